"""`llama2zh download`: the real sources, through the Hugging Face hub client.

TinyStories (roneneldan/TinyStories), its Chinese translation (52AI/TinyStoriesZh) and the
tokenizers of tokenizers/registry.json. The hub client honours HF_ENDPOINT (a mirror is how
most users in China reach the hub) and HF_HUB_OFFLINE, resumes interrupted downloads from
their `.incomplete` file and shows progress. Archives are checked (sha256: the registry's,
else the hub's LFS etag) and extracted safely: no absolute paths, no `..`, no links, devices
or other special members, into a temp folder renamed into place when complete. `--from`
ingests a copy the user already has (an archive, or a folder of shards).
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output, sha256_file
from llama2zh.paths import ROOT

COMPLETE = ".complete"  # written last into a finished download folder: its presence means done


@dataclass(frozen=True)
class Source:
    repo: str
    file: str
    repo_type: str  # "dataset" or "model"
    sha256: str | None = None


DATASETS = {
    "tinystories": Source("roneneldan/TinyStories", "TinyStories_all_data.tar.gz", "dataset"),
    "tinystories-zh": Source("52AI/TinyStoriesZh", "TinyStories_all_data_zh_2M.tar.gz", "dataset"),
}


def tokenizer_registry() -> dict[str, Source]:
    entries = json.loads((ROOT / "tokenizers" / "registry.json").read_text(encoding="utf-8"))
    return {name: Source(e["repo"], e["file"], "model", e["sha256"]) for name, e in entries.items()}


def fetch(source: Source, cache: Path, hint: str = ", or pass --from PATH with a copy you already have"
          ) -> tuple[Path, str | None]:
    """The file from the hub (HF_ENDPOINT, HF_HUB_OFFLINE honoured), resumed if interrupted,
    and the sha256 it should have: the registry's, else the hub's (an LFS file's etag).
    hint: what else the user can do, ending the error line."""
    import huggingface_hub
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry warnings would bury our one-line error
    try:
        path = huggingface_hub.hf_hub_download(source.repo, source.file, repo_type=source.repo_type,
                                               local_dir=cache)
        etag = huggingface_hub.get_hf_file_metadata(
            huggingface_hub.hf_hub_url(source.repo, source.file, repo_type=source.repo_type)).etag
    except Exception as e:  # the hub client raises many kinds (HTTP, offline, connection); one line says which
        raise hub_failure(f"cannot download {source.repo}/{source.file}", e, hint) from None
    hub_sha = etag if etag and re.fullmatch(r"[0-9a-f]{64}", etag) else None
    return Path(path), source.sha256 or hub_sha


def hub_failure(what: str, error: Exception, hint: str) -> UserError:
    """The one line that says what the hub client could not do ("cannot download X"), where it
    tried (the endpoint, or offline mode), why (the first line of its error) and what else the
    user can do (hint)."""
    from huggingface_hub import constants

    where = "offline mode (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else constants.ENDPOINT
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    return UserError(f"{what} from {where}: {reason}. Set HF_ENDPOINT to a mirror{hint}")


def check_sha256(path: Path, expected: str | None) -> str:
    """sha256 of path, checked against the expected one when it is known."""
    digest = sha256_file(path)
    if expected and digest != expected:
        raise UserError(f"{path}: sha256 {digest} differs from the expected {expected} (corrupt download?)")
    return digest


def safe_members(archive: tarfile.TarFile, name: str):
    """The archive's members, refusing any that could write outside the destination."""
    for member in archive.getmembers():
        parts = PurePosixPath(member.name).parts
        if member.name.startswith("/") or ".." in parts:
            raise UserError(f"{name}: member '{member.name}' points outside the destination; refusing the archive")
        if not (member.isfile() or member.isdir()):
            raise UserError(f"{name}: member '{member.name}' is a link or special file; refusing the archive")
        yield member


def extract(archive_path: Path, target: Path) -> None:
    """Extracts a tar archive into target via a temp folder renamed into place."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with tarfile.open(archive_path) as archive:
            members = list(safe_members(archive, archive_path.name))
            # Python's own "data" filter (3.10.12+) as a second guard where it exists
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(partial, members=members, **extra)
    except tarfile.TarError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"{archive_path}: not a readable tar archive ({e})") from None
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def download_dataset(name: str, dest: Path, from_path: Path | None = None) -> Path:
    """dest/NAME with the dataset's shards; skipped when a previous run finished it."""
    source = DATASETS[name]
    target = dest / name
    if (target / COMPLETE).exists():
        print(f"{target}: already downloaded")
        return target
    dest.mkdir(parents=True, exist_ok=True)
    if from_path is not None and from_path.is_dir():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(from_path, target)
        digest = "(copied folder)"
    else:
        archive, expected = (_existing(from_path), source.sha256) if from_path else fetch(source, dest / ".downloads")
        digest = check_sha256(archive, expected)
        extract(archive, target)
    with atomic_output(target / COMPLETE) as tmp:
        tmp.write_text(json.dumps({"source": f"{source.repo}/{source.file}", "sha256": digest}) + "\n")
    print(f"{target}: {sum(1 for _ in target.rglob('*.json'))} shards, sha256 {digest}")
    return target


def download_tokenizer(name: str, dest: Path, from_path: Path | None = None) -> Path:
    """dest/NAME/tokenizer.model (sha256 checked) and its tokenizer.bin."""
    from llama2zh.vocab.export import export_tokenizer

    registry = tokenizer_registry()
    if name not in registry:
        raise UserError(f"unknown tokenizer '{name}'; known: {', '.join(registry)}")
    source = registry[name]
    target = dest / name
    target.mkdir(parents=True, exist_ok=True)
    fetched, expected = (_existing(from_path), source.sha256) if from_path else fetch(source, dest / ".downloads")
    check_sha256(fetched, expected)
    with atomic_output(target / "tokenizer.model") as tmp:
        shutil.copyfile(fetched, tmp)
    export_tokenizer(target / "tokenizer.model", target / "tokenizer.bin")
    print(f"{target}: tokenizer.model (sha256 {source.sha256}) and tokenizer.bin")
    return target


def _existing(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    return path
