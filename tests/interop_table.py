"""Measures which tools load llama2zh's exports, and how closely each agrees with our PyTorch model.

`python -m tests.interop_table` (`make interop-table`) prints a markdown table for the README: one row
per model, one column per consumer of an export. Models:

- stories260K: llama2.c's model.bin (../shared/models) imported with `import_llama2c`, with the
  512-piece tokenizer in tok512's layout that tests/test_interop_llama2c.py builds (byte pieces, the
  rest named "[id]": text becomes byte-fallback ids);
- the demo runs out/sample-sft (chat-tuned; `make demo` makes it, required) and out/sample (when present);
- a random model of llama2.c's stories15M shape with the Llama 2 tokenizer, written as a run directory.

Each run is exported every way, into a temporary directory, and measured:

- transformers: the HF export loaded with AutoModelForCausalLM (fp32) and AutoTokenizer; its ids for a
  bilingual prompt (verify.PROMPT) against SentencePiece's, its logits against our Transformer's
  (max |diff| / max |logit| over the prompt), and greedy `generate(do_sample=False)` of 64 tokens
  against our `Transformer.generate` (end-of-text tokens not stopping either: 64 ids compared);
- llama.cpp f32: llama-completion (greedy, 2 threads) continuing a Chinese prompt, against the ids the
  C engine generates from model.bin v1 (what ./run prints), as tests/test_interop_gguf.py does;
- llama.cpp q8_0: top-1 agreement with the f32 GGUF (llama-perplexity --kl-divergence, "Same top p")
  over the second half of each 128-token chunk of real stories;
- Ollama: the Modelfile export_gguf writes, parsed as Ollama parses it; Ollama itself is not installed;
- ./run: model.bin v1 in the C engine: `llama2zh verify`'s checks, and the same logits measure as for
  transformers.

A measurement that cannot be made says why in its cell. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llama2zh import verify
from llama2zh.checkpoint import load_checkpoint
from llama2zh.engine import CModel, CTokenizer
from llama2zh.export import write_model_bin
from llama2zh.interop import llamacpp
from llama2zh.interop.gguf import MODELFILE, export_gguf
from llama2zh.interop.hf import export_hf
from llama2zh.interop.llama2c import import_llama2c
from llama2zh.rundir import config_for, write_run_dir
from llama2zh.vocab.export import export_tokenizer, load_sentencepiece
from tests.conftest import ROOT, SHARED, random_model
from tests.test_interop_gguf import PROMPT as ZH_PROMPT
from tests.test_interop_gguf import llamacpp_ids, parse_modelfile, tool, until_stop
from tests.test_interop_llama2c import ids_tokenizer
from tests.test_quant import relative_max_diff

NEW_TOKENS = 64
PPL_CTX, PPL_CHUNKS = 128, 8  # llama-perplexity scores positions 64..126 of each chunk: 8 x 63 = 504
STORIES = 40  # stories of each text file, more than 8 x 128 tokens in every vocabulary here
# llama2.c's stories15M (tinyllamas registry): tied classifier, Llama 2's 32000 pieces
SHAPE_15M = dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, max_seq_len=256,
                 vocab_size=32000, shared_classifier=True)
START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:5.0f}s] {message}", file=sys.stderr, flush=True)


def attempt(measure, *args) -> str:
    """measure(*args), or a cell saying how it failed (the last line of the error, which names the cause)."""
    try:
        return measure(*args)
    except Exception as e:  # noqa: BLE001 (every failure is a result here)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        log(f"  failed: {type(e).__name__}: {lines[-1]}")
        return f"**fails**: {type(e).__name__}: {lines[-1][:100]}".replace("|", "\\|")  # a markdown cell


def agreement(ours: list[int], theirs: list[int]) -> str:
    """'k/64': how many leading ids agree; stops before 64 are stated."""
    same = verify.first_difference(ours, theirs)
    if ours == theirs and len(ours) < NEW_TOKENS:
        return f"{same}/{same} (both stop there, at BOS/EOS)"
    return f"{same}/{NEW_TOKENS}" + ("" if max(len(ours), len(theirs)) >= NEW_TOKENS else
                                     f" (lengths {len(ours)} and {len(theirs)})")


# ---- the models, each a run directory (ckpt.pt, tokenizer.model) and the text its q8_0 check reads ----


class TmpDirs:
    """What ids_tokenizer needs of pytest's tmp_path_factory: fresh directories."""

    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))


def stories(path: Path) -> list[str]:
    """The "story" of each record of a .jsonl file or a JSON list."""
    text = path.read_text(encoding="utf-8")
    records = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]
    return [r["story"] for r in records[:STORIES]]


def shared_text() -> tuple[str, str]:
    """Chinese and English stories from ../shared/data, and where they come from."""
    files = [SHARED / "data" / "tinystories_zh_sample.jsonl", SHARED / "data" / "tinystories_en_sample.jsonl"]
    zh, en = (stories(f) for f in files)
    return "\n".join(zh + en), f"{len(zh)} stories of ../shared/data/{files[0].name}, then {len(en)} of {files[1].name}"


def demo_text() -> tuple[str, str] | None:
    corpus = sorted((ROOT / "data" / "sample").glob("data*.json"))
    if not corpus:
        return None
    own = stories(corpus[-1])
    return "\n".join(own), f"the first {len(own)} stories of data/sample/{corpus[-1].name}"


def models(work: Path) -> list[dict]:
    """name, description, run directory, perplexity text (and where it comes from) of each model."""
    demo = [run for run in (ROOT / "out" / "sample-sft", ROOT / "out" / "sample")
            if (run / "ckpt.pt").is_file() and (run / "tokenizer.model").is_file()]
    if not demo or demo[0].name != "sample-sft":
        raise SystemExit("interop table: out/sample-sft (the demo's chat model) is missing: run make demo first")
    own = demo_text() or shared_text()

    log("stories260K: importing ../shared/models/stories260K.bin")
    tokenizer_dir = ids_tokenizer.__wrapped__(TmpDirs(work))  # the pytest fixture's own function
    stories260k = import_llama2c(SHARED / "models" / "stories260K.bin", tokenizer_dir, work / "stories260K")

    log("random 15M: writing a run directory")
    model = random_model(0, **SHAPE_15M)
    tokenizer = SHARED / "tokenizers" / "llama2en" / "tokenizer.model"
    random_dir = work / "random15M"
    write_run_dir(random_dir, model, tokenizer, config_for(model, out_dir=str(random_dir),
                                                           tokenizer=str(tokenizer.parent)))
    return [
        {"name": "stories260K", "what": "llama2.c model.bin, imported; tok512-layout tokenizer",
         "run": stories260k, "text": shared_text()},
        {"name": "sample-sft", "what": "demo, chat-tuned", "run": demo[0], "text": own},
        *[{"name": "sample", "what": "demo, pretrained", "run": run, "text": own} for run in demo[1:]],
        {"name": "random 15M", "what": "random weights, stories15M shape; Llama 2 tokenizer",
         "run": random_dir, "text": shared_text(), "random": True},
    ]


# ---- the measurements ----


def measure_transformers(run: Path, out: Path, model, ids: list[int]) -> str:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hf_dir = export_hf(run, out / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok_ids = transformers.AutoTokenizer.from_pretrained(hf_dir).encode(verify.PROMPT)
    tokens = "tokenizer ids = SentencePiece" if tok_ids == ids else \
        f"tokenizer ids differ at {verify.first_difference(tok_ids, ids)}"
    with torch.no_grad():
        expected, got = model(torch.tensor([ids]))[0], hf(torch.tensor([ids])).logits[0]
        # no end-of-text id stops either generation: 64 ids each
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()
    ours = model.generate(ids, NEW_TOKENS, temperature=0.0)
    diff = relative_max_diff(got.numpy(), expected.numpy())
    return f"loads; {tokens}; rel. logit diff {diff:.1e}; greedy {agreement(ours, theirs)}"


def measure_llamacpp_f32(bin_dir: Path, gguf_file: Path, sp, model_bin: Path, tokenizer_bin: Path) -> str:
    prompt = [sp.bos_id(), *sp.encode(ZH_PROMPT)]
    ids = llamacpp_ids(bin_dir, gguf_file, "-p", ZH_PROMPT, "-n", NEW_TOKENS, "-no-cnv")
    tokens = "prompt ids = SentencePiece" if ids[:len(prompt)] == prompt else "**prompt ids differ**"
    # ./run -n counts positions: the last prompt position yields the first new id
    ours = CModel(model_bin).generate(CTokenizer(tokenizer_bin), ZH_PROMPT, len(prompt) + NEW_TOKENS - 1)
    theirs = until_stop(ids[len(prompt):], (sp.bos_id(), sp.eos_id()))
    return f"loads; {tokens}; greedy = ./run {agreement(ours, theirs)}"


def measure_q8_0(bin_dir: Path, f32: Path, q8_0: Path, text: str, work: Path) -> str:
    (work / "text.txt").write_text(text, encoding="utf-8")
    common = ["-f", work / "text.txt", "-c", PPL_CTX, "--chunks", PPL_CHUNKS, "-b", PPL_CTX, "-t", 2,
              "--kl-divergence-base", work / "f32.kld"]
    tool(bin_dir, "llama-perplexity", "-m", f32, *common)
    for _ in range(3):  # llama.cpp's log thread now and then loses the last lines at exit (see the test)
        result = tool(bin_dir, "llama-perplexity", "-m", q8_0, *common, "--kl-divergence")
        output = (result.stdout + result.stderr).decode(errors="replace")
        same, chunks = re.search(r"Same top p:\s*([\d.]+)", output), re.search(r"over (\d+) chunks, n_ctx=(\d+)",
                                                                               output)
        if same and chunks:
            break
    else:
        raise RuntimeError("llama-perplexity printed no 'Same top p' line in 3 runs")
    n_chunks, n_ctx = map(int, chunks.groups())
    positions = n_chunks * (n_ctx - 1 - n_ctx // 2)
    return f"loads; top-1 = f32 at {float(same.group(1)):.1f}% of {positions} positions"


def measure_modelfile(gguf_file: Path) -> str:
    commands = parse_modelfile((gguf_file.parent / MODELFILE).read_text(encoding="utf-8"))
    first = dict(reversed(commands))  # the first argument of each instruction
    chat = "im_start" in first["TEMPLATE"]
    stops = [a.split(None, 1)[1] for name, a in commands if name == "PARAMETER" and a.startswith("stop ")]
    what = "ChatML template" if chat else "plain template"
    what += "".join(f", stop {s}" for s in stops).replace("|", "\\|")  # a markdown cell
    return f"written, not run (Ollama is not installed here): FROM {first['FROM']}, {what}"


def measure_run(subject: verify.Subject, ids: list[int]) -> str:
    checks = verify.verify(subject)
    passed = sum(c.passed for c in checks)
    failed = [c.name for c in checks if not c.passed]
    cmodel = CModel(subject.model_bin)
    with torch.no_grad():
        expected = subject.model(torch.tensor([ids]))[0].numpy()
    got = np.stack([cmodel.forward(token, pos) for pos, token in enumerate(ids)])  # as verify's logits check
    return (f"verify {passed}/{len(checks)} pass{' (fails: ' + ', '.join(failed) + ')' if failed else ''}; "
            f"rel. logit diff {relative_max_diff(got, expected):.1e}")


def random_model_traits(model, ids: list[int]) -> str:
    """How an untrained tied model behaves: its top-1 is often the input id itself, its greedy text one id."""
    with torch.no_grad():
        top1 = model(torch.tensor([ids]))[0].argmax(-1).tolist()
    echoed = sum(t == i for t, i in zip(top1, ids, strict=True))
    distinct = len(set(model.generate(ids, NEW_TOKENS, temperature=0.0)))
    return (f"its top-1 is the input id itself at {echoed} of the prompt's {len(ids)} positions, and its "
            f"{NEW_TOKENS} greedy ids hold {distinct} distinct id{'s' if distinct > 1 else ''}")


def measure(entry: dict, work: Path, bin_dir: Path | None, llamacpp_error: str) -> dict[str, str]:
    """Every export of one run, and a cell per consumer."""
    run, name = entry["run"], entry["name"]
    out = work / "exports" / name.replace(" ", "-")
    out.mkdir(parents=True)
    model, _ = load_checkpoint(run / "ckpt.pt")
    model.eval()
    sp, _ = load_sentencepiece(run / "tokenizer.model")
    ids = [sp.bos_id(), *sp.encode(verify.PROMPT)]
    a = model.args
    entry["shape"] = (f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, dim {a.dim}, "
                      f"{a.n_layers} layers, vocab {a.vocab_size}")
    entry["prompt_ids"] = len(ids)
    if entry.get("random"):  # what makes its agreement easy: see the notes
        entry["random"] = random_model_traits(model, ids)
    cells = {}

    log(f"{name}: transformers")
    cells["transformers"] = attempt(measure_transformers, run, out, model, ids)

    log(f"{name}: model.bin v1, GGUF f32 and q8_0")
    model_bin, tokenizer_bin = write_model_bin(model, out / "model.bin", version=1), out / "tokenizer.bin"
    export_tokenizer(run / "tokenizer.model", tokenizer_bin)
    f32 = export_gguf(run, out / "f32" / "model.gguf", "f32")
    q8_0 = export_gguf(run, out / "q8_0" / "model.gguf", "q8_0")
    if bin_dir is None:
        cells["f32"] = cells["q8_0"] = f"not measured: {llamacpp_error}"
    else:
        log(f"{name}: llama.cpp f32 greedy")
        cells["f32"] = attempt(measure_llamacpp_f32, bin_dir, f32, sp, model_bin, tokenizer_bin)
        log(f"{name}: llama.cpp q8_0 vs f32 (llama-perplexity)")
        cells["q8_0"] = attempt(measure_q8_0, bin_dir, f32, q8_0, entry["text"][0], out)
    cells["ollama"] = attempt(measure_modelfile, f32)

    log(f"{name}: ./run (llama2zh verify)")
    subject = verify.Subject(model_bin, model, run / "tokenizer.model", tokenizer_bin)
    cells["run"] = attempt(measure_run, subject, ids)
    return cells


def main() -> int:
    torch.manual_seed(0)
    try:
        bin_dir, llamacpp_error = llamacpp.build(), ""
    except Exception as e:  # noqa: BLE001
        bin_dir, llamacpp_error = None, f"llama.cpp {llamacpp.VERSION} could not be built ({e})"
    with tempfile.TemporaryDirectory(prefix="interop-table-") as tmp:
        work = Path(tmp)
        entries = models(work)
        rows = [(entry, measure(entry, work, bin_dir, llamacpp_error)) for entry in entries]

    columns = [("transformers", "transformers (HF export, fp32)"), ("f32", "llama.cpp (GGUF f32)"),
               ("q8_0", "llama.cpp (GGUF q8_0)"), ("ollama", "Ollama (Modelfile)"), ("run", "./run (model.bin v1)")]
    print("| model | " + " | ".join(title for _, title in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for entry, cells in rows:
        model = f"**{entry['name']}** ({entry['what']}; {entry['shape']})"
        print(f"| {model} | " + " | ".join(cells[key] for key, _ in columns) + " |")

    import transformers

    prompt_ids = ", ".join(f"{entry['name']} {entry['prompt_ids']}" for entry, _ in rows)
    texts = {}  # text -> the models that read it
    for entry, _ in rows:
        texts.setdefault(entry["text"][1], []).append(entry["name"])
    print()
    print(f"Measured by `make interop-table` (tests/interop_table.py) in {time.monotonic() - START:.0f} s; "
          f"llama.cpp {llamacpp.VERSION} (llama-cpp-python's vendored copy), transformers {transformers.__version__}, "
          f"torch {torch.__version__}, CPU.")
    print(f"- rel. logit diff: max |logit difference| / max |logit| against our PyTorch model over the bilingual "
          f"prompt {verify.PROMPT!r} (ids with BOS: {prompt_ids}).")
    print(f"- greedy k/{NEW_TOKENS}: how many of {NEW_TOKENS} greedily generated ids agree before the first "
          f"difference; transformers: `generate(do_sample=False)` after the bilingual prompt vs our "
          f"`Transformer.generate`, neither stopping at EOS; llama.cpp f32: llama-completion `--temp 0` after "
          f"{ZH_PROMPT!r} vs the C engine's ids for `./run -t 0`, llama.cpp's compared up to the first BOS or EOS, "
          f"where ./run stops.")
    print(f'- q8_0 top-1: llama-perplexity --kl-divergence "Same top p" against the f32 GGUF, -c {PPL_CTX}, '
          f"{PPL_CHUNKS} chunks (each chunk's second half is scored); text: "
          + "; ".join(f"{', '.join(names)}: {text}" for text, names in texts.items()) + ".")
    print("- ./run: `llama2zh verify`'s checks (logits, tokens, 200-token greedy, ./run's text; chat render and "
          "reply for chat tokenizers) on a model.bin v1 written from the checkpoint.")
    print("- stories260K's tokenizer is the tok512-layout stand-in of tests/test_interop_llama2c.py (llama2.c's "
          "tok512.model is not in ../shared, and the hub is out of reach here): its merged pieces are named "
          "\"[id]\", so all text becomes byte-fallback ids, which is not the text the model was trained on; "
          "agreement is measured all the same.")
    for entry, _ in rows:
        if entry.get("random"):
            print(f"- {entry['name']}: random weights (tests.conftest.random_model, seed 0), classifier tied to the "
                  f"embedding as in stories15M and not scaled: {entry['random']}. So its greedy and top-1 agreement "
                  "show the same function computed, not close calls decided alike.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
