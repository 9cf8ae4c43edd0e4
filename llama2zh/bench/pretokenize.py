"""`make bench`, pretokenize part: our pipeline vs the forks' one-story-at-a-time loop.

The real text in ../shared/data (TinyStories stories, Chinese stories and prose) repeated to
at least 50 MB in 8 shards, encoded with llama2enzh (../shared/tokenizers, or --tokenizer):
  baseline  one story at a time through SentencePiece, one thread, ids gathered and written
  ours      `pretokenize` with 1 and with 2 worker processes (their outputs must be identical)
Reports tokens/s, the ratio to the baseline measured in the same run, and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from llama2zh.corpus.pretokenize import pretokenize
from llama2zh.corpus.shards import read_records, shard_paths
from llama2zh.paths import ROOT

SHARED = ROOT.parent / "shared"
TARGET_BYTES = 50_000_000
N_SHARDS = 8


def real_texts() -> list[str]:
    texts = []
    for path in sorted((SHARED / "data").glob("*.jsonl")):
        for line in path.open(encoding="utf-8"):
            record = json.loads(line)
            texts.append(record.get("story") or record.get("text"))
    return texts


def build_dataset(directory: Path) -> int:
    """Writes the repeated text as N_SHARDS story shards; returns its size in bytes."""
    texts = real_texts()
    per_round = sum(len(t.encode("utf-8")) for t in texts)
    rounds = -(-TARGET_BYTES // per_round)
    stories = [{"story": t} for _ in range(rounds) for t in texts]
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(N_SHARDS):
        (directory / f"data{n:02d}.json").write_text(json.dumps(stories[n::N_SHARDS], ensure_ascii=False),
                                                     encoding="utf-8")
    return rounds * per_round


def baseline(dataset: Path, tokenizer_model: Path, out: Path) -> tuple[int, float]:
    """The forks' way: sp.encode per story, one thread, a list of ids per shard."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    out.mkdir(parents=True, exist_ok=True)
    start, tokens = time.perf_counter(), 0
    for shard in shard_paths(dataset):
        ids = []
        for record in read_records(shard):
            ids += [sp.bos_id()] + sp.encode(record["story"])
        np.array(ids, dtype=np.uint16).tofile(out / (shard.stem + ".bin"))
        tokens += len(ids)
    return tokens, time.perf_counter() - start


def ours(dataset: Path, tokenizer_dir: Path, workers: int) -> tuple[int, float, dict]:
    shutil.rmtree(dataset / tokenizer_dir.name, ignore_errors=True)
    start = time.perf_counter()
    out = pretokenize(dataset, tokenizer_dir, lang="en", workers=workers, val_permille=0)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(e[s]["tokens"] for e in manifest["shards"].values() for s in ("train", "val"))
    return tokens, seconds, {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llama2enzh",
                        help="directory with tokenizer.model (default: ../shared's llama2enzh)")
    args = parser.parse_args()
    if not (args.tokenizer / "tokenizer.model").exists() or not (SHARED / "data").exists():
        raise SystemExit(f"bench.pretokenize: needs {SHARED / 'data'} and {args.tokenizer}/tokenizer.model")
    work = ROOT / "build" / "bench" / "pretokenize"
    shutil.rmtree(work, ignore_errors=True)
    tokenizer_dir = work / "llama2enzh"
    tokenizer_dir.mkdir(parents=True)
    shutil.copyfile(args.tokenizer / "tokenizer.model", tokenizer_dir / "tokenizer.model")
    size = build_dataset(work / "data")

    base_tokens, base_s = baseline(work / "data", tokenizer_dir / "tokenizer.model", work / "baseline")
    rows = [("one story at a time, SentencePiece, 1 thread", base_tokens, base_s)]
    outputs = []
    for workers in (1, 2):
        tokens, seconds, files = ours(work / "data", tokenizer_dir, workers)
        rows.append((f"llama2zh pretokenize, {workers} worker{'s' * (workers > 1)}", tokens, seconds))
        outputs.append(files)
    peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(f"pretokenize, {size / 1e6:.0f} MB of real text in {N_SHARDS} shards, llama2enzh")
    print("| pipeline | tokens | seconds | tokens/s | vs baseline |")
    print("|---|---|---|---|---|")
    for name, tokens, seconds in rows:
        print(f"| {name} | {tokens:,} | {seconds:.1f} | {tokens / seconds / 1e6:.2f} M | "
              f"{(tokens / seconds) / (base_tokens / base_s):.2f}x |")
    print(f"outputs identical for 1 and 2 workers: {outputs[0] == outputs[1]}; peak memory of one process "
          f"{peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
