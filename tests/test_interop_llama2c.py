"""llama2.c's model.bin files: version 2 files whose quantization groups straddle rows (llama2.c's
export writes them) run in the C engine, and `import` makes a run directory of versions 0, 1 and 2."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from sentencepiece import sentencepiece_model_pb2 as pb
from torch import nn

from llama2zh.checkpoint import load_checkpoint
from llama2zh.cli import main
from llama2zh.engine import CModel, CTokenizer, EngineError, run_binary
from llama2zh.errors import UserError
from llama2zh.export import quantize_q80, read_header, read_model_bin, write_model_bin
from llama2zh.interop.llama2c import import_llama2c
from llama2zh.verify import run_verify
from tests.conftest import random_model, shared_file
from tests.test_quant import KERNELS, TOKENS, kernel_model, relative_max_diff

STORIES_V2 = "reference/stories260K_llama2c_v2.bin"  # group size 64: w2's rows of 172 straddle groups
# Kernels add in different orders, which can move an activation across a rounding boundary
# when it is quantized (see test_quant.TOLERANCE); the engine's arithmetic is otherwise exact.
TOLERANCE = 1e-2


def quantize_input(module: nn.Module, group_size: int) -> None:
    """module's input, from now on, rounded as quant.c's quantize_q8 rounds it: Q8_0 in groups of
    its last dimension's values (a rest that makes no whole group stays as it is)."""

    def hook(module, args):
        x = args[0]
        whole = x.shape[-1] // group_size * group_size
        groups = x[..., :whole].reshape(-1, group_size)
        scale = groups.abs().amax(dim=1, keepdim=True) / 127
        v = (groups * torch.where(scale > 0, 1 / scale, 0)).clamp(-127, 127)
        v = torch.trunc(v + torch.where(v >= 0, 0.5, -0.5))  # half away from zero
        return (torch.cat([(v * scale).reshape(*x.shape[:-1], whole), x[..., whole:]], dim=-1),)

    module.register_forward_pre_hook(hook)


def with_quantized_activations(model: nn.Module, group_size: int) -> nn.Module:
    """model computing as the C engine does on a v2 file: each matrix whose rows the groups fit
    takes its input quantized in those groups; the others (dequantized at load) in float32."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.in_features % group_size == 0:
            quantize_input(module, group_size)
    return model


def run_ids(model_bin, tokenizer_bin, steps: int = 300) -> list[int]:
    """The ids ./run prints greedily from BOS, with a tokenizer whose pieces are "[id]"."""
    out = subprocess.run([str(run_binary()), str(model_bin), "-z", str(tokenizer_bin), "-t", "0", "-n", str(steps),
                          "-i", ""], capture_output=True, check=True, timeout=120).stdout
    return [int(i) for i in re.findall(rb"\[(\d+)\]", out)]


def reference_ids(name: str) -> list[int]:
    return [int(x) for x in shared_file(f"reference/{name}").read_text().split()]


def pytorch_logits(model: nn.Module, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].numpy()


# ---- version 2 with groups straddling rows ----


@pytest.mark.parametrize("kernel", KERNELS)
def test_llama2c_v2_logits_are_pytorch_s_on_its_weights(monkeypatch, kernel):
    path = shared_file(STORIES_V2)
    got = kernel_model(monkeypatch, path, kernel).prefill(TOKENS)
    model = read_model_bin(path)
    plain = pytorch_logits(model, TOKENS)
    assert relative_max_diff(got, pytorch_logits(with_quantized_activations(model, 64), TOKENS)) < TOLERANCE
    # quantizing activations in groups of 64 moves this tiny model's logits by 5% of the largest
    assert relative_max_diff(got, plain) < 0.1 and np.all(got.argmax(1) == plain.argmax(1))


def test_llama2c_v2_generates_like_pytorch_on_its_weights():
    path = shared_file(STORIES_V2)
    ids = run_ids(path, shared_file("reference/idtok512.bin"))
    assert len(ids) == 300
    # where rounding the activations parts the texts is chance: after 22 tokens, 40 when
    # PyTorch rounds them too
    assert ids[:20] == read_model_bin(path).generate([1], 20, temperature=0.0)
    assert ids[:32] == with_quantized_activations(read_model_bin(path), 64).generate([1], 32, temperature=0.0)


def test_runq_drops_the_end_of_each_straddling_row():
    # what llama2.c's runq computes for w2 (rows of 172, groups of 64): per row, two chunks of
    # 64 values, each scaled by the scale of the group where the chunk starts; the last 44
    # values are never read. Those weights give runq's ids.
    path = shared_file(STORIES_V2)
    model, gs = read_model_bin(path), read_header(path).group_size
    d, n = model.args.dim, model.args.hidden_dim
    chunks = torch.arange(d)[:, None] * n + torch.arange(0, n - gs + 1, gs)  # where each starts, (d, 2)
    for layer in model.layers:
        w2 = layer.feed_forward.w2
        # the file's values and scales: re-quantizing what the reader gives is exact
        values, scales = quantize_q80(w2.weight, gs, rounding="llama2c")
        values = values.reshape(d, n).float()
        runq = torch.zeros(d, n)
        for c in range(chunks.shape[1]):
            runq[:, c * gs : (c + 1) * gs] = values[:, c * gs : (c + 1) * gs] * scales[chunks[:, c] // gs, None]
        w2.weight.data = runq
        quantize_input(w2, gs)  # its two whole groups: runq reads no more
    ids = with_quantized_activations(model, gs).generate([1], 60, temperature=0.0)
    expected = reference_ids("stories260K_llama2c_runq_greedy_ids.txt")
    assert ids[: len(expected) + 1] == expected + [1]  # runq stops when it samples BOS


# dim 12, hidden_dim 20, kv_dim 6: every matrix a whole number of groups of 6 or of 24, not every
# row. Group size 6: w2's rows straddle groups and the scales sit unaligned; 24: every matrix's
# rows do, and no activation is quantized.
STRADDLING = dict(dim=12, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=20, max_seq_len=32, vocab_size=20)


@pytest.mark.parametrize("group_size, shared", [(6, True), (6, False), (24, True), (24, False)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_straddling_groups_round_trip_and_run(monkeypatch, tmp_path, group_size, shared, kernel):
    model = random_model(seed=31, shared_classifier=shared, **STRADDLING)
    first = write_model_bin(model, tmp_path / "a.bin", 2, group_size)
    loaded = read_model_bin(first)
    for (name, w), (_, back) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        if not name.endswith("norm.weight"):  # groups over the flattened matrix
            assert (w - back).reshape(-1, group_size).abs().max() <= w.abs().max() / 127, name
    assert write_model_bin(loaded, tmp_path / "b.bin", 2, group_size).read_bytes() == first.read_bytes()
    tokens = [t % STRADDLING["vocab_size"] for t in TOKENS]
    got = kernel_model(monkeypatch, first, kernel).prefill(tokens)
    expected = pytorch_logits(with_quantized_activations(loaded, group_size), tokens)
    assert relative_max_diff(got, expected) < TOLERANCE


@pytest.mark.parametrize("group_size, message", [
    (0, "group size 0 must be positive"),
    (-64, "group size -64 must be positive"),
    (7, "group size 7 does not divide a weight matrix of 240 values"),
])
def test_c_loader_still_wants_whole_groups_in_each_matrix(tmp_path, group_size, message):
    path = write_model_bin(random_model(seed=32, **STRADDLING), tmp_path / "m.bin", 2, 6)
    data = bytearray(path.read_bytes())
    struct.pack_into("<i", data, 37, group_size)
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=message):
        CModel(path)


# ---- import ----


@pytest.fixture(scope="module")
def ids_tokenizer(tmp_path_factory):
    """A directory with a 512-piece tokenizer.model laid out as llama2.c's tok512 (<unk>, <s>,
    </s>, 256 byte pieces) whose other pieces are "[id]", so that printed text shows ids."""
    proto = pb.ModelProto()
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, 512, True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    Piece = pb.ModelProto.SentencePiece
    for text, kind in [("<unk>", Piece.UNKNOWN), ("<s>", Piece.CONTROL), ("</s>", Piece.CONTROL)]:
        proto.pieces.add(piece=text, score=0.0, type=kind)
    for b in range(256):
        proto.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=Piece.BYTE)
    for i in range(259, 512):
        proto.pieces.add(piece=f"[{i}]", score=-float(i), type=Piece.NORMAL)
    directory = tmp_path_factory.mktemp("ids512")
    (directory / "tokenizer.model").write_bytes(proto.SerializeToString())
    return directory


@pytest.mark.parametrize("source", ["models/stories260K.bin", "reference/stories260K_llama2c_v1.bin"])
def test_import_of_stories260K_gives_llama2c_s_greedy_ids(tmp_path, ids_tokenizer, source):
    model_bin = shared_file(source)
    out = import_llama2c(model_bin, ids_tokenizer, tmp_path / "run")
    expected = reference_ids("stories260K_greedy_ids.txt")
    assert run_ids(out / "model.bin", shared_file("reference/idtok512.bin")) == expected
    ctok = CTokenizer(out / "tokenizer.bin", vocab_size=512)
    assert CModel(out / "model.bin").generate(ctok, "", len(expected)) == expected
    _, state = load_checkpoint(out / "ckpt.pt")
    version = read_header(model_bin).version
    assert state["run_info"] == {"imported_from": str(model_bin), "format": f"llama2.c model.bin v{version}"}
    assert state["config"]["out_dir"] == str(tmp_path / "run") and state["config"]["tokenizer"] == str(ids_tokenizer)


def test_import_of_a_v2_file_dequantizes_it(tmp_path, ids_tokenizer, capsys):
    model_bin = shared_file(STORIES_V2)
    out = import_llama2c(model_bin, ids_tokenizer, tmp_path / "run")
    assert "int8 weights (group size 64) dequantized to float32" in capsys.readouterr().out
    model, state = load_checkpoint(out / "ckpt.pt")
    assert "dequantized to float32" in state["run_info"]["format"]
    for (name, a), (_, b) in zip(model.state_dict().items(), read_model_bin(model_bin).state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert read_header(out / "model.bin").version == 1
    expected = model.generate([1], 300)
    stop = expected.index(1) if 1 in expected else len(expected)  # ./run stops at BOS
    assert run_ids(out / "model.bin", shared_file("reference/idtok512.bin")) == expected[:stop]


def test_verify_accepts_an_imported_run(tmp_path, ids_tokenizer, capsys):
    out = import_llama2c(shared_file("models/stories260K.bin"), ids_tokenizer, tmp_path / "run")
    assert run_verify(out, None) == 0, capsys.readouterr().out


def test_cli_imports_a_model_bin(tmp_path, ids_tokenizer, capsys):
    source = shared_file("models/stories260K.bin")
    args = ["import", str(source), "--out", str(tmp_path / "run"), "--tokenizer", str(ids_tokenizer)]
    assert main(args) == 0
    assert "next: llama2zh verify" in capsys.readouterr().out
    assert main(args) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


def damaged(tmp_path, edit) -> Path:
    path = tmp_path / "m.bin"
    path.write_bytes(edit(shared_file("reference/stories260K_llama2c_v1.bin").read_bytes()))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda b: b[:4] + struct.pack("<i", 4) + b[8:], "unsupported model.bin version 4"),
    (lambda b: b[:4] + struct.pack("<i", 9) + b[8:], "unsupported model.bin version 9"),
    (lambda b: b[:-100], "the header implies"),
    (lambda b: b[:20], "truncated header"),
])
def test_import_refuses_what_is_not_a_llama2c_model_bin(tmp_path, ids_tokenizer, edit, message):
    with pytest.raises(UserError, match=message):
        import_llama2c(damaged(tmp_path, edit), ids_tokenizer, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_needs_the_model_s_tokenizer(tmp_path, tokenizer_dirs):
    model_bin = shared_file("models/stories260K.bin")
    with pytest.raises(UserError, match="no tokenizer.model"):
        import_llama2c(model_bin, tmp_path, tmp_path / "run")
    with pytest.raises(UserError, match="32000 pieces, but the model has vocab_size 512"):
        import_llama2c(model_bin, tokenizer_dirs["llama2en"], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_with_only_llama2c_s_tokenizer_bin_rebuilds_its_tokenizer_model(tmp_path, capsys):
    """llama2.c's own tokenizer.bin is all the tokenizer there is (as for adam89's tok5000.bin):
    import rebuilds tokenizer.model from it, and the run gives llama2.c's greedy ids."""
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.bin").write_bytes(shared_file("reference/idtok512.bin").read_bytes())
    out = import_llama2c(shared_file("models/stories260K.bin"), tokenizer_dir, tmp_path / "run")
    assert "rebuilt one from tokenizer.bin" in capsys.readouterr().out
    assert not (tokenizer_dir / "tokenizer.model").exists()  # the user's folder is left as it was
    expected = reference_ids("stories260K_greedy_ids.txt")
    ctok = CTokenizer(out / "tokenizer.bin", vocab_size=512)
    assert CModel(out / "model.bin").generate(ctok, "", len(expected)) == expected
    assert ctok.decode_bytes(expected[:3]) == b"".join(f"[{i}]".encode() for i in expected[:3])
