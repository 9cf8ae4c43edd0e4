"""model.bin v3 (4-bit groups, fp16 scale and min; the embedding 4- or 8-bit; int8 layers, by default the
first) in the C engine: the loader's
checks, the 4-bit kernels (each set forced with LLAMA2ZH_KERNEL) against the portable one and against PyTorch
on the dequantized weights, prefill, batched decode and threads. The files come from llama2zh.export."""

from __future__ import annotations

import struct
import subprocess

import numpy as np
import pytest
import torch

from llama2zh.engine import CBatch, CModel, EngineError, run_binary
from llama2zh.export import default_group_size, read_model_bin, write_model_bin
from llama2zh.model import ModelArgs
from tests.conftest import random_model
from tests.test_batch import Seq, assert_same, batched, prompt
from tests.test_quant import (
    GQA,
    KERNELS,
    TOKENS,
    UNTIED,
    kernel_model,
    logits_by_thread_count,
    patched,
    relative_max_diff,
    token_by_token,
)
from tests.test_run import assert_fails, write_id_tokenizer

# group size 2 and an unshared classifier: the SIMD sets run it with the portable loops (their layout
# takes multiples of 8), and the 4-bit matrices' odd sizes leave the int8 classifier's scales unaligned
ODD = dict(dim=6, n_layers=2, n_heads=1, n_kv_heads=1, hidden_dim=10, max_seq_len=16, vocab_size=7,
           shared_classifier=False)
# Kernels differ only in the order of float additions (measured: 2e-7 of the largest logit apart), but
# that can move an activation across a rounding boundary when it is quantized for the next matmul, as in
# test_quant (one step moved v2's logits by 2.3e-3): the same bound as v2's.
TOLERANCE = 1e-2
# Against PyTorch on the dequantized weights, the engine also rounds activations to int8: measured up to
# 8e-3 of the largest logit on these shapes.
PYTORCH_TOLERANCE = 0.02


def v3_file(tmp_path, shape=GQA, seed=40, group_size=32, embedding_bits=4, name="m.bin", int8_layers=None):
    """A random model and its v3 file (int8_layers None: the default, layer 0 int8, the rest 4-bit)."""
    model = random_model(seed=seed, **shape)
    return model, write_model_bin(model, tmp_path / name, 3, group_size=group_size, embedding_bits=embedding_bits,
                                  int8_layers=int8_layers)


def first_q4_offsets(args: ModelArgs, group_size: int, embedding_bits: int) -> tuple[int, int]:
    """Where the first 4-bit matrix's scales and its mins start, with no int8 layer: the embedding's when
    it is 4-bit, else layer 0's wq, after the int8 embedding."""
    at = 256 + 4 * (2 * args.n_layers + 1) * args.dim
    count = args.vocab_size * args.dim
    if embedding_bits == 8:
        at += count + 4 * count // default_group_size(args)
        count = args.dim * args.dim
    return at + count // 2, at + count // 2 + 2 * count // group_size


# ---- the loader ----


def test_config_reports_the_v3_fields(tmp_path):
    _, path = v3_file(tmp_path, group_size=16, embedding_bits=8)
    config = CModel(path).config
    assert (config["version"], config["group_size"], config["embedding_bits"]) == (3, 16, 8)
    assert config["int8_group_size"] == default_group_size(ModelArgs(**GQA)) == 32
    assert config["int8_layers"] == b"\x01" + bytes(127)  # layer 0
    _, path = v3_file(tmp_path, name="e4.bin", int8_layers=())
    config = CModel(path).config
    assert (config["group_size"], config["embedding_bits"], config["int8_group_size"]) == (32, 4, 0)
    _, path = v3_file(tmp_path, name="l2.bin", int8_layers=(2, 0))
    config = CModel(path).config
    assert (config["int8_group_size"], config["int8_layers"]) == (32, b"\x05" + bytes(127))


NAN16, INF16 = struct.pack("<H", 0x7E00), struct.pack("<H", 0x7C00)
DAMAGE = [  # (embedding bits, edit, what the one line says)
    (4, lambda p, a: p.write_bytes(p.read_bytes()[:-1]), "the header implies"),
    (4, lambda p, a: p.write_bytes(p.read_bytes() + b"\0\0"), "the header implies"),
    (4, lambda p, a: patched(p, 37, struct.pack("<i", 0)), "group size 0 must be even and divide dim 128"),
    (4, lambda p, a: patched(p, 37, struct.pack("<i", 1)), "group size 1 must be even"),
    (4, lambda p, a: patched(p, 37, struct.pack("<i", 5)), "group size 5 must be even"),
    (4, lambda p, a: patched(p, 37, struct.pack("<i", 12)), "group size 12 must be even and divide dim 128"),
    (4, lambda p, a: patched(p, 37, struct.pack("<i", -32)), "group size -32 must be even"),
    (4, lambda p, a: patched(p, 41, b"\x05"), "embedding_bits is 5, not 4 or 8"),
    (4, lambda p, a: patched(p, 42, struct.pack("<i", 32)), "int8 group size 32 must be 0 with no int8 matrix"),
    (8, lambda p, a: patched(p, 42, struct.pack("<i", 0)), "int8 group size 0 must be positive"),
    (8, lambda p, a: patched(p, 42, struct.pack("<i", 48)), "int8 group size 48 must be positive and divide"),
    (4, lambda p, a: patched(p, 46, b"\x08"), "layer 3 is marked int8, but the model has 3 layers"),
    (8, lambda p, a: patched(p, 46 + 127, b"\x80"), "layer 1023 is marked int8"),
    # an int8 layer's rows are dim and hidden_dim wide: 64 divides dim 128, not hidden_dim 352
    (8, lambda p, a: patched(patched(p, 46, b"\x01"), 42, struct.pack("<i", 64)),
     "int8 group size 64 must divide hidden_dim 352"),
    (4, lambda p, a: patched(p, first_q4_offsets(a, 32, 4)[0] + 6, NAN16), "4-bit quantization scale is nan"),
    (4, lambda p, a: patched(p, first_q4_offsets(a, 32, 4)[1], INF16), "4-bit quantization min is inf"),
    (8, lambda p, a: patched(p, first_q4_offsets(a, 32, 8)[1] - 2, b"\x00\xfc"), "4-bit quantization scale is -inf"),
    (8, lambda p, a: patched(p, first_q4_offsets(a, 32, 8)[1] + 4, NAN16), "4-bit quantization min is nan"),
    (8, lambda p, a: patched(p, 256 + 4 * (2 * a.n_layers + 1) * a.dim + 3, b"\x80"), "-128"),
]


@pytest.mark.parametrize("bits, edit, message", DAMAGE, ids=[m for _, _, m in DAMAGE])
def test_c_loader_rejects_damaged_v3_files_in_one_line(tmp_path, bits, edit, message):
    model, path = v3_file(tmp_path, embedding_bits=bits, int8_layers=())
    edit(path, model.args)
    with pytest.raises(EngineError, match=message):
        CModel(path)
    tokenizer = write_id_tokenizer(tmp_path / "tokenizer.bin", model.args.vocab_size)
    result = subprocess.run([str(run_binary()), str(path), "-k", str(tokenizer), "-n", "4"], capture_output=True,
                            timeout=60)
    assert_fails(result, 1, message.split(" must")[0])


# ---- kernels, prefill, batches, threads ----


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("group_size", [16, 32])
@pytest.mark.parametrize("bits", [4, 8], ids=["emb4", "emb8"])
@pytest.mark.parametrize("shape", [GQA, UNTIED], ids=["gqa-tied", "mha-untied"])
def test_kernels_agree_with_portable_and_pytorch(monkeypatch, tmp_path, kernel, group_size, bits, shape):
    # GQA with the default int8 first layer, UNTIED all 4-bit
    _, path = v3_file(tmp_path, shape, seed=41, group_size=group_size, embedding_bits=bits,
                      int8_layers=() if shape is UNTIED else None)
    tokens = [t % shape["vocab_size"] for t in TOKENS]
    expected = token_by_token(kernel_model(monkeypatch, path, "portable"), tokens)
    got = token_by_token(kernel_model(monkeypatch, path, kernel), tokens)
    assert relative_max_diff(got, expected) < TOLERANCE
    assert relative_max_diff(kernel_model(monkeypatch, path, kernel).prefill(tokens), expected) < TOLERANCE
    with torch.no_grad():
        reference = read_model_bin(path)(torch.tensor([tokens]))[0].numpy()
    assert relative_max_diff(got, reference) < PYTORCH_TOLERANCE
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.9


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", [4, 8], ids=["emb4", "emb8"])
def test_group_size_2_runs_the_portable_loops(monkeypatch, tmp_path, kernel, bits):
    _, path = v3_file(tmp_path, ODD, seed=42, group_size=2, embedding_bits=bits)
    tokens = [t % ODD["vocab_size"] for t in TOKENS]
    got = token_by_token(kernel_model(monkeypatch, path, kernel), tokens)
    with torch.no_grad():
        reference = read_model_bin(path)(torch.tensor([tokens]))[0].numpy()
    assert relative_max_diff(got, reference) < PYTORCH_TOLERANCE
    assert relative_max_diff(kernel_model(monkeypatch, path, kernel).prefill(tokens), got) < TOLERANCE


@pytest.mark.parametrize("kernel", KERNELS)
def test_prefill_equals_token_by_token_across_batches(monkeypatch, tmp_path, kernel):
    _, path = v3_file(tmp_path, seed=43, group_size=16, embedding_bits=8)
    tokens = list(np.random.default_rng(0).integers(0, GQA["vocab_size"], 300))  # > 2 batches of 128
    expected = token_by_token(kernel_model(monkeypatch, path, kernel), tokens)
    batched_model = kernel_model(monkeypatch, path, kernel)
    got = np.concatenate([batched_model.prefill(tokens[:5]), batched_model.prefill(tokens[5:], pos=5)])
    assert relative_max_diff(got, expected) < TOLERANCE


@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_decode_equals_each_sequence_alone(monkeypatch, tmp_path, kernel):
    # 4-bit sums are exact integers per group, scaled in group order whatever the batch: the same bits
    _, path = v3_file(tmp_path, seed=44, group_size=32, embedding_bits=4)
    rng, vocab = np.random.default_rng(4), GQA["vocab_size"]
    seqs = [
        Seq([prompt(rng, 5, vocab)], join=0, n_steps=6),
        Seq([prompt(rng, 20, vocab), prompt(rng, 17, vocab)], join=0, n_steps=12),
        Seq([prompt(rng, 1, vocab)], join=0, n_steps=16),
        Seq([prompt(rng, 150, vocab)], join=2, n_steps=10),
        Seq([prompt(rng, 4, vocab), prompt(rng, 5, vocab)], join=3, n_steps=8),
    ]
    batched(CBatch(kernel_model(monkeypatch, path, kernel), 3), seqs)
    assert_same(seqs, kernel_model(monkeypatch, path, kernel), exact=True)


@pytest.mark.parametrize("bits", [4, 8], ids=["emb4", "emb8"])
@pytest.mark.parametrize("n_tokens", [12, 100], ids=["threads-share-rows", "threads-share-tokens"])
def test_thread_count_does_not_change_logits(tmp_path, bits, n_tokens):
    _, path = v3_file(tmp_path, seed=45, group_size=16, embedding_bits=bits)
    tokens = list(np.random.default_rng(1).integers(0, GQA["vocab_size"], n_tokens))
    results = logits_by_thread_count(path, tokens)
    for got in results[1:]:
        assert relative_max_diff(got, results[0]) < TOLERANCE
