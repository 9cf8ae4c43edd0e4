"""`llama2zh vocab stats`: tokenizers side by side on the same texts, as one markdown table.

Tokens per Chinese character are counted on the Chinese documents (whitespace is not a
character), tokens per English word on the English ones (words split at whitespace); bytes
per token and the byte-fallback rate (share of tokens that are <0xXX> pieces) on both. The
embedding costs vocab × 288 parameters (llama2.c's 15M model; its classifier shares them).
"""

from __future__ import annotations

import os
from pathlib import Path

from llama2zh.vocab.corpus import CJK_RE, language, read_documents
from llama2zh.vocab.export import BYTE_TYPE, load_sentencepiece

EMBED_DIM = 288
COLUMNS = {  # key: (heading, format)
    "vocab": ("vocab", "{:,}"),
    "tokens_per_zh_char": ("tokens / zh char", "{:.3f}"),
    "tokens_per_en_word": ("tokens / en word", "{:.3f}"),
    "bytes_per_token": ("bytes / token", "{:.2f}"),
    "byte_fallback": ("byte fallback", "{:.2%}"),
    "cjk_pieces": ("CJK pieces", "{:.1%}"),
    "embedding_params": (f"embedding params (dim {EMBED_DIM})", "{:,}"),
}


def model_file(path: str | os.PathLike) -> Path:
    """A tokenizer.model given as itself or as the directory holding it."""
    path = Path(path)
    return path / "tokenizer.model" if path.is_dir() else path


def char_count(documents: list[str]) -> int:
    return sum(len("".join(doc.split())) for doc in documents)


def token_count(sp, documents: list[str]) -> int:
    return sum(map(len, sp.encode(documents))) if documents else 0


def tokens_per_char(sp, zh_documents: list[str]) -> float:
    return token_count(sp, zh_documents) / char_count(zh_documents)


def tokenizer_stats(model: str | os.PathLike, zh_documents: list[str], en_documents: list[str]) -> dict:
    """One table row; the text columns only for the languages that have documents."""
    sp, proto = load_sentencepiece(model_file(model))
    n = len(proto.pieces)
    row = {"vocab": n, "cjk_pieces": sum(bool(CJK_RE.search(p.piece)) for p in proto.pieces) / n,
           "embedding_params": n * EMBED_DIM}
    if zh_documents:
        row["tokens_per_zh_char"] = tokens_per_char(sp, zh_documents)
    if en_documents:
        row["tokens_per_en_word"] = token_count(sp, en_documents) / sum(len(d.split()) for d in en_documents)
    documents = zh_documents + en_documents
    if documents:
        ids = [i for doc_ids in sp.encode(documents) for i in doc_ids]
        byte_ids = {i for i, p in enumerate(proto.pieces) if p.type == BYTE_TYPE}
        row["bytes_per_token"] = sum(len(d.encode("utf-8")) for d in documents) / len(ids)
        row["byte_fallback"] = sum(i in byte_ids for i in ids) / len(ids)
    return row


def split_languages(documents) -> tuple[list[str], list[str]]:
    """(Chinese, English) documents; those with no letters are in neither."""
    zh, en = [], []
    for doc in documents:
        lang = language(doc)
        if lang:
            (zh if lang == "zh" else en).append(doc)
    return zh, en


def stats_table(models: list[str | os.PathLike], texts: list[str | os.PathLike] = ()) -> str:
    """The markdown table: one row per tokenizer, named by its directory."""
    zh, en = split_languages(read_documents(texts)) if texts else ([], [])
    lines = ["| tokenizer | " + " | ".join(heading for heading, _ in COLUMNS.values()) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for model in models:
        row = tokenizer_stats(model, zh, en)
        path = model_file(model)
        name = path.parent.name if path.name == "tokenizer.model" else path.stem
        cells = [fmt.format(row[key]) if key in row else "–" for key, (_, fmt) in COLUMNS.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
