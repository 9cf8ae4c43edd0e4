"""`llama2zh download` against a local stand-in for the hub (HF_ENDPOINT) and with --from: the
datasets, tokenizers, and the corpora of the registry (served under their real repo ids)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from llama2zh.corpus.conversations import ReadReport
from llama2zh.corpus.preferences import read_preferences
from llama2zh.corpus.registry import CORPORA
from tests.conftest import ROOT, shared_file
from tests.hub_standin import COMMIT, HubStandin
from tests.test_cli import llama2zh

TS_KEY = "datasets/roneneldan/TinyStories/TinyStories_all_data.tar.gz"


def make_archive(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def shard(n: int, offset: int = 0) -> bytes:
    return json.dumps([{"story": f"Once upon a time there was story {offset + i}."} for i in range(n)]).encode()


TS_ARCHIVE = make_archive({"data00.json": shard(300), "data01.json": shard(300, 300)})


def hub_env(hub: HubStandin, **extra) -> dict:
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", **extra)
    env.pop("HF_HUB_OFFLINE", None)
    return env


def run(*args, env, cwd):
    env = dict(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "llama2zh", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_tinystories_through_hf_endpoint_resumes_and_is_not_fetched_twice(tmp_path):
    with HubStandin({TS_KEY: TS_ARCHIVE}, cut_after=len(TS_ARCHIVE) // 3) as hub:
        first = run("download", "tinystories", "--dest", tmp_path / "data", env=hub_env(hub), cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith(".tar.gz")]
        assert len(gets) >= 2  # the dropped connection was followed by another request
        target = tmp_path / "data" / "tinystories"
        assert json.loads((target / "data01.json").read_text())[0]["story"].endswith("story 300.")
        count = len(hub.requests)
        again = run("download", "tinystories", "--dest", tmp_path / "data", env=hub_env(hub), cwd=tmp_path)
        assert again.returncode == 0 and "already downloaded" in again.stdout
        assert len(hub.requests) == count


def test_from_archive_and_from_folder(tmp_path):
    archive = tmp_path / "ts.tar.gz"
    archive.write_bytes(TS_ARCHIVE)
    offline = dict(os.environ, HF_HUB_OFFLINE="1")
    result = run("download", "tinystories", "--dest", tmp_path / "a", "--from", archive, env=offline, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run("download", "tinystories", "--dest", tmp_path / "b", "--from", tmp_path / "a" / "tinystories",
                 env=offline, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("data00.json", "data01.json"):
        assert (tmp_path / "b/tinystories" / name).read_bytes() == (tmp_path / "a/tinystories" / name).read_bytes()


def test_offline_says_what_could_not_be_reached_and_how_to_use_from(tmp_path):
    offline = dict(os.environ, HF_HUB_OFFLINE="1")
    result = run("download", "tinystories-zh", "--dest", tmp_path, env=offline, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "--from" in result.stderr and "52AI/TinyStoriesZh" in result.stderr


def test_unreachable_endpoint_is_one_line(tmp_path):
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    env.pop("HF_HUB_OFFLINE", None)
    result = run("download", "tinystories", "--dest", tmp_path, env=env, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "127.0.0.1:9" in result.stderr


@pytest.mark.parametrize("members, links", [
    ({"../evil.json": b"[]"}, None),
    ({"/tmp/evil.json": b"[]"}, None),
    ({"data00.json": b"[]"}, {"link.json": "/etc/passwd"}),
])
def test_archives_that_escape_the_destination_are_refused(tmp_path, members, links):
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(make_archive(members, links))
    result = run("download", "tinystories", "--dest", tmp_path / "data", "--from", archive, env=os.environ,
                 cwd=tmp_path)
    assert result.returncode == 1 and "refusing the archive" in result.stderr
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "data" / "tinystories").exists()


def test_tokenizer_is_checked_against_the_registry_sha256(tmp_path):
    model = shared_file("tokenizers/llama2en/tokenizer.model").read_bytes()
    with HubStandin({"hf-internal-testing/llama-tokenizer/tokenizer.model": model}) as hub:
        result = run("download", "tokenizer", "llama2en", "--dest", tmp_path / "tok", env=hub_env(hub), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "tok/llama2en/tokenizer.model").read_bytes() == model
        assert (tmp_path / "tok/llama2en/tokenizer.bin").exists()
    with HubStandin({"hf-internal-testing/llama-tokenizer/tokenizer.model": model[:-1] + b"x"}) as hub:
        result = run("download", "tokenizer", "llama2en", "--dest", tmp_path / "bad", env=hub_env(hub), cwd=tmp_path)
        assert result.returncode == 1 and "differs from the expected" in result.stderr


@pytest.mark.parametrize("args, status, message", [
    (["download", "tokenizer"], 2, "needs a NAME"),
    (["download", "tokenizer", "nosuch"], 1, "unknown tokenizer 'nosuch'; known: llama2en"),
    (["download", "sample", "extra"], 2, "takes no NAME"),
    (["download", "tinystories", "--from", "/nonexistent.tar.gz"], 1, "no such file"),
    (["download", "corpus"], 2, "download corpus needs a NAME"),
    (["download", "corpus", "nosuch"], 1, "unknown corpus 'nosuch'; known: wikipedia-cn, baidubaike, "),
    (["download", "corpus", "wikipedia-cn", "--limit", "0"], 1, "--limit must be at least 1"),
    (["download", "tinystories", "--limit", "3"], 2, "--limit applies to download corpus only"),
    (["download", "sample", "--list"], 2, "--list applies to download model and download corpus only"),
])
def test_download_usage_errors(tmp_path, args, status, message):
    result = llama2zh(*args, cwd=tmp_path)
    assert result.returncode == status and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


# ---- download corpus: the registry's entries, served by the stand-in under their real repo ids ----

WIKI = "datasets/pleisto/wikipedia-cn-20230720-filtered/"
ARTICLES = [{"completion": f"第{i}篇文章的正文。", "source": "wikipedia.zh2307"} for i in range(6)]
DPO = "datasets/hiyouga/DPO-En-Zh-20k/"


def dpo_pairs(lang: str, n: int) -> bytes:
    return json.dumps([{"conversations": [{"from": "human", "value": f"{lang} question {i}"}],
                        "chosen": {"from": "gpt", "value": f"a good answer {i}"},
                        "rejected": {"from": "gpt", "value": f"a bad answer {i}"}} for i in range(n)]).encode()


DPO_FILES = {DPO + "dpo_en.json": dpo_pairs("en", 5), DPO + "dpo_zh.json": dpo_pairs("zh", 4),
             DPO + "README.md": b"# card\n"}


def corpus_env(hub, tmp_path) -> dict:
    return hub_env(hub, HF_HOME=str(tmp_path / "hf"))


def test_download_corpus_writes_text_records_up_to_the_limit_once(tmp_path):
    records = [*ARTICLES[:2], {"completion": "  ", "source": "empty"}, *ARTICLES[2:]]
    with HubStandin({WIKI + "wikipedia-cn-20230720-filtered.json": json.dumps(records).encode(),
                     WIKI + "README.md": b"# card\n"}) as hub:
        args = ("download", "corpus", "wikipedia-cn", "--dest", tmp_path / "data", "--limit", 4)
        result = run(*args, env=corpus_env(hub, tmp_path), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        target = tmp_path / "data" / "wikipedia-cn"
        assert "4 records in 1 shards" in result.stdout and "1 without text skipped" in result.stdout
        written = [json.loads(line) for line in (target / "part-00000.jsonl").read_text(encoding="utf-8").splitlines()]
        assert written == [{"text": a["completion"]} for a in ARTICLES[:4]]
        complete = json.loads((target / ".complete").read_text())
        assert (complete["records"], complete["limit"], complete["revision"]) == (4, 4, COMMIT)
        count = len(hub.requests)
        again = run(*args, env=corpus_env(hub, tmp_path), cwd=tmp_path)
        assert again.returncode == 0 and "already downloaded" in again.stdout and len(hub.requests) == count
        other = run(*args[:-1], 5, env=corpus_env(hub, tmp_path), cwd=tmp_path)
        assert other.returncode == 1 and other.stderr.count("\n") == 1 and "already downloaded with --limit 4" in \
            other.stderr


def test_download_corpus_interrupted_resumes_to_the_same_bytes_without_rereading(tmp_path):
    args = ("download", "corpus", "dpo-en-zh-20k", "--dest")
    with HubStandin(DPO_FILES) as hub:
        whole = run(*args, tmp_path / "whole", env=corpus_env(hub, tmp_path), cwd=tmp_path)
        assert whole.returncode == 0, whole.stderr
    # the second file cannot be read (a mirror that lost it): the run stops after the first file's shard
    with HubStandin(DPO_FILES, unreadable={DPO + "dpo_zh.json"}) as hub:
        cut = run(*args, tmp_path / "cut", env=corpus_env(hub, tmp_path), cwd=tmp_path)
        assert cut.returncode == 1 and cut.stderr.count("\n") == 1 and "cannot read" in cut.stderr
        assert "dpo_zh.json" in cut.stderr and "404" in cut.stderr
        target = tmp_path / "cut" / "dpo-en-zh-20k"
        assert sorted(p.name for p in target.glob("part-*")) == ["part-00000.jsonl"]
        assert not (target / ".complete").exists()
        hub.unreadable.clear()
        first = len(hub.requests)
        resumed = run(*args, tmp_path / "cut", env=corpus_env(hub, tmp_path), cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert not [r for r in hub.requests[first:] if r[1].endswith("dpo_en.json")]  # done before: not read again
    names = sorted(p.name for p in (tmp_path / "whole" / "dpo-en-zh-20k").iterdir())
    assert names == [".complete", ".journal", "part-00000.jsonl", "part-00001.jsonl"]
    for name in names:
        assert (target / name).read_bytes() == (tmp_path / "whole" / "dpo-en-zh-20k" / name).read_bytes()
    report = ReadReport()  # the pairs in a form preferences.py reads
    pairs = [pair for part in sorted(target.glob("part-*")) for pair in read_preferences(part, report, strict=True)]
    assert len(pairs) == 9 and report.skipped == 0
    assert pairs[5].prompt == [{"role": "user", "content": "zh question 0"}]
    assert (pairs[5].chosen, pairs[5].rejected) == ("a good answer 0", "a bad answer 0")


def test_download_corpus_stopped_by_ctrl_c_resumes_to_the_same_bytes(tmp_path):
    with HubStandin(DPO_FILES) as hub:
        assert run("download", "corpus", "dpo-en-zh-20k", "--dest", tmp_path / "whole", env=corpus_env(hub, tmp_path),
                   cwd=tmp_path).returncode == 0
    target = tmp_path / "cut" / "dpo-en-zh-20k"
    with HubStandin(DPO_FILES, held={DPO + "dpo_zh.json"}) as hub:  # the second file's read waits
        command = [sys.executable, "-m", "llama2zh", "download", "corpus", "dpo-en-zh-20k", "--dest", tmp_path / "cut"]
        # SIGINT as a terminal delivers it, even where this test runs with SIGINT ignored (a background job of
        # a shell without job control: the child would inherit that and never see the Ctrl-C)
        process = subprocess.Popen(command, cwd=tmp_path, env=dict(corpus_env(hub, tmp_path), PYTHONPATH=str(ROOT)),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while not (target / "part-00000.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 130 and stderr.endswith("llama2zh: interrupted\n")
        assert sorted(p.name for p in target.glob("part-*")) == ["part-00000.jsonl"]
        hub.held.clear()
        hub.release.set()
        resumed = run(*command[3:], env=corpus_env(hub, tmp_path), cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
    for path in (tmp_path / "whole" / "dpo-en-zh-20k").iterdir():
        assert (target / path.name).read_bytes() == path.read_bytes()


def test_download_corpus_builds_text_from_several_fields_and_names_a_record_that_does_not_fit(tmp_path):
    baike = [{"title": "长城", "summary": "中国古代的军事防御工程。",
              "sections": [{"title": "历史", "content": "始建于春秋战国时期。"}, {"title": "", "content": "  "}]},
             {"title": "黄河", "summary": "", "sections": []}]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in baike).encode()
    files = {"datasets/xuqinyang/BaiduBaike-5.63M/563w_baidubaike.json": lines,
             "datasets/jingyaogong/minimind_dataset/pretrain_hq.jsonl": b'{"content": "not the field it reads"}\n'}
    with HubStandin(files) as hub:
        result = run("download", "corpus", "baidubaike", "--dest", tmp_path, env=corpus_env(hub, tmp_path),
                     cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        written = (tmp_path / "baidubaike" / "part-00000.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["text"] for line in written] == [
            "长城\n\n中国古代的军事防御工程。\n\n历史\n\n始建于春秋战国时期。", "黄河"]
        wrong = run("download", "corpus", "minimind-pretrain", "--dest", tmp_path, env=corpus_env(hub, tmp_path),
                    cwd=tmp_path)
        assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1
        assert "pretrain_hq.jsonl: record 0 does not have the fields the registry expects" in wrong.stderr
        assert "fields: content" in wrong.stderr


def test_download_corpus_list_and_usage(tmp_path):
    listed = llama2zh("download", "corpus", "--list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "KIND", "LANG", "SIZE", "REPO", "FILES", "LICENSE"]
    assert [row.split()[0] for row in rows] == list(CORPORA)
    assert all(c.repo in row and c.kind in row for c, row in zip(CORPORA.values(), rows, strict=True))
    assert {c.kind for c in CORPORA.values()} == {"pretrain", "sft", "dpo"}
