"""model.bin v3 in Python: the writer and reader (write -> read -> write byte for byte), the 4-bit
rounding's search and its GPTQ, calibration from a run's data, the header checks, `llama2zh export
--version 3`, and the quality the C engine gives on the demo model against its float32 checkpoint
(verify's passage and the real stories)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from llama2zh.calibrate import export_hessians, input_hessians
from llama2zh.checkpoint import load_checkpoint
from llama2zh.cli import main
from llama2zh.engine import CModel
from llama2zh.errors import UserError
from llama2zh.export import (
    V1_HEADER,
    _round_q4,
    default_group_size,
    quantize_q4,
    read_header,
    read_model_bin,
    v3_group_size,
    write_model_bin,
)
from llama2zh.verify import PASSAGE, log_softmax, subject_from_bin, verify
from llama2zh.vocab.export import load_sentencepiece
from tests.conftest import ROOT, random_model, shared_file
from tests.test_quant import GQA, UNTIED, VERIFY_SHAPE

# dim 6, hidden 10: the 4-bit groups are 2 values, the int8 embedding's too
SMALL = dict(dim=6, n_layers=1, n_heads=1, n_kv_heads=1, hidden_dim=10, vocab_size=7, max_seq_len=4)


@pytest.mark.parametrize("shape, group_size, embedding_bits, int8_layers", [
    (GQA, None, 8, None), (GQA, 32, 4, ()), (GQA, 32, 4, (1, 2)), (UNTIED, 16, 4, None), (UNTIED, None, 8, ()),
    (SMALL, None, 8, ()), (SMALL, 2, 4, ()),
])
def test_v3_write_read_write_is_byte_identical(tmp_path, shape, group_size, embedding_bits, int8_layers):
    model = random_model(seed=21, **shape)
    kwargs = dict(group_size=group_size, embedding_bits=embedding_bits, int8_layers=int8_layers)
    first = write_model_bin(model, tmp_path / "a.bin", 3, **kwargs)
    header = read_header(first)
    expected_group = v3_group_size(model.args) if group_size is None else group_size
    assert (header.version, header.group_size, header.embedding_bits) == (3, expected_group, embedding_bits)
    assert header.int8_layers == ((0,) if int8_layers is None else int8_layers)
    assert header.int8_group_size == (default_group_size(model.args) if embedding_bits == 8 or header.int8_layers
                                      else 0)
    second = write_model_bin(read_model_bin(first), tmp_path / "b.bin", 3, **kwargs)
    assert first.read_bytes() == second.read_bytes()


def test_a_one_layer_model_keeps_its_layer_4_bit_by_default(tmp_path):
    header = read_header(write_model_bin(random_model(seed=21, **SMALL), tmp_path / "a.bin", 3))
    assert header.int8_layers == ()


def test_trained_model_round_trips_byte_for_byte(tmp_path):
    """Trained weights (the demo's run): groups of every kind of spread, not only random ones."""
    if not (ROOT / "out/sample/ckpt.pt").exists():
        pytest.skip("needs `make demo`'s out/sample")
    model, _ = load_checkpoint(ROOT / "out/sample/ckpt.pt")
    first = write_model_bin(model, tmp_path / "a.bin", 3, embedding_bits=4)
    assert first.read_bytes() == write_model_bin(read_model_bin(first), tmp_path / "b.bin", 3,
                                                 embedding_bits=4).read_bytes()


def test_a_group_stores_its_extremes_as_0_and_15_and_beats_plain_min_max():
    w = torch.randn(4096, 32, generator=torch.Generator().manual_seed(5)) * 0.02
    w[::7, 3] *= 12  # outliers, which clipping is for
    values, scales, mins = quantize_q4(w, 32)
    values = values.reshape(-1, 32).float()
    assert torch.all(values.amin(1) == 0) and torch.all(values.amax(1) == 15)
    assert torch.all(values.gather(1, w.argmin(1, keepdim=True)) == 0)
    assert torch.all(values.gather(1, w.argmax(1, keepdim=True)) == 15)
    back = values * scales.float()[:, None] + mins.float()[:, None]
    error = (w - back).square().sum(1)
    plain_scale = ((w.amax(1) - w.amin(1)) / 15).half().float()
    _, plain_error = _round_q4(w, plain_scale, w.amin(1).half().float())
    assert torch.all(error <= plain_error)
    assert error.sum() < 0.9 * plain_error.sum()  # measured 0.81: the search pays where outliers stretch a group


def test_constant_groups_keep_their_value():
    w = torch.tensor([[0.25] * 16, [0.0] * 16, [-1.5] * 16])
    values, scales, mins = quantize_q4(w, 16)
    assert torch.all(values == 0) and torch.all(scales == 0)
    assert mins.tolist() == [0.25, 0.0, -1.5]


def correlated_inputs(n: int, width: int, seed: int) -> torch.Tensor:
    """Inputs whose features correlate, as a layer's do (GPTQ has nothing to exploit in white noise)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width // 4, generator=g) @ torch.randn(width // 4, width, generator=g) \
        + 0.1 * torch.randn(n, width, generator=g)


def dequantized(values, scales, mins, group_size: int) -> torch.Tensor:
    return values.reshape(-1, group_size).float() * scales.float()[:, None] + mins.float()[:, None]


def test_gptq_keeps_a_matrix_s_outputs_closer_than_rounding_to_nearest():
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(6)) * 0.05
    x = correlated_inputs(2048, 128, seed=7)
    errors = {}
    for name, hessian in (("nearest", None), ("gptq", x.T @ x)):
        values, scales, mins = quantize_q4(w, 16, hessian)
        grouped = values.reshape(-1, 16)
        assert torch.all(grouped.amin(1) == 0) and torch.all(grouped.amax(1) == 15)  # what round trips need
        errors[name] = (x @ (w - dequantized(values, scales, mins, 16).reshape(w.shape)).T).square().sum()
    assert errors["gptq"] < 0.4 * errors["nearest"]  # measured 0.18


def test_gptq_exports_round_trip_with_and_without_calibration(tmp_path):
    """Read back, a GPTQ export's weights are 4-bit already: rounding them again, to nearest or by GPTQ
    on the read model's own inputs, moves nothing."""
    model = random_model(seed=26, **GQA)
    tokens = torch.randint(0, GQA["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(8))
    first = write_model_bin(model, tmp_path / "a.bin", 3, hessians=input_hessians(model, tokens))
    assert first.read_bytes() != write_model_bin(model, tmp_path / "nearest.bin", 3).read_bytes()
    back = read_model_bin(first)
    assert first.read_bytes() == write_model_bin(back, tmp_path / "b.bin", 3).read_bytes()
    again = write_model_bin(back, tmp_path / "c.bin", 3, hessians=input_hessians(back, tokens))
    assert first.read_bytes() == again.read_bytes()


def test_input_hessians_sum_x_x_t_over_each_matrix_s_inputs():
    model = random_model(seed=27, **GQA)
    tokens = torch.randint(0, GQA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(9))
    hessians = input_hessians(model, tokens)
    seen = []
    layer = model.layers[1].feed_forward
    handle = layer.w2.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, 352)))
    with torch.inference_mode():
        model(tokens)
    handle.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(hessians[id(layer.w2.weight)], x.T @ x, rtol=1e-4, atol=1e-3)
    attention = model.layers[0].attention
    assert hessians[id(attention.wq.weight)] is hessians[id(attention.wk.weight)] is hessians[id(attention.wv.weight)]
    assert len({id(h) for h in hessians.values()}) == 4 * GQA["n_layers"]


def demo_run(name: str):
    if not (ROOT / name / "ckpt.pt").exists():
        pytest.skip(f"needs `make demo`'s {name}")
    return ROOT / name


def test_export_of_a_run_calibrates_on_its_training_data(tmp_path, monkeypatch, capsys):
    base, chat = demo_run("out/sample"), demo_run("out/sample-sft")
    monkeypatch.chdir(ROOT)  # the runs name their data relative to the repository
    assert main(["export", str(base), "--version", "3", "--out", str(tmp_path / "a.bin")]) == 0
    assert "int8 layers 0, GPTQ on 16,384 tokens of data/sample," in capsys.readouterr().out
    # the chat run's data are conversations: its base run's pretraining data calibrate it
    assert main(["export", str(chat), "--version", "3", "--out", str(tmp_path / "b.bin")]) == 0
    assert "GPTQ on 16,384 tokens of data/sample," in capsys.readouterr().out
    assert main(["export", str(base), "--version", "3", "--calibration", str(tmp_path), "--out",
                 str(tmp_path / "c.bin")]) == 1
    assert "no manifest.json" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # where the run's data cannot be found
    assert main(["export", str(base), "--version", "3", "--out", str(tmp_path / "d.bin")]) == 0
    out, err = capsys.readouterr()
    assert "4-bit rounding to nearest" in out and "names no pretokenized data that exists" in err


def test_weights_float16_cannot_hold_are_refused(tmp_path):
    model = random_model(seed=22, **GQA)
    with torch.no_grad():
        model.layers[1].attention.wq.weight[0, 0] = 1e6  # layer 0 is int8
    with pytest.raises(UserError, match="too large for float16"):
        write_model_bin(model, tmp_path / "m.bin", 3)


def v3_bytes(tmp_path, **kwargs) -> bytes:
    return write_model_bin(random_model(seed=23, **GQA), tmp_path / "m.bin", 3, **kwargs).read_bytes()


@pytest.mark.parametrize("edit, message", [
    (lambda b: b[:-1], "the header implies"),
    (lambda b: b[:37] + struct.pack("<i", 5) + b[41:], "4-bit group size 5 must be even"),
    (lambda b: b[:37] + struct.pack("<i", 6) + b[41:], "4-bit group size 6 must be even and divide dim 128"),
    (lambda b: b[:41] + bytes([5]) + b[42:], "embedding bits must be 4 or 8, got 5"),
    (lambda b: b[:42] + struct.pack("<i", 0) + b[46:], "int8 group size 0 does not divide dim"),
    (lambda b: b[:41] + bytes([4]) + b[42:46] + bytes(1) + b[47:], "int8 group size 32 with no int8 matrix"),
    (lambda b: b[:46] + bytes([9]) + b[47:], "layer 3 is marked int8, but the model has 3 layers"),
    (lambda b: b[:42] + struct.pack("<i", 64) + b[46:], "int8 group size 64 does not divide hidden_dim 352"),
])
def test_reader_rejects_damaged_v3_headers(tmp_path, edit, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(edit(v3_bytes(tmp_path, group_size=32, embedding_bits=8)))
    with pytest.raises(UserError, match=message):
        read_model_bin(path)


def test_header_fields_sit_after_v2_s_group_size_offset(tmp_path):
    data = v3_bytes(tmp_path, group_size=16, embedding_bits=8)
    assert V1_HEADER.size == 37 and struct.unpack_from("<iBi", data, 37) == (16, 8, 32)
    assert data[46] == 1 and not any(data[47:256])  # the int8 layers: bit 0, layer 0


def test_cli_exports_v3(tmp_path, capsys):
    v1 = write_model_bin(random_model(seed=24, **GQA), tmp_path / "m1.bin", 1)
    out = tmp_path / "m3.bin"
    assert main(["export", str(v1), "--version", "3", "--out", str(out)]) == 0
    assert ("version 3, group size 16, embedding int8, int8 layers 0, 4-bit rounding to nearest"
            in capsys.readouterr().out)
    assert main(["export", str(v1), "--version", "3", "--group-size", "32", "--embedding-bits", "4",
                 "--int8-layers", "none", "--out", str(out)]) == 0
    header = read_header(out)
    assert (header.group_size, header.embedding_bits, header.int8_group_size, header.int8_layers) == (32, 4, 0, ())
    assert main(["export", str(v1), "--version", "3", "--int8-layers", "2,1", "--out", str(out)]) == 0
    assert read_header(out).int8_layers == (1, 2)
    for bad in ("x", "1,", "-1"):
        assert main(["export", str(v1), "--version", "3", "--int8-layers", bad, "--out", str(out)]) == 2
        assert "--int8-layers" in capsys.readouterr().err
    assert main(["export", str(v1), "--version", "3", "--int8-layers", "3", "--out", str(out)]) == 1
    assert "layer 3 is marked int8, but the model has 3 layers" in capsys.readouterr().err
    assert main(["export", str(v1), "--version", "3", "--calibration", str(tmp_path), "--out", str(out)]) == 2
    assert "--calibration needs a run directory" in capsys.readouterr().err
    for flag in ("--int8-layers", "--calibration"):
        assert main(["export", str(v1), "--version", "2", flag, "none", "--out", str(out)]) == 2
        assert f"{flag} applies to --version 3 only" in capsys.readouterr().err
    assert main(["export", str(v1), "--version", "2", "--embedding-bits", "4", "--out", str(out)]) == 2
    assert "--embedding-bits applies to --version 3 only" in capsys.readouterr().err
    assert main(["export", str(v1), "--version", "3", "--group-size", "12", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().endswith("must be even and divide dim 128 and hidden_dim 352")


# ---- quality: the C engine on a v3 export of the demo model against its float32 checkpoint ----

def story_texts() -> list[str]:
    """verify's passage, then the first stories of each real sample in ../shared/data."""
    texts = [PASSAGE]
    for name, count in (("tinystories_en_sample.jsonl", 8), ("tinystories_zh_sample.jsonl", 8),
                        ("zh_literature.jsonl", 4)):
        with open(shared_file(f"data/{name}"), encoding="utf-8") as f:
            records = [json.loads(line) for line, _ in zip(f, range(count), strict=False)]
        texts += [r.get("story") or r["text"] for r in records]
    return texts


def agreement(model, cmodel: CModel, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per position: whether the top tokens agree, and KL(float32 || C)."""
    with torch.inference_mode():
        expected = log_softmax(model(torch.tensor([ids[:-1]]))[0].numpy())
    got = log_softmax(cmodel.prefill(ids[:-1]))
    return got.argmax(-1) == expected.argmax(-1), np.sum(np.exp(expected) * (expected - got), axis=-1)


def quality(model, path, sp) -> tuple[float, float, float, float]:
    """top-1 agreement and mean KL of the C engine on path against model: on the passage, then on all texts."""
    cmodel = CModel(path)
    same, kl = zip(*(agreement(model, cmodel, ([sp.bos_id()] + sp.encode(t))[: model.args.max_seq_len])
                     for t in story_texts()), strict=True)
    result = same[0].mean(), kl[0].mean(), np.concatenate(same).mean(), np.concatenate(kl).mean()
    print(f"{path.name}: passage top-1 {result[0]:.1%}, KL {result[1]:.4f}; all {sum(map(len, kl))} positions: "
          f"top-1 {result[2]:.1%}, KL {result[3]:.4f}")
    return result


def test_v3_quality_on_the_demo_model(tmp_path, monkeypatch):
    """The issue asks top-1 >= 95% and mean KL <= 0.02, which the defaults meet: measured 96.1% and 0.0045 on
    the passage, 96.3% and 0.0041 over all 4,436 positions (groups of 16, the embedding and the first layer
    int8, GPTQ on the run's data). Without the calibration the KL over all is 0.0074."""
    run = demo_run("out/sample")
    monkeypatch.chdir(ROOT)
    model, state = load_checkpoint(run / "ckpt.pt")
    sp, _ = load_sentencepiece(run / "tokenizer.model")
    hessians, _ = export_hessians(model, state, None)
    passage_top1, passage_kl, all_top1, all_kl = quality(model, write_model_bin(model, tmp_path / "v3.bin", 3,
                                                                                hessians=hessians), sp)
    assert passage_kl <= 0.02 and all_kl <= 0.02
    assert passage_top1 >= 0.95 and all_top1 >= 0.95
    assert all_kl < 0.8 * quality(model, write_model_bin(model, tmp_path / "nearest.bin", 3), sp)[3]


def test_verify_checks_a_v3_file_on_its_dequantized_weights(tmp_path, tokenizer_dirs, capsys):
    """A bare v3 .bin: the reference is its own dequantized weights, so quality measures the engine's
    activation rounding and kernels alone, which must pass; the report names the format."""
    model = random_model(seed=25, **VERIFY_SHAPE)
    path = write_model_bin(model, tmp_path / "m.bin", 3, group_size=32)
    checks = verify(subject_from_bin(path, tokenizer_dirs["llama2enzh"]))
    assert [c.name for c in checks] == ["quality", "tokens", "greedy", "text"]
    for check in checks:
        assert check.passed, check.line()
    assert main(["verify", str(path), "--tokenizer", str(tokenizer_dirs["llama2enzh"])]) == 0
    assert "model.bin v3, int4 (group size 32; embedding int8; int8 layers 0; int8 group size 32)" in \
        capsys.readouterr().out
