"""Calibration for v3's 4-bit rounding (GPTQ, see export._gptq_q4): for each layer matrix, the
sum of x x^T over the inputs x it sees on CALIBRATION_TOKENS tokens of the run's own training data.

The data is the run's pretraining dataset(s) (for a fine-tuned run, its base run's), pretokenized
with the run's tokenizer, or a dataset folder given to `export --calibration`; the windows are
drawn with a fixed seed, so an export is reproducible.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from llama2zh.config import Config, load_config
from llama2zh.corpus.dataset import TokenShards, open_shards
from llama2zh.errors import UserError
from llama2zh.model import Transformer

# 64 windows of the demo model's 256 tokens (the GPTQ paper takes 128 of 2048). Four times as many
# lowered the demo model's KL to float32 further, from 0.0032 to 0.0023 (PyTorch, default v3), at four
# times the forward passes (16,384 tokens take 38 s through a 110M model on 2 CPU cores).
CALIBRATION_TOKENS = 16384
CALIBRATION_SEED = 0


def run_shards(state: dict, dataset: Path | None) -> tuple[TokenShards, Path] | None:
    """The token shards to calibrate a run's export on (state: its checkpoint), and their folder:
    dataset's, or the run's pretraining data (its base run's for a fine-tuned run), made with the
    run's tokenizer; None when the run names no such data that exists."""
    info, config = state.get("run_info", {}), Config(**state["config"])
    # a fine-tuned run's tokenizer extends its base's: the base's ids mean the same
    known = sorted({state.get("tokenizer_sha256"), info.get("base_tokenizer_sha256")} - {None})
    tokenizer = Path(config.tokenizer).name
    if dataset is not None:
        return _matching(dataset, tokenizer, known, raise_error=True), dataset
    folders = [(Path(path), tokenizer) for path, _ in config.datasets]
    # the base run's config.toml, not its checkpoint: weights and optimizer state are not needed here
    if info.get("base_run") and (Path(info["base_run"]) / "config.toml").exists():
        base = load_config(Path(info["base_run"]) / "config.toml")
        folders += [(Path(path), Path(base.tokenizer).name) for path, _ in base.datasets]
    for folder, name in folders:
        shards = _matching(folder, name, known, raise_error=False)
        if shards is not None:
            return shards, folder
    return None


def _matching(folder: Path, tokenizer: str, known: list[str], raise_error: bool) -> TokenShards | None:
    """folder's shards made with one of the known tokenizers, if any."""
    error = UserError(f"{folder}: the run's checkpoint names no tokenizer to check the data against")
    for sha in known:
        try:
            return open_shards(folder, tokenizer, sha, None)
        except UserError as e:
            error = e
    if raise_error:
        raise error
    return None


def calibration_tokens(shards: TokenShards, seq_len: int) -> torch.Tensor:
    """(rows, seq_len) windows of the training split, CALIBRATION_TOKENS in all (a window at least)."""
    rows = max(1, CALIBRATION_TOKENS // seq_len)
    inputs, _, _ = shards.batch("train", rows, seq_len, torch.Generator().manual_seed(CALIBRATION_SEED))
    return inputs


def input_hessians(model: Transformer, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """id(weight) -> x x^T summed over that layer matrix's inputs x (float32, inputs x inputs).
    wq, wk and wv see the same inputs, as do w1 and w3: one sum each."""
    sums: dict[str, torch.Tensor] = {}
    readers = {}  # the module whose input is summed -> the weights that share that input
    for i, layer in enumerate(model.layers):
        a, f = layer.attention, layer.feed_forward
        readers.update({f"{i}.wq": (a.wq, [a.wq, a.wk, a.wv]), f"{i}.wo": (a.wo, [a.wo]),
                        f"{i}.w1": (f.w1, [f.w1, f.w3]), f"{i}.w2": (f.w2, [f.w2])})

    def hook(name):
        def add(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
        return add

    handles = [module.register_forward_pre_hook(hook(name)) for name, (module, _) in readers.items()]
    try:
        with torch.inference_mode():
            for row in tqdm(tokens.split(1), desc="calibrating", unit="window", leave=False):
                model(row)
    finally:
        for handle in handles:
            handle.remove()
    return {id(linear.weight): sums[name] for name, (_, linears) in readers.items() for linear in linears}


def export_hessians(model: Transformer, state: dict | None, calibration: str | None,
                    ) -> tuple[dict[int, torch.Tensor] | None, str]:
    """v3's 4-bit rounding: the hessians for GPTQ from the run's data (or --calibration's), or None
    (rounding to nearest) for a .bin, a run with no data, or --calibration none; and its description."""
    if calibration == "none":
        return None, "4-bit rounding to nearest"
    found = run_shards(state, None if calibration is None else Path(calibration)) if state else None
    if found is None:
        if state:
            print("note: the run names no pretokenized data that exists (pass --calibration DATASET): 4-bit "
                  "weights rounded to nearest, less close to float32", file=sys.stderr)
        return None, "4-bit rounding to nearest"
    shards, folder = found
    tokens = calibration_tokens(shards, model.args.max_seq_len)
    return input_hessians(model, tokens), f"GPTQ on {tokens.numel():,} tokens of {folder}"
