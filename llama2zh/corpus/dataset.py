"""Training batches from pretokenized shards (see pretokenize.py for the layout).

Batches are random windows of seq_len + 1 tokens drawn with a torch.Generator, so a run is
reproducible and a resumed run continues exactly (the generator's state is checkpointed).
With several processes, every rank draws the same global batch and keeps its own rows: N
processes see exactly the batch one process would, and each reads only its own windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llama2zh.errors import UserError

DTYPES = {"uint16": "<u2", "uint32": "<u4"}


class TokenShards:
    def __init__(self, directory: Path):
        path = directory / "manifest.json"
        if not path.exists():
            raise UserError(f"{directory}: no manifest.json (run `llama2zh pretokenize` first)")
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

    def batch(self, split: str, rows: int, seq_len: int, generator: torch.Generator,
              rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(inputs, targets, None), each (rows, seq_len): this rank's share of rows * world windows
        (no segments: a window runs across documents, as in llama2.c)."""
        shards = self.splits[split] or self.splits["train"]
        lengths = torch.tensor([max(len(s) - seq_len - 1, 0) for s in shards], dtype=torch.float64)
        if lengths.sum() == 0:
            raise UserError(f"every {split} shard is shorter than max_seq_len + 1 = {seq_len + 1} tokens")
        which = torch.multinomial(lengths, rows * world, replacement=True, generator=generator)
        offsets = torch.rand(rows * world, generator=generator, dtype=torch.float64)
        mine = range(rank * rows, (rank + 1) * rows)
        windows = np.stack([np.asarray(shards[int(which[i])][start : start + seq_len + 1], dtype=np.int64)
                            for i in mine for start in [int(offsets[i] * lengths[which[i]])]])
        data = torch.from_numpy(windows)
        return data[:, :-1], data[:, 1:], None
