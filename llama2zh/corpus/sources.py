"""Records from local files or a hub dataset, streamed through Hugging Face `datasets`, in an order a
run can resume.

- .jsonl, .json: one record per line, or one JSON array of records (datasets' "json" builder)
- .parquet, .csv: one record per row
- .txt: one document per line, {"text": line}; blank lines are skipped (SentencePiece's input
  convention, and that of llama2zh.vocab.corpus): a corpus with paragraphs over several lines
  belongs in .jsonl

A folder stands for the files with those suffixes under it, in sorted order. So does a dataset on
the Hugging Face hub, named `owner/name` (when no such local path exists, and not a data file's
name) or `hf://datasets/owner/name[@revision][/pattern]` (pattern: a file, folder or glob in the
repo): its files are listed at one commit, through HF_ENDPOINT (a mirror), and streamed from
there; with HF_HUB_OFFLINE=1 they are read from the local hub cache, which `hf download owner/name
--repo-type dataset` fills.

datasets gives every record of a file the same columns: a field a record lacks comes as None. A
record whose text field is missing or not a string stops the stream with a UserError naming the
file and the record, rather than being skipped: a wrong --text-field would otherwise silently
read nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import quote

from llama2zh.corpus.download import hub_failure
from llama2zh.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
HUB_ID = r"\w[\w.-]*/\w[\w.-]*"
HUB_URL = re.compile(rf"hf:/+datasets/({HUB_ID})(?:@([^/]+))?(?:/(.+))?")  # one slash once it has been a Path


@dataclass(frozen=True)
class HubFile:
    """A data file of a hub dataset at one commit."""
    repo: str
    revision: str  # the commit the listing was made at
    path: str  # in the repo
    size: int
    local: Path | None = field(default=None, compare=False)  # the cached copy, offline

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.path).suffix

    @property
    def url(self) -> str:
        """Where datasets reads it: the cached copy, else the hub (HfFileSystem, through HF_ENDPOINT)."""
        if self.local:
            return str(self.local)
        return f"hf://datasets/{self.repo}@{quote(self.revision, safe='')}/{self.path}"

    def __str__(self) -> str:
        return f"hf://datasets/{self.repo}@{self.revision}/{self.path}"


@dataclass(frozen=True)
class Record:
    file: Path | HubFile
    index: int  # the record's row in its file, from 0 (a .txt file's line, blank ones counted)
    data: dict  # the record as datasets gives it
    field: str | None  # the name of its text field (None: records read whole)

    @property
    def text(self) -> str:
        return self.data[self.field]


def source_files(paths: Iterable[str | Path]) -> list[Path | HubFile]:
    """The files to read, in the order given (a folder's or a hub dataset's in sorted order), each once."""
    files = []
    for source in paths:
        path = Path(source)
        hub = _hub_source(str(source))
        if hub and not path.exists():
            files.extend(hub_files(*hub, source=str(source)))
        elif path.is_dir():
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


def _hub_source(source: str) -> tuple[str, str | None, str | None] | None:
    """(repo, revision, pattern) of a source that names a hub dataset: hf://datasets/..., or
    owner/name (not owner/file.jsonl: that is a local file's name, missing)."""
    if match := HUB_URL.fullmatch(source):
        return match.groups()
    if re.fullmatch(HUB_ID, source) and Path(source).suffix not in BUILDERS:
        return source, None, None
    return None


def hub_files(repo: str, revision: str | None, pattern: str | None, source: str) -> list[HubFile]:
    """The data files of a hub dataset (those matching pattern, a file, folder or glob), sorted by path."""
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        if constants.HF_HUB_OFFLINE:
            snapshot = Path(snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True))
            found = [(p.relative_to(snapshot).as_posix(), p) for p in snapshot.rglob("*") if p.is_file()]
            files = [HubFile(repo, snapshot.name, name, p.stat().st_size, p) for name, p in found]
        else:
            info = HfApi().dataset_info(repo, revision=revision, files_metadata=True)
            files = [HubFile(repo, info.sha, s.rfilename, s.size) for s in info.siblings]
    except Exception as e:  # the hub client raises many kinds (HTTP, offline, connection); one line says which
        raise hub_failure(f"{source}: no such file or folder, and cannot list it as a hub dataset", e,
                          f", or fill the hub cache with `hf download {repo} --repo-type dataset`") from None
    wanted = sorted((f for f in files if f.suffix in BUILDERS and _matches(f.path, pattern)), key=lambda f: f.path)
    if not wanted:
        matching = f" matching {pattern!r}" if pattern else ""
        raise UserError(f"{source}: no {', '.join(BUILDERS)} files{matching} in this hub dataset")
    return wanted


def _matches(path: str, pattern: str | None) -> bool:
    return not pattern or fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/")


def describe(file: Path | HubFile) -> dict:
    """What identifies a source file's content for a resumed run: a rerun on changed inputs must start over."""
    if isinstance(file, HubFile):
        return {"repo": file.repo, "revision": file.revision, "path": file.path, "size": file.size}
    return {"file": str(file), "size": file.stat().st_size}


def read_records(files: list[Path | HubFile], text_field: str | None = "text", start: tuple[int, int] = (0, 0)
                 ) -> Iterator[Record]:
    """The records of `files` (from source_files) in order, from record start[1] of files[start[0]] on.

    The text field of a .txt record is always "text"; text_field names it in the other formats, or
    is None for records read whole (conversations, preference pairs)."""
    first_file, first_index = start
    for number in range(first_file, len(files)):
        file = files[number]
        builder = BUILDERS[file.suffix]
        field = "text" if builder == "text" else text_field
        skip = first_index if number == first_file else 0
        for index, data in enumerate(_rows(file, builder, skip), skip):
            if field is None:
                yield Record(file, index, data, field)
                continue
            text = data.get(field)
            if builder == "text" and not text.strip():
                continue
            if not isinstance(text, str):
                found = ("no such field" if field not in data else "null" if text is None
                         else f"a value of type {type(text).__name__}")
                raise UserError(f"{file}: record {index} has no text in field {field!r} ({found}; "
                                f"fields: {', '.join(data)}); see --text-field")
            yield Record(file, index, data, field)


def _import_datasets():
    """datasets, imported without torch: we read plain records, and its torch formatters cost 170 MB a
    process. USE_TORCH is read once, at datasets' import, and put back after it (transformers reads it too)."""
    previous = os.environ.get("USE_TORCH")
    os.environ["USE_TORCH"] = "0"
    try:
        import datasets  # slow to import: only when reading
    finally:
        if previous is None:
            del os.environ["USE_TORCH"]
        else:
            os.environ["USE_TORCH"] = previous
    return datasets


def _rows(file: Path | HubFile, builder: str, skip: int) -> Iterator[dict]:
    """The rows of one file after the first `skip`; a file datasets cannot parse is a UserError."""
    datasets = _import_datasets()

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors come back as our one line
    url = file.url if isinstance(file, HubFile) else str(file)
    try:
        rows = datasets.load_dataset(builder, data_files=[url], split="train", streaming=True).skip(skip)
        yield from rows
    except Exception as e:
        if isinstance(file, HubFile) and not isinstance(e, (datasets.exceptions.DatasetGenerationError, ValueError)):
            raise hub_failure(f"cannot read {file}", e, "") from None  # HTTP, connection: the hub client's errors
        if not isinstance(e, (datasets.exceptions.DatasetGenerationError, ValueError, OSError)):
            raise
        cause = e.__cause__ or e
        raise UserError(f"{file}: not readable as {builder} ({str(cause).splitlines()[0] if str(cause) else cause!r})"
                        ) from None
