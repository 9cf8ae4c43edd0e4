"""`llama2zh sft`: instruction tuning a pretrained run into a chat model.

What is particular to sft; the loop is train.py's.
- The tokenizer: the base run's, with the chat pieces appended when it lacks them (every old
  id kept); the model grows by as many embedding rows (Transformer.extended).
- The data: conversations in .jsonl, .json, .parquet or .csv files (corpus/conversations.py
  reads the three forms), rendered by the chat template (chat.py) once into token shards beside
  the data, DATASET/chat-<sha>/:
  {train,val}.bin (the ids, BOS before each conversation, uint16 or uint32) and
  {train,val}.mask (one byte per id: 1 where the loss is taken, on the assistant's content and
  its <|im_end|>), with manifest.json (tokenizer sha256, max_seq_len, the sources' sha256).
  A conversation longer than max_seq_len + 1 ids is cut after its last whole turn that fits
  (mid-turn when even the first reply does not fit), and counted.
- The batches: conversations packed whole into rows of max_seq_len + 1 ids (best fit,
  longest first), each row's conversations kept apart by an attention mask (segments).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llama2zh.chat import CHAT_PIECES, TEMPLATE, add_chat_pieces, chat_piece_ids, message_pieces
from llama2zh.checkpoint import load_checkpoint
from llama2zh.config import Config
from llama2zh.corpus.conversations import SUFFIXES, Malformed, ReadReport, read_conversations
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output, atomic_write_bytes, sha256_file
from llama2zh.model import Transformer
from llama2zh.train import Trainer, run_stage

PAD = 0  # the id padding holds (never trained on, never attended to by a conversation)


def chat_tokenizer(base_run: Path, run_dir: Path) -> tuple[Path, int]:
    """run_dir/tokenizer.model: the base run's, with the chat pieces when it lacks them; and how
    many pieces were added."""
    source = base_run / "tokenizer.model"
    if not source.exists():
        raise UserError(f"{base_run}: no tokenizer.model (init_from must be a run directory)")
    model, added = add_chat_pieces(source.read_bytes())
    target = run_dir / "tokenizer.model"
    if not target.exists() or target.read_bytes() != model:
        atomic_write_bytes(target, [model])
    return target, added


def fit_turns(pieces: list[tuple[list[int], list[bool]]], limit: int) -> tuple[list[int], list[bool], str]:
    """A conversation rendered message by message, made to fit limit ids: (ids, trained, how),
    how one of "whole", "truncated" (after its last whole turn that fits and holds a trained
    id) or "cut" (mid-turn); ([], [], "dropped") when not even a cut keeps a trained id."""
    ids = [i for p in pieces for i in p[0]]
    trained = [t for p in pieces for t in p[1]]
    if len(ids) <= limit:
        return ids, trained, "whole"
    end = 0
    for k in range(1, len(pieces) + 1):
        length = sum(len(p[0]) for p in pieces[:k])
        if length > limit:
            break
        if any(t for p in pieces[:k] for t in p[1]):
            end = length
    if end:
        return ids[:end], trained[:end], "truncated"
    if any(trained[:limit]):
        return ids[:limit], trained[:limit], "cut"
    return [], [], "dropped"


def split_files(dataset: Path) -> dict[str, list[Path]]:
    """The dataset's data files (.jsonl, .json, .parquet, .csv): those named val* are the val split,
    the rest train."""
    kinds = ", ".join(SUFFIXES)
    if not dataset.is_dir():
        raise UserError(f"{dataset}: no such directory of {kinds} files (the dataset)")
    files = sorted(p for p in dataset.iterdir() if p.suffix in SUFFIXES and p.is_file())
    splits = {"train": [p for p in files if not p.name.startswith("val")],
              "val": [p for p in files if p.name.startswith("val")]}
    if not splits["train"]:
        raise UserError(f"{dataset}: no training data (train* or any file not named val*, one of {kinds})")
    return splits


def write_split(out_dir: Path, split: str, report: ReadReport, ids_chunks: list, mask_chunks: list,
                dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Prints what report skipped; writes out_dir/{split}.bin (the ids) and .mask (a byte per id)."""
    if report.summary():
        for problem in report.problems:
            print(f"warning: {problem}")
        print(f"{split}: {report.summary()}")
    ids = np.concatenate(ids_chunks) if ids_chunks else np.zeros(0, dtype=dtype)
    mask = np.concatenate(mask_chunks) if mask_chunks else np.zeros(0, dtype=np.uint8)
    atomic_write_bytes(out_dir / f"{split}.bin", [ids.tobytes()])
    atomic_write_bytes(out_dir / f"{split}.mask", [mask.tobytes()])
    return ids, mask


def tokenize_split(sp, files: list[Path], out_dir: Path, split: str, limit: int, dtype: str,
                   strict: bool) -> dict:
    """Writes out_dir/{split}.bin and .mask; returns the split's manifest entry."""
    report, counts = ReadReport(), {"whole": 0, "truncated": 0, "cut": 0, "dropped": 0}
    ids_chunks, mask_chunks = [], []
    for path in files:
        for messages in tqdm(read_conversations(path, report, strict), desc=f"sft data {path.name}",
                             unit=" conv", leave=False):
            ids, trained, how = fit_turns(message_pieces(sp, messages), limit)
            counts[how] += 1
            if ids:
                ids_chunks.append(np.asarray(ids, dtype=dtype))
                mask_chunks.append(np.asarray(trained, dtype=np.uint8))
    ids, mask = write_split(out_dir, split, report, ids_chunks, mask_chunks, dtype)
    return {"conversations": len(ids_chunks), "tokens": int(ids.size), "trained_tokens": int(mask.sum()),
            "malformed": report.skipped, "problems": report.problems, "formats": report.formats,
            **{how: counts[how] for how in ("truncated", "cut", "dropped")}}


def tokenize_conversations(dataset: Path, tokenizer_model: Path, max_seq_len: int, strict: bool = False) -> Path:
    """The dataset's conversations as token shards for this tokenizer (made once, reused after)."""
    return tokenize_dataset(dataset, tokenizer_model, max_seq_len, strict, "chat", tokenize_split)


def tokenize_dataset(dataset: Path, tokenizer_model: Path, max_seq_len: int, strict: bool, prefix: str,
                     tokenize: Callable) -> Path:
    """DATASET/{prefix}-<sha>/: each split of the dataset's files as tokenize(sp, files, out_dir,
    split, max_seq_len + 1, dtype, strict) writes it, which returns the split's manifest entry
    (with its "problems"); made once for these sources, tokenizer and max_seq_len, reused after."""
    import sentencepiece as spm

    splits = split_files(dataset)
    tokenizer_sha256 = sha256_file(tokenizer_model)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    if sp.bos_id() < 0:
        raise UserError(f"{tokenizer_model}: has no BOS piece, which marks where conversations start")
    header = {"tokenizer_sha256": tokenizer_sha256, "vocab_size": sp.vocab_size(), "bos_id": sp.bos_id(),
              "dtype": "uint16" if sp.vocab_size() <= 1 << 16 else "uint32", "max_seq_len": max_seq_len,
              "template": TEMPLATE,
              "sources": {p.name: sha256_file(p) for files in splits.values() for p in files}}
    out_dir = dataset / f"{prefix}-{hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:12]}"
    if (out_dir / "manifest.json").exists():
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
        problems = [p for split in manifest["splits"].values() for p in split["problems"]]
        if strict and problems:  # made before without --strict, skipping these
            raise Malformed(problems[0])
        return out_dir
    out_dir.mkdir(exist_ok=True)
    dtype = "<u2" if header["dtype"] == "uint16" else "<u4"
    manifest = {**header, "splits": {split: tokenize(sp, files, out_dir, split, max_seq_len + 1, dtype, strict)
                                     for split, files in splits.items()}}
    with atomic_output(out_dir / "manifest.json") as tmp:  # last: marks the shards complete
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of lengths grouped into rows of at most capacity: best fit, longest first."""
    rows, open_rows = [], [[] for _ in range(capacity + 1)]  # open_rows[room]: rows with that much room left
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        room = next((r for r in range(lengths[i], capacity + 1) if open_rows[r]), None)
        row = open_rows[room].pop() if room is not None else len(rows)
        if room is None:
            rows.append([])
            room = capacity
        rows[row].append(i)
        open_rows[room - lengths[i]].append(row)
    return rows


def read_shards(directory: Path, seq_len: int) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray, list]]]:
    """What tokenize_dataset wrote: its manifest, and per split (ids, mask, spans), spans the
    (start, length) of each sequence (each begins with BOS), in the order written."""
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    if manifest["max_seq_len"] != seq_len:
        raise UserError(f"{directory} was made for max_seq_len {manifest['max_seq_len']}, not {seq_len}")
    dtype = "<u2" if manifest["dtype"] == "uint16" else "<u4"
    splits = {}
    for split in ("train", "val"):
        ids = np.fromfile(directory / f"{split}.bin", dtype=dtype)
        mask = np.fromfile(directory / f"{split}.mask", dtype=np.uint8)
        starts = np.flatnonzero(ids == manifest["bos_id"])
        splits[split] = (ids, mask, list(zip(starts.tolist(), np.diff(np.append(starts, ids.size)).tolist(),
                                             strict=True)))
    return manifest, splits


class ConversationShards:
    """Batches of packed conversations: inputs, targets (-1 where not trained on), segments."""

    def __init__(self, directory: Path, seq_len: int):
        self.manifest, splits = read_shards(directory, seq_len)
        self.capacity = seq_len + 1
        self.splits = {}
        for split, (ids, mask, spans) in splits.items():
            rows = [[spans[i] for i in row] for row in pack([n for _, n in spans], self.capacity)]
            self.splits[split] = (ids, mask, rows)
        if not self.splits["train"][2]:
            raise UserError(f"{directory}: no training conversations")

    def padding(self, split: str = "train") -> float:
        """The share of the rows' positions that are padding."""
        ids, _, rows = self.splits[split]
        return 1 - ids.size / max(1, len(rows) * self.capacity)

    def _split(self, split: str):
        """(ids, mask, packed rows) of a split, or of the train split when it has none."""
        return self.splits[split] if self.splits[split][2] else self.splits["train"]

    def rows(self, split: str, which: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed rows of a split (the train split when it has none) as (inputs, targets, segments)."""
        ids, mask, packed = self._split(split)
        tokens = np.full((len(which), self.capacity), PAD, dtype=np.int64)
        trained = np.zeros((len(which), self.capacity), dtype=bool)
        segments = np.full((len(which), self.capacity), -1, dtype=np.int64)
        for r, row in enumerate(which):
            at = 0
            for s, (start, n) in enumerate(packed[row]):
                tokens[r, at:at + n] = ids[start:start + n]
                trained[r, at:at + n] = mask[start:start + n].astype(bool)
                segments[r, at:at + n] = s
                at += n
        targets = np.where(trained[:, 1:], tokens[:, 1:], -1)
        return (torch.from_numpy(tokens[:, :-1]), torch.from_numpy(targets),
                torch.from_numpy(segments[:, :-1]).contiguous())

    def n_rows(self, split: str) -> int:
        return len(self._split(split)[2])

    def batch(self, split: str, rows: int, seq_len: int, generator: torch.Generator,
              rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of rows * world packed rows drawn at random."""
        which = torch.randint(self.n_rows(split), (rows * world,), generator=generator)
        return self.rows(split, which[rank * rows:(rank + 1) * rows].tolist())


def start_from(config: Config, stage: str, what: str) -> tuple[Transformer, dict, Config, Path, int]:
    """What a stage on init_from's weights (sft, dpo) begins with: init_from's model and checkpoint; the config
    with its shape and with out_dir's tokenizer (init_from's, the chat pieces added when it lacks them); that
    tokenizer's path, and how many pieces were added."""
    if not config.init_from:
        raise UserError(f"{stage} needs init_from: {what} to start from (--init_from=out/RUN)")
    base_run, run_dir = Path(config.init_from), Path(config.out_dir)
    if base_run.resolve() == run_dir.resolve():
        raise UserError(f"out_dir {run_dir} is init_from: {stage} writes a new run directory")
    base, base_state = load_checkpoint(base_run / "ckpt.pt")
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_model, added = chat_tokenizer(base_run, run_dir)
    shape = base.args
    config = replace(config, tokenizer=str(run_dir), dim=shape.dim, n_layers=shape.n_layers, n_heads=shape.n_heads,
                     n_kv_heads=shape.n_kv_heads, hidden_dim=shape.hidden_dim,
                     shared_classifier=shape.shared_classifier, norm_eps=shape.norm_eps)
    return base, base_state, config, tokenizer_model, added


def sft_trainer(config: Config, resume: bool = True, strict: bool = False) -> Trainer:
    base, base_state, config, tokenizer_model, added = start_from(config, "sft", "the pretrained run directory")
    base_run = Path(config.init_from)
    model = base.extended(added, config.max_seq_len)
    shards = tokenize_conversations(Path(config.dataset), tokenizer_model, config.max_seq_len, strict)
    data = ConversationShards(shards, config.max_seq_len)
    split = data.manifest["splits"]["train"]
    print(f"sft: {split['conversations']:,} conversations ({split['trained_tokens']:,} of {split['tokens']:,} "
          f"tokens trained on; {split['truncated']} truncated at a turn, {split['cut']} cut mid-turn, "
          f"{split['dropped']} dropped) in {len(data.splits['train'][2]):,} rows of {data.capacity}: "
          f"padding {data.padding():.1%}" + (f"; {added} chat pieces added to the tokenizer" if added else ""))
    run_info = {"stage": "sft", "base_run": str(base_run), "base_step": base_state["step"],
                "base_tokenizer_sha256": base_state["tokenizer_sha256"], "chat_pieces_added": added,
                "chat_pieces": list(CHAT_PIECES), "chat_template": TEMPLATE}
    import sentencepiece as spm

    chat_ids = chat_piece_ids(spm.SentencePieceProcessor(model_file=str(tokenizer_model))) or ()
    return Trainer(config, data, model, sha256_file(tokenizer_model), resume, run_info, trained_rows=chat_ids)


def sft(config: Config, resume: bool = True, strict: bool = False) -> Path:
    trainer = sft_trainer(config, resume, strict)
    return run_stage(trainer.c, trainer, Path(config.out_dir) / "tokenizer.model")
