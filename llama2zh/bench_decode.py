"""`make bench`, decode part: the C engine against PyTorch, measured in the same run.

Random models of llama2.c's 15M shape (dim 288, 6 layers) with the 32000- and 55296-piece
vocabs, fp32 (model.bin v1). For each: `./run -t 0 -n 256` (the achieved tok/s it reports,
best of several runs) and PyTorch's KV-cached generate() on the same weights and thread
count (the embeddings of <unk>, BOS and EOS shrunk so that greedy decoding does not stop early). This
machine is shared and noisy, so the ratio is the figure to trust.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path

import torch

from llama2zh.engine import run_binary
from llama2zh.export import write_model_bin
from llama2zh.model import ModelArgs, Transformer
from llama2zh.paths import ROOT
from llama2zh.vocab.export import write_tokenizer_bin

SHAPE_15M = dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, max_seq_len=256)
VOCABS = (32000, 55296)
STEPS = 256


def id_tokenizer(vocab_size: int, path: Path) -> Path:
    """A tokenizer.bin whose pieces print their own ids, "[0]".."[n-1]" (no trailer)."""
    pieces = [f"[{i}]".encode() for i in range(vocab_size)]
    data = {"max_token_length": max(map(len, pieces)), "pieces": pieces, "scores": [0.0] * vocab_size,
            "trailer": None}
    return write_tokenizer_bin(data, path)


def c_tokens_per_second(model_bin: Path, tokenizer_bin: Path, threads: int, repeats: int) -> tuple[float, int]:
    """Best achieved tok/s over repeats of `./run -t 0 -n 256`, and how many tokens it printed."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    best, count = 0.0, 0
    for _ in range(repeats):
        result = subprocess.run([str(run_binary()), str(model_bin), "-k", str(tokenizer_bin), "-t", "0",
                                 "-n", str(STEPS), "-i", ""], capture_output=True, text=True, env=env, check=True)
        best = max(best, float(re.search(r"achieved tok/s: ([\d.]+)", result.stderr).group(1)))
        count = result.stdout.count("[")
    return best, count


def torch_tokens_per_second(model: Transformer, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = len(model.generate([1], STEPS, temperature=0.0))
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = ROOT / "build" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for vocab in VOCABS:
        model = Transformer(ModelArgs(vocab_size=vocab, **SHAPE_15M))
        model.init_weights(torch.Generator().manual_seed(0))
        with torch.no_grad():  # a random tied model repeats its input: keep it from repeating BOS
            model.tok_embeddings.weight[0:3] *= 0.1
        model_bin = write_model_bin(model, work / f"15M_v{vocab}.bin", 1)
        tokenizer_bin = id_tokenizer(vocab, work / f"ids{vocab}.bin")
        c_rate, count = c_tokens_per_second(model_bin, tokenizer_bin, args.threads, args.repeats)
        torch_rate = torch_tokens_per_second(model, args.threads, args.repeats)
        weights_mb = model_bin.stat().st_size / 1e6
        rows.append((vocab, weights_mb, count, c_rate, torch_rate))
    print(f"decode, 15M shape, fp32, {args.threads} threads, {STEPS} greedy steps, best of {args.repeats}")
    print("| vocab | model.bin MB | tokens | C run tok/s | PyTorch tok/s | C / PyTorch |")
    print("|---|---|---|---|---|---|")
    for vocab, mb, count, c_rate, torch_rate in rows:
        print(f"| {vocab} | {mb:.0f} | {count} | {c_rate:.0f} | {torch_rate:.0f} | {c_rate / torch_rate:.2f}x |")


if __name__ == "__main__":
    main()
