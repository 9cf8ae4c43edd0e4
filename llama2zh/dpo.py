"""`llama2zh dpo`: Direct Preference Optimization (Rafailov et al. 2023) of a chat-tuned run.

For a prompt with a chosen reply y_w and a rejected one y_l, the policy (init_from's weights, all
trained or LoRA adapters on them) and the reference (init_from again, frozen) give each reply the
reward r(y) = beta * (log p_policy(y) - log p_reference(y)), the log-probabilities summed over the
reply's tokens (its content and <|im_end|>, as corpus/preferences.py marks them). The loss,
-log sigmoid(r(y_w) - r(y_l)) averaged over pairs, raises the chosen reply against the rejected
one, each measured from where the reference stood, so the policy pays for drifting away from it.
DPO alone can lower the chosen replies' likelihood too, only the rejected ones' more, and on a
tiny model pushed hard that costs what sft taught (configs/sample_dpo.toml measures it);
dpo_nll_weight adds the chosen replies' cross-entropy per token, times the weight, to the loss,
which holds it (RPO, Pang et al. 2024; TRL's rpo_alpha). Reward accuracy (pairs with
r(y_w) > r(y_l)) and margin (mean r(y_w) - r(y_l)) go to the progress bar and metrics.jsonl, for
train and val. Everything else is train.Trainer's: resume, DDP, bf16, the NaN guard,
checkpoints, metrics.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from llama2zh.config import Config
from llama2zh.corpus.preferences import PreferenceShards, tokenize_preferences
from llama2zh.errors import UserError
from llama2zh.fileio import sha256_file
from llama2zh.sft import start_from
from llama2zh.train import Trainer, autocast_context, run_stage


def reply_logps(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the targets y (-1: not counted) under logits."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")
    return -nll.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean DPO loss of a batch of pairs, and each pair's chosen and rejected rewards (detached)."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def pair_logps(model, chosen_x, chosen_y, rejected_x, rejected_y) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and rejected replies' log-probabilities under model, both sides in one forward pass."""
    logps = reply_logps(model(torch.cat([chosen_x, rejected_x])), torch.cat([chosen_y, rejected_y]))
    return logps[:len(chosen_x)], logps[len(chosen_x):]


class DPOTrainer(Trainer):
    """train.Trainer with the DPO loss on batches of pairs (corpus.preferences.PreferenceShards)."""

    def __init__(self, config: Config, data: PreferenceShards, model, reference, tokenizer_sha256: str,
                 resume: bool, run_info: dict):
        super().__init__(config, data, model, tokenizer_sha256, resume, run_info)
        self.reference = reference.requires_grad_(False).eval().to(self.device)
        self.rewards = {"train": [], "val": []}  # per split, the (chosen, rejected) rewards since last reported

    def batch_tokens(self, batch) -> int:
        return batch[0].numel() + batch[2].numel()

    def loss(self, chosen_x, chosen_y, rejected_x, rejected_y, segments=None, model=None) -> torch.Tensor:
        with autocast_context(self.dtype, self.device):
            policy = pair_logps(model or self.forward_model, chosen_x, chosen_y, rejected_x, rejected_y)
            with torch.no_grad():
                reference = pair_logps(self.reference, chosen_x, chosen_y, rejected_x, rejected_y)
        loss, chosen, rejected = dpo_loss(*policy, *reference, self.c.dpo_beta)
        self.rewards["train" if self.model.training else "val"].append((chosen, rejected))
        if self.c.dpo_nll_weight:  # the chosen replies' mean loss per token, so that their likelihood holds
            loss = loss - self.c.dpo_nll_weight * policy[0].sum() / (chosen_y >= 0).sum()
        return loss

    def reported(self, split: str) -> dict:
        """Reward accuracy and margin over the pairs since the last call (all ranks' under DDP)."""
        if not self.rewards[split]:
            return {}
        chosen, rejected = (torch.cat(side) for side in zip(*self.rewards[split], strict=True))
        self.rewards[split] = []
        accuracy, margin = self.dist.average(torch.stack([(chosen > rejected).float().mean(),
                                                          (chosen - rejected).mean()])).tolist()
        return {"reward_accuracy": accuracy, "reward_margin": margin}


def dpo_trainer(config: Config, resume: bool = True, strict: bool = False) -> DPOTrainer:
    base, state, config, tokenizer_model, _ = start_from(config, "dpo", "the chat-tuned run")
    base_run = Path(config.init_from)
    if state.get("run_info", {}).get("stage") not in ("sft", "dpo"):
        raise UserError(f"init_from {base_run} is not a chat-tuned run: run llama2zh sft first")
    data = PreferenceShards(tokenize_preferences(Path(config.dataset), tokenizer_model, config.max_seq_len, strict),
                            config.max_seq_len)
    split = data.manifest["splits"]["train"]
    print(f"dpo: {split['pairs']:,} pairs ({split['trained_tokens']:,} reply tokens of {split['tokens']:,}; "
          f"{split['cut']} cut, {split['dropped']} dropped), beta {config.dpo_beta}, reference {base_run}")
    run_info = {**state["run_info"], "stage": "dpo", "base_run": str(base_run), "base_step": state["step"],
                "dpo_beta": config.dpo_beta}
    run_info.pop("lora", None)  # init_from's own adapters are merged into it; this run records its own
    policy, reference = (base.extended(max_seq_len=config.max_seq_len) for _ in range(2))  # two copies
    return DPOTrainer(config, data, policy, reference, sha256_file(tokenizer_model), resume, run_info)


def dpo(config: Config, resume: bool = True, strict: bool = False) -> Path:
    trainer = dpo_trainer(config, resume, strict)
    return run_stage(trainer.c, trainer, Path(config.out_dir) / "tokenizer.model")
