"""Training: exact resume, DDP equals one process, NaN caught, Ctrl-C saves, bad configs, evaluation."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from llama2zh.checkpoint import load_checkpoint
from llama2zh.config import Config, load_config
from llama2zh.corpus.pretokenize import pretokenize
from llama2zh.corpus.sample import write_sample
from llama2zh.errors import UserError
from llama2zh.evaluate import evaluate
from llama2zh.train import NonFiniteLoss, pretraining_trainer, train
from llama2zh.vocab.train import train_tokenizer
from tests.conftest import ROOT
from tests.test_cli import llama2zh

SAMPLE = ROOT / "configs" / "sample.toml"

TINY = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64, batch_size=4, max_iters=12,
            learning_rate=3e-3, warmup_iters=2, eval_interval=4, eval_iters=2, log_interval=1, device="cpu",
            dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small built-in corpus, a tokenizer trained on it, and its token shards."""
    root = tmp_path_factory.mktemp("train")
    write_sample(root / "data" / "sample", n_stories=300, shard_size=100)
    train_tokenizer(sorted((root / "data" / "sample").glob("*.json")), 1200, root / "tok" / "tiny", lang="enzh")
    pretokenize(root / "data" / "sample", root / "tok" / "tiny", lang="enzh", workers=1, val_permille=100)
    # a second dataset for mixes: the first of those shards alone, as a generic text corpus (lang "any")
    source, other = root / "data" / "sample" / "tiny", root / "data" / "other" / "tiny"
    manifest = json.loads((source / "manifest.json").read_text())
    manifest.update(lang="any", shards=dict(sorted(manifest["shards"].items())[:1]))
    other.mkdir(parents=True)
    for entry in manifest["shards"].values():
        for split in ("train", "val"):
            shutil.copyfile(source / entry[split]["file"], other / entry[split]["file"])
    (other / "manifest.json").write_text(json.dumps(manifest))
    return root


def mix(data) -> str:
    return f"{data / 'data' / 'sample'}=0.7, {data / 'data' / 'other'}=0.3"


def config(data, out: str, **extra) -> Config:
    """configs/sample.toml made tiny, as the subprocess runs below make it with overrides."""
    return replace(load_config(SAMPLE), **{**TINY, "dataset": str(data / "data" / "sample"),
                                           "tokenizer": str(data / "tok" / "tiny"),
                                           "out_dir": str(data / "out" / out), **extra})


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


@pytest.mark.parametrize("mixed", [False, True], ids=["dataset", "mix"])
def test_resumed_run_repeats_the_uninterrupted_losses(data, mixed):
    settings = {"mix": mix(data)} if mixed else {}
    straight = train(config(data, f"straight-{mixed}", **settings))
    first = pretraining_trainer(config(data, f"resumed-{mixed}", **settings), resume=False)
    early = {}
    for step in range(1, 6):
        early[step] = first.train_step()
    first.save()
    second = pretraining_trainer(config(data, f"resumed-{mixed}", **settings), resume=True)
    assert second.step == 5
    second.run()
    resumed = {**early, **losses(data / "out" / f"resumed-{mixed}")}
    assert sorted(resumed) == sorted(losses(straight)) == list(range(1, 13))
    for step, loss in losses(straight).items():
        assert abs(resumed[step] - loss) <= 1e-6, step
    # the epochs counted resume too: a dataset's tokens drawn, over its size
    epochs = [[{k: v for k, v in r.items() if k.startswith("epochs/")} for r in records(run) if r["step"] > 5
               and "loss" in r] for run in (straight, data / "out" / f"resumed-{mixed}")]
    assert epochs[0] == epochs[1]
    epochs = epochs[0]
    names = ["sample", "other"] if mixed else ["sample"]
    assert sorted(epochs[-1]) == sorted(f"epochs/{name}" for name in names)
    trained = 12 * TINY["batch_size"] * TINY["max_seq_len"]
    assert sum(epochs[-1][f"epochs/{name}"] * second.data.parts[i].tokens("train")
               for i, name in enumerate(names)) == pytest.approx(trained)


def test_two_gloo_processes_match_one_at_the_same_global_batch(data):
    """With a mix of two datasets: each rank keeps its rows of the one global batch."""
    one = losses(train(config(data, "one", batch_size=4, max_iters=6, eval_interval=6, mix=mix(data))))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    overrides = [f"--{k}={v}" for k, v in {**TINY, "mix": mix(data), "tokenizer": data / "tok" / "tiny",
                 "out_dir": data / "out" / "two", "batch_size": 2, "max_iters": 6, "eval_interval": 6}.items()]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "llama2zh", "train", "--config", str(SAMPLE), *overrides],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    two = losses(data / "out" / "two")
    assert sorted(two) == sorted(one)
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-4, (step, one[step], two[step])


@pytest.mark.parametrize("log_interval", [1, 4])
def test_nan_mid_run_stops_and_keeps_the_last_good_checkpoint(data, log_interval):
    """Losses are read once per log interval; a NaN among them names its step, and no save holds it."""
    out = f"nan-{log_interval}"
    trainer = pretraining_trainer(config(data, out, log_interval=log_interval, eval_interval=5), resume=False)
    for _ in range(3):
        trainer.train_step()
    trainer.save()
    with torch.no_grad():
        trainer.model.layers[0].attention.wq.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 3"):
        trainer.run()  # log_interval 4: found at step 4's read, before step 5's save
    assert trainer.step == 4 and trainer.prefetcher is None
    model, state = load_checkpoint(data / "out" / out / "ckpt.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 3"):
        trainer.save()  # the weights are NaN now: a direct save is refused too
    assert load_checkpoint(data / "out" / out / "ckpt.pt")[1]["step"] == 3


def test_a_data_error_on_the_prefetching_thread_reaches_the_step(data):
    trainer = pretraining_trainer(config(data, "too-long", max_seq_len=300_000), resume=False)
    with pytest.raises(UserError, match=r"shorter than max_seq_len \+ 1 = 300001 tokens"):
        trainer.train_step()
    trainer.close()


def test_ctrl_c_saves_and_a_rerun_resumes(data):
    out = data / "out" / "interrupted"
    args = [sys.executable, "-m", "llama2zh", "train", "--config", str(SAMPLE),
            *[f"--{k}={v}" for k, v in {**TINY, "dataset": data / "data" / "sample", "tokenizer":
              data / "tok" / "tiny", "out_dir": out, "max_iters": 100000, "eval_interval": 100000}.items()]]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "llama2zh: interrupted"
    _, state = load_checkpoint(out / "ckpt.pt")
    assert state["step"] >= 3
    steps = sorted(losses(out))
    assert steps == list(range(1, state["step"] + 1))  # every step logged once, up to the save


@pytest.mark.parametrize("override, message", [
    ("--dimm=3", "unknown config key 'dimm'; valid keys: dim"),
    ("--dtype=float8", "dtype must be one of float32, bfloat16, float16"),
    ("--batch_size=0", "batch_size must be at least 1"),
    ("--learning_rate=fast", "learning_rate must be an float"),
    ("--mix=data/a=0.5, data/b=0", "mix must be a comma list of PATH=WEIGHT with positive weights, got 'data/b=0'"),
])
def test_bad_configs_are_rejected(tmp_path, override, message):
    result = llama2zh("train", "--config", SAMPLE, override, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_mix_of_datasets_that_do_not_fit_is_refused_in_one_line(data, tmp_path):
    tokenizer = f"--tokenizer={data / 'tok' / 'tiny'}"
    missing = llama2zh("train", "--config", SAMPLE, tokenizer, f"--mix={data / 'data' / 'sample'}=1, nowhere=1",
                       cwd=tmp_path)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
    assert "nowhere/tiny: no manifest.json (run `llama2zh pretokenize` first)" in missing.stderr
    english = llama2zh("train", "--config", SAMPLE, tokenizer, f"--mix={mix(data)}", "--lang=en", cwd=tmp_path)
    assert english.returncode == 1 and english.stderr.count("\n") == 1, english.stderr
    assert "sample was pretokenized with --lang enzh, the config asks for lang = en" in english.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_is_valid(path):
    config = load_config(path)
    config.model_args(vocab_size=32000)
    assert path.stem.startswith("sample") or path.stem.split("_")[1] in config.tokenizer


def test_evaluation_reports_bits_per_character_per_language(data):
    run = train(config(data, "eval", max_iters=8))
    report = evaluate(run, per_language=10)
    for lang in ("en", "zh"):
        row = report[lang]
        assert row["documents"] == 10
        assert row["bits_per_char"] > 0 and row["bits_per_byte"] <= row["bits_per_char"]
    assert report["unigram_entropy"] > 0
    assert list(report["datasets"]) == ["sample"] and report["datasets"]["sample"]["documents"] == 20
    for name in ("model.bin", "tokenizer.bin", "tokenizer.model", "config.toml", "metrics.jsonl", "best.pt"):
        assert (run / name).exists(), name


def test_an_imported_run_continues_pretraining_and_evaluates(data, tmp_path):
    """export --format hf, then import: train (init_from), eval and export take the imported run."""
    pytest.importorskip("safetensors")
    from llama2zh.interop.hf import export_hf, import_hf

    base = train(config(data, "to-import", max_iters=4, eval_interval=4))
    imported = import_hf(export_hf(base, tmp_path / "hf"), tmp_path / "imported")
    continued = train(config(data, "continued", max_iters=4, eval_interval=4, init_from=str(imported)))
    state = load_checkpoint(continued / "ckpt.pt")[1]
    assert state["run_info"]["base_run"] == str(imported) and state["step"] == 4
    assert losses(continued)[1] < losses(base)[1]  # it starts from the trained weights, not from scratch
    report = evaluate(continued)
    assert report["step"] == 4 and report["en"]["tokens"] > 0 and report["zh"]["tokens"] > 0


def test_a_mixed_run_reports_each_dataset_in_training_and_in_eval(data):
    run = train(config(data, "mixed-eval", max_iters=8, mix=mix(data)))
    val = [r for r in records(run) if "val_loss" in r][-1]
    assert val["val_loss"] == pytest.approx(0.7 * val["val_loss/sample"] + 0.3 * val["val_loss/other"])
    report = evaluate(run, per_language=5)
    assert list(report["datasets"]) == ["sample", "other"]
    assert [r["weight"] for r in report["datasets"].values()] == pytest.approx([0.7, 0.3])
    for row in report["datasets"].values():
        assert row["documents"] == 10 and row["bits_per_char"] > 0
    assert report["en"]["documents"] == report["zh"]["documents"] == 10  # 5 of each language from each dataset
    result = llama2zh("eval", run)
    assert result.returncode == 0 and "| dataset | weight |" in result.stdout and "| other | 0.30 |" in result.stdout
