"""`llama2zh download` against a local stand-in for the hub (HF_ENDPOINT) and with --from."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from tests.conftest import shared_file
from tests.hub_standin import HubStandin
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
    import subprocess
    import sys

    from tests.conftest import ROOT

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
])
def test_download_usage_errors(tmp_path, args, status, message):
    result = llama2zh(*args, cwd=tmp_path)
    assert result.returncode == status and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
