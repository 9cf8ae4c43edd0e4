"""`llama2zh clean` on a corpus with planted duplicates, near-duplicates, boilerplate and junk."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from llama2zh.bench.corpus import near_copy
from llama2zh.corpus import clean as clean_module
from llama2zh.corpus.clean import Rules, clean, normalise
from llama2zh.corpus.minhash import KeyMap, lsh_rows, shingle_hashes, signature, similar
from llama2zh.corpus.sample import make_story
from llama2zh.errors import UserError
from tests.conftest import shared_file
from tests.test_cli import llama2zh

ADS = ("本章未完，请点击下一页继续阅读", "天才一秒记住本站地址：www.biquge.com 最新章节", "https://example.com/novel/123")
RULES = Rules(lang="zh")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """a.jsonl: distinct Chinese paragraphs; b.jsonl: copies of them, near-copies, boilerplate and junk, shuffled.

    Real text; test_sample_stories_... does the same on the built-in stories, which share templates."""
    rng = random.Random(0)
    paragraphs = [json.loads(line)["text"] for name in ("zh_literature.jsonl", "zh_literature_2.jsonl")
                  for line in shared_file(f"data/{name}").open(encoding="utf-8")]
    paragraphs = [t for t in dict.fromkeys(paragraphs) if len(t) >= 120]
    distinct, reserved = paragraphs[:500], paragraphs[500:530]
    plants = {
        "exact": [" " + t.replace("\n", " \r\n\u3000") + "\u3000\n"
                  for t in rng.sample(distinct, 30)],  # same once normalised
        "near": [near_copy(t, rng) for t in rng.sample(distinct, 60)],
        "boilerplate": [t + "\n" + ADS[i % 3] for i, t in enumerate(reserved)],
        "short": ["你好。", "第一章", "嗯嗯，好的。"],
        "lines": ["他走了。\n" * 12, "加油！加油！\n我们赢了！\n" * 8],
        "shingles": ["哈" * 300, "好的好的" * 60],
        "language": [make_story(random.Random(i))[0] for i in range(5)],
    }
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
                                          for i, t in enumerate(distinct)), encoding="utf-8")
    mixed = [(kind, t) for kind, texts in plants.items() for t in texts]
    rng.shuffle(mixed)
    (root / "b.jsonl").write_text("".join(json.dumps({"kind": kind, "text": t}, ensure_ascii=False) + "\n"
                                          for kind, t in mixed), encoding="utf-8")
    return root, distinct, plants


def kept_records(out_dir):
    return [json.loads(line) for shard in sorted(out_dir.glob("part-*.jsonl")) for line in shard.open()]


def directory_bytes(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def test_clean_drops_every_plant_and_keeps_distinct_documents(corpus, tmp_path):
    root, distinct, plants = corpus
    report = clean([root], tmp_path / "out", rules=RULES, workers=2, shard_docs=200)
    kept = kept_records(tmp_path / "out")
    texts = {r["text"] for r in kept}
    lost = [t for t in distinct if normalise(t) not in texts]
    assert len(lost) <= 0.01 * len(distinct), lost[:3]
    near_kept = [t for t in plants["near"] if normalise(t) in texts]
    assert len(near_kept) <= 0.05 * len(plants["near"])
    assert report["dropped"]["exact_duplicate"] == len(plants["exact"])
    assert report["dropped"]["near_duplicate"] + len(lost) >= 0.95 * len(plants["near"])
    for rule, kind in (("too_short", "short"), ("repeated_lines", "lines"), ("repeated_shingles", "shingles"),
                       ("language", "language")):
        assert report["dropped"][rule] == len(plants[kind]), rule
        assert not any(r.get("kind") == kind for r in kept)
        assert report["samples"][rule]
    # boilerplate lines leave their documents, which stay
    assert report["boilerplate_lines"] == len(plants["boilerplate"])
    assert len(report["samples"]["boilerplate_line"]) == 3 and set(report["samples"]["boilerplate_line"]) <= set(ADS)
    cleaned = [r["text"] for r in kept if r.get("kind") == "boilerplate"]
    assert len(cleaned) == len(plants["boilerplate"])
    assert not any(ad in t for t in cleaned for ad in ADS)
    # records as they came, in input order, in shards of 200
    assert report["read"] == len(distinct) + sum(map(len, plants.values()))
    assert report["kept"] == len(kept)
    assert report["shards"] == [f"part-{i:05d}.jsonl" for i in range((len(kept) + 199) // 200)]
    assert [r["id"] for r in kept if "id" in r] == sorted(r["id"] for r in kept if "id" in r)
    assert json.loads((tmp_path / "out/report.json").read_text()) == report


def test_one_and_two_workers_and_a_resumed_run_give_the_same_bytes(corpus, tmp_path, monkeypatch):
    root, _, _ = corpus
    clean([root], tmp_path / "one", rules=RULES, workers=1, shard_docs=150)
    clean([root], tmp_path / "two", rules=RULES, workers=2, shard_docs=150)
    expected = directory_bytes(tmp_path / "one")
    assert len([name for name in expected if name.endswith(".jsonl")]) >= 4
    assert directory_bytes(tmp_path / "two") == expected

    read_records = clean_module.read_records

    def interrupted(*args):  # Ctrl-C while reading record 600: after the first shards, in the middle of one
        for n, record in enumerate(read_records(*args)):
            if n == 600:
                raise KeyboardInterrupt
            yield record

    monkeypatch.setattr(clean_module, "read_records", interrupted)
    with pytest.raises(KeyboardInterrupt):
        clean([root], tmp_path / "resumed", rules=RULES, workers=1, shard_docs=150)
    partial = directory_bytes(tmp_path / "resumed")
    assert "report.json" not in partial and 2 <= len([n for n in partial if n.startswith("part-")]) // 3 < 4
    assert not [n for n in partial if n.endswith(".tmp")]
    monkeypatch.setattr(clean_module, "read_records", read_records)
    clean([root], tmp_path / "resumed", rules=RULES, workers=2, shard_docs=150)
    assert directory_bytes(tmp_path / "resumed") == expected
    clean([root], tmp_path / "resumed", rules=RULES, workers=1, shard_docs=150)  # done: nothing changes
    assert directory_bytes(tmp_path / "resumed") == expected

    with pytest.raises(UserError, match="other inputs or settings; use --force"):
        clean([root], tmp_path / "resumed", rules=Rules(lang="any"), shard_docs=150)
    report = clean([root], tmp_path / "resumed", rules=Rules(lang="any"), shard_docs=150, force=True)
    assert "language" not in report["dropped"]


def test_sample_stories_lose_their_planted_duplicates_and_keep_the_rest(tmp_path):
    """The built-in stories share templates: pairs of them that share a band key are 0.5-0.7 alike, not 0.8."""
    rng = random.Random(3)
    distinct = list(dict.fromkeys(make_story(rng)[1] for _ in range(1000)))
    plants = {"near": [near_copy(t, rng) for t in rng.sample(distinct, 100)], "exact": rng.sample(distinct, 30)}
    docs = [("distinct", t) for t in distinct] + [(kind, t) for kind, texts in plants.items() for t in texts]
    rng.shuffle(docs)
    docs.sort(key=lambda doc: doc[0] != "distinct")  # the originals first, so their copies are the ones dropped
    (tmp_path / "stories.jsonl").write_text("".join(json.dumps({"kind": kind, "text": t}, ensure_ascii=False) + "\n"
                                                    for kind, t in docs), encoding="utf-8")
    report = clean([tmp_path / "stories.jsonl"], tmp_path / "out", rules=RULES, workers=1, shard_docs=300)
    kept = kept_records(tmp_path / "out")
    lost = [t for t in distinct if normalise(t) not in {r["text"] for r in kept if r["kind"] == "distinct"}]
    assert len(lost) <= 0.01 * len(distinct), lost[:3]
    assert sum(r["kind"] == "near" for r in kept) <= 0.05 * len(plants["near"]), report["dropped"]
    assert not any(r["kind"] == "exact" for r in kept)
    assert report["dropped"]["exact_duplicate"] >= 30  # and near-copies whose changed characters came out the same
    assert sum(report["dropped"].values()) == 130 + len(lost)


def test_signatures_estimate_jaccard_similarity():
    """Each position agrees with probability J: the estimates stay within a few standard errors of J."""
    rng = random.Random(4)
    stories = [make_story(rng)[0] for _ in range(60)]
    shingles = [np.unique(shingle_hashes(t)) for t in stories]
    signatures = [signature(s) for s in shingles]
    errors = []
    for i in range(len(stories)):
        for j in range(i):
            jaccard = len(np.intersect1d(shingles[i], shingles[j])) / len(np.union1d(shingles[i], shingles[j]))
            errors.append(np.mean(signatures[i] == signatures[j]) - jaccard)
    assert abs(np.mean(errors)) < 0.01 and np.sqrt(np.mean(np.square(errors))) < 0.03 and max(map(abs, errors)) < 0.15
    same = signatures[0].copy()
    assert similar(signatures[0], same, 0.8)
    same[:30] += 1  # 98 of 128 positions agree: 0.766, within a standard error (0.035) of 0.8
    assert similar(signatures[0], same, 0.8)
    same[30] += 1
    assert not similar(signatures[0], same, 0.8)


def test_lsh_rows_and_key_map():
    assert [lsh_rows(t) for t in (0.5, 0.7, 0.8, 0.9, 0.95)] == [2, 4, 8, 8, 16]
    rng = random.Random(1)
    added = list(dict.fromkeys(rng.getrandbits(64) for _ in range(100_000)))
    keys = KeyMap()
    keys.extend(np.array(added[:50_000], np.uint64), np.arange(50_000))
    for n, key in enumerate(added[50_000:], 50_000):  # through the buffer, merged into runs on the way
        keys.add([key], n)
    keys.add([added[7], added[-1]], 123_456)  # a key may map to several values
    assert len(keys) == len(added) + 2
    assert all(keys.find([k]) == [n] for n, k in enumerate(added) if n % 997 and n not in (7, len(added) - 1))
    assert keys.find([added[7], 5]) == [7, 123_456] and keys.find([added[-1]]) == [len(added) - 1, 123_456]
    present = set(added)
    assert not any(keys.find([k ^ 1]) for k in added[::997] if k ^ 1 not in present)


def test_cli_summary_and_bad_input_is_one_line(corpus, tmp_path):
    root, _, _ = corpus
    result = llama2zh("clean", root / "a.jsonl", "--out", tmp_path / "out", "--lang", "zh", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'out'}: kept 500 of 500 documents in 1 shards")
    (tmp_path / "other.jsonl").write_text('{"content": "一篇文章"}\n', encoding="utf-8")
    for args, message in (([tmp_path / "missing.jsonl"], "missing.jsonl: no such file or folder"),
                          ([tmp_path / "other.jsonl"], "record 0 has no text in field 'text'")):
        result = llama2zh("clean", *args, "--out", tmp_path / "bad")
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
