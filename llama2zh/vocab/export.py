"""tokenizer.bin: written from a SentencePiece tokenizer.model, read back for checks.

Layout, all integers little-endian:

    uint32 max_token_length                       (the longest piece, in bytes)
    per piece id 0..n-1:
        float32 score
        uint32  length
        bytes   text       the SentencePiece piece with U+2581 '▁' written as ' ';
                           byte-fallback pieces keep their text <0xXX>, control and
                           unknown pieces theirs (<s>, </s>, <unk>)
    optional trailer, running exactly to the end of the file:
        uint32 magic "L2ZT" (the four bytes, i.e. 0x545A324C)
        uint32 version (1; 2 for a tokenizer with the chat template's pieces)
        uint32 payload length (= bytes left after this field)
        payload v1:
            uint32  piece count (must equal n)
            int32   unk_id, bos_id, eos_id, pad_id     (-1 when absent)
            uint32  flags: 1 add_dummy_prefix, 2 remove_extra_whitespaces,
                    4 escape_whitespaces (always set), 8 treat_whitespace_as_suffix,
                    16 byte_fallback, 32 unigram model (set: the scores are log
                    probabilities for a Viterbi search; clear: BPE, they rank merges)
            int32   byte_ids[256]      id of the piece <0xXX> for each byte (-1 when missing)
            uint8   types[n]           SentencePiece's piece types: 1 normal, 2 unknown,
                                       3 control, 4 user-defined, 5 unused, 6 byte
            uint32  length, bytes      unk surface: what decode prints for <unk> (" ⁇ ")
            uint32  rule count, then per rule, sorted by key bytes:
                    uint16 key length, uint16 value length, key bytes, value bytes
                    the normalizer: at each position of the input the longest key that
                    matches is replaced by its value (empty for identity normalizers)
        payload v2: payload v1, then the chat section
            int32   im_start_id, im_end_id   <|im_start|> and <|im_end|>: distinct control pieces
            uint32  length, bytes      the template's name, ASCII: "chatml" (llama2zh/chat.py's rule)

Upstream llama2.c reads exactly vocab_size pieces and ignores the trailer (it encodes every
model with its BPE merge loop). A reader tells the trailer from one more piece by its magic
AND its length field matching the bytes left. Files without flag 32 are BPE, so files written
before unigram support read as they did; older readers refuse the unknown flag. Version 2 is
written exactly when the tokenizer.model holds both chat pieces as control pieces, so every
other file stays version 1, byte for byte.

The rules are the normalizer's own table (SentencePieceNormalizer.Decompile()), not a
per-code-point approximation: NFKC is not per code point. Of baichuan's 224,725 rules only
4,850 have a one-code-point key; the rest compose decomposed sequences ("e" + U+0301 -> "é",
Hangul jamo -> syllables), so they are kept whole (about 3.5 MB of trailer for baichuan).
Refused: model types other than BPE and unigram (word, char), a denormalizer,
escape_whitespaces off (SentencePiece's trainers make it only when asked), no unknown piece
(SentencePiece allows none with byte fallback; its trainers always make one) and pieces
holding a literal space (they would read as U+2581).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llama2zh.chat import TEMPLATE, chat_piece_ids
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_write_bytes

MAGIC = b"L2ZT"
VERSIONS = (1, 2)  # 2: version 1's payload, then the chat section
SPACE = "\u2581"
CONTROL_TYPE, UNUSED_TYPE, BYTE_TYPE = 3, 5, 6
FLAGS = ("add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces",
         "treat_whitespace_as_suffix", "byte_fallback")
UNIGRAM_FLAG = 1 << len(FLAGS)  # the trailer's model_type: "unigram" when set, else "bpe"
MODEL_TYPES = {sentencepiece_model_pb2.TrainerSpec.BPE: "bpe", sentencepiece_model_pb2.TrainerSpec.UNIGRAM: "unigram"}


def load_sentencepiece(model_path: str | os.PathLike):
    """(SentencePieceProcessor, ModelProto) of a tokenizer.model, or UserError."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"{model_path}: no such file")
    data = model_path.read_bytes()
    try:
        processor = spm.SentencePieceProcessor(model_proto=data)
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(data)
    except Exception as exc:  # sentencepiece and protobuf raise several types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{model_path}: not a SentencePiece model ({reason})") from None
    if len(proto.pieces) != processor.get_piece_size() or not proto.pieces:
        raise UserError(f"{model_path}: not a SentencePiece model (no pieces)")
    return processor, proto


def _normalizer_rules(proto) -> list[tuple[bytes, bytes]]:
    """The normalizer's replacement table, sorted by key; [] for the identity normalizer."""
    if not proto.normalizer_spec.precompiled_charsmap:
        return []
    normalizer = spm.SentencePieceNormalizer(normalizer_spec=proto.normalizer_spec.SerializeToString())
    return sorted((key.encode("utf-8"), value.encode("utf-8")) for key, value in normalizer.Decompile())


def tokenizer_data(model_path: str | os.PathLike) -> dict:
    """What tokenizer.bin holds for a tokenizer.model, in read_tokenizer_bin's form."""
    model_path = Path(model_path)
    processor, proto = load_sentencepiece(model_path)
    if proto.trainer_spec.model_type not in MODEL_TYPES:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise UserError(f"{model_path}: a {kind} model; the C engine encodes BPE and unigram models only")
    if proto.denormalizer_spec.precompiled_charsmap:
        raise UserError(f"{model_path}: has a denormalizer, which the C engine does not implement")
    if processor.unk_id() < 0:
        raise UserError(f"{model_path}: has no unknown piece (<unk>), which tokenizer.bin requires")
    if not proto.normalizer_spec.escape_whitespaces:
        raise UserError(f"{model_path}: escape_whitespaces is off, which tokenizer.bin cannot express "
                        "(it writes U+2581 as a space)")

    pieces, types, byte_ids = [], [], [-1] * 256
    for i, piece in enumerate(proto.pieces):
        if " " in piece.piece:
            raise UserError(f"{model_path}: piece {i} {piece.piece!r} holds a space, which tokenizer.bin "
                            "cannot tell from U+2581")
        text = piece.piece.replace(SPACE, " ").encode("utf-8")
        if piece.type == BYTE_TYPE:
            byte_ids[int(piece.piece[3:5], 16)] = i
        pieces.append(text)
        # SentencePiece loads a "\0" piece of a byte-fallback model as unused (<0x00> is the byte).
        types.append(UNUSED_TYPE if piece.piece == "\0" and proto.trainer_spec.byte_fallback else piece.type)

    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    chat = chat_piece_ids(processor)
    trailer = {
        "version": 2 if chat else 1,
        "model_type": MODEL_TYPES[trainer.model_type],
        "unk_id": processor.unk_id(), "bos_id": processor.bos_id(),
        "eos_id": processor.eos_id(), "pad_id": processor.pad_id(),
        "add_dummy_prefix": norm.add_dummy_prefix,
        "remove_extra_whitespaces": norm.remove_extra_whitespaces,
        "escape_whitespaces": norm.escape_whitespaces,
        "treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix,
        "byte_fallback": trainer.byte_fallback,
        "byte_ids": byte_ids,
        "types": types,
        "unk_surface": trainer.unk_surface.encode("utf-8"),
        "rules": _normalizer_rules(proto),
        "chat": {"im_start": chat[0], "im_end": chat[1], "template": TEMPLATE} if chat else None,
    }
    return {
        "max_token_length": max(len(p) for p in pieces),
        "pieces": pieces,
        "scores": [piece.score for piece in proto.pieces],
        "trailer": trailer,
    }


def _payload(trailer: dict, n_pieces: int) -> bytes:
    flags = sum(1 << bit for bit, name in enumerate(FLAGS) if trailer[name])
    flags |= UNIGRAM_FLAG if trailer["model_type"] == "unigram" else 0
    parts = [struct.pack("<I4iI", n_pieces, trailer["unk_id"], trailer["bos_id"], trailer["eos_id"],
                         trailer["pad_id"], flags),
             struct.pack("<256i", *trailer["byte_ids"]),
             bytes(trailer["types"]),
             struct.pack("<I", len(trailer["unk_surface"])), trailer["unk_surface"],
             struct.pack("<I", len(trailer["rules"]))]
    for key, value in trailer["rules"]:
        parts += [struct.pack("<HH", len(key), len(value)), key, value]
    if trailer["version"] >= 2:
        chat, name = trailer["chat"], trailer["chat"]["template"].encode("ascii")
        parts += [struct.pack("<2iI", chat["im_start"], chat["im_end"], len(name)), name]
    return b"".join(parts)


def write_tokenizer_bin(data: dict, out_path: str | os.PathLike) -> Path:
    """Writes read_tokenizer_bin's dict (or tokenizer_data's) as tokenizer.bin, atomically."""
    if not Path(out_path).parent.is_dir():
        raise UserError(f"{Path(out_path).parent}: no such directory")
    chunks = [struct.pack("<I", data["max_token_length"])]
    for text, score in zip(data["pieces"], data["scores"], strict=True):
        chunks.append(struct.pack("<fI", score, len(text)) + text)
    if data["trailer"] is not None:
        payload = _payload(data["trailer"], len(data["pieces"]))
        chunks.append(MAGIC + struct.pack("<II", data["trailer"]["version"], len(payload)) + payload)
    return atomic_write_bytes(out_path, chunks)


def export_tokenizer(model_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Writes tokenizer.bin for a SentencePiece tokenizer.model; returns its path."""
    return write_tokenizer_bin(tokenizer_data(model_path), out_path)


class _Reader:
    """Bounds-checked little-endian reads; running past the end is a UserError."""

    def __init__(self, data: bytes, name: str):
        self.data, self.pos, self.name = data, 0, name

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise UserError(f"{self.name}: {what} runs past the end of the file (truncated?)")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def at_trailer(self) -> bool:
        left = len(self.data) - self.pos
        return (left >= 12 and self.data[self.pos:self.pos + 4] == MAGIC
                and struct.unpack_from("<I", self.data, self.pos + 8)[0] == left - 12)


def _read_trailer(r: _Reader, n_pieces: int) -> dict:
    _, version, _ = r.unpack("<4sII", "trailer header")
    if version not in VERSIONS:
        raise UserError(f"{r.name}: trailer version {version} is not supported (this reader knows "
                        f"{' and '.join(map(str, VERSIONS))})")
    count, unk, bos, eos, pad, flags = r.unpack("<I4iI", "trailer")
    if count != n_pieces:
        raise UserError(f"{r.name}: trailer says {count} pieces, the file has {n_pieces}")
    if flags & ~(2 * UNIGRAM_FLAG - 1):
        raise UserError(f"{r.name}: trailer flags 0x{flags:x} have bits this reader does not know")
    trailer = {"version": version, "model_type": "unigram" if flags & UNIGRAM_FLAG else "bpe",
               "unk_id": unk, "bos_id": bos, "eos_id": eos, "pad_id": pad}
    trailer.update((name, bool(flags >> bit & 1)) for bit, name in enumerate(FLAGS))
    trailer["byte_ids"] = list(r.unpack("<256i", "byte ids"))
    trailer["types"] = list(r.take(n_pieces, "piece types"))
    (length,) = r.unpack("<I", "unk surface")
    trailer["unk_surface"] = r.take(length, "unk surface")
    (n_rules,) = r.unpack("<I", "normalizer rules")
    rules = []
    for _ in range(n_rules):
        key_len, value_len = r.unpack("<HH", "normalizer rule")
        rules.append((r.take(key_len, "normalizer rule"), r.take(value_len, "normalizer rule")))
    trailer["rules"] = rules
    trailer["chat"] = _read_chat(r, trailer["types"]) if version >= 2 else None
    if r.pos != len(r.data):
        raise UserError(f"{r.name}: {len(r.data) - r.pos} unexpected bytes at the end of the trailer")
    bad_type = next((i for i, t in enumerate(trailer["types"]) if not 1 <= t <= 6), None)
    if bad_type is not None:
        raise UserError(f"{r.name}: piece {bad_type} has invalid type {trailer['types'][bad_type]}")
    ids = [unk, bos, eos, pad] + trailer["byte_ids"]
    if not 0 <= unk < n_pieces or any(not -1 <= i < n_pieces for i in ids):
        raise UserError(f"{r.name}: trailer has an id out of range")
    return trailer


def _read_chat(r: _Reader, types: list[int]) -> dict:
    """Version 2's chat section, checked as the C engine checks it."""
    im_start, im_end, length = r.unpack("<2iI", "chat section")
    name = r.take(length, "chat template name")
    for i in (im_start, im_end):
        if not 0 <= i < len(types) or types[i] != CONTROL_TYPE:
            raise UserError(f"{r.name}: chat id {i} is not a control piece of the vocab")
    if im_start == im_end:
        raise UserError(f"{r.name}: chat ids <|im_start|> and <|im_end|> are the same piece {im_start}")
    if name != TEMPLATE.encode():
        raise UserError(f"{r.name}: unknown chat template {name.decode('ascii', 'replace')!r}")
    return {"im_start": im_start, "im_end": im_end, "template": TEMPLATE}


def read_tokenizer_bin(path: str | os.PathLike) -> dict:
    """tokenizer.bin as {max_token_length, pieces (bytes), scores, trailer (dict or None)}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    r = _Reader(path.read_bytes(), str(path))
    (max_token_length,) = r.unpack("<I", "max_token_length")
    pieces, scores = [], []
    while r.pos < len(r.data) and not r.at_trailer():
        if r.data[r.pos:r.pos + 4] == MAGIC:  # no piece score has these bytes
            raise UserError(f"{path}: trailer after piece {len(pieces) - 1} is truncated or damaged")
        score, length = r.unpack("<fI", f"piece {len(pieces)}")
        pieces.append(r.take(length, f"piece {len(pieces)}"))
        scores.append(score)
    if not pieces:
        raise UserError(f"{path}: has no pieces")
    trailer = _read_trailer(r, len(pieces)) if r.pos < len(r.data) else None
    return {"max_token_length": max_token_length, "pieces": pieces, "scores": scores, "trailer": trailer}
