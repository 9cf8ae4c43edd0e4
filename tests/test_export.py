"""model.bin writers and readers: byte-exact round trips, upstream llama2.c files, bad files."""

from __future__ import annotations

import struct

import pytest
import torch

from llama2zh.cli import main
from llama2zh.errors import UserError
from llama2zh.export import read_header, read_model_bin, write_model_bin
from tests.conftest import random_model, shared_file

SHAPES = {
    "mha-untied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300, hidden_dim=128,
                       max_seq_len=64, shared_classifier=False),
    "gqa-tied": dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=257, hidden_dim=160,
                     max_seq_len=80, shared_classifier=True),
}


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
def test_write_read_write_is_byte_identical(tmp_path, shape, version):
    model = random_model(seed=5, **SHAPES[shape])
    first = write_model_bin(model, tmp_path / "a.bin", version)
    loaded = read_model_bin(first)
    assert loaded.args == model.args
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    second = write_model_bin(loaded, tmp_path / "b.bin", version)
    assert first.read_bytes() == second.read_bytes()
    assert read_header(first).version == version


def test_upstream_v0_reads_and_rewrites_byte_identically(tmp_path):
    upstream = shared_file("models/stories260K.bin")
    model = read_model_bin(upstream)
    a = model.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len) == (64, 5, 8, 4, 512, 512)
    assert write_model_bin(model, tmp_path / "v0.bin", 0).read_bytes() == upstream.read_bytes()
    # llama2.c's own export.py wrote the same weights as version 1: ours must equal it
    reference_v1 = shared_file("reference/stories260K_llama2c_v1.bin")
    assert write_model_bin(model, tmp_path / "v1.bin", 1).read_bytes() == reference_v1.read_bytes()


def test_upstream_weights_generate_llama2c_greedy_ids():
    expected = [int(x) for x in shared_file("reference/stories260K_greedy_ids.txt").read_text().split()]
    for name in ("models/stories260K.bin", "reference/stories260K_llama2c_v1.bin"):
        model = read_model_bin(shared_file(name))
        assert model.generate([1], len(expected), temperature=0.0) == expected


def test_cli_converts_between_versions(tmp_path, capsys):
    model = random_model(seed=6, **SHAPES["gqa-tied"])
    v1 = write_model_bin(model, tmp_path / "m1.bin", 1)
    assert main(["export", str(v1), "--version", "0", "--out", str(tmp_path / "m0.bin")]) == 0
    assert main(["export", str(tmp_path / "m0.bin"), "--version", "1", "--out", str(tmp_path / "back.bin")]) == 0
    assert (tmp_path / "back.bin").read_bytes() == v1.read_bytes()
    assert "version 0" in capsys.readouterr().out


def _v1_with_field(tmp_path, index: int, value: int):
    model = random_model(seed=7, **SHAPES["mha-untied"])
    path = write_model_bin(model, tmp_path / "m.bin", 1)
    data = bytearray(path.read_bytes())
    struct.pack_into("<i", data, 8 + 4 * index, value)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("index, value, message", [
    (0, 0, "dim must be positive"),
    (3, -4, "n_heads must be positive"),
    (4, 3, "n_heads 4 is not divisible by n_kv_heads 3"),
    (0, 1 << 30, "the header implies"),
    (5, 301, "the header implies"),
])
def test_bad_header_fields_are_rejected(tmp_path, index, value, message):
    with pytest.raises(UserError, match=message):
        read_model_bin(_v1_with_field(tmp_path, index, value))


@pytest.mark.parametrize("edit, message", [
    (lambda b: b[:-3], "the header implies"),
    (lambda b: b + b"\0\0\0\0", "the header implies"),
    (lambda b: b[:10], "truncated header"),
    (lambda b: b"", "too short"),
    (lambda b: b"hello, this is not a model at all\n" * 20, "bad header|the header implies"),
    (lambda b: struct.pack("<Ii", 0x616B3432, 7) + b[8:], "unsupported model.bin version 7"),
])
def test_damaged_files_are_rejected(tmp_path, edit, message):
    path = write_model_bin(random_model(seed=8, **SHAPES["gqa-tied"]), tmp_path / "m.bin", 1)
    path.write_bytes(edit(path.read_bytes()))
    with pytest.raises(UserError, match=message):
        read_model_bin(path)


def test_missing_file_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.bin"), "--version", "0", "--out", str(tmp_path / "x.bin")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.bin: cannot read" in err
