"""vocab train, extend and stats: SentencePiece settings, the base kept exactly, the C tokenizer
equal to SentencePiece on what they write, stats against a hand count, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
import xml.etree.ElementTree as ET

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from llama2zh.engine import CTokenizer
from llama2zh.fileio import sha256_file
from llama2zh.vocab.corpus import read_documents
from llama2zh.vocab.curve import markdown, svg
from llama2zh.vocab.export import SPACE
from llama2zh.vocab.extend import chinese_candidates, extend_proto, extend_tokenizer, is_chinese_piece
from llama2zh.vocab.stats import stats_table, tokenizer_stats
from llama2zh.vocab.train import train_tokenizer
from tests.conftest import ROOT, shared_file

NORMAL, BYTE = 1, 6
EN, ZH = "data/tinystories_en_sample.jsonl", "data/tinystories_zh_sample.jsonl"
LITERATURE, HELDOUT = "data/zh_literature.jsonl", "data/zh_literature_2.jsonl"
MIXED = ["Once upon a time, 小明和他的 dog 去公园玩。He said: “你好! Let's go.”",
         "（全角括号）１２３ＡＢＣ，。！？：；“”‘’【】《》　全角空格", "In 2024 she counted 1,000 stars.",
         "罕见字 𠀀𠮷 and emoji 😀👍🏽", "  two  spaces\tand a tab\n\n新的一行  ", "——……“嗯。”"]


def documents(relative: str, limit: int | None = None) -> list[str]:
    return list(read_documents([shared_file(relative)]))[:limit]


def proto_of(path) -> pb.ModelProto:
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab") / "trained"
    meta = train_tokenizer([shared_file(EN), shared_file(ZH)], 1000, out)
    return out, meta


@pytest.fixture(scope="session")
def extended(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab") / "extended"
    base = shared_file("tokenizers/llama2en/tokenizer.model")
    report = extend_tokenizer(base, [shared_file(LITERATURE), shared_file(ZH)], 4000, out,
                              heldout=[shared_file(HELDOUT)])
    return out, report, base


def llama2zh(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "llama2zh", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# ---- train ----

def test_train_uses_the_llama_settings_and_writes_meta(trained):
    out, meta = trained
    proto = proto_of(out / "tokenizer.model")
    spec = proto.trainer_spec
    assert len(proto.pieces) == 1000 and spec.model_type == pb.TrainerSpec.BPE
    assert spec.byte_fallback and spec.split_digits and spec.character_coverage == pytest.approx(0.9995)
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, -1)
    assert proto.normalizer_spec.name == "identity"
    assert [p.type for p in proto.pieces[3:259]] == [BYTE] * 256
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.decode(sp.encode("“你好！”，（１２３）")) == "“你好！”，（１２３）"  # no NFKC

    on_disk = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert on_disk == meta and meta["tokenizer_sha256"] == sha256_file(out / "tokenizer.model")
    assert [c["sha256"] for c in meta["corpus"]] == [sha256_file(shared_file(EN)), sha256_file(shared_file(ZH))]
    assert meta["settings"]["byte_fallback"] and meta["vocab_size"] == 1000 and meta["lang"] == "enzh"
    assert (out / "tokenizer.bin").stat().st_size > 0


def test_train_splits_digits(tmp_path):
    (tmp_path / "n.txt").write_text("".join(f"Story {i}: in 2024 we saw 1000 birds and 42 cats.\n" for i in range(300)))
    train_tokenizer([tmp_path / "n.txt"], 320, tmp_path / "out")  # without split_digits: "▁2024", "▁1000"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert sp.encode("in 2024 we saw 1000", out_type=str) == ["▁in", "▁", "2", "0", "2", "4", "▁we", "▁saw", "▁",
                                                              "1", "0", "0", "0"]


def test_documents_by_format_and_language(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"story": "小猫在花园里玩。", "story_en": "The cat played in the garden."}\n\n'
        '{"text": "A dog ran."}\n{"story": "狗跑了，Tom 笑了。"}\n', encoding="utf-8")
    (tmp_path / "b.json").write_text('[{"story": "One day."}, {"story": "有一天。"}]', encoding="utf-8")
    (tmp_path / "c.txt").write_text("第一行。\nsecond line\n\n", encoding="utf-8")
    files = [tmp_path / name for name in ("a.jsonl", "b.json", "c.txt")]
    assert list(read_documents(files, "en")) == ["The cat played in the garden.", "A dog ran.", "One day.",
                                                 "second line"]
    assert list(read_documents(files, "zh")) == ["小猫在花园里玩。", "狗跑了，Tom 笑了。", "有一天。", "第一行。"]
    assert len(list(read_documents(files, "enzh"))) == 8


# ---- the C tokenizer on what train and extend write ----

@pytest.mark.parametrize("which", ["trained", "extended"])
def test_c_tokenizer_equals_sentencepiece(which, request):
    out = request.getfixturevalue(which)[0]
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ct = CTokenizer(out / "tokenizer.bin")
    texts = documents(ZH) + documents(EN, 40) + documents(HELDOUT, 100) + MIXED
    for text in texts:
        ids = sp.encode(text)
        assert ct.encode(text, bos=False) == ids, text[:60]
        assert ct.decode(ids) == sp.decode(ids), text[:60]


# ---- extend ----

def test_extend_keeps_every_base_piece(extended):
    out, report, base_path = extended
    base, proto = proto_of(base_path), proto_of(out / "tokenizer.model")
    n = len(base.pieces)
    assert [(p.piece, p.score, p.type) for p in proto.pieces[:n]] == [(p.piece, p.score, p.type) for p in base.pieces]
    assert proto.normalizer_spec == base.normalizer_spec
    new = proto.pieces[n:]
    assert len(new) == report["added"] == 4000 and report["vocab_size"] == len(proto.pieces)
    assert len({p.piece for p in proto.pieces}) == len(proto.pieces)  # no duplicates
    assert all(p.type == NORMAL and is_chinese_piece(p.piece) for p in new)
    scores = [p.score for p in new]
    assert scores[0] < min(p.score for p in base.pieces)
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))  # learned order, distinct


def test_extend_english_keeps_the_base_ids(extended):
    out, _, base_path = extended
    base = spm.SentencePieceProcessor(model_file=str(base_path))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    stories = documents(EN)
    assert len(stories) == 472 and sp.encode(stories) == base.encode(stories)


def test_extend_every_new_piece_encodes_to_itself(extended):
    out, _, base_path = extended
    proto = proto_of(out / "tokenizer.model")
    n = len(proto_of(base_path).pieces)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))  # dummy prefix on: "X" -> "▁X"
    proto.normalizer_spec.add_dummy_prefix = False
    bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    for i, piece in enumerate(proto.pieces[n:], n):
        text = piece.piece
        ids = sp.encode(text[1:]) if text.startswith(SPACE) else bare.encode(text)
        assert ids == [i], text


def test_extend_needs_fewer_tokens_per_chinese_character(extended):
    out, report, base_path = extended
    tpc = report["tokens_per_zh_char"]
    assert report["heldout"] and tpc["extended"] < 0.85 * tpc["base"]
    stories = documents(ZH)
    chars = sum(len("".join(s.split())) for s in stories)
    per_char = {name: sum(map(len, spm.SentencePieceProcessor(model_file=str(path)).encode(stories))) / chars
                for name, path in (("base", base_path), ("extended", out / "tokenizer.model"))}
    assert per_char["extended"] < 0.75 * per_char["base"]


def test_curve_points_are_what_extend_makes(extended):
    out, _, base_path = extended
    base = proto_of(base_path)
    candidates, _ = chinese_candidates(base, [shared_file(LITERATURE), shared_file(ZH)], 6000)  # curve: max size
    proto, _ = extend_proto(base, candidates, 4000)
    assert proto.SerializeToString() == (out / "tokenizer.model").read_bytes()


def test_curve_writes_a_table_and_an_svg():
    rows = [{"name": "base", "added": 0, "vocab": 32000, "eval": 1.6, "heldout": 1.5},
            {"name": "+1,000", "added": 1000, "vocab": 33000, "eval": 1.1, "heldout": 1.2},
            {"name": "ref", "added": None, "vocab": 55296, "eval": 0.7, "heldout": 0.8}]
    table = markdown(rows, "stories", "prose").splitlines()
    assert table[0] == "| tokenizer | pieces added | vocab | tokens / zh char: stories | prose |"
    assert table[4] == "| ref | – | 55,296 | 0.700 | 0.800 |"
    root = ET.fromstring(svg(rows, "stories", "prose"))
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}polyline")) == 2 and len(root.findall(f"{ns}rect")) == 1 + 2


# ---- stats ----

def test_stats_against_a_hand_count(tmp_path):
    model = shared_file("tokenizers/llama2en/tokenizer.model")
    zh, en = "小猫，你好。\n再见", "The cat sat on the mat. 2024!"
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": zh}) + "\n" + json.dumps({"text": en}) + "\n")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    zh_ids, en_ids = sp.encode(zh), sp.encode(en)
    n_byte = sum(sp.is_byte(i) for i in zh_ids + en_ids)
    n_cjk = sum(any(unicodedata.name(c, "").startswith(("CJK UNIFIED", "CJK COMPATIBILITY IDEOGRAPH"))
                    for c in sp.id_to_piece(i)) for i in range(sp.get_piece_size()))
    row = tokenizer_stats(model, [zh], [en])
    assert row["vocab"] == 32000 and row["embedding_params"] == 32000 * 288
    assert row["tokens_per_zh_char"] == len(zh_ids) / 8  # 小猫，你好。再见: 8 characters
    assert row["tokens_per_en_word"] == len(en_ids) / 7
    assert row["bytes_per_token"] == (len(zh.encode()) + len(en.encode())) / (len(zh_ids) + len(en_ids))
    assert row["byte_fallback"] == n_byte / (len(zh_ids) + len(en_ids)) and n_byte > 0
    assert row["cjk_pieces"] == n_cjk / 32000
    table = stats_table([model], [tmp_path / "t.jsonl"]).splitlines()
    assert len(table) == 3 and table[2].startswith("| llama2en | 32,000 | ")
    assert f"| {len(zh_ids) / 8:.3f} | {len(en_ids) / 7:.3f} |" in table[2]


# ---- bad input: one line on stderr, exit 1 (2 for usage) ----

def test_bad_input_is_one_line_and_exit_1(tmp_path):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"story": f"A small story number {i}."}) + "\n" for i in range(200)))
    (tmp_path / "not.model").write_text("hello")
    cases = {
        "not a SentencePiece model": ["vocab", "stats", tmp_path / "not.model"],
        "missing.jsonl: no such file": ["vocab", "extend", "--base", shared_file("tokenizers/llama2en/tokenizer.model"),
                                        "--corpus", tmp_path / "missing.jsonl", "--add", 10, "--out", tmp_path / "x"],
        "Vocabulary size too high (5000). Please set it to a value <=": [
            "vocab", "train", "--input", tiny, "--vocab-size", 5000, "--out", tmp_path / "y"],
    }
    for message, args in cases.items():
        result = llama2zh(*args)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "y").exists() or not any((tmp_path / "y").iterdir())

    usage = llama2zh("vocab", "train", "--input", tiny, "--out", tmp_path / "z")
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1
    assert "--vocab-size" in usage.stderr


# ---- unigram (last: its C encoder is the newest part) ----

def test_train_unigram_and_c_tokenizer_equals_sentencepiece(tmp_path):
    meta = train_tokenizer([shared_file(EN), shared_file(ZH)], 1000, tmp_path, model_type="unigram")
    assert meta["model_type"] == "unigram"
    assert proto_of(tmp_path / "tokenizer.model").trainer_spec.model_type == pb.TrainerSpec.UNIGRAM
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ct = CTokenizer(tmp_path / "tokenizer.bin")
    for text in documents(ZH) + documents(EN, 20) + MIXED:
        ids = sp.encode(text)
        assert ct.encode(text, bos=False) == ids and ct.decode(ids) == sp.decode(ids), text[:60]
