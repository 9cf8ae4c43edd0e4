"""`make bench`, tokenizer part: the C encoder against SentencePiece, one thread each.

For each reference tokenizer in ../shared/tokenizers (llama2en, llama2enzh, baichuan), every
text of the real stories and prose in ../shared/data is encoded one call per text, with
SentencePiece and with the C encoder through the binding (its tokenizer.bin written by
`vocab export`). Each side's time is the best of ROUNDS rounds, the two taking turns, so that a
burst of load from elsewhere spoils neither alone; the ids of both must be equal.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llama2zh.bench.pretokenize import SHARED
from llama2zh.engine import CTokenizer
from llama2zh.paths import ROOT
from llama2zh.vocab.export import export_tokenizer

TOKENIZERS = ("llama2en", "llama2enzh", "baichuan")
DATA = (("tinystories_en_sample.jsonl", "story"), ("tinystories_zh_sample.jsonl", "story"),
        ("zh_literature.jsonl", "text"))
ROUNDS = 5


def texts() -> list[str]:
    return [json.loads(line)[field] for name, field in DATA
            for line in (SHARED / "data" / name).read_text(encoding="utf-8").splitlines()]


def best_time(encode, items: list[str], best: float) -> tuple[float, list]:
    """The time of one round of encode over items (kept when best of those so far), and its ids."""
    start = time.perf_counter()
    ids = [encode(text) for text in items]
    return min(best, time.perf_counter() - start), ids


def bench(name: str, items: list[str], work: Path, rounds: int) -> tuple[float, float]:
    import sentencepiece as spm

    model = SHARED / "tokenizers" / name / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model), num_threads=1)
    ct = CTokenizer(export_tokenizer(model, work / f"{name}.bin"))
    sp_s = c_s = float("inf")
    for _ in range(rounds):
        sp_s, sp_ids = best_time(sp.encode, items, sp_s)
        c_s, c_ids = best_time(lambda text: ct.encode(text, bos=False), items, c_s)
        if c_ids != sp_ids:
            raise SystemExit(f"bench.tokenizer: {name}: the C encoder's ids differ from SentencePiece's")
    return sp_s, c_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", nargs="+", choices=TOKENIZERS, default=list(TOKENIZERS))
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds of each encoder (the best counts)")
    args = parser.parse_args()
    needed = [SHARED / "data" / name for name, _ in DATA]
    needed += [SHARED / "tokenizers" / name / "tokenizer.model" for name in args.tokenizers]
    missing = [path for path in needed if not path.exists()]
    if missing:
        print(f"bench.tokenizer: skipped, {missing[0]} is absent (it needs ../shared's tokenizers and data)")
        return
    work = ROOT / "build" / "bench" / "tokenizer"
    work.mkdir(parents=True, exist_ok=True)
    items = texts()
    chars = sum(len(text) for text in items)
    print(f"tokenizer: encode {len(items):,} real texts ({', '.join(name for name, _ in DATA)}), "
          f"one call per text, 1 thread, best of {args.rounds} alternating rounds; ids equal")
    print("| tokenizer | texts/chars | SentencePiece s | C s | C / SentencePiece |")
    print("|---|---|---|---|---|")
    for name in args.tokenizers:
        sp_s, c_s = bench(name, items, work, args.rounds)
        print(f"| {name} | {len(items):,} / {chars:,} | {sp_s:.3f} | {c_s:.3f} | {c_s / sp_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
