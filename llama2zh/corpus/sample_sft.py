"""Built-in instruction-tuning (SFT) conversations, made from the sample story generator.

`llama2zh download sample-sft` writes dest/train.jsonl and dest/val.jsonl, one conversation a
line in the native form corpus/conversations.py reads, with what an evaluation needs to score
the last reply:

    {"conversations": [{"role": "system"|"user"|"assistant", "content": ...}, ...],
     "task": ..., "lang": "zh"|"en", "character": ..., "answer": ...}

lang is the language the last assistant reply is in; character the main character's name in
that language when the reply tells a story (it names them), else ""; answer the exact last
reply for question tasks, else "". An evaluation generates the last reply from the messages
before it and scores its language, the character named and the exact answers.

Every conversation is built around one story of corpus/sample.py together with the slots it
was made from (character, place, lost toy, ...), so every reply is true by construction: a
story asked for about 莉莉 at the park is one, a translation is the parallel side of the same
story, an answer is read off the slots. The tasks (TASKS, with their weights):

    story_zh, story_en            a story about a character (at a place) -> the story
    continue_zh, continue_en      its first 2 or 3 sentences -> the rest of the story
    translate_en_zh               asked in Chinese, an English story -> its Chinese side
    translate_zh_en               asked in English, a Chinese story -> its English side
    qa_zh, qa_en                  a story and up to four questions, one a turn (QUESTIONS: who,
                                  where the character went, what was lost, how it ends) -> short
                                  fixed-form answers; the last one is what an evaluation scores
    multi_zh_en, multi_en_zh      a story asked for, then "把它翻译成英文。" / "Now translate it
                                  into Chinese." -> the other side

About one conversation in five opens with a system prompt. A place is named (asked for, asked
about) only when the story happens there: its problem is one of AT_PLACE and both texts say it.

Held out: val holds only conversations whose (character, place, task) combination falls in the
val bucket of a stable hash (zlib.crc32 of "name|place|task", place "" when none is named), train
only the others; and no val prompt (the messages before the last reply, system prompt aside) is
verbatim in train or twice in val.

Length: a conversation is kept only when its ChatML length, estimated by rates fitted to the
sample tokenizer (estimate_tokens), is at most TOKEN_BUDGET (280; sft's context is 512, and
packing is tighter when most conversations take under half of it). Translate_* and multi_*, which
hold a story twice, are made from the shorter stories.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections import Counter, namedtuple
from pathlib import Path

from llama2zh.corpus.sample import Story, make_story_with_slots, split_sentences
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_write_bytes

VAL_PERCENT = 10  # of the (character, place, task) combinations
SYSTEM_SHARE = 0.3  # of the tries; about 0.2 of the conversations, as long ones fit less often
# Estimated tokens, fitted to the sample tokenizer (whose estimate errs by up to about 30 tokens
# either way, most in Chinese): in story sentences, 0.37 a Chinese character and 1.07 an English
# word or punctuation mark; elsewhere (requests, questions, system prompts) 1.3 a non-ASCII
# character and 0.37 an ASCII one, since a tokenizer trained on the stories alone spells words
# they lack (翻译, 故事, translate) in pieces or bytes; 4 for a message's ChatML wrapping
# (<|im_start|>, <|im_end|>, the newlines), 1 for BOS.
ZH_STORY_TOKENS, EN_STORY_TOKENS, OTHER_TOKENS, MESSAGE_TOKENS = 0.37, 1.07, (1.3, 0.37), 4
TOKEN_BUDGET = 280  # well within the sft context's 512, and most conversations within 256
MAX_TRIES = 20_000  # stories drawn for one conversation before giving up
AT_PLACE = {"lost_toy", "toy_in_tree", "sharing", "helping_animal", "lost_way", "new_friend"}
EN_TOKEN = re.compile(r"[A-Za-z']+|[^\sA-Za-z']")  # an English word or punctuation mark

SYSTEMS = ("你是一个会讲故事的助手。", "你是一个友好的助手，喜欢给小朋友讲故事。",
           "你是一个乐于助人的助手，请用简单的话回答。",
           "You are a helpful assistant who tells stories to children.", "You are a friendly storyteller for kids.",
           "You are a helpful assistant. Answer in simple words.")

# Asking for a story, (language, whether a place is named). Fields: {kind} {name} {at}, and in
# English also {a_kind} {place}. The first Chinese ones are what the chat demo asks.
REQUESTS = {
    ("zh", True): ("给我讲一个{kind}{name}在{at}的故事。", "请讲一个关于{kind}{name}在{at}的故事。",
                   "我想听一个故事，主人公是{kind}{name}，故事发生在{at}。",
                   "讲一个{kind}{name}在{at}的故事吧！"),
    ("zh", False): ("给我讲一个{kind}{name}的故事。", "请讲一个关于{kind}{name}的故事。",
                    "我想听一个{kind}{name}的故事。", "讲个{kind}{name}的故事吧！"),
    ("en", True): ("Tell me a story about {a_kind} named {name} {at}.",
                   "Can you tell me a story about {a_kind} called {name} {at}?",
                   "Please tell me a story about {a_kind} named {name} who goes to {place}.",
                   "I want a story about {name} the {kind} {at}."),
    ("en", False): ("Tell me a story about {a_kind} named {name}.",
                    "Can you tell me a story about {a_kind} called {name}?",
                    "Please tell me a story about {a_kind} named {name}.", "I want a story about {name} the {kind}."),
}
CONTINUES = {
    "zh": ("请接着讲这个故事：{start}", "这个故事还没讲完，请继续讲下去：\n\n{start}",
           "故事的开头是这样的：{start}\n后来发生了什么？", "接着往下讲吧：{start}"),
    "en": ("Please continue this story: {start}", "Finish this story:\n\n{start}",
           "Here is the beginning of a story. What happens next?\n\n{start}", "Continue the story: {start}"),
}
# Translating, asked in the target language.
TRANSLATES = {
    "zh": ("把下面的故事翻译成中文：\n\n{story}", "请把这个英文故事翻译成中文。\n\n{story}",
           "帮我把这个故事翻译成中文吧：\n\n{story}"),
    "en": ("Translate this story into English:\n\n{story}",
           "Please translate this Chinese story into English.\n\n{story}",
           "Can you translate this story into English for me?\n\n{story}"),
}
# The second turn of multi_*, in the first turn's language, keyed by the target language; the
# chat demo's "把它翻译成英文。" twice as often as the others.
FOLLOW_UPS = {
    "en": ("把它翻译成英文。", "把它翻译成英文。", "请把这个故事翻译成英文。", "能用英文再讲一遍吗？"),
    "zh": ("Now translate it into Chinese.", "Please translate the story into Chinese.",
           "Can you tell it again in Chinese?"),
}
QA_FRAMES = {
    "zh": ("{story}\n\n{question}", "读一读下面的故事，然后回答问题。\n\n{story}\n\n问题：{question}",
           "请根据这个故事回答：{question}\n\n{story}"),
    "en": ("{story}\n\n{question}", "Read the story and answer the question.\n\n{story}\n\nQuestion: {question}",
           "Answer this question about the story: {question}\n\n{story}"),
}
# Questions: (weight, Chinese phrasings, English phrasings); field {name}. Answers: exact_answer().
QUESTIONS = {
    "who": (3, ("这个故事讲的是谁？", "故事的主人公是谁？", "故事里的主角叫什么名字？"),
            ("Who is this story about?", "Who is the main character of the story?", "Whose story is this?")),
    # where the character went: a story may also name the home, so "where did it happen" is ambiguous
    "where": (3, ("{name}去了哪里？", "故事里，{name}去了什么地方？", "那天{name}去了哪儿？"),
              ("Where did {name} go?", "Where did {name} go in the story?", "What place did {name} go to?")),
    "lost": (2, ("{name}丢了什么？", "故事里，{name}找不到什么东西了？", "{name}的什么东西不见了？"),
             ("What did {name} lose?", "What could {name} not find?", "What was lost in the story?")),
    "end": (2, ("故事最后怎么样了？", "这个故事是怎么结束的？", "故事的最后一句话是什么？"),
            ("How does the story end?", "What happens at the end of the story?",
             "What is the last sentence of the story?")),
}


def other_lang(lang: str) -> str:
    return "en" if lang == "zh" else "zh"


def story_text(story: Story, lang: str) -> str:
    return story.zh if lang == "zh" else story.en


def _slots(story: Story, lang: str) -> dict:
    return story.zh_slots if lang == "zh" else story.en_slots


def place_of(story: Story) -> str:
    """The English place the story happens at and both texts name, or "" (then none is asked about)."""
    en, zh = story.en_slots, story.zh_slots
    said_en = en["place"].lower() in story.en.lower() or en["at"].lower() in story.en.lower()
    return en["place"] if story.problem in AT_PLACE and said_en and zh["place"] in story.zh else ""


def in_val(name: str, place: str, task: str) -> bool:
    """Whether the (English character name, English place or "", task) combination is held out."""
    return zlib.crc32(f"{name}|{place}|{task}".encode()) % 100 < VAL_PERCENT


def _sentences(paragraph: str, lang: str) -> list[str]:
    """split_sentences, a quotation kept whole ('"Oh no! Where is it?"' is one sentence)."""
    merged = []
    for s in split_sentences(paragraph):
        if merged and (merged[-1].count('"') % 2 or merged[-1].count("“") > merged[-1].count("”")):
            merged[-1] += ("" if lang == "zh" else " ") + s
        else:
            merged.append(s)
    return merged


def sentence_units(text: str, lang: str) -> list[tuple[int, str]]:
    """A story's sentences with the index of their paragraph."""
    return [(i, s) for i, p in enumerate(text.split("\n" if lang == "zh" else "\n\n")) for s in _sentences(p, lang)]


def join_units(units: list[tuple[int, str]], lang: str) -> str:
    """Sentences back into text: join_units(sentence_units(text)) == text."""
    paragraphs, last = [], None
    for i, s in units:
        if paragraphs and i == last:
            paragraphs[-1] += ("" if lang == "zh" else " ") + s
        else:
            paragraphs.append(s)
        last = i
    return ("\n" if lang == "zh" else "\n\n").join(paragraphs)


def exact_answer(story: Story, question: str, lang: str) -> str | None:
    """The exact answer to a question about the story, or None when it does not apply."""
    s, stop = _slots(story, lang), "。" if lang == "zh" else "."
    if question == "who":
        return s["name"] + stop
    if question == "where":
        if not place_of(story):
            return None
        return f"去了{s['place']}。" if lang == "zh" else f"To {s['place']}."
    if question == "lost":
        if story.problem != "lost_toy":
            return None
        return s["obj"] + "。" if lang == "zh" else f"The {s['obj']}."
    return sentence_units(story_text(story, lang), lang)[-1][1]  # "end": the last sentence


def _request(rng: random.Random, story: Story, lang: str) -> str:
    """A request in lang for this story: its character, and its place when it has one."""
    s = _slots(story, lang)
    fields = {"kind": s["kind"], "name": s["name"], "at": s["at"], "place": s["place"],
              "a_kind": ("an " if s["kind"][0] in "aeiou" else "a ") + s["kind"]}
    return rng.choice(REQUESTS[lang, bool(place_of(story))]).format(**fields)


def _turns(*contents: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


# Builders: (rng, story, lang of the last reply, question) -> (messages, character, answer), or
# None when the story does not suit the task.
def _tell(rng, story, lang, question):
    return _turns(_request(rng, story, lang), story_text(story, lang)), _slots(story, lang)["name"], ""


def _continue(rng, story, lang, question):
    units, k = sentence_units(story_text(story, lang), lang), rng.choice((2, 3))
    if len(units) - k < 3:
        return None
    rest, name = join_units(units[k:], lang), _slots(story, lang)["name"]
    start = join_units(units[:k], lang)
    return _turns(rng.choice(CONTINUES[lang]).format(start=start), rest), name if name in rest else "", ""


def _translate(rng, story, lang, question):
    prompt = rng.choice(TRANSLATES[lang]).format(story=story_text(story, other_lang(lang)))
    return _turns(prompt, story_text(story, lang)), _slots(story, lang)["name"], ""


def _qa(rng, story, lang, question):
    """The story and up to four questions about it, one a turn, the drawn question last: each
    conversation trains several short answers on one long prompt."""
    if exact_answer(story, question, lang) is None:
        return None
    others = [q for q in QUESTIONS if q != question and exact_answer(story, q, lang) is not None]
    contents = []
    for q in rng.sample(others, rng.randint(0, len(others))) + [question]:
        _, zh, en = QUESTIONS[q]
        asked = rng.choice(zh if lang == "zh" else en).format(name=_slots(story, lang)["name"])
        if not contents:
            asked = rng.choice(QA_FRAMES[lang]).format(story=story_text(story, lang), question=asked)
        contents += [asked, exact_answer(story, q, lang)]
    return _turns(*contents), "", contents[-1]


def _multi(rng, story, lang, question):
    first = other_lang(lang)
    messages = _turns(_request(rng, story, first), story_text(story, first), rng.choice(FOLLOW_UPS[lang]),
                      story_text(story, lang))
    return messages, _slots(story, lang)["name"], ""


# task: (weight, language of the last reply, builder)
TASKS = {
    "story_zh": (15, "zh", _tell), "story_en": (10, "en", _tell),
    "continue_zh": (7, "zh", _continue), "continue_en": (5, "en", _continue),
    "translate_en_zh": (8, "zh", _translate), "translate_zh_en": (7, "en", _translate),
    "qa_zh": (24, "zh", _qa), "qa_en": (18, "en", _qa),
    "multi_zh_en": (14, "en", _multi), "multi_en_zh": (10, "zh", _multi),
}


def _story_tokens(sentence: str) -> float:
    return len(EN_TOKEN.findall(sentence)) * EN_STORY_TOKENS if sentence.isascii() else len(sentence) * ZH_STORY_TOKENS


def _other_tokens(text: str) -> float:
    ascii_chars = len(text.encode("ascii", "ignore"))
    return (len(text) - ascii_chars) * OTHER_TOKENS[0] + ascii_chars * OTHER_TOKENS[1]


def estimate_tokens(messages: list[dict], story: Story) -> float:
    """The conversation's estimated length in tokens, BOS and ChatML wrapping included: the
    story's sentences wherever they occur at the story rate, everything else at the other."""
    sentences = sorted({s for lang in ("zh", "en") for _, s in sentence_units(story_text(story, lang), lang)},
                       key=len, reverse=True)
    tokens = 1.0
    for m in messages:
        rest = m["content"]
        for s in sentences:
            if s in rest:
                tokens += rest.count(s) * _story_tokens(s)
                rest = rest.replace(s, "")
        tokens += MESSAGE_TOKENS + _other_tokens(m["role"] + "\n" + rest)
    return tokens


def prompt_key(messages: list[dict]) -> str:
    """What the model is given to produce the last reply, system prompt aside."""
    return json.dumps([m for m in messages[:-1] if m["role"] != "system"], ensure_ascii=False)


# A conversation made: its (name, place, task) combination, its record, its estimated tokens,
# for qa_* the kind of question asked (a key of QUESTIONS), else None, and the story it was made from.
Made = namedtuple("Made", "combo record tokens question story")


def _conversation(rng: random.Random, task: str, val: bool, taken: set | None) -> Made:
    """One conversation of the task from a story whose combination lies in the split; a val
    conversation's prompt must not be in taken (and is added to it)."""
    _, lang, build = TASKS[task]
    question = rng.choices(list(QUESTIONS), weights=[q[0] for q in QUESTIONS.values()])[0] if build is _qa else None
    for _ in range(MAX_TRIES):
        story = make_story_with_slots(rng)
        combo = (story.en_slots["name"], place_of(story), task)
        if in_val(*combo) != val:
            continue
        made = build(rng, story, lang, question)
        if made is None:
            continue
        messages, character, answer = made
        if rng.random() < SYSTEM_SHARE:  # kept only if the whole fits, below
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
        tokens = estimate_tokens(messages, story)
        if tokens > TOKEN_BUDGET:
            continue
        if taken is not None:
            if prompt_key(messages) in taken:
                continue
            taken.add(prompt_key(messages))
        record = {"conversations": messages, "task": task, "lang": lang, "character": character, "answer": answer}
        return Made(combo, record, tokens, question, story)
    raise UserError(f"could not make a {'val' if val else 'train'} {task} conversation in {MAX_TRIES} tries")


def make_split(n: int, seed: int, val: bool, taken: set | None = None) -> list[Made]:
    """n conversations of one split; taken: prompts val must not repeat."""
    rng = random.Random(f"sample-sft:{seed}:{'val' if val else 'train'}")
    tasks = rng.choices(list(TASKS), weights=[t[0] for t in TASKS.values()], k=n)
    return [_conversation(rng, task, val, taken) for task in tasks]


def build_sft(n_train: int, n_val: int, seed: int = 0) -> dict[str, list[Made]]:
    """{"train": [...], "val": [...]}: the conversations write_sample_sft writes."""
    train = make_split(n_train, seed, val=False)
    taken = {prompt_key(made.record["conversations"]) for made in train}
    return {"train": train, "val": make_split(n_val, seed, val=True, taken=taken)}


def write_sample_sft(dest: Path, n_train: int = 8000, n_val: int = 300, seed: int = 0) -> dict:
    """Writes dest/train.jsonl and dest/val.jsonl and returns their statistics."""
    if n_train < 1 or n_val < 0:
        raise UserError(f"need at least one train conversation and no negative val count (got {n_train}, {n_val})")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    stats = {"bytes": 0, "files": []}
    longest = None
    for split, made in build_sft(n_train, n_val, seed).items():
        records = [m.record for m in made]
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        atomic_write_bytes(dest / f"{split}.jsonl", [data])
        stats["files"].append(f"{split}.jsonl")
        stats["bytes"] += len(data)
        tasks, questions = Counter(r["task"] for r in records), Counter(m.question for m in made)
        stats[split] = {"conversations": len(records), "tasks": {t: tasks[t] for t in TASKS if tasks[t]},
                        "langs": {lang: sum(r["lang"] == lang for r in records) for lang in ("zh", "en")},
                        "qa_questions": {q: questions[q] for q in QUESTIONS if questions[q]},
                        "with_system": sum(r["conversations"][0]["role"] == "system" for r in records)}
        for m in made:
            if longest is None or m.tokens > longest["tokens_estimated"]:
                text = "".join(turn["content"] for turn in m.record["conversations"])
                longest = {"split": split, "task": m.record["task"], "tokens_estimated": round(m.tokens, 1),
                           "chars_zh": sum(not c.isascii() for c in text), "chars_en": sum(c.isascii() for c in text)}
    stats["longest"] = longest
    return stats
