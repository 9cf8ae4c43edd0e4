"""tokenizer.model rebuilt from a tokenizer.bin, for models that ship only the latter.

Some published llama2.c models (adam89/tinyllamas-chinese: tok5000.bin) come without their
SentencePiece tokenizer.model, which `llama2zh import` needs. tokenizer.bin holds the pieces and
their scores; everything else is what csrc/tokenizer.c assumes when it reads the file, so the
rebuilt model encodes and decodes exactly as the C engine does:

- With our trailer (vocab/export.py): the trailer's model type, ids, piece types, flags, unk
  surface and normalizer rules (compiled back into SentencePiece's charsmap). That is the
  tokenizer.model it was exported from, but for trainer settings that encoding never reads.
- Without (upstream llama2.c, llama2.c-zh), infer_defaults' reading: BPE, <unk> 0, <s> 1, </s> 2
  (llama2.c writes them "\\n<s>\\n" and "\\n</s>\\n": undone), byte pieces <0xXX>, or else a run of
  256 raw byte characters (July 2023 files) given back their <0xXX> text, every other piece
  normal; the normalizer of llama2.c's train_vocab (and of Meta's Llama 2 tokenizer): identity,
  dummy prefix on, extra whitespace kept, whitespace escaped to U+2581 (stored as " ").

Refused: a trailer-less file with a score that is not an integer (a unigram model, which such a
file cannot say), and pieces SentencePiece would not load (not UTF-8, empty, duplicated).
"""

from __future__ import annotations

import math
import os
import re

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from llama2zh.errors import UserError
from llama2zh.vocab.export import FLAGS, MODEL_TYPES, SPACE, read_tokenizer_bin

Piece = pb.ModelProto.SentencePiece
MODEL_KINDS = {name: kind for kind, name in MODEL_TYPES.items()}
DEFAULT_UNK_SURFACE = pb.TrainerSpec().unk_surface  # " \u2047 ", as csrc/tokenizer.c's


def rebuild_model(tokenizer_bin: str | os.PathLike) -> bytes:
    """A serialized SentencePiece ModelProto that encodes and decodes as the C engine reads tokenizer_bin."""
    name = str(tokenizer_bin)
    data = read_tokenizer_bin(tokenizer_bin)
    texts = []
    for i, raw in enumerate(data["pieces"]):
        try:
            texts.append(raw.decode("utf-8").replace(" ", SPACE))
        except UnicodeDecodeError:
            raise UserError(f"{name}: piece {i} is not UTF-8, which a tokenizer.model cannot hold") from None
    trailer = data["trailer"] or _llama2c_reading(data["pieces"], texts, data["scores"], name)
    return _model_proto(texts, data["scores"], trailer, name)


def _byte_value(text: str) -> int:
    """The byte a piece <0xXX> stands for (upper-case hex, as SentencePiece writes it), or -1."""
    return int(text[3:5], 16) if re.fullmatch(r"<0x[0-9A-F]{2}>", text) else -1


def _llama2c_reading(pieces: list[bytes], texts: list[str], scores: list[float], name: str) -> dict:
    """csrc/tokenizer.c's infer_defaults as a trailer; fixes the texts of <s>, </s> and raw byte pieces."""
    n = len(texts)
    bos, eos = (1 if n > 1 else -1), (2 if n > 2 else -1)
    types, byte_ids = [Piece.NORMAL] * n, [-1] * 256
    for i, (text, score) in enumerate(zip(texts, scores, strict=True)):
        b = _byte_value(text)
        if i == 0:
            types[i] = Piece.UNKNOWN
        elif i in (bos, eos):
            types[i] = Piece.CONTROL
            if len(text) > 2 and text[0] == text[-1] == "\n":  # llama2.c's "\n<s>\n"
                texts[i] = text[1:-1]
        elif b >= 0 and byte_ids[b] < 0:
            types[i], byte_ids[b] = Piece.BYTE, i
        elif not (score.is_integer() or math.isinf(score)):  # BPE scores are minus the merge rank
            raise UserError(f"{name}: has no trailer and piece {i}'s score {score:g} is not a BPE rank: a unigram "
                            "model, whose tokenizer.model must come from its source")
    if max(byte_ids) < 0:  # July 2023: each byte piece as the byte's character
        raw = [chr(b).encode("utf-8") for b in range(256)]
        start = next((s for s in range(n - 255) if pieces[s] == b"\0" and pieces[s:s + 256] == raw), -1)
        for i in range(start, start + 256) if start >= 0 else ():
            if i not in (0, bos, eos):
                texts[i], types[i], byte_ids[i - start] = f"<0x{i - start:02X}>", Piece.BYTE, i
    trailer = dict.fromkeys(FLAGS, False)
    trailer.update(model_type="bpe", unk_id=0, bos_id=bos, eos_id=eos, pad_id=-1, add_dummy_prefix=True,
                   escape_whitespaces=True, byte_fallback=max(byte_ids) >= 0, types=types,
                   unk_surface=DEFAULT_UNK_SURFACE.encode(), rules=[])
    return trailer


def _model_proto(texts: list[str], scores: list[float], trailer: dict, name: str) -> bytes:
    m = pb.ModelProto()
    for text, score, kind in zip(texts, scores, trailer["types"], strict=True):
        m.pieces.add(piece=text, score=score, type=kind)
    spec = m.trainer_spec
    spec.model_type = MODEL_KINDS[trailer["model_type"]]
    spec.vocab_size = len(texts)
    spec.byte_fallback = trailer["byte_fallback"]
    spec.treat_whitespace_as_suffix = trailer["treat_whitespace_as_suffix"]
    spec.unk_surface = trailer["unk_surface"].decode("utf-8")
    for role in ("unk", "bos", "eos", "pad"):  # SentencePiece finds its special ids by these pieces' texts
        i = trailer[f"{role}_id"]
        setattr(spec, f"{role}_id", i)
        if i >= 0:
            setattr(spec, f"{role}_piece", texts[i])
    norm = m.normalizer_spec
    if trailer["rules"]:  # the normalizer's own table, compiled back into the same charsmap
        rules = [(key.decode("utf-8"), value.decode("utf-8")) for key, value in trailer["rules"]]
        spm.set_min_log_level(1)  # the charsmap builder logs its progress at INFO
        try:
            norm.MergeFromString(spm.SentencePieceNormalizer(norm_map=rules).serialized_normalizer_spec())
        finally:
            spm.set_min_log_level(0)  # SentencePiece's default
    else:
        norm.name = "identity"
    norm.add_dummy_prefix = trailer["add_dummy_prefix"]
    norm.remove_extra_whitespaces = trailer["remove_extra_whitespaces"]
    norm.escape_whitespaces = trailer["escape_whitespaces"]
    blob = m.SerializeToString()
    try:
        spm.SentencePieceProcessor(model_proto=blob)
    except Exception as exc:  # duplicated or empty pieces, byte pieces missing, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise UserError(f"{name}: SentencePiece cannot load the rebuilt tokenizer.model ({reason})") from None
    return blob
