"""`make gpu-check`: how busy the training loop keeps a CUDA GPU, for the 15M, 42M and 110M shapes.

Each shape trains on random tokens (vocab 32000, batch 32 x 1024 by default) through
train.Trainer, the loop `llama2zh train` runs: bf16 autocast, torch.compile, fused AdamW, batches
prefetched into pinned memory, one wait for the GPU per log interval (here: per measurement).
The first steps (compilation, warm-up) are not timed. Reports tokens/s, MFU against the GPU's
bf16 peak (train.PEAK_BF16, or measured for a GPU not in it) and peak memory per shape.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from llama2zh.config import Config
from llama2zh.model import Transformer
from llama2zh.train import Trainer, flops_per_token, known_peak_flops, peak_flops

SHAPES = {"15M": dict(dim=288, n_layers=6, n_heads=6), "42M": dict(dim=512, n_layers=8, n_heads=8),
          "110M": dict(dim=768, n_layers=12, n_heads=12)}


class RandomTokens:
    """Uniformly random token ids, with the TokenShards.batch contract."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def batch(self, split: str, rows: int, seq_len: int, generator: torch.Generator,
              rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor, None]:
        data = torch.randint(self.vocab_size, (rows * world, seq_len + 1), generator=generator)
        data = data[rank * rows : (rank + 1) * rows]
        return data[:, :-1], data[:, 1:], None


def measure(shape: dict, device: str, steps: int, warmup: int, batch_size: int, seq_len: int, compile: bool,
            work: Path, vocab_size: int = 32000) -> dict:
    """Trains a model of shape (dim, n_layers, n_heads) for warmup + steps steps on device; the speed of the
    last steps: tokens/s, MFU (None on a CPU), peak memory in GiB (None on a CPU) and the last loss."""
    config = Config(**shape, max_seq_len=seq_len, batch_size=batch_size, device=device, dtype="bfloat16",
                    compile=compile, max_iters=warmup + steps, warmup_iters=warmup, out_dir=str(work))
    model = Transformer(config.model_args(vocab_size))
    model.init_weights(torch.Generator().manual_seed(0))
    trainer = Trainer(config, RandomTokens(vocab_size), model, tokenizer_sha256="", resume=False)
    cuda = trainer.device.type == "cuda"
    try:
        for _ in range(warmup):
            trainer.train_step()
        trainer.read_losses()  # waits for the warm-up steps to finish
        start, trainer.tokens_seen = time.perf_counter(), 0
        for _ in range(steps):
            trainer.train_step()
        loss = trainer.read_losses()[-1]
        rate = trainer.tokens_seen / (time.perf_counter() - start)
    finally:
        trainer.close()
    peak = peak_flops(trainer.device)
    return {"parameters": sum(p.numel() for p in model.parameters()), "tokens_per_s": rate,
            "mfu": rate * flops_per_token(model) / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated(trainer.device) / 2**30 if cuda else None,
            "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="a comma list among " + ", ".join(SHAPES))
    parser.add_argument("--steps", type=int, default=300, help="timed steps per shape")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (compilation)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true", help="eager PyTorch, without torch.compile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device here (torch.cuda.is_available() is false); it measures a GPU "
                         "(and needs a CUDA build of torch)")
    shapes = [s.strip() for s in args.shapes.split(",")]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"gpu-check: unknown shape {unknown[0]}; one of {', '.join(SHAPES)}")
    name = torch.cuda.get_device_name()
    peak = peak_flops(torch.device("cuda"))
    print(f"{name}: bf16 peak {peak / 1e12:,.0f} TFLOP/s ({'known' if known_peak_flops(name) else 'measured'}); "
          f"batch {args.batch_size} x {args.seq_len}, vocab 32000, bf16, torch.compile "
          f"{'off' if args.no_compile else 'on'}, {args.steps} steps timed after {args.warmup}")
    print("| shape | parameters | tokens/s | MFU | peak memory | loss |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as work:
            r = measure(SHAPES[shape], "cuda", args.steps, args.warmup, args.batch_size, args.seq_len,
                        not args.no_compile, Path(work))
        print(f"| {shape} | {r['parameters'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
              f"{r['peak_memory_gib']:.1f} GiB | {r['loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
