"""Built-in preference pairs (DPO), made from the sample-sft conversations.

`llama2zh download sample-dpo` writes dest/train.jsonl and dest/val.jsonl, one pair a line in
minimind's form, which corpus/preferences.py reads:

    {"chosen": [messages], "rejected": [messages], "kind": ..., "rejected_ends": true|false,
     "task": ..., "lang": "zh"|"en", "character": ..., "answer": ...}

task, lang, character and answer are the sample-sft conversation's (what `llama2zh eval` checks
a reply to the prompt against: lang the language asked for, character the name a story reply
must say, answer the exact reply to a question, "" when none).

The prompts are sample-sft's: the conversations of build_sft with the same counts and seed, so
val's prompts are never in train, and val holds only (character, place, task) combinations
train never has. chosen is the conversation with its true last reply; rejected the same
messages with another last reply, of one kind (KINDS):

    loop             the reply's first sentences, then the last of them again and again, at
                     least LOOP_REPEATS times in all and until the conversation reaches
                     sample-sft's TOKEN_BUDGET estimated tokens: a loop, which never ends
    cutoff           the reply cut mid-sentence (after a word or a Chinese character, between a
                     quarter and three quarters of its length when it can be), where it ends: a
                     reply that stops before its story or answer is told
    wrong_language   the reply in the other language: the other side of the same story (so a
                     translation echoes its source, and multi_* repeats the first reply), or of
                     the answer to the same question
    wrong_character  the same task told about another character: a story of another one, who is
                     named and the asked one is not; only for replies that name their character
                     (stories, translations, continuations that name them)

"rejected_ends" is false for loop: a loop has no end, and is tokenized without <|im_end|>. (A
cut-off reply without an end would teach nothing: its tokens are the chosen reply's first ones,
whose log-probabilities cancel in DPO's difference; ending it where it is cut contrasts
<|im_end|> with the true next token.) Each pair's kind is the one of those that suit it used least so far in its
split (ties in the order of KINDS), so the kinds come in about equal numbers. The same counts
and seed give the same bytes.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

from llama2zh.corpus.sample import Story, make_story_with_slots
from llama2zh.corpus.sample_sft import (
    MAX_TRIES,
    TASKS,
    TOKEN_BUDGET,
    Made,
    build_sft,
    estimate_tokens,
    exact_answer,
    join_units,
    other_lang,
    sentence_units,
    story_text,
)
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_write_bytes

KINDS = ("loop", "cutoff", "wrong_language", "wrong_character")
ENDS = {"loop": False, "cutoff": True, "wrong_language": True, "wrong_character": True}
LOOP_REPEATS = 4  # the looping sentence's occurrences, at least
CHECKS = ("task", "lang", "character", "answer")  # the sample-sft record's keys a pair carries


def _reply(made: Made) -> str:
    return made.record["conversations"][-1]["content"]


def _with_reply(made: Made, reply: str) -> list[dict]:
    return [*made.record["conversations"][:-1], {"role": "assistant", "content": reply}]


def _loop(rng: random.Random, made: Made) -> str:
    lang = made.record["lang"]
    units = sentence_units(_reply(made), lang)
    k = rng.randint(1, (len(units) + 1) // 2)
    start = units[:k]
    tokens = estimate_tokens(_with_reply(made, join_units(start, lang)), made.story)
    per_repeat = estimate_tokens(_with_reply(made, join_units([*start, units[k - 1]], lang)), made.story) - tokens
    repeats = max(LOOP_REPEATS - 1, math.ceil((TOKEN_BUDGET - tokens) / per_repeat))
    return join_units(start + [units[k - 1]] * repeats, lang)


def _cutoff(rng: random.Random, made: Made) -> str:
    """The reply cut right after a letter or a Chinese character (mid-word only when a word
    boundary will not do), so that no sentence-final mark ends it."""
    reply, lang = _reply(made), made.record["lang"]
    after = [i for i in range(1, len(reply)) if reply[i - 1].isalnum()]
    at_word = [i for i in after if lang == "zh" or not reply[i].isalnum()]
    middle = [i for i in at_word if len(reply) / 4 <= i <= 3 * len(reply) / 4]
    return reply[:rng.choice(middle or at_word or after)]


def _told(made: Made) -> int:
    """How many of the story's sentences the prompt told (continue_*), 0 when the reply is the story."""
    lang = made.record["lang"]
    return len(sentence_units(story_text(made.story, lang), lang)) - len(sentence_units(_reply(made), lang))


def _rest(story: Story, lang: str, told: int) -> str:
    """The story in lang after its first told sentences (all of it when told is 0)."""
    return join_units(sentence_units(story_text(story, lang), lang)[told:], lang)


def _wrong_language(rng: random.Random, made: Made) -> str:
    other = other_lang(made.record["lang"])
    if made.question:
        return exact_answer(made.story, made.question, other)
    return _rest(made.story, other, _told(made))


def _wrong_character(rng: random.Random, made: Made) -> str | None:
    """The reply the task would give about another story's character, or None when the reply
    names no character."""
    asked, lang, told = made.record["character"], made.record["lang"], _told(made)
    if not asked:
        return None
    for _ in range(MAX_TRIES):
        story = make_story_with_slots(rng)
        name, reply = (story.zh_slots if lang == "zh" else story.en_slots)["name"], _rest(story, lang, told)
        if name != asked and name in reply and asked not in reply and name not in asked:
            return reply
    raise UserError(f"could not find a story about another character than {asked} in {MAX_TRIES} tries")


REJECT = {"loop": _loop, "cutoff": _cutoff, "wrong_language": _wrong_language, "wrong_character": _wrong_character}


def make_pairs(made: list[Made], split: str, seed: int) -> list[dict]:
    """A pair record for each conversation of a split."""
    rng, used, records = random.Random(f"sample-dpo:{seed}:{split}"), Counter(), []
    for m in made:
        suits = [k for k in KINDS if k != "wrong_character" or m.record["character"]]
        kind = min(suits, key=lambda k: used[k])
        used[kind] += 1
        rejected = REJECT[kind](rng, m)
        records.append({"chosen": m.record["conversations"], "rejected": _with_reply(m, rejected), "kind": kind,
                        "rejected_ends": ENDS[kind], **{key: m.record[key] for key in CHECKS}})
    return records


def write_sample_dpo(dest: Path, n_train: int = 8000, n_val: int = 300, seed: int = 0) -> dict:
    """Writes dest/train.jsonl and dest/val.jsonl and returns their statistics."""
    if n_train < 1 or n_val < 0:
        raise UserError(f"need at least one train pair and no negative val count (got {n_train}, {n_val})")
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{dest}: cannot make the directory ({e.strerror or e})") from None
    stats = {"bytes": 0, "files": []}
    for split, made in build_sft(n_train, n_val, seed).items():
        records = make_pairs(made, split, seed)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        try:
            atomic_write_bytes(dest / f"{split}.jsonl", [data])
        except OSError as e:
            raise UserError(f"{dest / f'{split}.jsonl'}: cannot write ({e.strerror or e})") from None
        stats["files"].append(f"{split}.jsonl")
        stats["bytes"] += len(data)
        kinds, tasks = Counter(r["kind"] for r in records), Counter(r["task"] for r in records)
        stats[split] = {"pairs": len(records), "kinds": {k: kinds[k] for k in KINDS if kinds[k]},
                        "tasks": {t: tasks[t] for t in TASKS if tasks[t]}}
    return stats
