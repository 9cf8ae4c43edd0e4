"""The chat evaluation's generation figures (repeated spans, ends) and a DPO run's report: its
reward accuracy and margin against an independent computation, and the keys of `eval --json`.

The models are tiny random ones over a tokenizer trained here (test_chat_engine's); those whose
replies must end, loop or stop at EOS get a classifier that gives every position the same logits.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from llama2zh.chat import chat_piece_ids, render
from llama2zh.checkpoint import save_checkpoint
from llama2zh.config import Config
from llama2zh.corpus.sample import make_story
from llama2zh.corpus.sample_dpo import write_sample_dpo
from llama2zh.evaluate_chat import REPEAT_COLUMNS, format_chat_report, generation_checks, repeats
from tests.conftest import random_model
from tests.test_chat_engine import trained
from tests.test_cli import llama2zh

SHAPE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=192, shared_classifier=False)
BETA = 0.2
PAIRS = [("Tell me a story about Lily.", "Once upon a time, there was a little girl named Lily.",
          "从前，有一个小女孩叫莉莉。"),
         ("讲一个故事。", "从前，有一个小女孩叫莉莉。", "She liked to play with her dog in the park."),
         ("Who sang?", "3 birds sang.", "One day, 3 birds sang: \"Hello!\""),
         ("你好", "你好！", "你好你好你好你好你好你好你好你好你好你好你好你好你好")]


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(trained(path.parent)[1])
    return spm.SentencePieceProcessor(model_file=str(path))


def test_a_repeated_span_is_at_least_24_columns_twice_without_overlap():
    assert REPEAT_COLUMNS == 24
    loop = "Lily smiled at the dog. " * 4  # 19 characters a sentence: three would not hold two spans of 24 apart
    assert repeats(loop) and not repeats(loop[:-24]) and repeats("她笑了，小狗也笑了。" * 4)
    english, chinese = make_story(random.Random(4))
    assert not repeats(english) and not repeats(chinese)
    latin, han = "abcdefghijklmnopqrstuvwxyz", "一二三四五六七八九十甲乙丙"
    assert repeats(latin[:24] * 2) and not repeats(latin[:23] * 2)  # the edge: 24 columns, not 23
    assert repeats(han[:12] * 2) and not repeats(han[:11] * 2)  # a Chinese character is two columns
    assert repeats(han[:11] + "ab" + han[:11] + "ab") and not repeats(han[:11] + "a" + han[:11] + "a")
    assert repeats("abcdefghijkl mnop\nqrstuvwx" + latin[:24])  # whitespace removed
    assert repeats("ab" * 24) and not repeats("ab" * 23 + "a")  # the two occurrences may not overlap
    assert not repeats("") and repeats(latin[:24] + "-" * 5 + latin[:24])


def test_sample_dpo_val_true_replies_never_repeat_and_its_loops_always_do(tmp_path):
    write_sample_dpo(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "val.jsonl").open(encoding="utf-8")]
    loops = [r["rejected"][-1]["content"] for r in records if r["kind"] == "loop"]
    assert len(loops) == 75 and all(map(repeats, loops))
    assert not any(repeats(r["chosen"][-1]["content"]) for r in records)


def saying(sp, token: int):
    """A model whose every logit is 0 but token's, so that greedy decoding says token and only it."""
    model = random_model(0, vocab_size=sp.vocab_size(), **SHAPE)
    model.output = torch.nn.Linear(SHAPE["dim"], sp.vocab_size())
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.bias.zero_()
        model.output.bias[token] = 1.0
    return model.eval()


def test_ends_are_replies_stopped_at_im_end_before_the_limit(sp):
    prompts = [{"prompt": [{"role": "user", "content": user}], "reference": chosen, "lang": "en", "character": "",
                "answer": ""} for user, chosen, _ in PAIRS]
    loop_piece = sp.encode("Once")[0]
    assert len(sp.decode([loop_piece])) >= 2  # so that 32 of them hold two spans of 24 columns
    ends = generation_checks(saying(sp, chat_piece_ids(sp)[1]), sp, prompts)
    loops = generation_checks(saying(sp, loop_piece), sp, prompts)
    at_eos = generation_checks(saying(sp, sp.eos_id()), sp, prompts)
    assert (ends["ends"], ends["repetition"], ends["ends_asked"]) == (1.0, 0.0, 4)  # empty replies, each ended
    assert (loops["ends"], loops["repetition"]) == (0.0, 1.0)
    assert (at_eos["ends"], at_eos["repetition"]) == (0.0, 0.0)  # EOS stops a reply but is no end of the turn


@pytest.fixture(scope="module")
def dpo_run(sp, tmp_path_factory):
    """A DPO run's directory, its sft base's, and their models (random, the DPO one another seed)."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "pairs"
    data.mkdir()
    records = [{"chosen": [{"role": "user", "content": user}, {"role": "assistant", "content": chosen}],
                "rejected": [{"role": "user", "content": user}, {"role": "assistant", "content": rejected}],
                "lang": "zh" if "莉" in chosen or "你" in chosen else "en", "character": "", "answer": ""}
               for user, chosen, rejected in PAIRS]
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                             encoding="utf-8")
    models = {}
    for stage, seed in (("sft", 1), ("dpo", 2)):
        run = root / stage
        run.mkdir()
        (run / "tokenizer.model").write_bytes(sp.serialized_model_proto())
        config = Config(**SHAPE, dataset=str(data), out_dir=str(run))
        run_info = {"stage": stage, "base_run": str(root / "sft" if stage == "dpo" else root / "base")}
        if stage == "dpo":
            run_info["dpo_beta"] = BETA
        models[stage] = random_model(seed, vocab_size=sp.vocab_size(), **SHAPE).eval()
        save_checkpoint(run / "ckpt.pt", models[stage], config=asdict(config), tokenizer_sha256="", step=5,
                        run_info=run_info)
    return root, models


def reply_logp(sp, model, user: str, reply: str) -> float:
    """The reply's log-probability after the user's message, its content and <|im_end|>, alone."""
    ids, trained = render(sp, [{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
    ids, trained = ids[:-len(sp.encode("\n"))], trained[:-len(sp.encode("\n"))]
    logps = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
    return sum(logps[t - 1, ids[t]].item() for t in range(1, len(ids)) if trained[t])


def test_a_dpo_report_gives_reward_accuracy_and_margin_and_every_figure(sp, dpo_run):
    root, models = dpo_run
    result = llama2zh("eval", root / "dpo", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    with torch.no_grad():
        rewards = [BETA * ((reply_logp(sp, models["dpo"], user, chosen) - reply_logp(sp, models["sft"], user, chosen))
                           - (reply_logp(sp, models["dpo"], user, rejected)
                              - reply_logp(sp, models["sft"], user, rejected))) for user, chosen, rejected in PAIRS]
    assert report["dpo"]["reward_accuracy"] == pytest.approx(sum(r > 0 for r in rewards) / len(PAIRS))
    assert report["dpo"]["reward_margin"] == pytest.approx(sum(rewards) / len(PAIRS), rel=1e-4, abs=1e-6)
    assert {k: report[k] for k in ("stage", "val_prompts", "val_pairs", "dpo_beta", "base_run")} == \
        {"stage": "dpo", "val_prompts": 4, "val_pairs": 4, "dpo_beta": BETA, "base_run": str(root / "sft")}
    checks = {f"{name}{asked}" for name in ("language", "character", "exact", "repetition", "ends")
              for asked in ("", "_asked")}
    assert set(report["base"]) == checks | {"chosen_loss", "chosen_tokens", "prompts_too_long"}
    assert set(report["dpo"]) == set(report["base"]) | {"reward_accuracy", "reward_margin"}
    assert report["dpo"]["ends_asked"] == report["dpo"]["repetition_asked"] == 4
    with torch.no_grad():
        chosen_nats = -sum(reply_logp(sp, models["dpo"], user, chosen) for user, chosen, _ in PAIRS)
    assert report["dpo"]["chosen_loss"] * report["dpo"]["chosen_tokens"] == pytest.approx(chosen_nats, rel=1e-4)
    table = format_chat_report(report)
    assert "| figure | dpo | base |" in table and "| reward accuracy |" in table
    assert f"| replies repeating a span ({REPEAT_COLUMNS}+ columns) (4) |" in table
    assert "| replies ending with <|im_end|> (4) |" in table
