"""Built-in SFT conversations (llama2zh.corpus.sample_sft): structure, truth, held-out split."""

from __future__ import annotations

import hashlib
import json
import re
import zlib

import pytest

from llama2zh.corpus.sample import BOYS, GIRLS, PETS, PLACES, TOYS, write_sample
from llama2zh.corpus.sample_sft import (
    QUESTIONS,
    TASKS,
    TOKEN_BUDGET,
    build_sft,
    make_split,
    prompt_key,
    write_sample_sft,
)
from llama2zh.errors import UserError

N_TRAIN, N_VAL, SEED = 400, 60, 3
CJK = re.compile(r"[\u4e00-\u9fff]")
EN_NAME = {zh: en for en, zh, _ in GIRLS + BOYS + PETS}
NAMES = set(EN_NAME) | set(EN_NAME.values())
# Split after . ! ? (。！？) unless more punctuation follows, or after such a mark and a closing quote
# (as tests/test_sample.py does): written independently of the module's own splitter.
SPLIT = re.compile(r'(?<=[.!?。！？])(?![.!?。！？"”])|(?<=[.!?。！？]["”])')
# The main character, from a story's first sentence: "...named Lily." / "Lily was a ..." / "...名叫莉莉。"
# at the start of a line or after a colon ("请接着讲这个故事：从前，...").
OPENING_EN = re.compile(r"(?:^|: )(?:(?:Once upon a time|There was once)[^.]*? (?:named|called) (\w+)\."
                        r"|(\w+) was an? )", re.M)
OPENING_ZH = re.compile(r"(?:^|：)(?:(?:从前|很久以前)，[^。]*?叫(\w+?)。|(\w+?)是一)", re.M)


def main_character(text: str, lang: str) -> str:
    found = (OPENING_ZH if lang == "zh" else OPENING_EN).search(text)
    assert found, text
    return found.group(1) or found.group(2)


def shape(text: str) -> tuple[int, list[int]]:
    """Paragraphs and sentences per paragraph: the same for a story's two sides."""
    paragraphs = [p for p in re.split(r"\n+", text) if p.strip()]
    return len(paragraphs), [len([s for s in SPLIT.split(p) if s.strip()]) for p in paragraphs]


def assert_parallel(source: str, source_lang: str, target: str, target_lang: str):
    assert shape(source) == shape(target), (source, target)
    names = {lang: main_character(text, lang) for text, lang in ((source, source_lang), (target, target_lang))}
    assert EN_NAME[names["zh"]] == names["en"]


def in_language(text: str, lang: str) -> bool:
    return bool(CJK.search(text)) and not re.search(r"[A-Za-z]", text) if lang == "zh" else text.isascii()


def prompt(record) -> str:
    return json.dumps([m for m in record["conversations"][:-1] if m["role"] != "system"], ensure_ascii=False)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    dest = tmp_path_factory.mktemp("sft")
    stats = write_sample_sft(dest, n_train=N_TRAIN, n_val=N_VAL, seed=SEED)
    records = {split: [json.loads(line) for line in (dest / f"{split}.jsonl").read_text("utf-8").splitlines()]
               for split in ("train", "val")}
    return dest, stats, records


@pytest.fixture(scope="module")
def built():
    return build_sft(N_TRAIN, N_VAL, SEED)


def all_records(written):
    return [r for split in ("train", "val") for r in written[2][split]]


def test_files_stats_and_build_agree(written, built):
    dest, stats, records = written
    assert sorted(p.name for p in dest.iterdir()) == ["train.jsonl", "val.jsonl"]  # no temp files left
    assert stats["bytes"] == sum(p.stat().st_size for p in dest.iterdir())
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        assert len(records[split]) == n == stats[split]["conversations"]
        assert sum(stats[split]["tasks"].values()) == sum(stats[split]["langs"].values()) == n
        assert [m.record for m in built[split]] == records[split]
    assert stats["longest"]["tokens_estimated"] <= TOKEN_BUDGET


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def files(name, seed):
        write_sample_sft(tmp_path / name, n_train=60, n_val=10, seed=seed)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}

    first = files("a", 5)
    assert files("b", 5) == first
    other = files("c", 6)
    assert all(other[name] != first[name] for name in first)


def test_records_are_well_formed_conversations(written):
    for r in all_records(written):
        assert set(r) == {"conversations", "task", "lang", "character", "answer"}
        turns = r["conversations"]
        roles = [m["role"] for m in turns]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2), roles
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in turns)
        assert r["task"] in TASKS and r["lang"] == TASKS[r["task"]][1]
        assert in_language(turns[-1]["content"], r["lang"]), r
        assert (r["answer"] == turns[-1]["content"]) if r["task"].startswith("qa_") else r["answer"] == ""
        assert not any(re.search(r"[{}]", m["content"]) for m in turns)  # no unfilled template field


def test_tasks_languages_and_system_prompts_are_represented(written):
    _, stats, records = written
    assert {r["task"] for r in records["train"]} == set(TASKS)
    assert len({r["task"] for r in records["val"]}) >= 6
    for split in ("train", "val"):
        assert {r["lang"] for r in records[split]} == {"zh", "en"}
    with_system = sum(r["conversations"][0]["role"] == "system" for r in all_records(written))
    assert 0.08 < with_system / (N_TRAIN + N_VAL) < 0.35


def test_story_replies_are_about_the_character_asked_for(written):
    for r in all_records(written):
        task, lang, turns = r["task"], r["lang"], [m for m in r["conversations"] if m["role"] != "system"]
        if task.startswith("story_"):
            request, story = turns[0]["content"], turns[1]["content"]
            assert in_language(request, lang) and r["character"] in request
            assert main_character(story, lang) == r["character"]
            for place_en, at_en, place_zh, at_zh, *_ in PLACES:  # a place asked for is where the story goes
                if f"在{at_zh}" in request or f" {at_en}" in request or f"goes to {place_en}" in request:
                    assert (place_zh in story) if lang == "zh" else (place_en in story or at_en in story.lower())
        elif task.startswith("continue_"):
            start, rest = turns[0]["content"], turns[1]["content"]
            assert main_character(start, lang) == r["character"] and r["character"] in rest
            assert rest not in start and in_language(start, lang)
        elif task.startswith(("translate_", "multi_")):
            source_lang = task[-5:-3]  # translate_en_zh, multi_zh_en: the language translated from
            source = turns[0]["content"].split("\n\n", 1)[1] if task.startswith("translate_") else turns[1]["content"]
            assert source_lang != lang and in_language(source, source_lang)
            assert_parallel(source, source_lang, turns[-1]["content"], lang)
            assert main_character(turns[-1]["content"], lang) == r["character"]
            if task.startswith("multi_"):  # asked for a story, then for it in the other language
                assert main_character(source, source_lang) in turns[0]["content"]
                assert in_language(turns[0]["content"], source_lang) and in_language(turns[2]["content"], source_lang)
        else:
            assert r["character"] == ""


def test_question_answers_are_true_of_the_story_in_the_prompt(written):
    kinds = set()
    toys = {lang: {toy[i] for toy in TOYS} for lang, i in (("en", 0), ("zh", 1))}
    for r in all_records(written):
        if not r["task"].startswith("qa_"):
            continue
        turns = [m for m in r["conversations"] if m["role"] != "system"]
        story, lang = turns[0]["content"], r["lang"]  # the first question comes with the story
        assert r["answer"] == turns[-1]["content"] and 2 <= len(turns) <= 2 * len(QUESTIONS)
        asked = set()
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            assert re.search(r'[.!?。！？]["”]?$', answer["content"]) and in_language(question["content"], lang)
            kinds.add(kind := answer_kind(answer["content"], story, lang, toys))
            asked.add(kind)
        assert len(asked) == len(turns) // 2  # each kind of question once
    assert kinds == {"who", "where", "lost", "end"}


def answer_kind(answer: str, story: str, lang: str, toys: dict) -> str:
    """The kind of question answer answers, checked true of the story."""
    bare = answer[:-1]  # without its full stop
    if bare in NAMES:
        assert main_character(story, lang) == bare
        return "who"
    if re.fullmatch(r"去了\w+|To the [a-z ]+", bare):
        noun = bare[2:].removesuffix("上") if lang == "zh" else bare.split()[-1]
        went = rf"去(?:了)?{noun}" if lang == "zh" else rf"\b(?:to|at|on|in|by|visit) the (?:big )?{noun}\b"
        assert re.search(went, story), story
        return "where"
    if bare in toys[lang] or bare.removeprefix("The ") in toys[lang]:
        toy = bare if lang == "zh" else bare.removeprefix("The ")
        gone = rf"{toy}不见了|找不到\w的{toy}" if lang == "zh" else rf"the {toy} was gone|could not find \w+ {toy}"
        assert re.search(gone, story), story
        return "lost"
    assert re.search(re.escape(answer) + r"(\n\n[^\n]*)?$", story), story  # its last sentence (then the question)
    return "end"


def test_val_combinations_and_prompts_never_occur_in_train(written, built):
    combos = {split: {m.combo for m in built[split]} for split in ("train", "val")}
    assert combos["val"] and not combos["val"] & combos["train"]
    for split in ("train", "val"):
        for name, place, task in combos[split]:
            held_out = zlib.crc32(f"{name}|{place}|{task}".encode()) % 100 < 10
            assert held_out == (split == "val")
    for m in built["train"] + built["val"]:  # the combination is what the conversation is about
        name, place, task = m.combo
        text = json.dumps(m.record["conversations"], ensure_ascii=False)
        assert task == m.record["task"] and name in EN_NAME.values()
        assert name in text or any(zh in text for zh, en in EN_NAME.items() if en == name)
        if place:
            at, place_zh = next(p[1:3] for p in PLACES if p[0] == place)
            assert place in text or at in text.lower() or place_zh in text
    train_prompts = {prompt(r) for r in written[2]["train"]}
    val_prompts = [prompt(r) for r in written[2]["val"]]
    assert not train_prompts & set(val_prompts) and len(set(val_prompts)) == len(val_prompts)


def test_val_skips_prompts_already_taken():
    first = make_split(30, seed=1, val=True)
    taken = {prompt_key(m.record["conversations"]) for m in first}
    again = make_split(30, seed=1, val=True, taken=set(taken))
    assert not taken & {prompt_key(m.record["conversations"]) for m in again}


@pytest.mark.parametrize("n_train, n_val", [(0, 10), (10, -1)])
def test_rejects_bad_sizes(tmp_path, n_train, n_val):
    with pytest.raises(UserError):
        write_sample_sft(tmp_path, n_train=n_train, n_val=n_val)


def test_write_sample_is_unchanged(tmp_path):
    """The story generator was refactored to expose its slots: the sample corpus keeps its bytes."""
    write_sample(tmp_path, n_stories=1000, seed=0)
    digest = hashlib.sha256((tmp_path / "data00.json").read_bytes()).hexdigest()
    assert digest == "d304331b80c65f51950da0f513ef0b15de24b690ce8528c0b4eb4776e37420e2"
