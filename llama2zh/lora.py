"""LoRA (Hu et al. 2021): low-rank adapters trained on a frozen Transformer, written by hand.

apply_lora wraps the chosen projections in place: each frozen weight W (out x in) gets a
trainable pair A (rank x in, nn.Linear's own uniform init) and B (out x rank, zeros), and the
layer computes W x + (alpha / rank) * B A dropout(x), so the wrapped model starts exactly as
its base. The embedding (and classifier) rows of a few token ids can be trained too: sft's chat
pieces, which pretraining never showed as input (or sft just appended, as copies of one mean
row that frozen could never be told apart); PEFT calls this trainable_token_indices.
merge_lora folds it all back into a plain Transformer (W + scale * B A), which is all that
eval, export and the C engine ever see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama2zh.config import LORA_TARGETS as TARGETS
from llama2zh.model import Transformer


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        bound = base.in_features ** -0.5  # kaiming_uniform(a=sqrt(5)), as nn.Linear initialises
        with torch.no_grad():
            self.lora_a.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_b @ self.lora_a)


class TrainedRows(nn.Module):
    """An embedding (or classifier) over a frozen matrix whose rows of some token ids are trained."""

    def __init__(self, weight: nn.Parameter, ids: torch.Tensor, rows: nn.Parameter, embedding: bool):
        super().__init__()
        self.frozen, self.rows, self.embedding = weight.requires_grad_(False), rows, embedding
        self.register_buffer("ids", ids, persistent=False)

    def merged_weight(self) -> torch.Tensor:
        return self.frozen.index_put((self.ids,), self.rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.merged_weight()) if self.embedding else F.linear(x, self.merged_weight())


def apply_lora(model: Transformer, rank: int, alpha: float, dropout: float = 0.0, targets=TARGETS,
               rows: list[int] = (), generator: torch.Generator | None = None) -> Transformer:
    """model, in place: every weight frozen, adapters on the targets, the token rows of ids rows trained."""
    model.requires_grad_(False)
    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            for name in TARGETS:  # a fixed order, so a seed gives the same adapters
                if name in targets and hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout, generator))
    if rows:
        ids = torch.tensor(sorted(rows), device=model.tok_embeddings.weight.device)
        embedding = nn.Parameter(model.tok_embeddings.weight.detach()[ids].clone())
        output = embedding if model.args.shared_classifier else nn.Parameter(model.output.weight.detach()[ids].clone())
        model.output = TrainedRows(model.output.weight, ids, output, embedding=False)
        model.tok_embeddings = TrainedRows(model.tok_embeddings.weight, ids, embedding, embedding=True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors only: adapters (and token rows), by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_lora_state_dict(model: nn.Module, adapters: dict[str, torch.Tensor]) -> None:
    expected = set(lora_state_dict(model))
    if set(adapters) != expected:
        raise ValueError(f"the adapters do not fit: {sorted(set(adapters) ^ expected)[:3]}")
    model.load_state_dict(adapters, strict=False)


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """A plain Transformer whose weights are the adapted ones (W + scale * B A)."""
    plain = Transformer(model.args)
    names = plain.state_dict().keys()
    state = {name: t for name, t in model.state_dict().items() if name in names}
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, TrainedRows)):
            state[f"{name}.weight"] = module.merged_weight()
    plain.load_state_dict(state)
    return plain.to(next(model.parameters()).device)


def is_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, TrainedRows)) for m in model.modules())
