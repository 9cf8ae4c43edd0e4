"""`llama2zh pretokenize`: story shards -> token shards for training.

For each input shard, `train_NNNN.bin` and `val_NNNN.bin` in DATASET_DIR/<tokenizer>/: raw
little-endian token ids, uint16 when the vocab fits, else uint32, each document prefixed
with BOS. A document goes to val when a hash of its story id falls under val_permille, so
the English and Chinese versions of one story always land on the same side and the split
does not depend on the worker count. Shards are encoded in parallel processes by the C
engine's encoder (SentencePiece-exact, checked against SentencePiece on the first shard's
first documents, and faster per core than SentencePiece); each finished shard is written
atomically and recorded in manifest.json, so a rerun skips what is done.
"""

from __future__ import annotations

import json
import multiprocessing
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama2zh.corpus.shards import LANGS, documents, shard_paths
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output, sha256_file

CHECKED_DOCUMENTS = 200  # documents of the first shard re-encoded by SentencePiece as a check


@dataclass(frozen=True)
class Job:
    source: Path
    index: int
    out_dir: Path
    tokenizer_bin: Path
    dtype: str
    lang: str
    val_permille: int


def is_val(doc_id: str, val_permille: int) -> bool:
    story_id = doc_id.removesuffix("/en")  # both languages of a story on the same side
    return zlib.crc32(story_id.encode("utf-8")) % 1000 < val_permille


_tokenizers = {}  # per process: tokenizer.bin path -> its C tokenizer, loaded once


def _encoder(path: Path):
    if path not in _tokenizers:
        from llama2zh.engine import CTokenizer

        _tokenizers[path] = CTokenizer(path)
    return _tokenizers[path]


def encode_shard(job: Job) -> dict:
    """Encodes one input shard into its train/val files, streaming; returns its manifest entry."""
    tokenizer = _encoder(job.tokenizer_bin)
    entry = {"source": job.source.name, "source_size": job.source.stat().st_size}
    with ExitStack() as stack:
        files = {}
        for split in ("train", "val"):
            name = f"{split}_{job.index:04d}.bin"
            files[split] = open(stack.enter_context(atomic_output(job.out_dir / name)), "wb")
            stack.callback(files[split].close)  # closed before atomic_output renames it
            entry[split] = {"file": name, "tokens": 0, "documents": 0}
        for doc_id, text in documents(job.source, job.lang):
            split = "val" if is_val(doc_id, job.val_permille) else "train"
            ids = tokenizer.encode_array(text, bos=True).astype(job.dtype)
            files[split].write(ids.tobytes())
            entry[split]["tokens"] += int(ids.size)
            entry[split]["documents"] += 1
    return entry


def _is_done(entry: dict | None, source: Path, out_dir: Path, itemsize: int) -> bool:
    if not entry or entry["source_size"] != source.stat().st_size:
        return False
    return all((out_dir / entry[s]["file"]).exists()
               and (out_dir / entry[s]["file"]).stat().st_size == entry[s]["tokens"] * itemsize
               for s in ("train", "val"))


def check_against_sentencepiece(source: Path, lang: str, tokenizer_bin: Path, tokenizer_model: Path) -> None:
    """The C encoder must equal SentencePiece; a cheap look at real documents before a long run."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    tokenizer = _encoder(tokenizer_bin)
    for n, (doc_id, text) in enumerate(documents(source, lang)):
        if n == CHECKED_DOCUMENTS:
            return
        if tokenizer.encode(text, bos=False) != sp.encode(text):
            raise UserError(f"the C encoder differs from SentencePiece on {doc_id}; please report this")


def pretokenize(dataset_dir: Path, tokenizer_dir: Path, lang: str = "enzh", workers: int = 2,
                val_permille: int = 10, force: bool = False) -> Path:
    from llama2zh.vocab.export import export_tokenizer, load_sentencepiece

    if lang not in LANGS:
        raise UserError(f"unknown --lang '{lang}'; one of {', '.join(LANGS)}")
    sources = shard_paths(dataset_dir)
    tokenizer_model = tokenizer_dir / "tokenizer.model"
    sp, _ = load_sentencepiece(tokenizer_model)
    tokenizer_bin = tokenizer_dir / "tokenizer.bin"
    if not tokenizer_bin.exists():
        export_tokenizer(tokenizer_model, tokenizer_bin)

    out_dir = dataset_dir / tokenizer_dir.name
    out_dir.mkdir(exist_ok=True)
    dtype = "uint16" if sp.vocab_size() <= 1 << 16 else "uint32"  # stored little-endian
    header = {"tokenizer": tokenizer_dir.name, "tokenizer_sha256": sha256_file(tokenizer_model),
              "vocab_size": sp.vocab_size(), "bos_id": sp.bos_id(), "dtype": dtype, "lang": lang,
              "val_permille": val_permille}
    manifest = _load_manifest(out_dir / "manifest.json", header, force)

    itemsize = np.dtype(dtype).itemsize
    file_dtype = "<u2" if dtype == "uint16" else "<u4"
    jobs = [Job(src, i, out_dir, tokenizer_bin, file_dtype, lang, val_permille) for i, src in enumerate(sources)
            if not _is_done(manifest["shards"].get(src.stem), src, out_dir, itemsize)]
    if jobs:
        check_against_sentencepiece(jobs[0].source, lang, tokenizer_bin, tokenizer_model)
    skipped = len(sources) - len(jobs)
    bar = tqdm(total=len(sources), initial=skipped, unit="shard", desc=f"pretokenize {dataset_dir.name}")
    tokens = 0
    with multiprocessing.get_context("fork").Pool(max(1, min(workers, len(jobs) or 1))) as pool:
        for job, entry in zip(jobs, pool.imap(encode_shard, jobs), strict=True):
            manifest["shards"][job.source.stem] = entry
            _save_manifest(out_dir / "manifest.json", manifest)
            tokens += entry["train"]["tokens"] + entry["val"]["tokens"]
            bar.set_postfix(tokens=f"{tokens:,}")
            bar.update()
    bar.close()
    return out_dir


def _load_manifest(path: Path, header: dict, force: bool) -> dict:
    """The manifest to continue, or a new one; a different tokenizer or setting needs --force."""
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in header if old.get(k) != header[k]]
        if changed and not force:
            raise UserError(f"{path.parent} was made with a different {', '.join(changed)} "
                            f"({old.get(changed[0])!r}, now {header[changed[0]]!r}); use --force to redo it")
        if not changed:
            return old
    return {**header, "shards": {}}


def _save_manifest(path: Path, manifest: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
