"""`make bench`, translate part: our translator vs the forks' one-story-at-a-time loop, same service.

The service is tests/google_standin.py in its own process, answering like Google's /m page after
200 ms, no faults. The stories are the real TinyStories in ../shared/data (the built-in sample
generator's English when ../shared is absent). Measured in the same run:
  baseline  deep-translator's GoogleTranslator.translate(story), one story after another
  ours      `translate` (chunks, threads, cache) on all the stories, from an empty DEST
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

from deep_translator import GoogleTranslator

from llama2zh.corpus.translate import Options, translate_corpus
from llama2zh.paths import ROOT

SAMPLE = ROOT.parent / "shared" / "data" / "tinystories_en_sample.jsonl"
TARGET = 20.0


def english_stories() -> tuple[list[str], str]:
    if SAMPLE.exists():
        return [json.loads(line)["story"] for line in SAMPLE.open(encoding="utf-8")], f"real TinyStories ({SAMPLE})"
    from llama2zh.corpus.sample import make_story

    rng = random.Random(0)
    return [make_story(rng)[0] for _ in range(500)], "the built-in sample's English (../shared is absent)"


def start_service(latency: float) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    service = subprocess.Popen([sys.executable, "-m", "tests.google_standin", "--latency", str(latency)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, text=True)
    return service, service.stdout.readline().strip()


def baseline(stories: list[str], url: str) -> float:
    """The forks' way: one deep-translator call per story, one story after another. Stories/s."""
    translator = GoogleTranslator(source="en", target="zh-CN")
    translator._base_url = url + "/m"
    start = time.perf_counter()
    for story in stories:
        translator.translate(story)
    return len(stories) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="the service's seconds per request")
    parser.add_argument("--baseline-stories", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[16, 128], help="thread counts to measure")
    args = parser.parse_args()
    stories, origin = english_stories()
    work = ROOT / "build" / "bench" / "translate"
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    (work / "src" / "data00.json").write_text(json.dumps([{"story": s} for s in stories]), encoding="utf-8")

    service, url = start_service(args.latency)
    try:
        base = baseline(stories[:args.baseline_stories], url)
        reports = {}
        for workers in args.workers:  # each from an empty DEST: no journal, a cold cache
            options = Options(endpoint=url + "/m", workers=workers, rate=0, timeout=30)
            reports[workers] = translate_corpus(work / "src", work / f"dest{workers}", options, progress=False)
    finally:
        service.terminate()
        service.wait()
    print(f"translate, {len(stories)} stories of {origin}; local Google stand-in, {args.latency * 1000:.0f} ms "
          "per request, no rate limit")
    print("| translator | stories | seconds | stories/s | requests | cache hits | vs baseline |")
    print("|---|---|---|---|---|---|---|")
    print(f"| deep-translator, one story at a time | {args.baseline_stories} | {args.baseline_stories / base:.1f} | "
          f"{base:.2f} | {args.baseline_stories} | - | 1.00x |")
    for workers, report in reports.items():
        ours = report.translated / report.seconds
        print(f"| llama2zh translate, {workers} workers | {report.translated} | {report.seconds:.1f} | {ours:.2f} | "
              f"{report.requests} | {report.cache_hits / max(1, report.cache_lookups):.1%} | {ours / base:.1f}x |")
    best = max(r.translated / r.seconds for r in reports.values()) / base
    failed = sum(r.failed + r.rejected for r in reports.values())
    print(f"rejected or failed: {failed}; target >= {TARGET:.0f}x: {'met' if best >= TARGET else 'NOT met'} "
          f"({best:.1f}x)")


if __name__ == "__main__":
    main()
