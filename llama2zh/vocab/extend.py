"""`llama2zh vocab extend`: a BPE base tokenizer plus Chinese pieces; the base stays exactly as it was.

A Chinese BPE model is trained in memory on the corpus's Chinese documents. Its pieces that are
Chinese (CJK ideographs and Chinese punctuation, after at most one leading ▁) and that the base
lacks are the candidates. New characters are chosen first (a missing character costs about
three byte tokens, a missing merge one), then merged pieces in learned order, up to `add`.
They are appended to the base's ModelProto as NORMAL pieces, in the Chinese model's order,
with scores below every base score: every base piece keeps its id, score and type, the base's
normalizer and dummy prefix stay, and base merges always win over new ones. Every new piece
holds a CJK ideograph or a full-width / CJK punctuation mark, so text without them (English)
encodes to the base's ids exactly. A new piece that does not encode to itself (a base merge
gets there first) is dropped and the next candidate takes its place, until every piece is.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from llama2zh.errors import UserError
from llama2zh.fileio import sha256_file
from llama2zh.vocab.corpus import CJK, lines, read_documents
from llama2zh.vocab.export import SPACE, load_sentencepiece
from llama2zh.vocab.stats import tokens_per_char
from llama2zh.vocab.train import corpus_meta, save_tokenizer, sentencepiece_train

NORMAL = pb.ModelProto.SentencePiece.NORMAL
MARKS = "\u3000-\u303f\uff00-\uffef"  # CJK symbols and punctuation, full-width forms: never in English
CHINESE_PIECE = re.compile(f"{SPACE}?[{CJK}{MARKS}“”‘’…—·]+")
MARK_OR_IDEOGRAPH = re.compile(f"[{CJK}{MARKS}]")
ZH_SETTINGS = {  # the Chinese model the new pieces come from
    "model_type": "bpe",
    "character_coverage": 1.0,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "max_sentencepiece_length": 16,
    "hard_vocab_limit": False,  # a small corpus gives what it has
    "input_sentence_size": 1_000_000,
    "shuffle_input_sentence": True,
    "max_sentence_length": 16384,
}


def is_chinese_piece(piece: str) -> bool:
    return bool(CHINESE_PIECE.fullmatch(piece) and MARK_OR_IDEOGRAPH.search(piece))


def zh_settings(base: pb.ModelProto, add: int) -> dict:
    # room for the characters (a few thousand) and for the pieces filtered out
    return {**ZH_SETTINGS, "add_dummy_prefix": base.normalizer_spec.add_dummy_prefix, "vocab_size": 2 * add + 10000}


def chinese_candidates(base: pb.ModelProto, corpus: Iterable[str | Path], add: int) -> tuple[list[str], int]:
    """(Chinese pieces the base lacks, in learned order; how many Chinese pieces the base already has)."""
    model, _ = sentencepiece_train(lines(read_documents(corpus, "zh", desc="reading Chinese")),
                                   **zh_settings(base, add))
    zh = pb.ModelProto()
    zh.ParseFromString(model)
    have = {p.piece for p in base.pieces}
    chinese = [p.piece for p in zh.pieces if p.type == NORMAL and is_chinese_piece(p.piece)]
    return [p for p in chinese if p not in have], sum(p in have for p in chinese)


def _append(base: pb.ModelProto, pieces: list[str]) -> pb.ModelProto:
    proto = pb.ModelProto()
    proto.CopyFrom(base)
    floor = min(p.score for p in base.pieces)
    step = max(1.0, abs(floor) / 2**20)  # keeps the scores distinct in float32 far below zero
    for i, piece in enumerate(pieces):
        proto.pieces.add(piece=piece, score=floor - step * (i + 1), type=NORMAL)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto


def unreachable(proto: pb.ModelProto, first: int) -> list[str]:
    """The pieces from id `first` on that SentencePiece does not encode to themselves."""
    probe = pb.ModelProto()
    probe.CopyFrom(proto)
    probe.normalizer_spec.add_dummy_prefix = False  # a piece's own text, its ▁ written as a space
    probe.normalizer_spec.remove_extra_whitespaces = False
    sp = spm.SentencePieceProcessor(model_proto=probe.SerializeToString())
    new = proto.pieces[first:]
    encoded = sp.encode([p.piece.replace(SPACE, " ") for p in new])
    return [p.piece for i, (p, ids) in enumerate(zip(new, encoded, strict=True)) if ids != [first + i]]


def extend_proto(base: pb.ModelProto, candidates: list[str], add: int) -> tuple[pb.ModelProto, list[str]]:
    """(base + up to `add` reachable candidates, the candidates dropped as unreachable)."""
    rank = {piece: i for i, piece in enumerate(candidates)}
    queue = deque(sorted(candidates, key=lambda p: len(p) > 1))  # characters first, each in learned order
    chosen, dropped = [], []
    while True:
        while len(chosen) < add and queue:
            chosen.append(queue.popleft())
        proto = _append(base, sorted(chosen, key=rank.__getitem__))
        bad = unreachable(proto, len(base.pieces))
        if not bad:
            return proto, dropped
        dropped += bad
        chosen = [p for p in chosen if p not in bad]  # bad is short: a dozen of 20,000


def extend_tokenizer(base: str | os.PathLike, corpus: Iterable[str | Path], add: int, out_dir: str | os.PathLike,
                     heldout: Iterable[str | Path] | None = None) -> dict:
    """Writes out_dir/{tokenizer.model,.bin,meta.json}; returns the report (also meta.json)."""
    base_sp, base_proto = load_sentencepiece(base)
    if base_proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise UserError(f"{base}: not a BPE model; only BPE bases can be extended")
    if add < 1:
        raise UserError(f"--add must be at least 1 (got {add})")
    corpus = list(corpus)
    candidates, in_base = chinese_candidates(base_proto, corpus, add)
    proto, dropped = extend_proto(base_proto, candidates, add)
    measured_on = list(heldout or corpus)
    zh = list(read_documents(measured_on, "zh", desc="measuring"))
    if not zh:
        raise UserError(f"no Chinese documents in {', '.join(map(str, measured_on))} to measure on")
    extended_sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    report = {
        "kind": "extend", "base": str(base), "base_sha256": sha256_file(base), "corpus": corpus_meta(corpus),
        "requested": add, "added": len(proto.pieces) - len(base_proto.pieces), "dropped_unreachable": len(dropped),
        "already_in_base": in_base, "base_vocab_size": len(base_proto.pieces), "vocab_size": len(proto.pieces),
        "measured_on": [str(p) for p in measured_on], "heldout": bool(heldout),
        "tokens_per_zh_char": {"base": tokens_per_char(base_sp, zh), "extended": tokens_per_char(extended_sp, zh)},
        "settings": zh_settings(base_proto, add),
    }
    return save_tokenizer(out_dir, proto.SerializeToString(), report)
