"""Built-in preference pairs (llama2zh.corpus.sample_dpo): the sample-sft prompts, each rejected
kind what it says, the held-out split, the same bytes every run, `llama2zh download sample-dpo`."""

from __future__ import annotations

import json
import re

import pytest

from llama2zh.corpus.conversations import ReadReport
from llama2zh.corpus.preferences import read_preferences
from llama2zh.corpus.sample import BOYS, GIRLS, PETS
from llama2zh.corpus.sample_dpo import CHECKS, KINDS, LOOP_REPEATS, write_sample_dpo
from llama2zh.corpus.sample_sft import build_sft, prompt_key
from llama2zh.errors import UserError
from llama2zh.evaluate import is_chinese
from tests.test_cli import llama2zh

N_TRAIN, N_VAL, SEED = 400, 60, 3
NAMES = {lang: {n[i] for n in GIRLS + BOYS + PETS} for i, lang in enumerate(("en", "zh"))}
# Sentences: up to . ! ? (。！？) and a closing quote, written apart from the module's own splitter.
SENTENCE = re.compile(r'[^.!?。！？]*[.!?。！？]+["”]?')


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The directory, its stats, per split the pair records and the sample-sft conversations made."""
    dest = tmp_path_factory.mktemp("dpo")
    stats = write_sample_dpo(dest, n_train=N_TRAIN, n_val=N_VAL, seed=SEED)
    made = build_sft(N_TRAIN, N_VAL, SEED)
    records = {split: list(map(json.loads, (dest / f"{split}.jsonl").open(encoding="utf-8"))) for split in made}
    return dest, stats, records, made


def pairs(written, kind=None):
    return [r for split in ("train", "val") for r in written[2][split] if kind in (None, r["kind"])]


def replies(record) -> tuple[str, str]:
    return record["chosen"][-1]["content"], record["rejected"][-1]["content"]


def test_files_stats_and_the_sample_sft_conversations(written):
    dest, stats, records, sft = written
    assert sorted(p.name for p in dest.iterdir()) == ["train.jsonl", "val.jsonl"]  # no temp files left
    assert stats["bytes"] == sum(p.stat().st_size for p in dest.iterdir())
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        assert len(records[split]) == n == stats[split]["pairs"] == sum(stats[split]["kinds"].values())
        assert [r["chosen"] for r in records[split]] == [m.record["conversations"] for m in sft[split]]
        assert [[r[k] for k in CHECKS] for r in records[split]] == [[m.record[k] for k in CHECKS] for m in sft[split]]
        assert set(stats[split]["kinds"]) == set(KINDS)  # every kind in each split
        assert max(stats[split]["kinds"].values()) - min(stats[split]["kinds"].values()) <= 1
        report = ReadReport()
        assert len(list(read_preferences(dest / f"{split}.jsonl", report, strict=True))) == n
        assert report.formats == {str(dest / f"{split}.jsonl"): "minimind"}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_sample_dpo(tmp_path / name, n_train=60, n_val=10, seed=seed)
        runs[name] = [(tmp_path / name / f"{split}.jsonl").read_bytes() for split in ("train", "val")]
    assert runs["a"] == runs["b"] and all(x != y for x, y in zip(runs["a"], runs["c"], strict=True))


def test_pairs_share_their_prompt_and_val_prompts_are_never_in_train(written):
    for r in pairs(written):
        assert set(r) == {"chosen", "rejected", "kind", "rejected_ends", *CHECKS}
        assert r["rejected"][:-1] == r["chosen"][:-1]
        assert r["chosen"][-1]["role"] == r["rejected"][-1]["role"] == "assistant"
        assert r["rejected_ends"] == (r["kind"] != "loop")
        chosen, rejected = replies(r)
        assert rejected.strip() and rejected != chosen
    train = {prompt_key(r["chosen"]) for r in written[2]["train"]}
    val = [prompt_key(r["chosen"]) for r in written[2]["val"]]
    assert not train & set(val) and len(set(val)) == len(val)


def loop_at_end(sentences: list[str]) -> tuple[list[str], int]:
    """The sentences (one, or a quotation split in two or three) repeated at the end, and how often."""
    for period in (1, 2, 3):
        block, n = sentences[-period:], 0
        while (n + 1) * period <= len(sentences) and sentences[len(sentences) - (n + 1) * period:][:period] == block:
            n += 1
        if n >= 2:
            return block, n
    return [], 0


def test_loop_repeats_a_sentence_of_the_reply(written):
    for r in pairs(written, "loop"):
        chosen, rejected = replies(r)
        block, repeats = loop_at_end([s.strip() for s in SENTENCE.findall(rejected)])
        assert repeats >= LOOP_REPEATS, rejected
        assert all(s in chosen for s in block)
        assert chosen.startswith(rejected[:rejected.index(block[0])])  # before the loop: the true reply's start
        assert not r["rejected_ends"]


def test_cutoff_is_a_proper_prefix_that_ends_mid_sentence(written):
    for r in pairs(written, "cutoff"):
        chosen, rejected = replies(r)
        assert chosen.startswith(rejected) and len(rejected) < len(chosen)
        assert re.search(r"\w$", rejected), rejected  # after a letter or a character: no sentence ends there
        assert r["rejected_ends"]


def test_wrong_language_is_the_other_language(written):
    for r in pairs(written, "wrong_language"):
        chosen, rejected = replies(r)
        assert is_chinese(chosen) == (r["lang"] == "zh") != is_chinese(rejected), r
        assert r["rejected_ends"]


def test_wrong_character_names_another_and_not_the_asked_one(written):
    made = {prompt_key(m.record["conversations"]): m.record for split in written[3].values() for m in split}
    found = pairs(written, "wrong_character")
    assert found
    for r in found:
        asked = made[prompt_key(r["chosen"])]["character"]
        chosen, rejected = replies(r)
        assert asked and asked in chosen and asked not in rejected
        assert any(name in rejected for name in NAMES[r["lang"]] - {asked}), rejected
        assert is_chinese(rejected) == (r["lang"] == "zh")
        assert not r["task"].startswith("qa_")


def test_bad_counts_are_refused(tmp_path):
    with pytest.raises(UserError, match="at least one train pair"):
        write_sample_dpo(tmp_path, n_train=0)


def test_cli_writes_the_files_and_refuses_a_bad_dest(tmp_path):
    result = llama2zh("download", "sample-dpo", "--dest", tmp_path / "data")
    assert result.returncode == 0, result.stderr
    assert "train.jsonl (8,000 pairs" in result.stdout and all(kind in result.stdout for kind in KINDS)
    assert sorted(p.name for p in (tmp_path / "data" / "sample-dpo").iterdir()) == ["train.jsonl", "val.jsonl"]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = llama2zh("download", "sample-dpo", "--dest", blocker)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "cannot make the directory" in result.stderr
    assert "Traceback" not in result.stderr
