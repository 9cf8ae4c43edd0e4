"""The GPU loop's device-independent parts, on the CPU: the peak table, MFU's inputs, the measurement
that `make gpu-check` runs (a tiny shape), the compile fallback, and a step that never waits for the device."""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import threading

import pytest
import torch

from llama2zh.config import Config
from llama2zh.gpu_check import RandomTokens, measure
from llama2zh.model import ModelArgs, Transformer
from llama2zh.train import (
    Trainer,
    compiled,
    flops_per_token,
    known_peak_flops,
    make_optimizer,
    measured_peak_flops,
    peak_flops,
)
from tests.conftest import ROOT


@pytest.mark.parametrize("name, flops", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                         ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                         ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
                                         ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla T4", None)])
def test_the_bf16_peak_of_known_gpus(name, flops):
    assert known_peak_flops(name) == flops


def test_a_cpu_has_no_peak_and_a_measured_one_is_positive():
    assert peak_flops(torch.device("cpu")) is None  # a CPU's speed is reported in tokens/s only
    assert measured_peak_flops(torch.device("cpu"), n=128, dtype=torch.float32) > 0


def test_flops_per_token_count_parameters_and_attention():
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=100, hidden_dim=128,
                                  max_seq_len=32))
    n = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model) == 6 * n + 12 * 2 * 64 * 32


def test_random_tokens_follow_the_batch_contract():
    data = RandomTokens(50)
    x, y, segments = data.batch("train", 6, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 8) and segments is None and torch.equal(x[:, 1:], y[:, :-1])
    halves = [data.batch("train", 3, 8, torch.Generator().manual_seed(0), rank, 2)[0] for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), x)


def test_the_measurement_trains_a_tiny_shape_on_the_cpu(tmp_path):
    shape = dict(dim=32, n_layers=2, n_heads=2)
    result = measure(shape, "cpu", steps=3, warmup=1, batch_size=2, seq_len=16, compile=True, work=tmp_path,
                     vocab_size=64)
    assert result["tokens_per_s"] > 0 and result["mfu"] is None and result["peak_memory_gib"] is None
    assert abs(result["loss"] - math.log(64)) < 0.5  # random tokens: about ln(vocab)
    assert result["parameters"] == sum(p.numel() for p in Transformer(ModelArgs(
        dim=32, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=64, hidden_dim=96, max_seq_len=16)).parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    result = subprocess.run([sys.executable, "-m", "llama2zh.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("gpu-check: no CUDA device here")


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch, capsys):
    def failing_backend(graph, inputs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=failing_backend))
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=64, hidden_dim=64,
                                  max_seq_len=16))
    rng = torch.get_rng_state()
    assert compiled(model, torch.zeros(2, 16, dtype=torch.long), "float32") is model
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith("warning: torch.compile failed (") and \
        "no compiler here" in warning and "training without it" in warning
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)


def test_a_training_step_never_reads_a_tensor_on_the_host(monkeypatch, tmp_path):
    """What a GPU would wait for: no .item(), .tolist(), bool() or float() of a tensor on the loop's thread
    (the prefetching thread reads its CPU tensors freely); losses are read once, by read_losses."""
    config = Config(dim=32, n_layers=2, n_heads=2, max_seq_len=16, batch_size=2, grad_accum=2, device="cpu",
                    dtype="bfloat16", out_dir=str(tmp_path))
    model = Transformer(config.model_args(64))
    trainer = Trainer(config, RandomTokens(64), model, tokenizer_sha256="", resume=False)
    trainer.optimizer = make_optimizer(model, config, fused=True)  # CUDA's (the CPU's reads its step count)
    trainer.train_step()
    trainer.read_losses()
    reads = []

    def watched(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args):
            if threading.current_thread() is threading.main_thread():
                reads.append(name)
            return real(self, *args)
        return read

    for name in ("item", "tolist", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, watched(name))
    for _ in range(3):
        trainer.train_step()
    assert reads == []
    losses = trainer.read_losses()
    assert len(losses) == 3 and reads == ["tolist"]
    trainer.close()
