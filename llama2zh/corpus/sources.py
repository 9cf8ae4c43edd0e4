"""Records from local files, streamed through Hugging Face `datasets`, in an order a run can resume.

- .jsonl, .json: one record per line, or one JSON array of records (datasets' "json" builder)
- .parquet, .csv: one record per row
- .txt: one document per line, {"text": line}; blank lines are skipped (SentencePiece's input
  convention, and that of llama2zh.vocab.corpus): a corpus with paragraphs over several lines
  belongs in .jsonl

A folder stands for the files with those suffixes under it, in sorted order. datasets gives every
record of a file the same columns: a field a record lacks comes as None. A record whose text field
is missing or not a string stops the stream with a UserError naming the file and the record,
rather than being skipped: a wrong --text-field would otherwise silently read nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llama2zh.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass(frozen=True)
class Record:
    file: Path
    index: int  # the record's row in its file, from 0 (a .txt file's line, blank ones counted)
    data: dict  # the record as datasets gives it
    field: str  # the name of its text field

    @property
    def text(self) -> str:
        return self.data[self.field]


def source_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files to read, in the order given (a folder's in sorted order), each once."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file())
            if not found:
                raise UserError(f"{path}: no {', '.join(BUILDERS)} files in this folder")
            files.extend(found)
        elif not path.is_file():
            raise UserError(f"{path}: no such file or folder")
        elif path.suffix not in BUILDERS:
            raise UserError(f"{path}: unknown format (expected {', '.join(BUILDERS)} or a folder)")
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def describe(file: Path) -> dict:
    """What identifies a source file's content for a resumed run: a rerun on changed inputs must start over."""
    return {"file": str(file), "size": file.stat().st_size}


def read_records(files: list[Path], text_field: str = "text", start: tuple[int, int] = (0, 0)) -> Iterator[Record]:
    """The records of `files` (from source_files) in order, from record start[1] of files[start[0]] on.

    The text field of a .txt record is always "text"; text_field names it in the other formats."""
    first_file, first_index = start
    for number in range(first_file, len(files)):
        file = files[number]
        builder = BUILDERS[file.suffix]
        field = "text" if builder == "text" else text_field
        skip = first_index if number == first_file else 0
        for index, data in enumerate(_rows(file, builder, skip), skip):
            text = data.get(field)
            if builder == "text" and not text.strip():
                continue
            if not isinstance(text, str):
                found = ("no such field" if field not in data else "null" if text is None
                         else f"a value of type {type(text).__name__}")
                raise UserError(f"{file}: record {index} has no text in field {field!r} ({found}; "
                                f"fields: {', '.join(data)}); see --text-field")
            yield Record(file, index, data, field)


def _rows(file: Path, builder: str, skip: int) -> Iterator[dict]:
    """The rows of one file after the first `skip`; a file datasets cannot parse is a UserError."""
    import datasets  # slow to import: only when reading

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors come back as our one line
    try:
        rows = datasets.load_dataset(builder, data_files=[str(file)], split="train", streaming=True).skip(skip)
        yield from rows
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as e:
        cause = e.__cause__ or e
        raise UserError(f"{file}: not readable as {builder} ({str(cause).splitlines()[0] if str(cause) else cause!r})"
                        ) from None
