"""ckpt.pt, the PyTorch side of a run directory: model args, weights, optimizer, step, config.

Saved atomically (a temp file beside it, then rename), so an interrupted save never leaves
a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output
from llama2zh.model import ModelArgs, Transformer


def save_checkpoint(path: str | Path, model: Transformer, *, config: dict, tokenizer_sha256: str,
                    step: int = 0, optimizer: dict | None = None, run_info: dict | None = None) -> Path:
    """run_info: what else the run records (sft: the base run, the chat pieces added)."""
    path = Path(path)
    state = {
        "model_args": model.args.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer,
        "step": step,
        "config": config,
        "tokenizer_sha256": tokenizer_sha256,
        "run_info": run_info or {},
    }
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path) -> tuple[Transformer, dict]:
    """The model rebuilt from ckpt.pt, and the whole checkpoint dict."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = Transformer(ModelArgs(**state["model_args"]))
        model.load_state_dict(state["model"])
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except Exception as e:  # a corrupt or foreign file: say so in one line
        raise UserError(f"{path}: not a llama2zh checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None
    return model, state
