"""DPO: the loss (with RPO's term too) and its gradient against a reference written here, the frozen
reference model, exact resume, LoRA, the rewards reported, and the refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from llama2zh.checkpoint import load_checkpoint
from llama2zh.config import load_config
from llama2zh.dpo import dpo, dpo_trainer
from llama2zh.errors import UserError
from llama2zh.sft import sft
from tests import test_sft
from tests.conftest import ROOT
from tests.test_cli import llama2zh
from tests.test_sft import TINY, check_resume, sft_config, story_conversations, write_jsonl

base = test_sft.base  # the fixture: a tiny pretrained run and conversations

BETA = 0.1


@pytest.fixture(scope="module")
def chat(base):
    """base, with a tiny chat run (out/chat) and preference pairs (data/pairs): train in minimind's form,
    val in TRL's, each the true reply against its first sentence said over and over, or another story."""
    sft(sft_config(base, "chat"))
    stories = story_conversations(60, seed=1)
    pairs = []
    for i, record in enumerate(stories):
        prompt, reply = record["conversations"][0], record["conversations"][1]["content"]
        rejected = reply.split("。")[0] + "。" if i % 2 else stories[i - 1]["conversations"][1]["content"]
        pairs.append((prompt, reply, rejected * (4 if i % 2 else 1)))
    folder = base / "data" / "pairs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"chosen": [p, {"role": "assistant", "content": c}],
                                          "rejected": [p, {"role": "assistant", "content": r}]}
                                         for p, c, r in pairs[:50]])
    write_jsonl(folder / "val.jsonl", [{"prompt": p["content"], "chosen": c, "rejected": r} for p, c, r in pairs[50:]])
    return base


def dpo_config(root, out: str, **extra):
    return replace(load_config(ROOT / "configs" / "sample_dpo.toml"),
                   **{**TINY, "init_from": str(root / "out" / "chat"), "dataset": str(root / "data" / "pairs"),
                      "out_dir": str(root / "out" / out), "dpo_beta": BETA, "learning_rate": 1e-3, **extra})


def summed_logps(model, x, y) -> torch.Tensor:
    """Per row, the log-probabilities of the trained targets, one position at a time."""
    logps = torch.log_softmax(model(x).float(), dim=-1)
    return torch.stack([sum((logps[r, t, y[r, t]] for t in range(y.size(1)) if y[r, t] >= 0), torch.tensor(0.0))
                        for r in range(y.size(0))])


@pytest.mark.parametrize("nll_weight", [0.0, 0.5])
def test_the_loss_and_its_gradient_equal_the_papers_formula(chat, nll_weight):
    trainer = dpo_trainer(dpo_config(chat, "formula", dpo_nll_weight=nll_weight), resume=False)
    chosen_x, chosen_y, rejected_x, rejected_y = trainer.micro_batch("train", torch.Generator().manual_seed(0))
    assert (chosen_y >= 0).any(1).all() and (rejected_y >= 0).any(1).all()
    with torch.no_grad():  # move the policy off its reference, so that the rewards are not all 0
        for p in trainer.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    loss = trainer.loss(chosen_x, chosen_y, rejected_x, rejected_y)
    grads = torch.autograd.grad(loss, params)

    policy, reference = trainer.model, trainer.reference  # each side alone, each position alone
    with torch.no_grad():
        reference_margin = summed_logps(reference, chosen_x, chosen_y) - summed_logps(reference, rejected_x, rejected_y)
    policy_chosen = summed_logps(policy, chosen_x, chosen_y)
    policy_margin = policy_chosen - summed_logps(policy, rejected_x, rejected_y)
    expected = -F.logsigmoid(BETA * (policy_margin - reference_margin)).mean()
    expected = expected - nll_weight * policy_chosen.sum() / (chosen_y >= 0).sum()  # RPO's term
    expected_grads = torch.autograd.grad(expected, params)

    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item() and 0.01 < expected.item() < 10
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    chosen, rejected = trainer.rewards["train"][0]
    torch.testing.assert_close(chosen - rejected, (BETA * (policy_margin - reference_margin)).detach(),
                               rtol=1e-3, atol=1e-4)  # sums of ~100 float32 log-probabilities


def test_the_reference_stays_frozen_and_the_rewards_are_reported(chat):
    run = dpo(dpo_config(chat, "frozen"))
    sft_model, _ = load_checkpoint(chat / "out" / "chat" / "ckpt.pt")
    trainer = dpo_trainer(dpo_config(chat, "frozen"), resume=True)  # the finished run, resumed at its end
    assert trainer.step == TINY["max_iters"]
    for (name, ref), sft_weight in zip(trainer.reference.state_dict().items(), sft_model.state_dict().values(),
                                       strict=True):
        assert torch.equal(ref, sft_weight), name
    assert not any(p.requires_grad for p in trainer.reference.parameters())
    tuned, state = load_checkpoint(run / "ckpt.pt")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), sft_model.state_dict().values(),
                                                     strict=True))
    assert state["run_info"]["stage"] == "dpo" and state["run_info"]["base_run"] == str(chat / "out" / "chat")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_loss" in r]
    assert all(0 <= r["reward_accuracy"] <= 1 and "reward_margin" in r for r in train_records)
    assert all(0 <= r["val_reward_accuracy"] <= 1 and "val_reward_margin" in r for r in val_records)
    assert val_records[-1]["val_reward_margin"] > 0  # it learned something of the preference
    for name in ("model.bin", "tokenizer.bin", "tokenizer.model", "config.toml"):
        assert (run / name).exists(), name


def test_a_resumed_dpo_run_repeats_the_uninterrupted_losses(chat):
    check_resume(dpo, dpo_trainer, lambda name: dpo_config(chat, name))


def test_dpo_with_lora_trains_only_the_adapters(chat):
    run = dpo(dpo_config(chat, "lora", lora_rank=4, lora_alpha=8.0, learning_rate=2e-2))
    sft_model, _ = load_checkpoint(chat / "out" / "chat" / "ckpt.pt")
    tuned, state = load_checkpoint(run / "ckpt.pt")  # merged onto out/chat
    lora = state["run_info"]["lora"]
    assert lora["rank"] == 4 and lora["rows"] == [] and set(state["model"]) == \
        {name for name in state["model"] if "lora_a" in name or "lora_b" in name}
    changed = {name for (name, a), b in zip(tuned.state_dict().items(), sft_model.state_dict().values(), strict=True)
               if not torch.equal(a, b)}
    assert changed and all(name.split(".")[-2] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for name in changed)


def test_dpo_refuses_what_it_cannot_start_from(chat, tmp_path):
    with pytest.raises(UserError, match="not a chat-tuned run"):
        dpo_trainer(dpo_config(chat, "x", init_from=str(chat / "out" / "base")), resume=False)
    with pytest.raises(UserError, match="dpo needs init_from"):
        dpo_trainer(dpo_config(chat, "x", init_from=""), resume=False)
    result = llama2zh("dpo", "--config", ROOT / "configs" / "sample_dpo.toml", f"--init_from={tmp_path / 'none'}",
                      f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "no such checkpoint" in result.stderr
    result = llama2zh("dpo", "--config", ROOT / "configs" / "sample_dpo.toml", "--dpo_beta=0")
    assert result.returncode == 2 and "dpo_beta must be positive" in result.stderr
