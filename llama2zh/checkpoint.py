"""ckpt.pt, the PyTorch side of a run directory: model args, weights, optimizer, step, config.

Saved atomically (a temp file beside it, then rename), so an interrupted save never leaves
a half-written checkpoint in place of a good one.

A LoRA run's checkpoint holds only what it trained (the adapters, and the chat pieces' embedding rows)
and, in run_info["lora"], its base: the base checkpoint's path relative to the run directory
and that file's sha256. load_checkpoint rebuilds the base, checks the sha256, and returns the
merged plain model, so every reader of a run (eval, chat, sample, verify, every export) gets
merged weights with nothing to do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output, sha256_file
from llama2zh.lora import apply_lora, is_lora, load_lora_state_dict, lora_state_dict, merge_lora
from llama2zh.model import ModelArgs, Transformer


def save_checkpoint(path: str | Path, model: Transformer, *, config: dict, tokenizer_sha256: str,
                    step: int = 0, optimizer: dict | None = None, run_info: dict | None = None) -> Path:
    """run_info: what else the run records (sft: the base run, the chat pieces added; LoRA: its base)."""
    path = Path(path)
    state = {
        "model_args": model.args.to_dict(),
        "model": lora_state_dict(model) if is_lora(model) else model.state_dict(),
        "optimizer": optimizer,
        "step": step,
        "config": config,
        "tokenizer_sha256": tokenizer_sha256,
        "run_info": run_info or {},
    }
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """ckpt.pt's dict, as saved."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except Exception as e:  # a corrupt or foreign file: say so in one line
        raise UserError(f"{path}: not a llama2zh checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None


def lora_base(path: str | Path, lora: dict) -> Path:
    """The base checkpoint of a LoRA checkpoint at path, checked to be the one it was trained on."""
    base = Path(path).parent / lora["base_ckpt"]
    if not base.is_file():
        raise UserError(f"{path}: LoRA adapters on {base}, which is gone (the base run must stay where it was)")
    if sha256_file(base) != lora["base_sha256"]:
        raise UserError(f"{path}: LoRA adapters on {base}, which has changed since (sha256 "
                        f"{lora['base_sha256'][:12]}..., now {sha256_file(base)[:12]}...): they fit the old base only")
    return base


def lora_model(path: str | Path, state: dict) -> Transformer:
    """The unmerged LoRA model of a checkpoint: its base (grown as the stage grew it) with its adapters."""
    lora = state["run_info"]["lora"]
    base, _ = load_checkpoint(lora_base(path, lora))
    args = ModelArgs(**state["model_args"])
    try:
        model = base.extended(args.vocab_size - base.args.vocab_size, args.max_seq_len)
        apply_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"], lora["rows"])
        load_lora_state_dict(model, state["model"])
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{path}: its LoRA adapters do not fit its base {lora['base_ckpt']} "
                        f"({type(e).__name__}: {e})".splitlines()[0]) from None
    return model


def load_checkpoint(path: str | Path) -> tuple[Transformer, dict]:
    """The model rebuilt from ckpt.pt (a LoRA run's merged into its base), and the whole checkpoint dict."""
    state = read_checkpoint(path)
    if state.get("run_info", {}).get("lora"):
        return merge_lora(lora_model(path, state)), state
    try:
        model = Transformer(ModelArgs(**state["model_args"]))
        model.load_state_dict(state["model"])
    except Exception as e:  # a foreign dict: say so in one line
        raise UserError(f"{path}: not a llama2zh checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None
    return model, state
