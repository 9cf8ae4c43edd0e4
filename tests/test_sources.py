"""Local corpus files through `datasets`: every format, folders, the order a run resumes in, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from llama2zh.corpus.sources import read_records, source_files
from llama2zh.errors import UserError

ROWS = [{"content": "第一篇文章。", "id": 1}, {"content": "第二篇，\n有两行。", "id": 2}, {"content": "third", "id": 3}]


def write(path, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    elif kind == "parquet":
        pd.DataFrame(ROWS).to_parquet(path)
    elif kind == "csv":
        pd.DataFrame(ROWS).to_csv(path, index=False)
    return path


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
                          (tmp_path / "doc.pdf", "unknown format")):
        with pytest.raises(UserError, match=message):
            source_files([path])
