"""LoRA: merged equals unmerged (PyTorch, model.bin in the C engine, the HF and GGUF exports), only the
adapters train, exact resume, the base checked by sha256, bad settings refused."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from llama2zh.checkpoint import load_checkpoint, lora_model, read_checkpoint
from llama2zh.config import load_config
from llama2zh.engine import CModel
from llama2zh.errors import UserError
from llama2zh.interop.hf import export_hf, import_hf
from llama2zh.lora import TARGETS, LoRALinear, TrainedRows, apply_lora, lora_state_dict, merge_lora
from llama2zh.sft import sft, sft_trainer
from llama2zh.train import pretraining_trainer, train
from tests import test_sft
from tests.conftest import ROOT, random_model
from tests.test_cli import llama2zh
from tests.test_sft import SFT_CONFIG, TINY, check_resume, sft_config

base = test_sft.base  # the fixture: a tiny pretrained run (tokenizer without the chat pieces), conversations

LORA = dict(lora_rank=4, lora_alpha=8.0, learning_rate=2e-2)
IDS = [1, 5, 17, 200, 33, 901, 1200, 1201, 7, 64]  # 1200, 1201: the chat pieces sft appended


def logits_of(model, ids=IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@pytest.mark.parametrize("shared", [True, False])
def test_merge_equals_the_adapted_model_and_starts_as_the_base(shared):
    model = random_model(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, hidden_dim=64,
                         max_seq_len=16, shared_classifier=shared).extended(2)
    before = logits_of(model, [1, 2, 63, 65])
    apply_lora(model, 4, 8.0, 0.1, ("wq", "wv", "w2"), rows=[3, 64, 65], generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits_of(model, [1, 2, 63, 65]), before)  # B = 0: the base, exactly
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape))
    adapted = logits_of(model, [1, 2, 63, 65])
    assert (adapted - before).abs().max() > 1e-2
    assert (logits_of(merge_lora(model), [1, 2, 63, 65]) - adapted).abs().max() <= 1e-5
    wrapped = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert wrapped == 2 * 3 and sum(isinstance(m, TrainedRows) for m in model.modules()) == 2
    assert len(lora_state_dict(model)) == 2 * wrapped + (1 if shared else 2)


def test_lora_sft_trains_only_the_adapters_and_the_chat_rows(base):
    trainer = sft_trainer(sft_config(base, "only", **LORA, max_iters=4), resume=False)
    model = trainer.model
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(adapters) == {n for n in adapters if n.endswith(("lora_a", "lora_b"))} | {"tok_embeddings.rows"}
    for _ in range(4):
        trainer.train_step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # bitwise: no gradient, no weight decay
        else:
            assert not torch.equal(p, adapters[name]), name
    trainer.save()
    state = read_checkpoint(trainer.run_dir / "ckpt.pt")
    assert set(state["model"]) == set(adapters)
    lora = state["run_info"]["lora"]
    assert (lora["rank"], lora["alpha"], lora["rows"], lora["targets"]) == (4, 8.0, [1200, 1201], list(TARGETS))
    assert lora["trainable_parameters"] == sum(p.numel() for p in adapters.values())


def test_merged_exports_equal_the_unmerged_lora_model(base, tmp_path):
    run = sft(sft_config(base, "merged", **LORA))
    state = read_checkpoint(run / "ckpt.pt")
    unmerged = logits_of(lora_model(run / "ckpt.pt", state))
    merged, _ = load_checkpoint(run / "ckpt.pt")  # what eval, chat, verify and every export read
    assert (logits_of(merged) - unmerged).abs().max() <= 1e-5
    plain_base, _ = load_checkpoint(base / "out" / "base" / "ckpt.pt")
    assert (logits_of(plain_base.extended(2, 128)) - unmerged).abs().max() > 1e-3  # the adapters did something

    cmodel = CModel(run / "model.bin")  # written by sft at the end of the run: ./run needs nothing new
    c_logits = torch.from_numpy(np.stack([cmodel.forward(t, pos) for pos, t in enumerate(IDS)]))
    assert (c_logits - unmerged).abs().max() <= 1e-5 * max(1.0, unmerged.abs().max().item())

    imported = import_hf(export_hf(run, tmp_path / "hf"), tmp_path / "from-hf", tokenizer_dir=run)
    assert (logits_of(load_checkpoint(imported / "ckpt.pt")[0]) - unmerged).abs().max() <= 1e-5

    result = llama2zh("export", run, "--format", "gguf", "--out", tmp_path / "model.gguf")
    assert result.returncode == 0, result.stderr
    tensors = {t.name: t for t in GGUFReader(tmp_path / "model.gguf").tensors}
    w2 = torch.from_numpy(np.array(tensors["blk.1.ffn_down.weight"].data)).reshape(merged.args.dim, -1)
    assert torch.equal(w2, merged.layers[1].feed_forward.w2.weight.detach())

    result = llama2zh("verify", run)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_resumed_lora_run_repeats_the_uninterrupted_losses(base):
    settings = dict(LORA, lora_dropout=0.1)  # dropout: the global generator must resume too
    check_resume(sft, sft_trainer, lambda name: sft_config(base, f"lora-{name}", **settings))


def test_a_changed_base_is_refused_on_resume_and_on_load(base, tmp_path):
    base_run = tmp_path / "base"
    shutil.copytree(base / "out" / "base", base_run)
    config = sft_config(base, "x", **LORA, init_from=str(base_run), out_dir=str(tmp_path / "lora"))
    trainer = sft_trainer(config, resume=False)
    trainer.train_step()
    trainer.save()
    assert sft_trainer(config, resume=True).step == 1
    with pytest.raises(UserError, match="LoRA rank was 4, the config says 8"):
        sft_trainer(replace(config, lora_rank=8), resume=True)
    with pytest.raises(UserError, match="holds LoRA adapters, the config asks for lora_rank = 0"):
        sft_trainer(replace(config, lora_rank=0), resume=True)
    shutil.move(base_run / "ckpt.pt", tmp_path / "moved.pt")
    with pytest.raises(UserError, match="must stay where it was"):
        load_checkpoint(tmp_path / "lora" / "ckpt.pt")
    shutil.move(tmp_path / "moved.pt", base_run / "ckpt.pt")
    assert load_checkpoint(tmp_path / "lora" / "ckpt.pt")[1]["step"] == 1

    state = read_checkpoint(base_run / "ckpt.pt")
    state["model"]["norm.weight"] = state["model"]["norm.weight"] * 1.01
    torch.save(state, base_run / "ckpt.pt")
    with pytest.raises(UserError, match="has changed since the run began"):
        sft_trainer(config, resume=True)
    with pytest.raises(UserError, match="which has changed since"):
        load_checkpoint(tmp_path / "lora" / "ckpt.pt")
    result = llama2zh("eval", tmp_path / "lora")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "changed since" in result.stderr


def test_continued_pretraining_with_lora(base):
    config = replace(load_config(ROOT / "configs" / "sample.toml"), **{
        **TINY, **LORA, "max_iters": 3, "dataset": str(base / "data" / "sample"),
        "tokenizer": str(base / "tok" / "plain"), "init_from": str(base / "out" / "base"),
        "out_dir": str(base / "out" / "continued")})
    trainer = pretraining_trainer(config, resume=False)
    assert trainer.run_info["lora"]["rows"] == []
    run = train(config)
    model, state = load_checkpoint(run / "ckpt.pt")
    assert state["run_info"]["lora"]["base_run"] == str(base / "out" / "base") and model.args.vocab_size == 1200


@pytest.mark.parametrize("overrides, message", [
    (["--lora_rank=-1"], "lora_rank must be 0 (off) or positive, got -1"),
    (["--lora_rank=4", "--lora_targets=wq,wx"], "lora_targets must be a comma list of distinct names among"),
    (["--lora_rank=4", "--init_from="], "lora_rank > 0 trains adapters on a frozen base: set init_from"),
    (["--lora_rank=4", "--lora_dropout=1"], "lora_dropout must be in [0, 1), got 1.0"),
    (["--lora_rank=4", "--lora_alpha=0"], "lora_alpha must be positive"),
])
def test_bad_lora_settings_are_usage_errors(tmp_path, overrides, message):
    result = llama2zh("sft", "--config", SFT_CONFIG, *overrides, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
