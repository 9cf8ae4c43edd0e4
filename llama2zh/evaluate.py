"""`llama2zh eval out/RUN`: numbers that compare across tokenizers.

Loss per token depends on how finely a tokenizer cuts text, so validation documents are also
scored per character and per UTF-8 byte of the text they decode to, separately for English
and Chinese: bits/char = (sum of the tokens' negative log-likelihoods) / ln 2 / characters.
The unigram entropy of the training tokens is the floor a model that ignores context reaches.
A run pretrained on a mix is scored on each dataset's validation documents too, one row each;
the language rows and the unigram entropy are over the mix (each dataset in its weight).
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
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

    def __add__(self, other: Score) -> Score:
        return Score(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

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


def unigram_entropy(datasets: list[tuple[float, TokenShards]]) -> float:
    """Entropy (nats/token) of the unigram distribution of the training tokens of the (weight, dataset) mix."""
    p = 0.0
    for weight, shards in datasets:
        counts = sum(np.bincount(shard, minlength=shards.vocab_size) for shard in shards.splits["train"])
        p = p + weight * counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def evaluate(run_dir: Path, per_language: int = 200, checkpoint: tuple | None = None) -> dict:
    """checkpoint: ckpt.pt's (model, state) when the caller has loaded it already."""
    if checkpoint is None and not (run_dir / "ckpt.pt").exists():
        raise UserError(f"{run_dir}: no ckpt.pt (train first)")
    model, state = checkpoint or load_checkpoint(run_dir / "ckpt.pt")
    config = Config(**state["config"])
    total = sum(weight for _, weight in config.datasets)
    mix = [(Path(path).name, weight / total, TokenShards(Path(path) / Path(config.tokenizer).name))
           for path, weight in config.datasets]
    sp, _ = load_sentencepiece(run_dir / "tokenizer.model")
    languages, datasets = {"en": Score(), "zh": Score()}, {}
    for name, weight, shards in mix:
        val = shards.splits["val"] or shards.splits["train"]
        docs = [d for shard in val for d in documents(np.asarray(shard), sp.bos_id())]
        scores = score_documents(model, sp, docs, per_language)
        languages = {lang: languages[lang] + scores[lang] for lang in languages}
        datasets[name] = {"weight": weight, **(scores["en"] + scores["zh"]).row()}
    return {"step": state["step"], "unigram_entropy": unigram_entropy([(w, shards) for _, w, shards in mix]),
            **{lang: s.row() for lang, s in languages.items() if s.documents}, "datasets": datasets}


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
    if len(report["datasets"]) > 1:
        lines += ["", "| dataset | weight | documents | tokens | loss/token (nats) | bits/char | bits/byte |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in report["datasets"].items():
            lines.append(f"| {name} | {r['weight']:.2f} | {r['documents']} | {r['tokens']:,} | "
                         f"{r['loss_per_token']:.3f} | {r['bits_per_char']:.3f} | {r['bits_per_byte']:.3f} |")
    return "\n".join(lines)
