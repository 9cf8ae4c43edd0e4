"""Training batches from pretokenized shards (see pretokenize.py for the layout), and mixes of them.

Batches are random windows of seq_len + 1 tokens drawn with a torch.Generator, so a run is
reproducible and a resumed run continues exactly (the generator's state is checkpointed).
With several processes, every rank draws the same global batch and keeps its own rows: N
processes see exactly the batch one process would, and each reads only its own windows.

A Mixture draws each batch's rows from several datasets in proportion to their weights,
whatever their sizes: a dataset with weight w gets w of the rows, rounded up or down at random
(systematic rounding: one uniform draw per batch, each count's expectation exactly w * rows), so
the tokens of many batches follow the weights. It counts the training tokens drawn from each
dataset (its epochs); the counts are part of the state a checkpoint keeps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from llama2zh.errors import UserError
from llama2zh.fileio import sha256_file

DTYPES = {"uint16": "<u2", "uint32": "<u4"}


class TokenShards:
    def __init__(self, directory: Path):
        path = directory / "manifest.json"
        if not path.exists():
            raise UserError(f"{directory}: no manifest.json (run `llama2zh pretokenize` first)")
        self.directory = directory
        self.manifest = json.loads(path.read_text(encoding="utf-8"))
        dtype = DTYPES[self.manifest["dtype"]]
        self.splits = {}
        for split in ("train", "val"):
            entries = [e[split] for _, e in sorted(self.manifest["shards"].items()) if e[split]["tokens"]]
            self.splits[split] = [np.memmap(directory / e["file"], dtype=dtype, mode="r") for e in entries]
        if not self.splits["train"]:
            raise UserError(f"{directory}: no training tokens")

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    def tokens(self, split: str) -> int:
        return sum(len(s) for s in self.splits[split])

    def draw(self, split: str, count: int, seq_len: int, generator: torch.Generator) -> list[tuple[int, int]]:
        """count random windows of seq_len + 1 tokens: (shard index, start) each."""
        shards = self.splits[split] or self.splits["train"]
        lengths = torch.tensor([max(len(s) - seq_len - 1, 0) for s in shards], dtype=torch.float64)
        if lengths.sum() == 0:
            raise UserError(f"every {split} shard of {self.directory} is shorter than max_seq_len + 1 = "
                            f"{seq_len + 1} tokens")
        which = torch.multinomial(lengths, count, replacement=True, generator=generator).tolist()
        offsets = torch.rand(count, generator=generator, dtype=torch.float64).tolist()
        return [(shard, int(offset * lengths[shard])) for shard, offset in zip(which, offsets, strict=True)]

    def read(self, split: str, windows: list[tuple[int, int]], seq_len: int) -> np.ndarray:
        shards = self.splits[split] or self.splits["train"]
        return np.stack([np.asarray(shards[shard][start : start + seq_len + 1], dtype=np.int64)
                         for shard, start in windows])

    def batch(self, split: str, rows: int, seq_len: int, generator: torch.Generator,
              rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(inputs, targets, None), each (rows, seq_len): this rank's share of rows * world windows
        (no segments: a window runs across documents, as in llama2.c)."""
        windows = self.draw(split, rows * world, seq_len, generator)[rank * rows : (rank + 1) * rows]
        data = torch.from_numpy(self.read(split, windows, seq_len))
        return data[:, :-1], data[:, 1:], None


def allocate(weights: list[float], rows: int, generator: torch.Generator) -> list[int]:
    """rows split in proportion to weights (which sum to 1): systematic rounding of the cumulative
    shares with one uniform offset, so each count is its share rounded down or up, exact on average."""
    if len(weights) == 1:
        return [rows]
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    edges = [math.floor(rows * sum(weights[:i]) + u) for i in range(len(weights))] + [rows]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


class Mixture:
    """Datasets (name, weight, TokenShards) drawn together; the TokenShards.batch contract."""

    def __init__(self, parts: list[tuple[str, float, TokenShards]]):
        total = sum(weight for _, weight, _ in parts)
        self.names = [name for name, _, _ in parts]
        self.weights = [weight / total for _, weight, _ in parts]
        self.parts = [shards for _, _, shards in parts]
        self.drawn = [0] * len(parts)  # training tokens drawn from each (every rank's rows), for epochs

    @property
    def vocab_size(self) -> int:
        return self.parts[0].vocab_size

    def batch(self, split: str, rows: int, seq_len: int, generator: torch.Generator,
              rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor, None]:
        counts = allocate(self.weights, rows * world, generator)
        windows = [(i, w) for i, part in enumerate(self.parts) if counts[i]
                   for w in part.draw(split, counts[i], seq_len, generator)]
        if split == "train":
            self.drawn = [drawn + count * seq_len for drawn, count in zip(self.drawn, counts, strict=True)]
        mine = windows[rank * rows : (rank + 1) * rows]
        data = torch.from_numpy(np.concatenate([self.parts[i].read(split, [w for j, w in mine if j == i], seq_len)
                                                for i in sorted({i for i, _ in mine})]))
        return data[:, :-1], data[:, 1:], None

    def epochs(self, drawn: list[int] | None = None) -> dict[str, float]:
        """Per dataset, the training tokens drawn (these counts, or drawn) over the tokens it has."""
        return {name: tokens / part.tokens("train")
                for name, part, tokens in zip(self.names, self.parts, drawn or self.drawn, strict=True)}

    def state_dict(self) -> dict:
        return {"names": self.names, "weights": self.weights, "drawn": list(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        if (state["names"], state["weights"]) != (self.names, self.weights):
            mix = ", ".join(f"{n}={w:g}" for n, w in zip(state["names"], state["weights"], strict=True))
            raise UserError(f"the run was trained on the mix {mix}; resume it with that mix, or start a new out_dir")
        self.drawn = list(state["drawn"])


def open_mixture(datasets: list[tuple[str, float]], tokenizer_dir: Path, lang: str) -> Mixture:
    """The mix of dataset folders (path, weight), each pretokenized with tokenizer_dir's tokenizer.model
    and lang (or as any text, lang "any")."""
    tokenizer_sha256 = sha256_file(tokenizer_dir / "tokenizer.model")
    return Mixture([(Path(path).name, weight, open_shards(Path(path), tokenizer_dir.name, tokenizer_sha256, lang))
                    for path, weight in datasets])


def open_shards(path: Path, tokenizer_name: str, tokenizer_sha256: str, lang: str | None) -> TokenShards:
    """A dataset folder's shards made with the tokenizer tokenizer_name (whose tokenizer.model has
    that sha256) and lang (or as any text, lang "any"; lang None: any lang)."""
    shards = TokenShards(path / tokenizer_name)
    if shards.manifest["tokenizer_sha256"] != tokenizer_sha256:
        raise UserError(f"{path} was pretokenized with another {tokenizer_name}/tokenizer.model; "
                        "pretokenize it again (--force)")
    if lang is not None and shards.manifest["lang"] not in (lang, "any"):
        raise UserError(f"{path} was pretokenized with --lang {shards.manifest['lang']}, the config asks for "
                        f"lang = {lang}; pretokenize it again with --lang {lang} --force")
    return shards
