"""`make bench`, corpus part: `clean` then `pretokenize` of one large .jsonl file, speed and peak memory.

The input is ../shared/data's real text (TinyStories stories, Chinese stories and prose, about
1.3 MB) recombined into mostly distinct documents: each a seeded random pick of 4-12 paragraphs
or stories in random order, so two documents share little. Planted among them: exact duplicates
(3%), near-duplicates (3%, one character in 150 changed), documents with an advertising line (5%)
and too-short ones (2%). One file per size (default 0.25 and 1 GB), built once into
~/.cache/llama2zh/bench_corpus (or $XDG_CACHE_HOME's).

Each stage runs as `python -m llama2zh ...` with 1 and with 2 workers; pretokenize (llama2enzh)
reads the clean's output. Reported: MB/s of input text, wall seconds, and peak resident memory,
sampled every 50 ms from /proc: summed over the process tree (main process and workers; forked
workers share pages with the main one, which the sum counts in each), and the largest single
process (its own high-water mark, VmHWM).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from llama2zh.bench.pretokenize import SHARED, real_texts
from llama2zh.fileio import atomic_output, sha256_file
from llama2zh.paths import ROOT

SIZES_GB = (0.25, 1.0)
SEED = 14
RECENT = 1000
ADS = ("本章未完，请点击下一页继续阅读", "天才一秒记住本站地址：www.biquge.com 最新章节",
       "Click here to subscribe to our newsletter!")
SHORT = ("第一章", "Chapter 1", "未完待续。", "The End.")
PAGE = os.sysconf("SC_PAGE_SIZE")


def near_copy(text: str, rng: random.Random) -> str:
    """The text with a character in 150 replaced (at least one): Jaccard about 0.85-0.95 to the original."""
    chars = list(text)
    for at in rng.sample(range(len(chars)), max(1, len(chars) // 150)):
        chars[at] = rng.choice("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年同工")
    return "".join(chars)


def documents(texts: list[str], rng: random.Random):
    """An endless stream of documents: new combinations of the texts, and the plants among them."""
    recent = []  # the latest originals, for the duplicates to copy
    for n in itertools.count():
        kind = rng.random()
        if kind < 0.03 and recent:
            yield rng.choice(recent)
        elif kind < 0.06 and recent:
            yield near_copy(rng.choice(recent), rng)
        elif kind < 0.08:
            yield rng.choice(SHORT)
        else:
            doc = "\n".join(rng.sample(texts, rng.randint(4, 12)))
            if kind < 0.13:
                doc += "\n" + rng.choice(ADS)
            if len(recent) < RECENT:
                recent.append(doc)
            else:
                recent[n % RECENT] = doc
            yield doc


def corpus_file(size_gb: float) -> Path:
    """The cached input of about size_gb GB ({"text"} per line), built first if missing."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama2zh" / "bench_corpus"
    path = cache / f"mixed-{size_gb:g}GB-seed{SEED}.jsonl"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    target = int(size_gb * 1e9)
    lines = documents(real_texts(), random.Random(SEED))
    with atomic_output(path) as tmp, open(tmp, "wb") as f, \
            tqdm(total=target, unit="B", unit_scale=True, desc=f"building {path.name}") as bar:
        while f.tell() < target:
            n = f.write(json.dumps({"text": next(lines)}, ensure_ascii=False).encode() + b"\n")
            bar.update(n)
    return path


def tree(pid: int) -> list[int]:
    """The process and its descendants (children of any of their threads)."""
    pids, i = [pid], 0
    while i < len(pids):
        for children in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            try:
                pids += map(int, children.read_text().split())
            except OSError:  # the process or thread just ended
                pass
        i += 1
    return pids


def measure(command: list[str]) -> dict:
    """Runs the command; wall seconds, the peak RSS summed over its tree and the largest VmHWM, in MB."""
    peak = {"tree": 0, "largest": 0}

    def sample(pid: int, done: threading.Event) -> None:
        while not done.wait(0.05):
            total = 0
            for p in tree(pid):
                try:
                    total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
                    status = Path(f"/proc/{p}/status").read_text()
                except OSError:
                    continue
                hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines()
                            if line.startswith("VmHWM:")), 0)
                peak["largest"] = max(peak["largest"], hwm)
            peak["tree"] = max(peak["tree"], total)

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    done = threading.Event()
    sampler = threading.Thread(target=sample, args=(process.pid, done))
    sampler.start()
    code = process.wait()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if code:
        raise SystemExit(f"bench.corpus: {' '.join(command)} failed with exit status {code}")
    return {"seconds": seconds, "tree_mb": peak["tree"] / 1e6, "largest_mb": peak["largest"] / 1e6}


def llama2zh(*args) -> list[str]:
    return [sys.executable, "-m", "llama2zh", *map(str, args)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=SIZES_GB, metavar="GB",
                        help="input sizes in GB (default 0.25 1)")
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llama2enzh",
                        help="directory with tokenizer.model (default: ../shared's llama2enzh)")
    args = parser.parse_args()
    if not (args.tokenizer / "tokenizer.model").exists() or not (SHARED / "data").exists():
        raise SystemExit(f"bench.corpus: skipped, needs {SHARED / 'data'} and {args.tokenizer}/tokenizer.model")
    work = ROOT / "build" / "bench" / "corpus"
    rows, identical = [], {}
    for size in args.sizes:
        source = corpus_file(size)
        source_bytes = source.stat().st_size
        shutil.rmtree(work, ignore_errors=True)
        digests = []
        for workers in (1, 2):
            out = work / f"clean-{workers}"
            result = measure(llama2zh("clean", source, "--out", out, "--workers", workers))
            report = json.loads((out / "report.json").read_text())
            rows.append(("clean", source_bytes, workers, result, f"read {report['read']:,}, kept {report['kept']:,}"))
            digests.append([sha256_file(p) for p in sorted(out.glob("part-*"))])
        identical[f"clean {size:g} GB"] = digests[0] == digests[1]
        shards = sorted((work / "clean-2").glob("part-*.jsonl"))
        cleaned_bytes = sum(p.stat().st_size for p in shards)
        digests = []
        for workers in (1, 2):
            out = work / f"tokens-{workers}"
            result = measure(llama2zh("pretokenize", *shards, "--tokenizer", args.tokenizer, "--out", out,
                                      "--text-field", "text", "--workers", workers))
            entries = json.loads((out / "manifest.json").read_text())["shards"].values()
            tokens = sum(e[split]["tokens"] for e in entries for split in ("train", "val"))
            docs = sum(e[split]["documents"] for e in entries for split in ("train", "val"))
            rows.append(("pretokenize", cleaned_bytes, workers, result, f"{docs:,}, {tokens / 1e6:.1f} M tokens"))
            digests.append([sha256_file(p) for p in sorted(out.glob("*.bin"))])
        identical[f"pretokenize {size:g} GB"] = digests[0] == digests[1]
    shutil.rmtree(work, ignore_errors=True)

    print(f"clean + pretokenize of one .jsonl file of mixed Chinese/English text ({os.cpu_count()} CPUs)")
    print("| stage | input MB | workers | MB/s | wall s | peak RSS, tree MB | largest process MB | documents |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, size, workers, r, docs in rows:
        print(f"| {stage} | {size / 1e6:,.0f} | {workers} | {size / 1e6 / r['seconds']:.2f} | {r['seconds']:.0f} | "
              f"{r['tree_mb']:,.0f} | {r['largest_mb']:,.0f} | {docs} |")
    print("outputs identical for 1 and 2 workers: " + ", ".join(f"{k} {v}" for k, v in identical.items()))


if __name__ == "__main__":
    main()
