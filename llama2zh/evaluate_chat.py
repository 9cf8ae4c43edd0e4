"""`llama2zh eval out/RUN` on a chat-tuned run (stage "sft" or "dpo"): the run beside its base run.

- loss, sft runs: mean negative log-likelihood (nats) of the assistant tokens (content and
  <|im_end|>) of the val conversations, teacher-forced, the packed rows as sft trains on them.
  dpo runs: the same of the chosen replies of the val pairs (chosen_loss), as dpo tokenizes them.
- generation checks, on every val conversation, or val pair, that says what its last reply should
  be ("lang", and "character" or "answer", as `download sample-sft` and `download sample-dpo`
  write them): the prompt is every message before the last assistant message (a pair's shared
  prompt); the reply is generated greedily, up to the reference reply's (a pair's chosen reply's)
  length + 32 tokens. language: the share of replies in the language asked for (Chinese: CJK
  ideographs are over 30% of the non-space characters); character: the share of story replies
  that name the character asked for; exact: the share of question replies equal to the answer
  (surrounding whitespace ignored); repetition: the share of replies that repeat a span (repeats);
  ends: the share of replies that stop at <|im_end|> before the token limit (a stop at EOS or BOS,
  a pretrained model's end of document, leaves the chat turn open and is no end). Prompts that
  leave no room for a reply in the context are counted apart (prompts_too_long).
- reward accuracy and margin, dpo runs: over every val pair, dpo.dpo_loss's rewards with the run
  as the policy, its base run as the reference (as dpo trained it) and the run's dpo_beta.
The base run (run_info's base_run) gets the same ids: when its tokenizer lacks the chat pieces,
its model is given them as the sft run was at its start (the mean embedding row).
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

from llama2zh.chat import chat_piece_ids, render_ids
from llama2zh.checkpoint import load_checkpoint
from llama2zh.config import Config
from llama2zh.corpus.conversations import Malformed, to_messages
from llama2zh.corpus.preferences import PreferenceShards, detect_form, to_pair, tokenize_preferences
from llama2zh.dpo import dpo_loss, pair_logps
from llama2zh.evaluate import is_chinese
from llama2zh.sft import ConversationShards, split_files, tokenize_conversations

EXTRA_REPLY_TOKENS = 32
# No true reply of sample-sft's or sample-dpo's val split repeats a span this wide (the widest
# repeat: 22 columns), every loop reject of sample-dpo's val split does (the narrowest: 24).
REPEAT_COLUMNS = 24
CHECKS = ("language", "character", "exact", "repetition", "ends")
LABELS = {"assistant_loss": "loss on assistant tokens (nats)", "chosen_loss": "loss on chosen replies (nats)",
          "language": "replies in the language asked", "character": "story replies naming the character",
          "exact": "exact answers", "repetition": f"replies repeating a span ({REPEAT_COLUMNS}+ columns)",
          "ends": "replies ending with <|im_end|>", "reward_accuracy": "reward accuracy",
          "reward_margin": "reward margin"}


def is_chat_run(state: dict) -> bool:
    return state.get("run_info", {}).get("stage") in ("sft", "dpo")


def repeats(text: str, columns: int = REPEAT_COLUMNS) -> bool:
    """Whether text repeats a span: some span at least columns wide (whitespace removed, a wide
    character such as a Chinese one two columns, any other one) occurs twice without overlapping."""
    s = "".join(text.split())
    widths = [2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s]
    first, end, width = {}, 0, 0  # span -> where it first starts; s[i:end], the narrowest wide enough
    for i in range(len(s)):
        while end < len(s) and width < columns:
            width, end = width + widths[end], end + 1
        if width < columns:
            return False
        span = s[i:end]
        if i - first.setdefault(span, i) >= len(span):
            return True
        width -= widths[i]
    return False


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


@torch.no_grad()
def val_pair_logps(model, data: PreferenceShards) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The val pairs' chosen and rejected replies' log-probabilities, and the chosen replies' tokens."""
    chosen, rejected, tokens, n = [], [], 0, data.n_pairs("val")
    for start in range(0, n, 16):
        batch = data.pairs("val", list(range(start, min(start + 16, n))))
        logps = pair_logps(model, *batch)
        chosen.append(logps[0])
        rejected.append(logps[1])
        tokens += int((batch[1] >= 0).sum())
    return torch.cat(chosen), torch.cat(rejected), tokens


def val_prompts(dataset: Path, pairs: bool = False) -> list[dict]:
    """The val conversations (pairs: preference pairs, the chosen reply the reference) that carry
    checks: {"prompt" (messages), "reference", "lang", "character", "answer", "task"}."""
    prompts = []
    for path in split_files(dataset)["val"]:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if pairs:
                    pair = to_pair(record, detect_form(record))
                    messages = [*pair.prompt, {"role": "assistant", "content": pair.chosen}]
                else:
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
    tally = {name: [0, 0] for name in CHECKS}  # [passed, asked]
    too_long = 0
    for p in prompts:
        ids = render_ids(sp, p["prompt"])
        room = model.args.max_seq_len - len(ids) + 1
        if room < 1:
            too_long += 1
            continue
        limit = min(room, len(sp.encode(p["reference"])) + EXTRA_REPLY_TOKENS)
        # Stopped at <|im_end|> alone, and cut at the first EOS or BOS after, a greedy reply is the
        # one all three stop ids give, and says how it stopped.
        out = model.generate(ids, limit, temperature=0.0, stop_ids=(im_end,))
        cut = next((i for i, t in enumerate(out) if t in (sp.eos_id(), sp.bos_id())), len(out))
        reply = sp.decode(out[:cut])
        checks = {"language": in_language(reply, p["lang"]), "repetition": repeats(reply),
                  "ends": cut == len(out) < limit}
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
    config, stage = Config(**state["config"]), state["run_info"]["stage"]
    dataset, tokenizer_model = Path(config.dataset), run_dir / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    if stage == "dpo":
        data = PreferenceShards(tokenize_preferences(dataset, tokenizer_model, config.max_seq_len), config.max_seq_len)
    else:
        data = ConversationShards(tokenize_conversations(dataset, tokenizer_model, config.max_seq_len),
                                  config.max_seq_len)
    prompts = val_prompts(dataset, pairs=stage == "dpo")
    report = {"step": state["step"], "stage": stage, "dataset": config.dataset, "val_prompts": len(prompts)}
    subjects = {stage: model}
    base_run = Path(state["run_info"]["base_run"])
    if (base_run / "ckpt.pt").exists():
        base, _ = load_checkpoint(base_run / "ckpt.pt")
        # the chat tokenizer is the base's plus the pieces sft appended (none for a dpo run): the base gets their rows
        subjects["base"] = base.extended(sp.vocab_size() - base.args.vocab_size, config.max_seq_len)
        report["base_run"] = str(base_run)
    logps = {}
    for name, subject in subjects.items():
        subject.eval()
        if stage == "dpo":
            chosen, rejected, tokens = val_pair_logps(subject, data)
            logps[name] = chosen, rejected
            figures = {"chosen_loss": -chosen.sum().item() / max(tokens, 1), "chosen_tokens": tokens}
        else:
            loss, tokens = assistant_loss(subject, data)
            figures = {"assistant_loss": loss, "assistant_tokens": tokens}
        report[name] = figures | generation_checks(subject, sp, prompts)
    if stage == "dpo" and "base" in logps:
        beta = state["run_info"]["dpo_beta"]
        _, chosen_rewards, rejected_rewards = dpo_loss(*logps["dpo"], *logps["base"], beta)
        margins = chosen_rewards - rejected_rewards
        report |= {"val_pairs": len(margins), "dpo_beta": beta}
        report["dpo"] |= {"reward_accuracy": (margins > 0).float().mean().item(),
                          "reward_margin": margins.mean().item()}
    return report


def format_chat_report(report: dict) -> str:
    names = [n for n in (report["stage"], "base") if n in report]
    lines = [f"step {report['step']}; {report['val_prompts']} val prompts of {report['dataset']}"
             + (f"; base run {report['base_run']}" if "base_run" in report else "")
             + (f"; rewards over {report['val_pairs']} val pairs, beta {report['dpo_beta']}" if "val_pairs" in report
                else ""),
             "| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    first = report[names[0]]
    for key, label in LABELS.items():
        if key not in first:
            continue
        asked = f" ({first[f'{key}_asked']})" if f"{key}_asked" in first else ""
        cells = ["–" if report[n].get(key) is None else f"{report[n][key]:.1%}" if key in CHECKS + ("reward_accuracy",)
                 else f"{report[n][key]:.3f}" for n in names]
        lines.append(f"| {label}{asked} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
