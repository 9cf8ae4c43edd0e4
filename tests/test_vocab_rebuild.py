"""vocab/rebuild.py: a tokenizer.model rebuilt from each form of tokenizer.bin must be the original
(pieces, scores, types, ids, encode, decode) wherever the file can say so, and encode as the C
engine reads the file everywhere."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from llama2zh.engine import CTokenizer, EngineError
from llama2zh.errors import UserError
from llama2zh.vocab.export import export_tokenizer, read_tokenizer_bin, tokenizer_data, write_tokenizer_bin
from llama2zh.vocab.rebuild import rebuild_model
from tests.conftest import shared_file
from tests.test_tokenizer import EDGE_TEXTS, NORMAL, id_sampler, july_2023_bin, small_unigram

# llama2c: llama2.c's tokenizer.py since c02865d; july_2023: before it (and llama2.c-zh); shipped: the
# files llama2.c-zh ships; stripped: ours without the trailer; trailer: ours, as vocab export writes it.
FORMS = ("llama2c", "july_2023", "shipped", "stripped", "trailer")
EXTRA_TEXTS = ["emoji 😀👍🏽🇨🇳 👨‍👩‍👧", "𠀀𠮷", "  two  spaces  ", "\n\nnew\nlines\n", " \u3000 全角 空格"]


def tokenizer_bin(name: str, form: str, out: Path) -> Path:
    """tokenizer.bin of a shared tokenizer in one of FORMS."""
    model = shared_file(f"tokenizers/{name}/tokenizer.model")
    if form == "shipped":
        return shared_file(f"thirdparty/llama2c_zh/{name}.bin")
    if form == "july_2023":
        out.write_bytes(july_2023_bin(model))
        return out
    data = tokenizer_data(model)
    trailer = data["trailer"]
    if form != "trailer":
        data["trailer"] = None
    if form == "llama2c":  # <0xXX> kept, <s> and </s> framed by newlines
        data["pieces"][trailer["bos_id"]], data["pieces"][trailer["eos_id"]] = b"\n<s>\n", b"\n</s>\n"
    return write_tokenizer_bin(data, out)


def rebuilt(path: Path, tmp_path: Path) -> tuple[spm.SentencePieceProcessor, Path]:
    model = tmp_path / "rebuilt.model"
    model.write_bytes(rebuild_model(path))
    return spm.SentencePieceProcessor(model_file=str(model)), model


def pieces(sp: spm.SentencePieceProcessor) -> list[tuple]:
    return [(p.piece, p.score, p.type) for p in pb.ModelProto.FromString(sp.serialized_model_proto()).pieces]


def special_ids(sp: spm.SentencePieceProcessor) -> tuple[int, ...]:
    return sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """300 zh_literature paragraphs, 100 English stories and edge cases."""
    def jsonl(relative: str, key: str) -> list[str]:
        return [json.loads(line)[key] for line in shared_file(relative).read_text(encoding="utf-8").splitlines()]

    return (jsonl("data/zh_literature.jsonl", "text")[:300] + jsonl("data/tinystories_en_sample.jsonl", "story")[:100]
            + EDGE_TEXTS + EXTRA_TEXTS)


@pytest.mark.parametrize("name, form", [(n, f) for n in ("llama2en", "llama2enzh") for f in FORMS]
                         + [("baichuan", "trailer")])  # NFKC: its rules compiled back
def test_rebuilt_model_is_the_original(name, form, texts, tmp_path):
    path = tokenizer_bin(name, form, tmp_path / "tokenizer.bin")
    original = spm.SentencePieceProcessor(model_file=str(shared_file(f"tokenizers/{name}/tokenizer.model")))
    sp, model = rebuilt(path, tmp_path)
    assert pieces(sp) == pieces(original)
    assert special_ids(sp) == special_ids(original)
    ct = CTokenizer(path, 0)
    wrong = [t[:40] for t in texts if not sp.encode(t) == original.encode(t) == ct.encode(t, bos=False)]
    assert not wrong and len(texts) > 400, wrong[:3]
    rng, random_ids = random.Random(3), id_sampler(original)
    for ids in [original.encode(t) for t in texts] + [random_ids(rng) for _ in range(300)]:
        assert sp.decode(ids) == original.decode(ids), ids
    # and its tokenizer.bin, with our trailer, encodes as it does
    again = CTokenizer(export_tokenizer(model, tmp_path / "again.bin"), 0)
    assert [again.encode(t, bos=False) for t in texts] == [sp.encode(t) for t in texts]


@pytest.mark.parametrize("form", ("llama2c", "shipped", "stripped"))
def test_trailerless_baichuan_reads_as_the_c_engine_does(form, texts, tmp_path):
    """Without a trailer the file cannot say baichuan's NFKC normalizer nor its user-defined pieces
    (<SEP>, "\\n", digits, ...): the rebuilt model, like the C engine, has neither. Given the text
    as NFKC leaves it, it is the original on text that names no <...> piece."""
    path = tokenizer_bin("baichuan", form, tmp_path / "tokenizer.bin")
    original = spm.SentencePieceProcessor(model_file=str(shared_file("tokenizers/baichuan/tokenizer.model")))
    sp, _ = rebuilt(path, tmp_path)
    ct = CTokenizer(path, 0)
    assert [sp.encode(t) for t in texts] == [ct.encode(t, bos=False) for t in texts]
    assert [p[:2] for p in pieces(sp)] == [p[:2] for p in pieces(original)]
    plain = [t for t in texts if "<" not in t]
    normalized = [original.normalize(t).replace("\u2581", " ").removeprefix(" ") for t in plain]
    assert len(plain) > 400 and [sp.encode(t) for t in normalized] == [original.encode(t) for t in plain]


def test_a_unigram_model_rebuilds_from_its_trailer_and_is_refused_without(tmp_path):
    model = small_unigram(("a", -1.5, NORMAL), ("b", -2.25, NORMAL), ("ab", -3.0, NORMAL), ("\u2581a", -0.5, NORMAL))
    (tmp_path / "u.model").write_bytes(model)
    path = export_tokenizer(tmp_path / "u.model", tmp_path / "u.bin")
    original = spm.SentencePieceProcessor(model_proto=model)
    sp = spm.SentencePieceProcessor(model_proto=rebuild_model(path))
    assert pieces(sp) == pieces(original)
    for text in ["ab", "a b", "aab ba", "c"]:
        assert sp.encode(text) == original.encode(text), text
    data = read_tokenizer_bin(path)
    data["trailer"] = None
    stripped = write_tokenizer_bin(data, tmp_path / "stripped.bin")
    with pytest.raises(UserError, match=r"piece 4's score -0.5 is not a BPE rank: a unigram model"):
        rebuild_model(stripped)
    with pytest.raises(EngineError, match=r"piece 4's score -0.5 is not a BPE rank"):
        CTokenizer(stripped, 0)


@pytest.mark.parametrize("piece, message", [(b"\xff", "piece 300 is not UTF-8"),
                                            (b"<0x41>", "cannot load the rebuilt tokenizer.model"),
                                            (b"", "cannot load the rebuilt tokenizer.model")])
def test_what_sentencepiece_cannot_hold_is_refused(piece, message, tmp_path):
    data = tokenizer_data(shared_file("tokenizers/llama2en/tokenizer.model"))
    data["trailer"] = None
    data["pieces"][300] = piece  # a second <0x41> is a normal piece in the C engine: a duplicate
    with pytest.raises(UserError, match=message):
        rebuild_model(write_tokenizer_bin(data, tmp_path / "tokenizer.bin"))
