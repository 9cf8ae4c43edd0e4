"""`llama2zh eval out/RUN` on a chat-tuned run: the sft model beside its base run.

- loss: mean negative log-likelihood (nats) of the assistant tokens (content and <|im_end|>)
  of the val conversations, teacher-forced, the packed rows as sft trains on them.
- generation checks, on every val conversation that says what its last reply should be
  ("lang", and "character" or "answer", as `download sample-sft` writes them): the prompt is
  every message before the last assistant message; the reply is generated greedily, up to the
  reference reply's length + 32 tokens. language: the share of replies in the language asked
  for (Chinese: CJK ideographs are over 30% of the non-space characters); character: the share
  of story replies that name the character asked for; exact: the share of question replies
  equal to the answer (surrounding whitespace ignored). Prompts that leave no room for a reply
  in the context are counted apart (prompts_too_long).
The base run (run_info's base_run) gets the same ids: when its tokenizer lacks the chat pieces,
its model is given them as the sft run was at its start (the mean embedding row).
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

from llama2zh.chat import chat_piece_ids, render_ids
from llama2zh.checkpoint import load_checkpoint
from llama2zh.config import Config
from llama2zh.corpus.conversations import Malformed, to_messages
from llama2zh.evaluate import is_chinese
from llama2zh.sft import ConversationShards, split_files, tokenize_conversations

EXTRA_REPLY_TOKENS = 32
FIGURES = ("assistant_loss", "language", "character", "exact")


def is_sft_run(state: dict) -> bool:
    return state.get("run_info", {}).get("stage") == "sft"


@torch.no_grad()
def assistant_loss(model, data: ConversationShards) -> tuple[float, int]:
    """(nats per assistant token, assistant tokens) over the val split's packed rows."""
    nats, count = 0.0, 0
    for start in range(0, data.n_rows("val"), 16):
        x, y, segments = data.rows("val", list(range(start, min(start + 16, data.n_rows("val")))))
        logits = model(x, segments=segments)
        nats += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                                reduction="sum").item()
        count += int((y >= 0).sum())
    return nats / max(count, 1), count


def val_prompts(dataset: Path) -> list[dict]:
    """The val conversations that carry checks: {"prompt" (messages), "reference", "lang", "character", "answer"}."""
    prompts = []
    for path in split_files(dataset)["val"]:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                messages = to_messages(record, "native")
            except (json.JSONDecodeError, Malformed):
                continue
            if record.get("lang") not in ("zh", "en") or messages[-1]["role"] != "assistant":
                continue
            prompts.append({"prompt": messages[:-1], "reference": messages[-1]["content"], "lang": record["lang"],
                            "character": record.get("character") or "", "answer": record.get("answer") or "",
                            "task": record.get("task", "")})
    return prompts


def in_language(text: str, lang: str) -> bool:
    if lang == "zh":
        return is_chinese(text)
    return not is_chinese(text) and any("a" <= ch.lower() <= "z" for ch in text)


@torch.no_grad()
def generation_checks(model, sp, prompts: list[dict]) -> dict:
    im_end = chat_piece_ids(sp)[1]
    stops = (im_end, sp.eos_id(), sp.bos_id())
    tally = {name: [0, 0] for name in ("language", "character", "exact")}  # [passed, asked]
    too_long = 0
    for p in prompts:
        ids = render_ids(sp, p["prompt"])
        room = model.args.max_seq_len - len(ids) + 1
        if room < 1:
            too_long += 1
            continue
        limit = min(room, len(sp.encode(p["reference"])) + EXTRA_REPLY_TOKENS)
        reply = sp.decode(model.generate(ids, limit, temperature=0.0, stop_ids=stops))
        checks = {"language": in_language(reply, p["lang"])}
        if p["character"]:
            checks["character"] = p["character"] in reply
        if p["answer"]:
            checks["exact"] = reply.strip() == p["answer"].strip()
        for name, passed in checks.items():
            tally[name][0] += passed
            tally[name][1] += 1
    return {name: (passed / asked if asked else None) for name, (passed, asked) in tally.items()} | \
        {f"{name}_asked": asked for name, (_, asked) in tally.items()} | {"prompts_too_long": too_long}


def evaluate_chat(run_dir: Path, state: dict, model) -> dict:
    config = Config(**state["config"])
    tokenizer_model = run_dir / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    data = ConversationShards(tokenize_conversations(Path(config.dataset), tokenizer_model, config.max_seq_len),
                              config.max_seq_len)
    prompts = val_prompts(Path(config.dataset))
    report = {"step": state["step"], "stage": "sft", "dataset": config.dataset, "val_prompts": len(prompts)}
    subjects = {"sft": model}
    base_run = Path(state["run_info"]["base_run"])
    if (base_run / "ckpt.pt").exists():
        base, _ = load_checkpoint(base_run / "ckpt.pt")
        # the chat tokenizer is the base's plus the pieces sft appended: the base gets their rows
        subjects["base"] = base.extended(sp.vocab_size() - base.args.vocab_size, config.max_seq_len)
        report["base_run"] = str(base_run)
    for name, subject in subjects.items():
        subject.eval()
        loss, tokens = assistant_loss(subject, data)
        report[name] = {"assistant_loss": loss, "assistant_tokens": tokens, **generation_checks(subject, sp, prompts)}
    return report


def format_chat_report(report: dict) -> str:
    names = [n for n in ("sft", "base") if n in report]
    lines = [f"step {report['step']}; {report['val_prompts']} val prompts of {report['dataset']}"
             + (f"; base run {report['base_run']}" if "base_run" in report else ""),
             "| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    labels = {"assistant_loss": "loss on assistant tokens (nats)", "language": "replies in the language asked",
              "character": "story replies naming the character", "exact": "exact answers"}
    for key in FIGURES:
        asked = f" ({report['sft'][f'{key}_asked']})" if key != "assistant_loss" else ""
        cells = ["–" if report[n][key] is None else f"{report[n][key]:.3f}" if key == "assistant_loss"
                 else f"{report[n][key]:.1%}" for n in names]
        lines.append(f"| {labels[key]}{asked} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
