"""Corpus files through `datasets`: every local format, folders, a hub dataset (the stand-in, by
repo id through HF_ENDPOINT, and offline from the hub cache), the order a run resumes in, bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from llama2zh.corpus.sources import read_records, source_files
from llama2zh.errors import UserError
from tests.conftest import ROOT
from tests.hub_standin import COMMIT, HubStandin

ROWS = [{"content": "第一篇文章。", "id": 1}, {"content": "第二篇，\n有两行。", "id": 2}, {"content": "third", "id": 3}]


def write(path, kind):
    path.write_bytes(content(kind))
    return path


def content(kind) -> bytes:
    """ROWS as a file of this kind."""
    if kind == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS).encode()
    if kind == "json":
        return json.dumps(ROWS, ensure_ascii=False).encode()
    buffer = io.BytesIO()
    if kind == "parquet":
        pd.DataFrame(ROWS).to_parquet(buffer)
    else:
        pd.DataFrame(ROWS).to_csv(buffer, index=False)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_each_structured_format_gives_its_records_with_their_place(tmp_path, kind):
    path = write(tmp_path / f"docs.{kind}", kind)
    records = list(read_records(source_files([path]), text_field="content"))
    assert [r.data for r in records] == ROWS
    assert [(r.file, r.index, r.field, r.text) for r in records] == [
        (path, i, "content", row["content"]) for i, row in enumerate(ROWS)]


def test_txt_is_a_document_per_line_and_skips_blank_lines(tmp_path):
    path = tmp_path / "novel.txt"
    path.write_text("第一行。\n\n  \n第二行。\r\nthird line\n", encoding="utf-8")
    records = list(read_records([path], text_field="ignored for txt"))
    assert [(r.index, r.data) for r in records] == [(0, {"text": "第一行。"}), (3, {"text": "第二行。"}),
                                                    (4, {"text": "third line"})]


def test_a_folder_reads_its_files_sorted_and_resumes_from_a_position(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    write(folder / "b" / "x.parquet", "parquet")
    write(folder / "a.jsonl", "jsonl")
    (folder / "c.txt").write_text("one\ntwo\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a corpus file")
    files = source_files([folder, folder / "a.jsonl"])  # a file named twice is read once
    assert files == [folder / "a.jsonl", folder / "b" / "x.parquet", folder / "c.txt"]
    everything = [(r.file, r.index) for r in read_records(files, "content")]
    assert len(everything) == 8
    for position in range(len(everything)):
        file, index = everything[position]
        rest = [(r.file, r.index) for r in read_records(files, "content", start=(files.index(file), index))]
        assert rest == everything[position:]


@pytest.mark.parametrize("content, message", [
    ('{"content": "x"}\n', "record 0 has no text in field 'text' (no such field; fields: content)"),
    ('{"text": "x"}\n{"other": 1}\n', "record 1 has no text in field 'text' (null;"),
    ('{"text": "x"}\n{"text": 5}\n', "record 1 has no text in field 'text' (a value of type int;"),
    ('{"text": "x"}\nnot json\n', "not readable as json"),
])
def test_a_bad_record_is_a_user_error_naming_file_and_record(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match="bad.jsonl: ") as error:
        list(read_records([path]))
    assert message in str(error.value)


def test_missing_and_unknown_paths_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "doc.pdf").write_bytes(b"%PDF")
    for path, message in ((tmp_path / "nope.jsonl", "no such file or folder"), (tmp_path / "empty", "no .jsonl"),
                          (tmp_path / "doc.pdf", "unknown format"),
                          ("missing/part.jsonl", "no such file or folder")):  # a file's name, not a hub id
        with pytest.raises(UserError, match=message):
            source_files([path])


# ---- a dataset on the hub: the stand-in, through HF_ENDPOINT, and offline from the hub cache ----

# the repo: every format, in folders, beside files that are not data
REPO = {"data/a.jsonl": content("jsonl"), "data/b.parquet": content("parquet"), "data/sub/c.csv": content("csv"),
        "d.json": content("json"), "e.txt": b"one\n\ntwo\n", "README.md": b"# a dataset card\n",
        ".gitattributes": b"*.parquet filter=lfs\n"}

# what a command reading a SOURCE does, in a process of its own (HF_ENDPOINT is read at import):
# the files' descriptions and records from a position on, as JSON; a UserError as its one line
READ = """
import json, sys
from llama2zh.corpus.sources import describe, read_records, source_files
from llama2zh.errors import UserError
try:
    files = source_files(sys.argv[2:])
    records = [[str(r.file), r.index, r.data] for r in read_records(files, "content", tuple(json.loads(sys.argv[1])))]
except UserError as e:
    sys.exit(f"llama2zh: {e}")
print(json.dumps({"files": [describe(f) for f in files], "records": records}, ensure_ascii=False))
"""


def read_sources(*sources, env, start=(0, 0)):
    result = subprocess.run([sys.executable, "-c", READ, json.dumps(start), *sources], capture_output=True, text=True,
                            env=dict(env, PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1"), timeout=300)
    return result, json.loads(result.stdout) if result.returncode == 0 else None


def online(hub, tmp_path) -> dict:
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    return env


def local_records(repo_copy, folder=".", start=(0, 0)) -> list:
    """The records of the repo's files (of a folder of it) written locally, as [path in the repo, index, data]."""
    files = source_files([repo_copy / folder])
    return [[r.file.relative_to(repo_copy).as_posix(), r.index, r.data] for r in read_records(files, "content", start)]


def in_repo(records) -> list:
    prefix = f"hf://datasets/owner/corpus@{COMMIT}/"
    assert all(file.startswith(prefix) for file, _, _ in records)
    return [[file[len(prefix):], index, data] for file, index, data in records]


@pytest.fixture
def repo_copy(tmp_path):
    """The repo's files in a local folder."""
    for name, data in REPO.items():
        (tmp_path / "local" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "local" / name).write_bytes(data)
    return tmp_path / "local"


def test_a_hub_dataset_by_repo_id_reads_as_its_files_do_locally(tmp_path, repo_copy):
    with HubStandin({f"datasets/owner/corpus/{name}": data for name, data in REPO.items()}) as hub:
        result, read = read_sources("owner/corpus", env=online(hub, tmp_path))
        assert result.returncode == 0, result.stderr
        assert in_repo(read["records"]) == local_records(repo_copy)
        assert [f["path"] for f in read["files"]] == ["d.json", "data/a.jsonl", "data/b.parquet", "data/sub/c.csv",
                                                      "e.txt"]  # sorted; README.md and .gitattributes are not data
        assert read["files"][2] == {"repo": "owner/corpus", "revision": COMMIT, "path": "data/b.parquet",
                                    "size": len(REPO["data/b.parquet"])}
        # a pattern picks files (a folder, a glob), and a position resumes inside them
        result, read = read_sources("hf://datasets/owner/corpus/data", env=online(hub, tmp_path), start=(1, 1))
        assert result.returncode == 0, result.stderr
        assert in_repo(read["records"]) == local_records(repo_copy, "data", start=(1, 1))
        assert [r[0] for r in in_repo(read["records"])] == ["data/b.parquet"] * 2 + ["data/sub/c.csv"] * 3
        result, read = read_sources(f"hf://datasets/owner/corpus@{COMMIT}/*.parquet", env=online(hub, tmp_path))
        assert [f["path"] for f in read["files"]] == ["data/b.parquet"]
        # streamed: the data files were read in ranges, and nothing else was fetched
        fetched = {path.split(f"/resolve/{COMMIT}/")[1] for method, path, _ in hub.requests if "/resolve/" in path}
        assert fetched == {"d.json", "data/a.jsonl", "data/b.parquet", "data/sub/c.csv", "e.txt"}


def test_offline_a_hub_dataset_reads_from_the_hub_cache_or_says_it_is_not_there(tmp_path, repo_copy):
    download = "import huggingface_hub; huggingface_hub.snapshot_download('owner/corpus', repo_type='dataset')"
    with HubStandin({f"datasets/owner/corpus/{name}": data for name, data in REPO.items()}) as hub:
        env = online(hub, tmp_path)
        result = subprocess.run([sys.executable, "-c", download], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        _, streamed = read_sources("owner/corpus", env=env)
    offline = dict(env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # the stand-in is gone too
    result, read = read_sources("owner/corpus", env=offline)
    assert result.returncode == 0, result.stderr
    assert read == streamed  # the same files (commit, paths, sizes) and records as online
    assert in_repo(read["records"]) == local_records(repo_copy)
    result, _ = read_sources("owner/other", env=offline)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("llama2zh: owner/other: no such file or folder, and cannot list it as a hub "
                                    "dataset from offline mode (HF_HUB_OFFLINE)")
    assert "hf download owner/other --repo-type dataset" in result.stderr


def test_a_missing_hub_dataset_or_one_without_data_is_one_line(tmp_path):
    with HubStandin({"datasets/owner/cards/README.md": b"# only a card\n"}) as hub:
        for source, message in (("owner/absent", f"owner/absent: no such file or folder, and cannot list it as a "
                                                 f"hub dataset from {hub.url}: "),
                                ("owner/cards", "owner/cards: no .jsonl, .json, .parquet, .csv, .txt files in this "
                                                "hub dataset"),
                                ("hf://datasets/owner/cards/data/*.csv", "matching 'data/*.csv'")):
            result, _ = read_sources(source, env=online(hub, tmp_path))
            assert result.returncode == 1 and result.stderr.count("\n") == 1 and message in result.stderr, \
                result.stderr
