"""GGUF export: the file reads back as written, and llama.cpp itself (pinned, built by
llama2zh/interop/llamacpp.py) runs it as the C engine runs model.bin: same tokenization, same greedy ids,
the chat template rendered by llama.cpp into chat.py's ids, q8_0 and q4_0 close to f32.

Models: a random one (classifier scaled so the greedy choice never hangs on a float rounding)
with a tokenizer trained here, and the demo runs out/sample and out/sample-sft when `make demo`
has made them (a random model's text is noise; a trained one's is the case users have).
Ollama is not available here: the Modelfile is checked as Ollama parses it, line by line.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llama2zh import chat
from llama2zh.checkpoint import load_checkpoint, save_checkpoint
from llama2zh.engine import CModel, CTokenizer, run_binary
from llama2zh.errors import UserError
from llama2zh.export import write_model_bin
from llama2zh.interop import llamacpp as llamacpp_build
from llama2zh.interop.gguf import MODELFILE, OLLAMA_TEMPLATE, export_gguf, read_gguf, tensor_names
from llama2zh.vocab.export import export_tokenizer, load_sentencepiece
from tests.conftest import ROOT, random_model
from tests.test_chat_engine import trained

PROMPT = "从前，有一个小女孩"
TEXTS = [PROMPT, "Once upon a time, 莉莉 said: “Hi!”  Two  spaces.", "小狗🐶和3只鸟"]  # a byte-fallback emoji
NEW_TOKENS = 64
SYSTEM, USER = "你是一个乐于助人的助手。", "讲一个关于小猫的故事。"
SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=128, shared_classifier=False)
TIMEOUT = 300


@pytest.fixture(scope="session")
def llamacpp() -> Path:
    """The portable llama.cpp's bin directory; a skip only when it cannot be built here."""
    try:
        return llamacpp_build.build()
    except RuntimeError as e:
        pytest.skip(f"llama.cpp {llamacpp_build.VERSION} (llama-cpp-python sdist) could not be built: {e}")


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> Path:
    """A chat run directory (stage sft) holding a random GQA model with its own classifier."""
    run = tmp_path_factory.mktemp("random")
    (run / "tokenizer.model").write_bytes(trained(tmp_path_factory.mktemp("tok"))[1])
    sp, _ = load_sentencepiece(run / "tokenizer.model")
    model = random_model(0, vocab_size=sp.get_piece_size(), **SHAPE)
    with torch.no_grad():  # logits of std ~5 instead of ~0.2: top-2 margins far above float error
        model.output.weight.mul_(30)
    save_checkpoint(run / "ckpt.pt", model, config={}, tokenizer_sha256="", run_info={"stage": "sft"})
    return run


def demo_run(name: str) -> Path:
    run = ROOT / "out" / name
    if not (run / "ckpt.pt").exists() or not (run / "tokenizer.model").exists():
        pytest.skip(f"{run} is absent: run make demo")
    return run


RUNS = {"random": lambda request: request.getfixturevalue("random_run"),
        "sample": lambda request: demo_run("sample"), "sample-sft": lambda request: demo_run("sample-sft")}


def export_run(run: Path, out: Path) -> dict:
    """A run exported every way: GGUF f32, q8_0 and q4_0, and model.bin + tokenizer.bin for ./run."""
    model_bin, tokenizer_bin = out / "model.bin", out / "tokenizer.bin"
    write_model_bin(load_checkpoint(run / "ckpt.pt")[0], model_bin, version=1)
    export_tokenizer(run / "tokenizer.model", tokenizer_bin)
    return {"run": run, "sp": load_sentencepiece(run / "tokenizer.model")[0], "model_bin": model_bin,
            "tokenizer_bin": tokenizer_bin, "f32": export_gguf(run, out / "f32" / "model.gguf"),
            **{qtype: export_gguf(run, out / qtype / "model.gguf", qtype) for qtype in ("q8_0", "q4_0")}}


@pytest.fixture(scope="module", params=list(RUNS))
def exported(request, tmp_path_factory) -> dict:
    return export_run(RUNS[request.param](request), tmp_path_factory.mktemp(request.param))


def tool(bin_dir: Path, name: str, *args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """A llama.cpp tool run on 2 threads; its log on failure."""
    result = subprocess.run([str(bin_dir / name), *map(str, args)], input=stdin, capture_output=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    return result


def llamacpp_ids(bin_dir: Path, gguf_file: Path, *args) -> list[int]:
    """The ids llama-completion fed and generated (greedy), from the session file it saves at the end."""
    session = gguf_file.parent / "session.bin"
    session.unlink(missing_ok=True)
    tool(bin_dir, "llama-completion", "-m", gguf_file, "--temp", 0, "-t", 2, "--no-warmup",
         "--prompt-cache", session, "--prompt-cache-all", *args)
    data = session.read_bytes()
    magic, _, count = struct.unpack_from("<3I", data)
    assert magic == 0x6767736E  # "ggsn"
    return np.frombuffer(data, "<i4", count, 12).tolist()


def until_stop(ids: list[int], stop: tuple[int, ...]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in stop), ids)


# ---- the file itself ----


# q4_0: half a step of the block's largest / 8, or a whole step where the largest's opposite is clipped at +7
@pytest.mark.parametrize("qtype, tolerance", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 2e-2), ("q4_0", 0.13)])
def test_gguf_reads_back_the_tensors_and_vocab(random_run, tmp_path, qtype, tolerance):
    path = export_gguf(random_run, tmp_path / "m.gguf", qtype)
    fields, tensors = read_gguf(path)
    model, _ = load_checkpoint(random_run / "ckpt.pt")
    state = model.state_dict()
    names = tensor_names(state, shared=False)
    assert sorted(tensors) == sorted(names.values()) and "output.weight" in tensors
    for key, name in names.items():
        want = state[key].numpy()
        assert tensors[name].shape == want.shape, name
        if tolerance == 0.0 or want.ndim == 1:  # norms are float32 in every type
            np.testing.assert_array_equal(tensors[name], want, err_msg=name)
        else:  # relative to each row's largest weight, the scale the blocks quantize with at most
            err = np.abs(tensors[name] - want) / np.abs(want).max(axis=-1, keepdims=True)
            assert err.max() <= tolerance, name

    sp, proto = load_sentencepiece(random_run / "tokenizer.model")
    assert fields["general.architecture"] == "llama"
    assert fields["llama.context_length"] == SHAPE["max_seq_len"] and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.tokens"] == [p.piece for p in proto.pieces]
    scores = np.float32([p.score for p in proto.pieces])
    np.testing.assert_array_equal(np.float32(fields["tokenizer.ggml.scores"]), scores)
    assert fields["tokenizer.ggml.token_type"] == [p.type for p in proto.pieces]
    assert {1, 2, 3, 6} <= set(fields["tokenizer.ggml.token_type"])  # normal, unknown, control, byte
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.chat_template"] == chat.JINJA_TEMPLATE
    assert fields["tokenizer.ggml.eot_token_id"] == chat.chat_piece_ids(sp)[1]


def test_shared_classifier_is_left_to_llama_cpp_to_tie(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.model").write_bytes(trained(tmp_path)[0])
    sp, _ = load_sentencepiece(run / "tokenizer.model")
    model = random_model(1, vocab_size=sp.get_piece_size(), **{**SHAPE, "shared_classifier": True})
    save_checkpoint(run / "ckpt.pt", model, config={}, tokenizer_sha256="", run_info={"stage": "pretrain"})
    fields, tensors = read_gguf(export_gguf(run, tmp_path / "m.gguf"))
    assert "output.weight" not in tensors and "tokenizer.chat_template" not in fields
    assert (tmp_path / MODELFILE).read_text().splitlines()[1] == 'TEMPLATE """{{ .Prompt }}"""'


def test_q4_0_types_and_the_f16_fallback(tmp_path):
    """Matrices in q4_0, norms in float32, the classifier in q8_0, and a matrix whose rows (of 80)
    q4_0's blocks of 32 do not cover in float16."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.model").write_bytes(trained(tmp_path)[0])
    sp, _ = load_sentencepiece(run / "tokenizer.model")
    model = random_model(2, vocab_size=sp.get_piece_size(), **{**SHAPE, "hidden_dim": 80})
    save_checkpoint(run / "ckpt.pt", model, config={}, tokenizer_sha256="", run_info={"stage": "pretrain"})
    reader = gguf.GGUFReader(export_gguf(run, tmp_path / "m.gguf", "q4_0"))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    Q = gguf.GGMLQuantizationType
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds.pop("output.weight") == Q.Q8_0
    for name, kind in kinds.items():
        assert kind == (Q.F32 if "norm" in name else Q.F16 if "ffn_down" in name else Q.Q4_0), name


def test_bad_input_is_one_line(random_run, tmp_path):
    with pytest.raises(UserError, match="unknown GGUF type 'q4'"):
        export_gguf(random_run, tmp_path / "m.gguf", "q4")
    with pytest.raises(UserError, match="no such checkpoint"):
        export_gguf(tmp_path, tmp_path / "m.gguf")
    (tmp_path / "ckpt.pt").write_bytes((random_run / "ckpt.pt").read_bytes())
    (tmp_path / "tokenizer.model").write_bytes(trained(tmp_path)[0])  # without the 2 chat pieces
    with pytest.raises(UserError, match=r"tokenizer.model has \d+ pieces, the model \d+ ids") as e:
        export_gguf(tmp_path, tmp_path / "m.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs as Ollama's parser reads them: one instruction a line, an
    argument in \"\"\" quotes may span lines, a "quoted" one is unquoted."""
    commands = []
    for match in re.finditer(r'^(\w+)[ \t]+("""(.*?)"""|.*?)[ \t]*$', text, re.M | re.S):
        name, argument = match.group(1).upper(), match.group(3) if match.group(3) is not None else match.group(2)
        if name == "PARAMETER":
            key, value = argument.split(None, 1)
            value = json.loads(value) if value.startswith('"') else value
            commands.append((name, f"{key} {value}"))
        else:
            commands.append((name, argument))
    return commands


def test_modelfile_as_ollama_reads_it(random_run, tmp_path):
    path = export_gguf(random_run, tmp_path / "tiny.gguf")
    text = (tmp_path / MODELFILE).read_text(encoding="utf-8")
    commands = parse_modelfile(text)
    assert commands == [("FROM", "./tiny.gguf"), ("TEMPLATE", OLLAMA_TEMPLATE), ("PARAMETER", "stop <|im_end|>"),
                        ("PARAMETER", "temperature 0.8"), ("PARAMETER", "top_p 0.9"),
                        ("PARAMETER", f"num_ctx {SHAPE['max_seq_len']}")]
    assert (tmp_path / commands[0][1]).resolve() == path.resolve()
    assert sum(len(a.splitlines()) or 1 for _, a in commands) == len(text.splitlines())  # nothing unparsed


# ---- llama.cpp runs it ----


def test_llamacpp_tokenizes_as_sentencepiece(llamacpp, exported):
    sp = exported["sp"]
    for text in TEXTS:
        out = tool(llamacpp, "llama-tokenize", "-m", exported["f32"], "--stdin", "--no-escape", "--ids",
                   "--log-disable", stdin=text.encode()).stdout
        assert json.loads(out.decode().strip().splitlines()[-1]) == [sp.bos_id(), *sp.encode(text)], text


def test_llamacpp_greedy_equals_run(llamacpp, exported):
    sp, ct = exported["sp"], CTokenizer(exported["tokenizer_bin"])
    prompt = [sp.bos_id(), *sp.encode(PROMPT)]
    ids = llamacpp_ids(llamacpp, exported["f32"], "-p", PROMPT, "-n", NEW_TOKENS, "-no-cnv")
    assert ids[:len(prompt)] == prompt
    steps = len(prompt) + NEW_TOKENS - 1  # ./run counts positions; the last prompt one yields the first new id
    ours = CModel(exported["model_bin"]).generate(ct, PROMPT, steps, temperature=0.0)
    theirs = until_stop(ids[len(prompt):], (sp.bos_id(), sp.eos_id()))
    assert theirs == ours and len(ours) > NEW_TOKENS // 2
    result = subprocess.run([str(run_binary()), str(exported["model_bin"]), "-k", str(exported["tokenizer_bin"]),
                             "-i", PROMPT, "-t", "0", "-n", str(steps)],
                            capture_output=True, timeout=TIMEOUT)
    assert result.returncode == 0 and result.stdout == ct.decode_bytes(prompt + theirs) + b"\n"


@pytest.mark.parametrize("name", ["random", "sample-sft"])  # the chat runs
def test_llamacpp_chat_mode_renders_and_replies_as_run(llamacpp, request, tmp_path, name):
    exported = export_run(RUNS[name](request), tmp_path)
    sp = exported["sp"]
    assert "tokenizer.chat_template" in read_gguf(exported["f32"])[0]
    im_end = chat.chat_piece_ids(sp)[1]
    ids = llamacpp_ids(llamacpp, exported["f32"], "-cnv", "--jinja", "-st", "-sys", SYSTEM, "-p", USER,
                       "-n", NEW_TOKENS)
    prompt = chat.render_ids(sp, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}])
    assert ids[:len(prompt)] == prompt  # llama.cpp's own template rendering and tokenization
    reply = until_stop(ids[len(prompt):], (im_end, sp.eos_id(), sp.bos_id()))
    result = subprocess.run([str(run_binary()), str(exported["model_bin"]), "-k", str(exported["tokenizer_bin"]),
                             "-m", "chat", "-t", "0", "-n", str(NEW_TOKENS), "-y", SYSTEM],
                            input=(USER + "\n").encode(), capture_output=True, timeout=TIMEOUT)
    assert result.returncode == 0 and reply
    assert result.stdout == sp.decode(reply).encode() + b"\n"


def test_q8_0_equals_llama_quantize(llamacpp, exported, tmp_path):
    tool(llamacpp, "llama-quantize", exported["f32"], tmp_path / "theirs.gguf", "q8_0", 1)
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    ours = gguf.GGUFReader(exported["q8_0"]).tensors
    assert sorted(theirs) == sorted(t.name for t in ours)
    for t in ours:  # same types (norms F32), same blocks to the byte
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        assert bytes(t.data) == bytes(theirs[t.name].data), t.name


@pytest.mark.parametrize("qtype, min_same_top", [("q8_0", 98.0), ("q4_0", 93.0)])  # measured 99.8%, 95.8%
def test_quantized_agrees_with_f32(llamacpp, tmp_path, qtype, min_same_top):
    """Top-1 agreement over 8 x 63 = 504 positions (each 128-token chunk's second half) of the demo's
    own stories, by the pretrained demo model: on text the model knows its choices are clear, so what
    differs is quantization."""
    exported = export_run(demo_run("sample"), tmp_path)
    corpus = sorted((ROOT / "data" / "sample").glob("data*.json"))
    if not corpus:
        pytest.skip("data/sample is absent: run make demo")
    stories = [s["story"] for s in json.loads(corpus[-1].read_text(encoding="utf-8"))[:40]]
    (tmp_path / "text.txt").write_text("\n".join(stories), encoding="utf-8")
    common = ["-f", tmp_path / "text.txt", "-c", 128, "--chunks", 8, "-b", 128, "-t", 2,
              "--kl-divergence-base", tmp_path / "f32.kld"]
    tool(llamacpp, "llama-perplexity", "-m", exported["f32"], *common)
    for _ in range(3):  # llama.cpp's log thread now and then loses the last lines at exit: run again
        result = tool(llamacpp, "llama-perplexity", "-m", exported[qtype], *common, "--kl-divergence")
        log = (result.stdout + result.stderr).decode(errors="replace")
        if found := re.search(r"Same top p:\s*([\d.]+)", log):
            break
    assert found, log[-2000:]
    same_top = float(found.group(1))
    print(f"{qtype} vs f32 top-1 agreement: {same_top:.2f}% over 504 positions")
    assert same_top >= min_same_top, log[-2000:]
