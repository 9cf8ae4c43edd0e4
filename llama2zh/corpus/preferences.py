"""Preference pairs (.jsonl, one pair a line, or .json/.parquet/.csv, one pair a record, as
conversations.py reads files) for `llama2zh dpo`: reading and tokenizing.

Three forms, detected per file from its first well-formed record:
  minimind   {"chosen": [messages], "rejected": [messages]}: two conversations, the same messages
             before their last, which is an assistant reply on each side
  trl        {"prompt": "...", "chosen": "...", "rejected": "..."}: a user message, two replies
  trl_chat   {"prompt": [messages], "chosen": [message], "rejected": [message]}: TRL's
             conversational form, one assistant message a side
Optional in every form, "rejected_ends": false says the rejected reply has no end (it loops, or
is cut off): it is tokenized without <|im_end|>, so that the pair teaches ending where the chosen
reply ends. Other keys ("kind", "task", ...) are ignored.

Messages are checked as sft checks a conversation (conversations.to_messages: roles, a system
message only first, no empty content); a pair also needs its reply to follow a user message,
the same prompt on both sides and two different replies. A malformed record is named by file
and line and skipped (counted in the split's summary), or with strict=True stops the reading,
as in sft. Each pair becomes Pair(prompt messages, chosen text, rejected text, rejected_ends).

Tokenized once, beside the data, as sft's conversations are (sft.tokenize_dataset):
DATASET/pref-<sha>/{train,val}.bin (ids) and .mask (a byte per id: 1 where the loss is taken)
with manifest.json. Each pair is two sequences, its chosen then its rejected one, each BOS and
the chat template's ids of prompt + reply (chat.message_pieces, as sft renders a conversation):
the prompt's messages untrained, the reply trained on its content and <|im_end|>, where the
sequence stops (on its content alone when it has no end). A sequence longer than max_seq_len + 1
ids is cut mid-reply as sft.fit_turns cuts; a pair with a side that keeps no trained id is
dropped, and both are counted. PreferenceShards gives padded batches of pairs.
"""

from __future__ import annotations

from collections import Counter, namedtuple
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llama2zh.chat import message_pieces
from llama2zh.corpus.conversations import Malformed, ReadReport, read_records, to_messages
from llama2zh.errors import UserError
from llama2zh.sft import PAD, fit_turns, read_shards, tokenize_dataset, write_split

FORMS = ("minimind", "trl", "trl_chat")
SIDES = ("chosen", "rejected")
Pair = namedtuple("Pair", "prompt chosen rejected rejected_ends")


def detect_form(record) -> str:
    """The form of one parsed record, or Malformed."""
    if isinstance(record, dict) and "chosen" in record and "rejected" in record:
        if "prompt" not in record:
            return "minimind"
        return "trl_chat" if isinstance(record["prompt"], list) else "trl"
    raise Malformed('not a preference pair (expected {"chosen", "rejected"}, with a "prompt" or without)')


def _sides(record, form: str) -> list:
    """The record's two conversations, chosen and rejected, as lists of turns (unchecked)."""
    if form == "minimind":
        return [record[side] for side in SIDES]
    if form == "trl":
        for key in ("prompt", *SIDES):
            if not isinstance(record[key], str):
                raise Malformed(f"{key} is not a string")
        return [[{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record[side]}]
                for side in SIDES]
    for side in SIDES:
        if not isinstance(record[side], list) or len(record[side]) != 1:
            raise Malformed(f"{side} is not a list of one message (the reply)")
    return [record["prompt"] + record[side] for side in SIDES]


def to_pair(record, form: str) -> Pair:
    """The record as a checked Pair."""
    if detect_form(record) != form:
        raise Malformed(f"a {detect_form(record)} record in a {form} file")
    ends = record.get("rejected_ends")
    ends = True if ends is None else ends  # None: absent (datasets gives a record every column of its file)
    if not isinstance(ends, bool):
        raise Malformed("rejected_ends is not true or false")
    conversations = []
    for side, turns in zip(SIDES, _sides(record, form), strict=True):
        if not isinstance(turns, list) or not turns:
            raise Malformed(f"{side} is not a list of messages")
        try:
            messages = to_messages({"conversations": turns}, "native")
        except Malformed as e:
            raise Malformed(f"{side}: {e}") from None
        if messages[-1]["role"] != "assistant":
            raise Malformed(f"{side} does not end with an assistant reply")
        if len(messages) < 2 or messages[-2]["role"] != "user":
            raise Malformed(f"{side}: the reply does not follow a user message")
        conversations.append(messages)
    chosen, rejected = conversations
    if chosen[:-1] != rejected[:-1]:
        raise Malformed("chosen and rejected differ before their last reply (a pair shares its prompt)")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise Malformed("chosen and rejected are the same reply")
    return Pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], ends)


def read_preferences(path: Path, report: ReadReport, strict: bool = False) -> Iterator[Pair]:
    """The pairs of one file, malformed records skipped (and counted in report)."""
    return read_records(path, report, strict, detect_form, to_pair)


def reply_pieces(sp, prompt: list[dict], reply: str, ends: bool = True) -> list[tuple[list[int], list[bool]]]:
    """message_pieces of prompt + reply with only the reply trained on (its content and
    <|im_end|>, where it stops; its content alone, and no <|im_end|>, when it has no end)."""
    *context, (ids, trained) = message_pieces(sp, [*prompt, {"role": "assistant", "content": reply}])
    keep = len(ids) - len(sp.encode("\n")) - (0 if ends else 1)
    return [*((p, [False] * len(p)) for p, _ in context), (ids[:keep], trained[:keep])]


def tokenize_split(sp, files: list[Path], out_dir: Path, split: str, limit: int, dtype: str, strict: bool) -> dict:
    """Writes out_dir/{split}.bin and .mask (per pair, its chosen then its rejected sequence);
    returns the split's manifest entry."""
    report, counts = ReadReport(), Counter()
    ids_chunks, mask_chunks = [], []
    for path in files:
        for pair in tqdm(read_preferences(path, report, strict), desc=f"dpo data {path.name}", unit=" pair",
                         leave=False):
            sides = [fit_turns(reply_pieces(sp, pair.prompt, reply, ends), limit)
                     for reply, ends in ((pair.chosen, True), (pair.rejected, pair.rejected_ends))]
            hows = {how for *_, how in sides}
            counts["dropped" if "dropped" in hows else "cut" if "cut" in hows else "whole"] += 1
            if "dropped" not in hows:
                for ids, trained, _ in sides:
                    ids_chunks.append(np.asarray(ids, dtype=dtype))
                    mask_chunks.append(np.asarray(trained, dtype=np.uint8))
    ids, mask = write_split(out_dir, split, report, ids_chunks, mask_chunks, dtype)
    return {"pairs": len(ids_chunks) // 2, "tokens": int(ids.size), "trained_tokens": int(mask.sum()),
            "malformed": report.skipped, "problems": report.problems, "formats": report.formats,
            "cut": counts["cut"], "dropped": counts["dropped"]}


def tokenize_preferences(dataset: Path, tokenizer_model: Path, max_seq_len: int, strict: bool = False) -> Path:
    """The dataset's preference pairs as token shards for this tokenizer (made once, reused after)."""
    return tokenize_dataset(dataset, tokenizer_model, max_seq_len, strict, "pref", tokenize_split)


class PreferenceShards:
    """Batches of tokenized pairs, each side right-padded to the longest sequence of the batch.

    batch() and pairs() give (chosen_x, chosen_y, rejected_x, rejected_y), each (rows, width)
    with one width for all four: x the input ids (PAD after the sequence), y the next ids where
    trained on (the reply, whose log-probabilities DPO sums) and -1 elsewhere. Row r of the
    chosen and of the rejected tensors is one pair, so the two go through one forward pass."""

    def __init__(self, directory: Path, seq_len: int):
        self.manifest, splits = read_shards(directory, seq_len)
        self.splits = {}
        for split, (ids, mask, spans) in splits.items():
            if len(spans) % 2:
                raise UserError(f"{directory}: {split}.bin holds {len(spans)} sequences, not chosen/rejected pairs")
            self.splits[split] = (ids, mask, list(zip(spans[0::2], spans[1::2], strict=True)))
        if not self.splits["train"][2]:
            raise UserError(f"{directory}: no training pairs")

    def _split(self, split: str):
        """(ids, mask, pairs of spans) of a split, or of the train split when it has none."""
        return self.splits[split] if self.splits[split][2] else self.splits["train"]

    def n_pairs(self, split: str) -> int:
        return len(self._split(split)[2])

    def pairs(self, split: str, which: list[int]) -> tuple[torch.Tensor, ...]:
        """Pairs of a split (the train split when it has none) by index, as the four tensors."""
        ids, mask, pairs = self._split(split)
        width = max(n for i in which for _, n in pairs[i])
        tensors = []
        for side in (0, 1):
            tokens = np.full((len(which), width), PAD, dtype=np.int64)
            trained = np.zeros((len(which), width), dtype=bool)
            for r, i in enumerate(which):
                start, n = pairs[i][side]
                tokens[r, :n], trained[r, :n] = ids[start:start + n], mask[start:start + n]
            targets = np.where(trained[:, 1:], tokens[:, 1:], -1)
            tensors += [torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(targets)]
        return tuple(tensors)

    def batch(self, split: str, rows: int, seq_len: int, generator: torch.Generator,
              rank: int = 0, world: int = 1) -> tuple[torch.Tensor, ...]:
        """This rank's share of rows * world pairs drawn at random (seq_len: the shards', as in
        ConversationShards.batch, which Trainer.micro_batch calls the same way)."""
        which = torch.randint(self.n_pairs(split), (rows * world,), generator=generator)
        return self.pairs(split, which[rank * rows:(rank + 1) * rows].tolist())
