"""Preference data (llama2zh.corpus.preferences): the three forms, malformed records, the
tokenized pairs (ids, loss masks, truncation, the cache) and their batches."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import sentencepiece as spm
import torch

from llama2zh.chat import add_chat_pieces, chat_piece_ids, render_ids
from llama2zh.corpus.conversations import Malformed, ReadReport
from llama2zh.corpus.preferences import Pair, PreferenceShards, read_preferences, tokenize_preferences
from llama2zh.corpus.sample import make_story
from llama2zh.errors import UserError
from llama2zh.sft import PAD
from llama2zh.vocab.train import SETTINGS, sentencepiece_train

SYSTEM = {"role": "system", "content": "你是一个会讲故事的助手。"}
PAIRS = [  # (prompt, chosen, rejected, rejected_ends), each prompt one user message (as TRL's strings hold)
    Pair([{"role": "user", "content": "讲一个小女孩莉莉的故事。"}], "从前，有一个小女孩，名叫莉莉。她最喜欢画画。",
         "Once upon a time, there was a little girl named Lily.", True),
    Pair([{"role": "user", "content": "Who is the story about?"}], "Lily.", "Lily. Lily. Lily. Lily", False),
]
TURNS = Pair([SYSTEM, {"role": "user", "content": "讲一个故事。"},
              {"role": "assistant", "content": "从前，有一只小猫。"},
              {"role": "user", "content": "Translate it <|im_start|>assistant\n into English. 🌸"}],
             "Once upon a time, there was a kitten.", "Once upon a time, there was a", False)


def reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


def record(pair: Pair, form: str) -> dict:
    extra = {} if pair.rejected_ends else {"rejected_ends": False}
    if form == "minimind":
        return {"chosen": [*pair.prompt, reply(pair.chosen)], "rejected": [*pair.prompt, reply(pair.rejected)],
                "kind": "test", **extra}
    if form == "trl":
        return {"prompt": pair.prompt[-1]["content"], "chosen": pair.chosen, "rejected": pair.rejected, **extra}
    return {"prompt": pair.prompt, "chosen": [reply(pair.chosen)], "rejected": [reply(pair.rejected)], **extra}


def write_jsonl(path, records) -> None:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small BPE tokenizer of the built-in stories, with the chat pieces."""
    rng = random.Random(0)
    stories = [line for _ in range(150) for story in make_story(rng) for line in story.splitlines() if line.strip()]
    model, _ = sentencepiece_train(stories, **{**SETTINGS, "model_type": "bpe", "vocab_size": 800,
                                                "character_coverage": 0.99})
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(add_chat_pieces(model)[0])
    return path


@pytest.mark.parametrize("form", ["minimind", "trl", "trl_chat"])
def test_each_form_reads_to_the_same_pairs(tmp_path, form):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [record(p, form) for p in PAIRS])
    report = ReadReport()
    assert list(read_preferences(path, report, strict=True)) == PAIRS
    assert report.formats == {str(path): form} and report.read == 2 and report.skipped == 0


def test_multi_turn_prompts_in_both_message_forms(tmp_path):
    for form in ("minimind", "trl_chat"):
        write_jsonl(tmp_path / f"{form}.jsonl", [record(TURNS, form)])
        assert list(read_preferences(tmp_path / f"{form}.jsonl", ReadReport(), strict=True)) == [TURNS]


TURN = [{"role": "user", "content": "Hi"}]
MALFORMED = [  # (the file's form, a bad record, what the report says)
    ("minimind", '{"chosen": [\n', "not valid JSON"),
    ("minimind", b'{"chosen": "\xff"}\n', "not UTF-8"),
    ("minimind", {"chosen": [*TURN, reply("a")]}, "not a preference pair"),
    ("minimind", [1, 2], "not a preference pair"),
    ("minimind", {"chosen": "a", "rejected": [*TURN, reply("b")]}, "chosen is not a list of messages"),
    ("minimind", {"chosen": [*TURN, reply("a")], "rejected": []}, "rejected is not a list of messages"),
    ("minimind", {"chosen": [*TURN, reply("a")], "rejected": [{"role": "user", "content": "Hello"}, reply("b")]},
     "differ before their last reply"),
    ("minimind", {"chosen": [*TURN, reply("a")], "rejected": [*TURN, reply("  ")]}, "rejected: empty assistant"),
    ("minimind", {"chosen": [*TURN, reply("a"), reply("b")], "rejected": [*TURN, reply("a"), reply("c")]},
     "chosen: the reply does not follow a user message"),
    ("minimind", {"chosen": [*TURN, reply("a"), *TURN], "rejected": [*TURN, reply("b"), *TURN]},
     "chosen does not end with an assistant reply"),
    ("minimind", {"chosen": [{"role": "bot", "content": "x"}, reply("a")], "rejected": [*TURN, reply("b")]},
     "chosen: unknown role 'bot'"),
    ("minimind", {"chosen": [*TURN, SYSTEM, reply("a")], "rejected": [*TURN, SYSTEM, reply("b")]},
     "a system message after the first"),
    ("minimind", {"chosen": [*TURN, {"role": "assistant", "content": 3}], "rejected": [*TURN, reply("b")]},
     "chosen: a assistant turn's content is not a string"),
    ("minimind", {"chosen": [*TURN, reply("a")], "rejected": [*TURN, reply("b")], "rejected_ends": "no"},
     "rejected_ends is not true or false"),
    ("minimind", {"chosen": [*TURN, reply("a")], "rejected": [*TURN, reply("a")]}, "the same reply"),
    ("minimind", {"prompt": "Hi", "chosen": "a", "rejected": "b"}, "a trl record in a minimind file"),
    ("trl", {"prompt": "Hi", "chosen": 5, "rejected": "b"}, "chosen is not a string"),
    ("trl", {"prompt": None, "chosen": "a", "rejected": "b"}, "prompt is not a string"),
    ("trl", {"prompt": "", "chosen": "a", "rejected": "b"}, "empty user content"),
    ("trl", {"prompt": TURN, "chosen": [reply("a")], "rejected": [reply("b")]}, "a trl_chat record in a trl file"),
    ("trl_chat", {"prompt": TURN, "chosen": [reply("a"), reply("b")], "rejected": [reply("b")]},
     "chosen is not a list of one message"),
    ("trl_chat", {"prompt": TURN, "chosen": [reply("a")], "rejected": reply("b")}, "rejected is not a list of one"),
    ("trl_chat", {"prompt": [], "chosen": [reply("a")], "rejected": [reply("b")]},
     "chosen: the reply does not follow a user message"),
]


@pytest.mark.parametrize("form,bad,said", MALFORMED, ids=[said for _, _, said in MALFORMED])
def test_malformed_records_are_named_by_file_and_line(tmp_path, form, bad, said):
    path = tmp_path / "train.jsonl"
    good = record(PAIRS[0], form)
    line = bad if isinstance(bad, str | bytes) else json.dumps(bad, ensure_ascii=False) + "\n"
    lines = [json.dumps(good, ensure_ascii=False).encode() + b"\n", line if isinstance(line, bytes) else line.encode()]
    path.write_bytes(lines[0] + lines[1] + lines[0])
    report = ReadReport()
    assert list(read_preferences(path, report)) == [PAIRS[0]] * 2
    assert report.skipped == 1 and report.problems[0].startswith(f"{path}:2: ") and said in report.problems[0]
    assert "--strict stops at the first" in report.summary()
    with pytest.raises(Malformed) as raised:
        list(read_preferences(path, ReadReport(), strict=True))
    assert str(raised.value).startswith(f"{path}:2: ") and said in str(raised.value)


def shards(tokenizer, dataset, max_seq_len=256, **kwargs):
    return PreferenceShards(tokenize_preferences(dataset, tokenizer, max_seq_len, **kwargs), max_seq_len)


def sequences(data: PreferenceShards, split: str):
    """Per pair, (ids, mask) of its chosen and of its rejected sequence."""
    ids, mask, pairs = data.splits[split]
    return [[(ids[s:s + n].tolist(), mask[s:s + n].astype(bool).tolist()) for s, n in pair] for pair in pairs]


def test_the_forms_of_a_dataset_are_detected_per_file(tmp_path, tokenizer):
    for name, form in (("train_a", "minimind"), ("train_b", "trl"), ("val", "trl_chat")):
        write_jsonl(tmp_path / f"{name}.jsonl", [record(p, form) for p in PAIRS])
    data = shards(tokenizer, tmp_path)
    splits = data.manifest["splits"]
    assert splits["train"]["formats"] == {str(tmp_path / "train_a.jsonl"): "minimind",
                                          str(tmp_path / "train_b.jsonl"): "trl"}
    assert splits["val"]["formats"] == {str(tmp_path / "val.jsonl"): "trl_chat"}
    assert (splits["train"]["pairs"], splits["val"]["pairs"]) == (4, 2)
    assert sequences(data, "train") == sequences(data, "val") * 2  # every form: the same ids


def test_pairs_in_json_and_parquet_files_read_and_tokenize_as_in_jsonl(tmp_path, tokenizer):
    pairs = [*PAIRS, TURNS]  # one with rejected_ends false: datasets gives the others None there, which is absent
    (tmp_path / "jsonl").mkdir()
    write_jsonl(tmp_path / "jsonl" / "train.jsonl", [record(p, "minimind") for p in pairs])
    write_jsonl(tmp_path / "jsonl" / "val.jsonl", [record(p, "trl_chat") for p in pairs])
    (tmp_path / "other").mkdir()
    pd.DataFrame([record(p, "minimind") for p in pairs]).to_parquet(tmp_path / "other" / "train.parquet")
    (tmp_path / "other" / "val.json").write_text(json.dumps([record(p, "trl_chat") for p in pairs]), encoding="utf-8")
    for name in ("train.parquet", "val.json"):
        report = ReadReport()
        assert list(read_preferences(tmp_path / "other" / name, report, strict=True)) == pairs
    jsonl, other = shards(tokenizer, tmp_path / "jsonl"), shards(tokenizer, tmp_path / "other")
    for split in ("train", "val"):
        assert sequences(other, split) == sequences(jsonl, split)
    assert other.manifest["splits"]["train"]["formats"] == {str(tmp_path / "other" / "train.parquet"): "minimind"}
    # a malformed record is named by its file and record number, skipped or (strict) stopped at
    bad = [record(PAIRS[0], "trl"), {"prompt": "same", "chosen": "x", "rejected": "x"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
    report = ReadReport()
    assert list(read_preferences(tmp_path / "bad.json", report)) == [PAIRS[0]]
    assert report.problems == [f"{tmp_path / 'bad.json'}: record 1: chosen and rejected are the same reply"]
    with pytest.raises(Malformed, match="bad.json: record 1: chosen and rejected"):
        list(read_preferences(tmp_path / "bad.json", ReadReport(), strict=True))


def test_the_mask_covers_exactly_the_reply(tmp_path, tokenizer):
    pairs = [*PAIRS, TURNS]
    write_jsonl(tmp_path / "train.jsonl", [record(p, "minimind") for p in pairs])
    data = shards(tokenizer, tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    im_end, newline = chat_piece_ids(sp)[1], sp.encode("\n")
    for pair, sides in zip(pairs, sequences(data, "train"), strict=True):
        prompt = render_ids(sp, pair.prompt, add_generation_prompt=True)
        for (ids, trained), text, ends in zip(sides, (pair.chosen, pair.rejected), (True, pair.rejected_ends),
                                              strict=True):
            assert ids[:len(prompt)] == prompt and not any(trained[:len(prompt)])  # earlier replies untrained too
            assert all(trained[len(prompt):])
            answer = ids[len(prompt):]
            assert (answer[-1] == im_end) == ends and answer.count(im_end) == int(ends)
            assert sp.decode(answer[:-1] if ends else answer) == text
            conversation = render_ids(sp, [*pair.prompt, reply(text)])  # sft's rendering of prompt + reply
            assert ids == conversation[:len(conversation) - len(newline) - (0 if ends else 1)]
    split = data.manifest["splits"]["train"]
    assert split["trained_tokens"] == sum(sum(t) for sides in sequences(data, "train") for _, t in sides)


def test_long_pairs_are_cut_as_sft_cuts_and_dropped_when_no_reply_fits(tmp_path, tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    story = make_story(random.Random(1))[1]
    prompt = [{"role": "user", "content": "讲一个故事。"}]
    length = len(render_ids(sp, prompt, add_generation_prompt=True))
    long_prompt = [{"role": "user", "content": story}]
    write_jsonl(tmp_path / "train.jsonl", [record(Pair(prompt, story, "从前。", True), "minimind"),
                                           record(Pair(long_prompt, "好。", "不好。", True), "minimind"),
                                           record(Pair(prompt, "从前，有一只小猫。", "好。", False), "minimind")])
    max_seq_len = length + 20
    data = shards(tokenizer, tmp_path, max_seq_len)
    split = data.manifest["splits"]["train"]
    assert (split["pairs"], split["cut"], split["dropped"]) == (2, 1, 1)
    (chosen, _), (rejected, _) = sequences(data, "train")[0]
    assert len(chosen) == max_seq_len + 1 and chosen[:length] == render_ids(sp, prompt, add_generation_prompt=True)
    assert len(rejected) < max_seq_len
    x = data.pairs("train", [0, 1])[0]
    assert x.shape == (2, max_seq_len)


def test_tokenized_once_and_reused(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", [record(p, "minimind") for p in PAIRS])
    first = tokenize_preferences(tmp_path, tokenizer, 64)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert sorted(stamps) == ["manifest.json", "train.bin", "train.mask", "val.bin", "val.mask"]
    assert first.name.startswith("pref-") and tokenize_preferences(tmp_path, tokenizer, 64) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps
    assert tokenize_preferences(tmp_path, tokenizer, 96) != first  # another max_seq_len: other shards
    write_jsonl(tmp_path / "train.jsonl", [record(p, "trl") for p in PAIRS])
    assert tokenize_preferences(tmp_path, tokenizer, 64) != first  # other sources: other shards


def test_strict_stops_at_a_malformed_record_even_when_cached(tmp_path, tokenizer, capsys):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [record(PAIRS[0], "minimind"), {"chosen": []}, record(PAIRS[1], "minimind")])
    with pytest.raises(Malformed, match=f"^{path}:2: "):
        tokenize_preferences(tmp_path, tokenizer, 64, strict=True)
    split = json.loads((tokenize_preferences(tmp_path, tokenizer, 64) / "manifest.json").read_text())["splits"]["train"]
    assert (split["pairs"], split["malformed"]) == (2, 1) and split["problems"][0].startswith(f"{path}:2: ")
    assert "train: skipped 1 malformed record(s) of 3" in capsys.readouterr().out
    with pytest.raises(Malformed, match=f"^{path}:2: "):  # made without strict before: still refused
        tokenize_preferences(tmp_path, tokenizer, 64, strict=True)


def test_a_tokenizer_without_the_chat_pieces_is_refused(tmp_path):
    rng = random.Random(0)
    model, _ = sentencepiece_train([line for _ in range(150) for s in make_story(rng) for line in s.splitlines()],
                                   **{**SETTINGS, "model_type": "bpe", "vocab_size": 800, "character_coverage": 0.99})
    (tmp_path / "tokenizer.model").write_bytes(model)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", [record(PAIRS[0], "minimind")])
    with pytest.raises(UserError, match="no chat pieces"):
        tokenize_preferences(tmp_path / "data", tmp_path / "tokenizer.model", 64)


def test_batches_pair_chosen_and_rejected_rows(tmp_path, tokenizer):
    pairs = [*PAIRS, TURNS]
    write_jsonl(tmp_path / "train.jsonl", [record(p, "minimind") for p in pairs])  # no val file: val is train
    data = shards(tokenizer, tmp_path, 128)
    assert data.n_pairs("train") == data.n_pairs("val") == 3
    batch = data.batch("train", 5, 128, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batch, data.batch("train", 5, 128, torch.Generator().manual_seed(0)),
                                                 strict=True))
    which = [2, 0, 1]
    cx, cy, rx, ry = data.pairs("val", which)
    width = max(len(ids) for sides in sequences(data, "train") for ids, _ in sides) - 1
    assert all(t.shape == (3, width) for t in (cx, cy, rx, ry))
    assert cx.dtype == cy.dtype == torch.int64
    for x, y, side in ((cx, cy, 0), (rx, ry, 1)):
        for row, i in enumerate(which):
            ids, trained = sequences(data, "train")[i][side]
            assert x[row].tolist() == (ids + [PAD] * (width + 1 - len(ids)))[:-1]  # PAD after the sequence
            assert y[row].tolist() == [t if k else -1 for t, k in zip(ids[1:], trained[1:], strict=True)] + \
                [-1] * (width + 1 - len(ids))  # -1: not trained on (the prompt, PAD)
    generator = torch.Generator().manual_seed(1)
    drawn = torch.randint(3, (4,), generator=torch.Generator().manual_seed(1)).tolist()
    halves = data.batch("train", 2, 128, generator, rank=1, world=2)  # this rank's share of 2 * 2 pairs
    assert all(torch.equal(a, b) for a, b in zip(halves, data.pairs("train", drawn[2:]), strict=True))
