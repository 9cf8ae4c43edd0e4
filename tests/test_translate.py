"""`llama2zh translate` against a local stand-in for Google Translate (tests/google_standin.py),
through deep-translator's real client code: faults, a kill -9 and resume, chunking, rejects,
sharding, --limit, the cache, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from llama2zh.cli import TRANSLATE_BACKENDS, main
from llama2zh.corpus.chunks import pack, split_story
from llama2zh.corpus.client import BACKENDS, CircuitBreaker, Client, Retry, TransientError
from llama2zh.corpus.journal import Journal, read_journal
from llama2zh.corpus.translate import Options, translate_corpus
from tests.conftest import ROOT
from tests.google_standin import GOOGLE_FAULTS, MYMEMORY_FAULTS, Standin, chinese

NAMES = ("Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Zoe", "Sam")
SHARED = (  # paragraphs many stories share, as in TinyStories: cache hits
    "The sun was warm and the sky was blue.",
    "They played all day and had lots of fun.",
    'Mom said, "It is time to go home now."',
    "The little dog wagged its tail and barked.",
    "From that day on, they were best friends.",
    "The end.",
)


def make_stories(count: int, seed: int = 0) -> list[str]:
    """Small TinyStories-like stories: a paragraph of their own, shared ones, varied newlines."""
    rng = random.Random(seed)
    stories = []
    for i in range(count):
        name = rng.choice(NAMES)
        own = (f"Once upon a time, {name} found {i} red stones by the river. "
               f"{name} gave {i % 7 + 2} of them to a friend.")
        paragraphs = [own, *rng.sample(SHARED, rng.randint(1, 2))]
        if i % 50 == 0:
            paragraphs.insert(1, "...")  # nothing to translate: kept as it is
        stories.append(rng.choice(("\n", "\n\n")).join(paragraphs) + rng.choice(("", "\n", "  ")))
    return stories


def expected(story: str) -> str:
    """What the stand-in's translation of a story must come out as."""
    return "".join(chinese(text.strip()) if translate else text for text, translate in split_story(story, 1000))


def chunks(story: str) -> set[str]:
    return {text.strip() for text, translate in split_story(story, 1000) if translate}


def asked(log, served=None) -> list[str]:
    """The chunks the stand-in was asked to translate: a request packs several, one a line."""
    return [chunk for entry in log if served in (None, entry.served) for chunk in entry.text.split("\n")]


def write_json(path, stories):
    path.write_text(json.dumps([{"story": s, "instruction": {}} for s in stories]), encoding="utf-8")


def write_jsonl(path, stories):
    path.write_text("".join(json.dumps({"story": s}) + "\n" for s in stories), encoding="utf-8")


def llama2zh(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "llama2zh", "translate", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def journaled(dest) -> list[str]:
    return [r["id"] for path in sorted((dest / "translate").glob("*.journal.jsonl")) for r in read_journal(path)]


def outputs(dest, pattern="data*.json") -> list[dict]:
    return [r for path in sorted(dest.glob(pattern)) for r in json.loads(path.read_text(encoding="utf-8"))]


def run(src, dest, standin, path="/m", **options) -> tuple:
    """translate_corpus in this process; the report and the stand-in's requests it caused."""
    start = len(standin.log)
    options = Options(endpoint=standin.url + path, workers=8, rate=0, timeout=2, **options)
    report = translate_corpus(src, dest, options, progress=False)
    return report, standin.log[start:]


def test_faults_kill_9_and_resume(tmp_path):
    """2,000 stories, 200 ms latency, 10% faults of every kind, kill -9 mid-run, rerun: every story
    exactly once, and the rerun sends no text the first run had already translated."""
    stories = make_stories(2000)
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    write_json(src / "data00.json", stories[:1200])
    write_jsonl(src / "data01.jsonl", stories[1200:])
    ids = [f"data00:{i}" for i in range(1200)] + [f"data01:{i}" for i in range(800)]
    english = dict(zip(ids, stories, strict=True))
    flags = ["--endpoint", None, "--workers", 64, "--rate", 0, "--timeout", 1]
    with Standin(latency=0.2, fault_rate=0.1, faults=GOOGLE_FAULTS, hang=1.5) as standin:
        flags[1] = standin.url + "/m"
        first = llama2zh(src, dest, *flags)
        deadline = time.monotonic() + 60
        while len(journaled(dest)) < 600 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be killed"
        first.send_signal(signal.SIGKILL)
        first.communicate()
        standin.settle()  # requests the killed run had sent are answered before the rerun starts

        done = journaled(dest)
        with sqlite3.connect(dest / "translate/cache.google.sqlite") as db:
            cached = {key for (key,) in db.execute("SELECT sha256 FROM chunks")}
        first_requests = len(standin.log)
        second = llama2zh(src, dest, *flags)
        stdout, stderr = second.communicate(timeout=120)
        rerun = standin.log[first_requests:]

    assert second.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    assert 600 <= len(done) < 2000 and f"{len(done)} done before" in stdout
    # every story exactly once, in the input's order, translated, its newlines intact
    stories_out = outputs(dest)
    assert [r["id"] for r in stories_out] == ids
    assert all(r["story_en"] == english[r["id"]] and r["story"] == expected(r["story_en"]) for r in stories_out)
    assert sorted(journaled(dest)) == sorted(ids)  # no story journaled twice, across the kill
    # the rerun re-translated nothing: no text of a journaled story, nothing already cached
    sent = set(asked(rerun))
    assert not sent & set().union(*(chunks(english[i]) for i in done))
    assert not {hashlib.sha256(text.encode()).hexdigest() for text in sent} & cached
    assert max(Counter(asked(rerun, "ok")).values()) == 1  # nor a chunk twice
    served = Counter(entry.served for entry in standin.log)
    assert set(served) == {"ok", *GOOGLE_FAULTS}, served
    assert 0.07 < 1 - served["ok"] / len(standin.log) < 0.13
    print(f"\nfault test: {len(standin.log)} requests ({first_requests} before the kill at {len(done)} stories "
          f"journaled, {len(rerun)} in the rerun); faults {dict(served)}; {stdout.splitlines()[1]}")


def test_chunks_rejoin_exactly_and_stay_under_the_limit():
    rng = random.Random(1)
    words = ["Tom", "ran.", "Why?", '"Yes!"', "a", "...", "-", "supercalifragilistic" * 4, "42"]
    for _ in range(300):
        lines = [" ".join(rng.choices(words, k=rng.randint(0, 120))) for _ in range(rng.randint(1, 5))]
        story = "".join(line + rng.choice(("\n", "\n\n", "  \n", "\r\n", "")) for line in lines)
        pieces = split_story(story, 60)
        assert "".join(text for text, _ in pieces) == story
        for text, translate in pieces:
            if translate:
                assert len(text) <= 60 and "\n" not in text and any(ch.isalpha() for ch in text)
    assert split_story("One. Two three.\n\n  Four!  ", 7) == [  # sentences, then words
        ("One. ", True), ("Two ", True), ("three.", True), ("\n", False), ("\n", False), ("  ", False),
        ("Four!", True), ("  ", False)]


def test_newlines_survive_translation_and_requests_stay_small(tmp_path):
    long_line = " ".join(f"Sentence number {i} is here." for i in range(150))  # about 4,000 characters
    story = f"  Tom ran.\n\n{long_line}\n...\nThe end.  \n"
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src/data00.jsonl", [story])
    with Standin() as standin:
        report, sent = run(tmp_path / "src", tmp_path / "dest", standin)
    out = outputs(tmp_path / "dest")[0]["story"]
    assert out == expected(story)
    assert [len(line) > 0 for line in out.split("\n")] == [len(line) > 0 for line in story.split("\n")]
    assert out.startswith("  ") and out.endswith("  \n") and "\n...\n" in out
    units = [text.strip() for text, translate in split_story(story, 1000) if translate]
    assert max(len(e.text) for e in sent) <= 1000 and len(sent) == len(pack(units, 1000)) < len(units)
    assert sorted(asked(sent)) == sorted(chunks(story))


def test_an_answer_that_loses_lines_is_asked_again_line_by_line(tmp_path):
    stories = make_stories(5)
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src/data00.jsonl", stories)
    with Standin(newlines=False) as standin:
        report, sent = run(tmp_path / "src", tmp_path / "dest", standin)
    assert [r["story"] for r in outputs(tmp_path / "dest")] == [expected(s) for s in stories]
    assert report.unpacked > 0 and all("\n" not in e.text for e in sent[-3:])


def test_rejects_are_kept_apart_and_retried(tmp_path, capsys):
    stories = make_stories(6)
    stories[2] = ("Zorblax and Quibble went to the big park with their mom and dad, "  # names the service keeps
                  "and they played in the sun all day long.")
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    write_json(src / "data00.json", stories)
    with Standin(keep=frozenset({"zorblax", "quibble", "fnord"})) as standin:
        report, _ = run(src, dest, standin)
        assert report.rejected == 1 and report.translated == 5
        [reject] = read_journal(dest / "translate/rejects.jsonl")
        assert reject["id"] == "data00:2" and "Latin words left" in reject["reason"]
        assert [r["id"] for r in outputs(dest)] == [f"data00:{i}" for i in (0, 1, 3, 4, 5)]
        report, sent = run(src, dest, standin)  # a reject is done: a rerun leaves it alone
        assert sent == [] and report.rejected_before == 1
        standin.keep = frozenset()  # the service got better
        report, sent = run(src, dest, standin, retry_rejects=True)  # its chunks were cached: asked again
    assert report.translated == 1 and len(sent) == 1 and sent[0].text == stories[2]
    assert read_journal(dest / "translate/rejects.jsonl") == []
    assert [r["id"] for r in outputs(dest)] == [f"data00:{i}" for i in range(6)]
    assert "--retry-rejects" not in "\n".join(report.lines())


def test_shards_partition_the_stories_by_id(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    write_json(src / "data00.json", make_stories(40))
    write_jsonl(src / "data01.jsonl", make_stories(30, seed=1))
    parts = []
    with Standin() as standin:
        for i in (1, 2, 3):
            run(src, dest, standin, part=(i, 3))
            parts.append([r["id"] for r in outputs(dest, f"data*.{i}of3.json")])
    assert sorted(sum(parts, [])) == sorted([f"data00:{i}" for i in range(40)] + [f"data01:{i}" for i in range(30)])
    assert all(10 < len(part) < 40 for part in parts)
    assert not (dest / "data00.json").exists() and (dest / "translate/data01.2of3.journal.jsonl").exists()


def test_limit_takes_the_first_stories_and_reruns_agree(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    write_json(src / "data00.json", make_stories(5))
    write_json(src / "data01.json", make_stories(5, seed=1))
    with Standin() as standin:
        run(src, dest, standin, limit=7)
        assert [r["id"] for r in outputs(dest)] == [f"data00:{i}" for i in range(5)] + ["data01:0", "data01:1"]
        report, sent = run(src, dest, standin, limit=7)
        assert sent == [] and report.done_before == 7 and report.written == []
        run(src, dest, standin)
    assert len(outputs(dest)) == 10


def test_cache_hits_are_reported_and_persist(tmp_path, capsys):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    stories = make_stories(100)
    write_json(src / "data00.json", stories)
    with Standin() as standin:
        assert main(["translate", str(src), str(dest), "--endpoint", standin.url + "/m", "--rate", "0"]) == 0
        first = len(standin.log)
        for path in [*dest.glob("*.json"), *(dest / "translate").glob("*.journal.jsonl")]:
            path.unlink()
        report, sent = run(src, dest, standin)
    lookups, distinct = sum(len(chunks(s)) for s in stories), set().union(*map(chunks, stories))
    assert Counter(asked(standin.log[:first])) == Counter(distinct)  # each distinct paragraph asked once
    assert f"cache: {lookups - len(distinct)}/{lookups} chunks were hits" in capsys.readouterr().out
    assert sent == [] and report.cache_hits == report.cache_lookups == lookups  # the next run: all hits


def test_mymemory_backend_and_none_results(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    write_jsonl(src / "data00.jsonl", make_stories(30))
    # no "timeout" fault (its hang against the client timeout depends on load); seed 4 serves each kind asserted
    faults = tuple(f for f in MYMEMORY_FAULTS if f != "timeout")
    with Standin(fault_rate=0.3, faults=faults, seed=4) as standin:
        report, sent = run(src, dest, standin, path="/get", backend="mymemory")
    assert report.translated == 30 and report.retries["no translation (None or empty)"] > 0
    assert {e.served for e in sent} >= {"none", "garbage", "unchanged"}
    assert len(outputs(dest)) == 30


def test_timeout_retries_and_circuit_breaker():
    """Each request has the client's timeout; a service that stays down pauses every thread."""
    with Standin(fault_rate=1.0, faults=("timeout",), hang=1.0) as standin:
        client = Client("google", standin.url + "/m", timeout=0.2, rate=0, retry=Retry(attempts=2, base=0.01))
        start = time.monotonic()
        with pytest.raises(TransientError, match="2 attempts failed, the last with: timeout"):
            client.translate("Hello there.")
        assert time.monotonic() - start < 0.8
    with Standin(outage=6) as standin:
        breaker = CircuitBreaker(threshold=3, cooldown=0.5, log=lambda message: None)
        client = Client("google", standin.url + "/m", rate=0, retry=Retry(attempts=10, base=0.01), breaker=breaker)
        assert client.translate("Hello there.") == chinese("Hello there.")
        times = [e.time for e in standin.log]
    assert breaker.trips == 2 and len(times) == 7
    assert times[3] - times[2] >= 0.5 and times[6] - times[5] >= 0.5 and times[2] - times[0] < 0.3


def test_rate_limit_spaces_requests():
    with Standin() as standin:
        client = Client("google", standin.url + "/m", rate=20)
        threads = [threading.Thread(target=client.translate, args=(f"Story {i} here.",)) for i in range(10)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert time.monotonic() - start >= 9 / 20 and client.requests == 10


def test_journal_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path) as journal:
        journal.append([{"id": "a"}, {"id": "b"}])
    with open(path, "ab") as f:
        f.write(b'{"id": "c", "sto')  # kill -9 in the middle of a write
    assert [r["id"] for r in read_journal(path)] == ["a", "b"]
    with Journal(path) as journal:
        journal.append([{"id": "d"}])
    assert [r["id"] for r in read_journal(path)] == ["a", "b", "d"]


def test_refusal_stops_the_run(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src/data00.jsonl", make_stories(3))
    with Standin() as standin:
        status = main(["translate", str(tmp_path / "src"), str(tmp_path / "dest"), "--endpoint", standin.url + "/x"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 1 and "HTTP 404" in err and "--endpoint" in err


@pytest.mark.parametrize("args, status, message", [
    (["missing", "out"], 1, "no such dataset directory"),
    (["SRC", "out", "--shard", "0/3"], 2, "1 <= i <= n"),
    (["SRC", "out", "--shard", "4/3"], 2, "1 <= i <= n"),
    (["SRC", "out", "--shard", "half"], 2, "is not i/n"),
    (["SRC", "out", "--backend", "babel"], 2, "invalid choice: 'babel'"),
    (["SRC", "out", "--workers", "0"], 2, "must be positive"),
    (["SRC", "SRC/out"], 1, "DEST must be outside SRC"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, status, message):
    (tmp_path / "SRC").mkdir()
    write_jsonl(tmp_path / "SRC/data00.jsonl", ["Tom ran."])
    args = [str(tmp_path / a) if a in ("SRC", "missing", "SRC/out") else a for a in args]
    try:
        code = main(["translate", *args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == status and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_names_every_backend():
    assert TRANSLATE_BACKENDS == tuple(BACKENDS)
