"""`llama2zh eval out/RUN`: numbers that compare across tokenizers.

Loss per token depends on how finely a tokenizer cuts text, so validation documents are also
scored per character and per UTF-8 byte of the text they decode to, separately for English
and Chinese: bits/char = (sum of the tokens' negative log-likelihoods) / ln 2 / characters.
The unigram entropy of the training tokens is the floor a model that ignores context reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llama2zh.checkpoint import load_checkpoint
from llama2zh.config import Config
from llama2zh.corpus.dataset import TokenShards
from llama2zh.errors import UserError
from llama2zh.vocab.export import load_sentencepiece


@dataclass
class Score:
    documents: int = 0
    tokens: int = 0
    nats: float = 0.0
    chars: int = 0
    bytes: int = 0

    def row(self) -> dict:
        bits = self.nats / math.log(2)
        return {"documents": self.documents, "tokens": self.tokens,
                "loss_per_token": self.nats / max(self.tokens, 1),
                "bits_per_char": bits / max(self.chars, 1), "bits_per_byte": bits / max(self.bytes, 1)}


def is_chinese(text: str) -> bool:
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf")
    return cjk > 0.3 * max(1, sum(1 for ch in text if not ch.isspace()))


def documents(ids: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(ids == bos).tolist() + [len(ids)]
    return [ids[a:b] for a, b in zip(starts, starts[1:], strict=False) if b - a > 1]


@torch.no_grad()
def score_documents(model, sp, docs: list[np.ndarray], per_language: int) -> dict[str, Score]:
    """Teacher-forced scores of up to per_language validation documents of each language."""
    model.eval()
    scores = {"en": Score(), "zh": Score()}
    seq_len = model.args.max_seq_len
    for doc in docs:
        ids = doc[: seq_len + 1].astype(np.int64)
        text = sp.decode(ids[1:].tolist())
        score = scores["zh" if is_chinese(text) else "en"]
        if score.documents == per_language:
            if all(s.documents == per_language for s in scores.values()):
                break
            continue
        tokens = torch.from_numpy(ids)[None]
        logits = model(tokens[:, :-1])
        score.nats += F.cross_entropy(logits[0].float(), tokens[0, 1:], reduction="sum").item()
        score.documents += 1
        score.tokens += len(ids) - 1
        score.chars += len(text)
        score.bytes += len(text.encode("utf-8"))
    return scores


def unigram_entropy(shards: TokenShards) -> float:
    """Entropy (nats/token) of the training tokens' unigram distribution."""
    counts = np.zeros(shards.vocab_size, dtype=np.int64)
    for shard in shards.splits["train"]:
        counts += np.bincount(shard, minlength=shards.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def evaluate(run_dir: Path, per_language: int = 200, checkpoint: tuple | None = None) -> dict:
    """checkpoint: ckpt.pt's (model, state) when the caller has loaded it already."""
    if checkpoint is None and not (run_dir / "ckpt.pt").exists():
        raise UserError(f"{run_dir}: no ckpt.pt (train first)")
    model, state = checkpoint or load_checkpoint(run_dir / "ckpt.pt")
    config = Config(**state["config"])
    shards = TokenShards(Path(config.dataset) / Path(config.tokenizer).name)
    sp, _ = load_sentencepiece(run_dir / "tokenizer.model")
    val = shards.splits["val"] or shards.splits["train"]
    docs = [d for shard in val for d in documents(np.asarray(shard), sp.bos_id())]
    scores = score_documents(model, sp, docs, per_language)
    return {"step": state["step"], "unigram_entropy": unigram_entropy(shards),
            **{lang: s.row() for lang, s in scores.items() if s.documents}}


def format_report(report: dict) -> str:
    lines = [f"step {report['step']}; unigram entropy of the training tokens: "
             f"{report['unigram_entropy']:.3f} nats/token",
             "| language | documents | tokens | loss/token (nats) | bits/char | bits/byte |",
             "|---|---|---|---|---|---|"]
    for lang, name in (("en", "English"), ("zh", "Chinese")):
        if lang in report:
            r = report[lang]
            lines.append(f"| {name} | {r['documents']} | {r['tokens']:,} | {r['loss_per_token']:.3f} | "
                         f"{r['bits_per_char']:.3f} | {r['bits_per_byte']:.3f} |")
    return "\n".join(lines)
