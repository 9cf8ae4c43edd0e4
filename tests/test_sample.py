"""The built-in bilingual story corpus (llama2zh.corpus.sample)."""

from __future__ import annotations

import json
import re

import pytest

from llama2zh.corpus.sample import write_sample
from llama2zh.errors import UserError

# Split after . ! ? (。！？) unless more punctuation follows, or after such a mark and a closing quote:
# written independently of the module's own splitter.
SPLIT = re.compile(r'(?<=[.!?。！？])(?![.!?。！？"”])|(?<=[.!?。！？]["”])')
CJK = re.compile(r"[\u4e00-\u9fff]")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SPLIT.split(text) if s.strip()]


def read_corpus(dest) -> list[dict]:
    return [record for path in sorted(dest.glob("data*.json")) for record in json.loads(path.read_text("utf-8"))]


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    dest = tmp_path_factory.mktemp("sample")
    stats = write_sample(dest)
    return dest, stats, read_corpus(dest)


def test_layout_is_tinystories_shards_of_parallel_records(default_corpus):
    dest, stats, records = default_corpus
    names = sorted(p.name for p in dest.iterdir())
    assert names == [f"data{i:02d}.json" for i in range(stats["shards"])] == stats["files"]
    for path in dest.iterdir():
        shard = json.loads(path.read_text("utf-8"))
        assert isinstance(shard, list) and shard
        assert all(set(r) == {"id", "story", "story_en"} for r in shard)
    assert len(records) == stats["stories"] >= 5000
    assert len({r["id"] for r in records}) == len(records)
    assert stats["bytes"] == sum(p.stat().st_size for p in dest.iterdir())


def test_chinese_is_chinese_and_english_is_ascii(default_corpus):
    _, stats, records = default_corpus
    for r in records:
        zh, en = r["story"], r["story_en"]
        letters = [c for c in zh if not c.isspace() and c not in "，。！？：；、“”"]
        assert len(CJK.findall(zh)) >= 0.95 * len(letters), zh
        assert "。" in zh and not re.search(r'[A-Za-z,.!?"]', zh), zh
        assert en.isascii() and re.search(r"[A-Za-z]", en) and "{" not in en + zh, en
    assert stats["chars_zh"] == sum(len(r["story"]) for r in records)
    assert stats["words_en"] == sum(len(r["story_en"].split()) for r in records)
    openers = sum(r["story"].startswith("从前，有一个小女孩") for r in records)
    assert 0.05 * len(records) < openers < 0.5 * len(records)  # the demo prompt is common, not universal
    assert any(r["story_en"].startswith("Once upon a time, there was a little girl") for r in records)


def test_parallel_sentences_and_story_length(default_corpus):
    _, _, records = default_corpus
    for r in records:
        en, zh = sentences(r["story_en"]), sentences(r["story"])
        assert len(en) == len(zh), (r["story_en"], r["story"])
        assert 5 <= len(en) <= 12


def test_distinct_sentence_ratio_is_reported_truthfully_and_high(default_corpus):
    _, stats, records = default_corpus
    for lang, key in (("en", "story_en"), ("zh", "story")):
        all_sentences = [s for r in records for s in sentences(r[key])]
        assert stats[f"sentences_{lang}"] == len(all_sentences)
        ratio = len(set(all_sentences)) / len(all_sentences)
        assert stats[f"distinct_sentence_ratio_{lang}"] == pytest.approx(ratio, abs=1e-12)
        assert ratio > 0.3
    assert len({r["story"] for r in records}) == len(records)  # no two stories alike


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def shards(name, seed):
        write_sample(tmp_path / name, n_stories=250, seed=seed, shard_size=100)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}

    first = shards("a", 7)
    assert list(first) == ["data00.json", "data01.json", "data02.json"]
    assert shards("b", 7) == first
    other = shards("c", 8)
    assert list(other) == list(first) and all(other[name] != first[name] for name in first)


def test_rewrite_leaves_no_stale_shards_or_temp_files(tmp_path):
    write_sample(tmp_path, n_stories=30, shard_size=10)
    (tmp_path / "notes.txt").write_text("kept")
    stats = write_sample(tmp_path, n_stories=15, shard_size=10)
    assert stats["shards"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data00.json", "data01.json", "notes.txt"]
    assert len(read_corpus(tmp_path)) == 15


@pytest.mark.parametrize("n_stories, shard_size", [(0, 10), (10, 0)])
def test_rejects_empty_sizes(tmp_path, n_stories, shard_size):
    with pytest.raises(UserError):
        write_sample(tmp_path, n_stories=n_stories, shard_size=shard_size)
