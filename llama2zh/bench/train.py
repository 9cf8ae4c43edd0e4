"""`make bench`, training part: our loop vs a plain fp32 eager loop (llama2.c's train.py way).

llama2.c's 15M shape with the 55296-piece vocab (llama2enzh from ../shared, or --tokenizer),
batches of 8 x 256 tokens of real text from ../shared/data, on the CPU. The baseline runs the
same model in fp32 without autocast; ours is `llama2zh train`'s Trainer with dtype bfloat16.
Reports tokens/s for each, their ratio, and the process's peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llama2zh.config import Config
from llama2zh.corpus.pretokenize import pretokenize
from llama2zh.paths import ROOT
from llama2zh.train import pretraining_trainer

SHARED = ROOT.parent / "shared"
SHAPE_15M = dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, max_seq_len=256, batch_size=8)


def build_dataset(work: Path, tokenizer: Path) -> tuple[Path, Path]:
    """Real stories and prose from ../shared/data as shards, pretokenized with the tokenizer."""
    data = work / "data"
    data.mkdir(parents=True)
    for path in sorted((SHARED / "data").glob("*.jsonl")):
        records = [json.loads(line) for line in path.open(encoding="utf-8")]
        stories = [{"story": r.get("story") or r.get("text")} for r in records]
        (data / (path.stem + ".json")).write_text(json.dumps(stories, ensure_ascii=False), encoding="utf-8")
    tokenizer_dir = work / "llama2enzh"
    tokenizer_dir.mkdir()
    shutil.copyfile(tokenizer / "tokenizer.model", tokenizer_dir / "tokenizer.model")
    pretokenize(data, tokenizer_dir, lang="enzh", workers=2)
    return data, tokenizer_dir


def timed_steps(step, n: int) -> float:
    """Seconds per step over n steps, after one warm-up step."""
    step()
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llama2enzh")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if not (args.tokenizer / "tokenizer.model").exists() or not (SHARED / "data").exists():
        raise SystemExit(f"bench.train: needs {SHARED / 'data'} and {args.tokenizer}/tokenizer.model")
    work = ROOT / "build" / "bench" / "train"
    shutil.rmtree(work, ignore_errors=True)
    data, tokenizer_dir = build_dataset(work, args.tokenizer)
    base = dict(SHAPE_15M, dataset=str(data), tokenizer=str(tokenizer_dir), device="cpu", max_iters=10**6,
                warmup_iters=10)

    ours = pretraining_trainer(Config(**base, dtype="bfloat16", out_dir=str(work / "ours")), resume=False)
    ours_s = timed_steps(ours.train_step, args.steps)

    plain = pretraining_trainer(Config(**base, dtype="float32", out_dir=str(work / "plain")), resume=False)
    model, optimizer = plain.model, torch.optim.AdamW(plain.model.parameters(), lr=5e-4)

    def plain_step():
        x, y, _ = plain.micro_batch("train", plain.data_rng)
        logits = model(x)
        F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    plain_s = timed_steps(plain_step, args.steps)
    tokens = SHAPE_15M["batch_size"] * SHAPE_15M["max_seq_len"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"training, 15M shape, vocab 55296, batch 8 x 256, CPU, {torch.get_num_threads()} threads, "
          f"{args.steps} steps each")
    print("| loop | s/step | tokens/s | vs plain |")
    print("|---|---|---|---|")
    print(f"| plain fp32 eager (llama2.c's train.py way) | {plain_s:.2f} | {tokens / plain_s:,.0f} | 1.00x |")
    print(f"| llama2zh train (bf16 autocast) | {ours_s:.2f} | {tokens / ours_s:,.0f} | {plain_s / ours_s:.2f}x |")
    print(f"peak memory: {peak_mb:,.0f} MB")


if __name__ == "__main__":
    main()
