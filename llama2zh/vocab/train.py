"""`llama2zh vocab train`: a SentencePiece tokenizer for a small Chinese–English model.

The settings are Llama 2's (byte fallback, identity normalizer, split digits, unk/bos/eos =
0/1/2, no pad) with a character coverage for CJK, and the chat template's two control pieces
(<|im_start|>, <|im_end|>) reserved as the last two ids, so a model pretrained with it can be
chat-tuned without growing. SentencePiece trains on the documents'
lines, of which it keeps a random sample of at most `input_sentence_size`: that bounds its
memory on a large corpus. Writes tokenizer.model, tokenizer.bin and meta.json.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from llama2zh.chat import CHAT_PIECES, add_chat_pieces
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output, atomic_write_bytes, sha256_file
from llama2zh.vocab.corpus import check_inputs, lines, read_documents
from llama2zh.vocab.export import export_tokenizer

MODEL_TYPES = ("bpe", "unigram")
SETTINGS = {
    "character_coverage": 0.9995,  # about 3,500 Chinese characters on 260k; the rarest fall back to bytes
    "normalization_rule_name": "identity",  # NFKC would turn full-width ，。！ into ASCII
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "byte_fallback": True,
    "allow_whitespace_only_pieces": True,
    "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
    "input_sentence_size": 1_000_000,  # lines sampled from a larger corpus
    "shuffle_input_sentence": True,
    "max_sentence_length": 16384,  # bytes; SentencePiece skips longer lines
}


def sentencepiece_train(sentences: Iterable[str], seed: int = 0, **settings) -> tuple[bytes, int]:
    """(model bytes, lines read) from SentencePiece's trainer, run in memory; failures are UserErrors."""
    count, failure, done = 0, None, False

    def guarded():
        nonlocal count, failure, done
        try:
            for sentence in sentences:
                count += 1
                yield sentence
        except UserError as e:  # SentencePiece would turn it into a RuntimeError
            failure = e
            raise
        done = True

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the sampling of lines
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=guarded(), model_writer=model, minloglevel=2,
                                       num_threads=os.cpu_count() or 1, **settings)
    except RuntimeError as e:
        if failure:
            raise failure from None
        if done and not count:
            raise UserError("no documents to train on (check the input files and --lang)") from None
        reason = (str(e).strip().splitlines() or ["failed"])[0].rsplit("] ", 1)[-1].removeprefix("INTERNAL: ")
        raise UserError(f"sentencepiece: {reason}") from None
    return model.getvalue(), count


def corpus_meta(inputs: Iterable[str | Path]) -> list[dict]:
    return [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in check_inputs(inputs)]


def save_tokenizer(out_dir: str | os.PathLike, model: bytes, meta: dict) -> dict:
    """Writes tokenizer.model, tokenizer.bin and (last, so it marks a complete directory) meta.json."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "tokenizer.model", [model])
    export_tokenizer(out_dir / "tokenizer.model", out_dir / "tokenizer.bin")
    meta = {**meta, "tokenizer_sha256": sha256_file(out_dir / "tokenizer.model"),
            "sentencepiece": spm.__version__}
    with atomic_output(out_dir / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def train_tokenizer(inputs: Iterable[str | Path], vocab_size: int, out_dir: str | os.PathLike, lang: str = "enzh",
                    model_type: str = "bpe", seed: int = 0, **overrides) -> dict:
    """Trains on the `lang` documents of `inputs`; writes out_dir/{tokenizer.model,.bin,meta.json}; returns meta."""
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown model type {model_type!r} (expected one of {', '.join(MODEL_TYPES)})")
    inputs = check_inputs(inputs)
    if vocab_size <= len(CHAT_PIECES):
        raise UserError(f"--vocab-size {vocab_size} leaves no room beside the {len(CHAT_PIECES)} chat pieces")
    settings = {**SETTINGS, **overrides, "model_type": model_type, "vocab_size": vocab_size - len(CHAT_PIECES)}
    try:
        model, n_lines = sentencepiece_train(lines(read_documents(inputs, lang)), seed=seed, **settings)
    except UserError as e:  # SentencePiece's sizes leave out the chat pieces: give the user's
        too_high = re.fullmatch(r"(.*Vocabulary size too high \()\d+(\)\. Please set it to a value <= )(\d+)(.*)",
                                str(e))
        if not too_high:
            raise
        head, middle, most, tail = too_high.groups()
        raise UserError(f"{head}{vocab_size}{middle}{int(most) + len(CHAT_PIECES)}{tail}") from None
    model, _ = add_chat_pieces(model)  # the last ids: every trained piece keeps the id SentencePiece gave it
    meta = {"kind": "train", "lang": lang, "vocab_size": vocab_size, "model_type": model_type,
            "corpus": corpus_meta(inputs), "lines": n_lines, "seed": seed, "settings": settings}
    return save_tokenizer(out_dir, model, meta)
