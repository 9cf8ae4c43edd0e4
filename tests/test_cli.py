"""The llama2zh command line: init -> verify, bare .bin verify, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

TINY = ["--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--max_seq_len=256"]


def llama2zh(*args, cwd=ROOT, input=None):
    """Runs `python -m llama2zh` as a user would, in a fresh process (input: its standard input)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "llama2zh", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, input=input)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer_dirs):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    result = llama2zh("init", run, "--config", ROOT / "configs/stories15M_llama2en.toml", "--tokenizer",
                      tokenizer_dirs["llama2en"], *TINY)
    assert result.returncode == 0, result.stderr
    return run


def test_init_writes_a_complete_run_directory(run_dir):
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["ckpt.pt", "config.toml", "model.bin", "tokenizer.bin", "tokenizer.model"]
    assert "dim = 64" in (run_dir / "config.toml").read_text()


def test_verify_run_directory_passes(run_dir):
    result = llama2zh("verify", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [
        ["PASS", "logits"], ["PASS", "tokens"], ["PASS", "greedy"], ["PASS", "text"]]


def test_verify_bare_bin_writes_tokenizer_bin(tmp_path, run_dir):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok/tokenizer.model").write_bytes((run_dir / "tokenizer.model").read_bytes())
    result = llama2zh("verify", run_dir / "model.bin", "--tokenizer", tmp_path / "tok")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "tok/tokenizer.bin").exists()


def test_verify_catches_a_model_bin_that_disagrees(tmp_path, run_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("ckpt.pt", "tokenizer.model", "tokenizer.bin"):
        (broken / name).write_bytes((run_dir / name).read_bytes())
    weights = np.fromfile(run_dir / "model.bin", dtype=np.float32, offset=256)
    weights[len(weights) // 2] += 1.0  # one weight of one matrix, off by one
    (broken / "model.bin").write_bytes((run_dir / "model.bin").read_bytes()[:256] + weights.tobytes())
    result = llama2zh("verify", broken)
    assert result.returncode == 1
    assert "FAIL logits" in result.stdout


def test_export_run_directory_to_v0_and_back(tmp_path, run_dir):
    assert llama2zh("export", run_dir, "--version", "0", "--out", tmp_path / "m0.bin").returncode == 0
    assert llama2zh("export", tmp_path / "m0.bin", "--version", "1", "--out", tmp_path / "m1.bin").returncode == 0
    assert (tmp_path / "m1.bin").read_bytes() == (run_dir / "model.bin").read_bytes()


@pytest.mark.parametrize("args, status, message", [
    (["verify", "/nonexistent/run"], 1, "no such"),
    (["frobnicate"], 2, "invalid choice"),
    (["export"], 2, "required"),
    (["verify", "x", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["export", "m.bin", "--version", "1"], 2, "needs --out"),
    (["export", "m.bin", "--version", "9", "--out", "o.bin"], 2, "invalid choice"),
    (["init", "out/x", "--config", "configs/stories15M_llama2en.toml", "--tokenizer", "/nonexistent", "--dimm=4"], 2,
     "unknown config key 'dimm'; valid keys: dim"),
    (["init", "out/x", "--config", "configs/stories15M_llama2en.toml", "--tokenizer", "/nonexistent"], 1,
     "/nonexistent"),
    (["vocab", "export", "/nonexistent/tokenizer.model"], 1, "/nonexistent/tokenizer.model"),
    (["export", "out/x", "--format", "hf", "--version", "2"], 2, "--version applies to --format bin only"),
    (["export", "out/x", "--format", "gguf", "--dtype", "float16"], 2, "--dtype applies to --format hf only"),
    (["export", "out/x", "--type", "q8_0"], 2, "--type applies to --format gguf only"),
    (["export", "/nonexistent/run", "--format", "gguf"], 1, "not a run directory"),
    (["import", "/nonexistent/model.bin", "--out", "out/x"], 1, "not a hub repo id"),
    (["import", "owner/name"], 2, "required: --out"),
    (["download", "model"], 2, "needs a NAME"),
    (["download", "sample", "--list"], 2, "--list applies to download model and download corpus only"),
])
def test_bad_usage_is_one_line(tmp_path, args, status, message):
    result = llama2zh(*args, cwd=tmp_path if args[0] != "init" else ROOT)
    assert result.returncode == status, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_import_of_a_model_bin_needs_its_tokenizer(run_dir):
    result = llama2zh("import", run_dir / "model.bin", "--out", run_dir.parent / "imported")
    assert result.returncode == 2 and "needs --tokenizer DIR" in result.stderr


def test_verify_bare_bin_without_tokenizer_is_an_error(run_dir):
    result = llama2zh("verify", run_dir / "model.bin")
    assert result.returncode == 1 and "--tokenizer" in result.stderr
