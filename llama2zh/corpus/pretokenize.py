"""`llama2zh pretokenize`: text -> token shards for training.

Output: `train_NNNN.bin` and `val_NNNN.bin` pairs and manifest.json in one folder: raw
little-endian token ids, uint16 when the vocab fits, else uint32, each document prefixed with
BOS. Documents are encoded in parallel processes by the C engine's encoder (SentencePiece-exact,
checked against SentencePiece on the first documents, and faster per core than SentencePiece);
each finished shard is written atomically and recorded in manifest.json, so a rerun skips what
is done and ends with the same bytes as an uninterrupted run, for any worker count.

Story shards (`pretokenize`): one output pair per input shard, in DATASET_DIR/<tokenizer>/ by
default. A document goes to val when a hash of its story id falls under val_permille, so the
English and Chinese versions of one story always land on the same side.

Any other source (`pretokenize_records`: files, folders, what llama2zh.corpus.sources reads):
records stream in order through a bounded window of chunks, so memory stays flat whatever the
input size, and an output pair closes once it holds shard_tokens tokens. The manifest records
each pair with the input position after it, where a resumed run starts reading. A document goes
to val when a hash of its text falls under val_permille.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama2zh.corpus.parallel import chunked, ordered_map, worker_pool
from llama2zh.corpus.shards import LANGS, documents, shard_paths
from llama2zh.corpus.sources import describe, read_records
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output, sha256_file

CHECKED_DOCUMENTS = 200  # first documents re-encoded by SentencePiece as a check
SHARD_TOKENS = 1 << 26  # tokens per output pair of a generic source: 128 MB of uint16
CHUNK_DOCUMENTS = 128  # documents per task sent to a worker process
FILE_DTYPES = {"uint16": "<u2", "uint32": "<u4"}  # the manifest's dtype -> the files' (little-endian)


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
    return bool(entry) and entry["source_size"] == source.stat().st_size and _intact(entry, out_dir, itemsize)


def _intact(entry: dict, out_dir: Path, itemsize: int) -> bool:
    """Both files of a recorded train/val pair are there, with the recorded number of tokens."""
    return all((out_dir / entry[s]["file"]).exists()
               and (out_dir / entry[s]["file"]).stat().st_size == entry[s]["tokens"] * itemsize
               for s in ("train", "val"))


def check_against_sentencepiece(docs: Iterable[tuple[str, str]], tokenizer_bin: Path, tokenizer_model: Path) -> None:
    """The C encoder must equal SentencePiece; a cheap look at real (id, text) documents before a long run."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    tokenizer = _encoder(tokenizer_bin)
    for doc_id, text in islice(docs, CHECKED_DOCUMENTS):
        if tokenizer.encode(text, bos=False) != sp.encode(text):
            raise UserError(f"the C encoder differs from SentencePiece on {doc_id}; please report this")


def _tokenizer(tokenizer_dir: Path) -> tuple[Path, Path, dict]:
    """tokenizer.bin (exported beside tokenizer.model when missing), tokenizer.model, and the manifest's header."""
    from llama2zh.vocab.export import export_tokenizer, load_sentencepiece

    tokenizer_model = tokenizer_dir / "tokenizer.model"
    sp, _ = load_sentencepiece(tokenizer_model)
    tokenizer_bin = tokenizer_dir / "tokenizer.bin"
    if not tokenizer_bin.exists():
        export_tokenizer(tokenizer_model, tokenizer_bin)
    dtype = "uint16" if sp.vocab_size() <= 1 << 16 else "uint32"  # stored little-endian
    header = {"tokenizer": tokenizer_dir.name, "tokenizer_sha256": sha256_file(tokenizer_model),
              "vocab_size": sp.vocab_size(), "bos_id": sp.bos_id(), "dtype": dtype}
    return tokenizer_bin, tokenizer_model, header


def pretokenize(dataset_dir: Path, tokenizer_dir: Path, lang: str = "enzh", workers: int = 2,
                val_permille: int = 10, force: bool = False, out_dir: Path | None = None) -> Path:
    """Story shards in dataset_dir -> one train/val pair per shard in out_dir (default dataset_dir/<tokenizer>)."""
    if lang not in LANGS:
        raise UserError(f"unknown --lang '{lang}'; one of {', '.join(LANGS)}")
    sources = shard_paths(dataset_dir)
    tokenizer_bin, tokenizer_model, header = _tokenizer(tokenizer_dir)
    out_dir = out_dir or dataset_dir / tokenizer_dir.name
    out_dir.mkdir(parents=True, exist_ok=True)
    header |= {"lang": lang, "val_permille": val_permille}
    manifest = _load_manifest(out_dir / "manifest.json", header, force)

    itemsize = np.dtype(header["dtype"]).itemsize
    file_dtype = FILE_DTYPES[header["dtype"]]
    jobs = [Job(src, i, out_dir, tokenizer_bin, file_dtype, lang, val_permille) for i, src in enumerate(sources)
            if not _is_done(manifest["shards"].get(src.stem), src, out_dir, itemsize)]
    if jobs:
        check_against_sentencepiece(documents(jobs[0].source, lang), tokenizer_bin, tokenizer_model)
    skipped = len(sources) - len(jobs)
    bar = tqdm(total=len(sources), initial=skipped, unit="shard", desc=f"pretokenize {dataset_dir.name}")
    tokens = 0
    with worker_pool(max(1, min(workers, len(jobs) or 1))) as pool:
        for job, entry in zip(jobs, pool.imap(encode_shard, jobs), strict=True):
            manifest["shards"][job.source.stem] = entry
            _save_manifest(out_dir / "manifest.json", manifest)
            tokens += entry["train"]["tokens"] + entry["val"]["tokens"]
            bar.set_postfix(tokens=f"{tokens:,}")
            bar.update()
    bar.close()
    return out_dir


def encode_documents(tokenizer_bin: Path, dtype: str, val_permille: int,
                     chunk: list[tuple[str, tuple[int, int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A chunk of (text, position after it) -> all its ids (BOS first in each document), each
    document's length, and whether it goes to val: few large arrays travel back, not one per document."""
    tokenizer = _encoder(tokenizer_bin)
    arrays = [tokenizer.encode_array(text, bos=True) for text, _ in chunk]
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    val = np.array([zlib.crc32(text.encode("utf-8")) % 1000 < val_permille for text, _ in chunk], dtype=bool)
    return np.concatenate(arrays).astype(dtype), lengths, val


class ShardWriter:
    """Writes output pairs train_NNNN.bin + val_NNNN.bin of about shard_tokens tokens each. A pair
    enters the manifest, with the input position after its last document, only once both files are
    in place; a pair cut short by an error or interrupt leaves nothing behind."""

    def __init__(self, out_dir: Path, manifest: dict, shard_tokens: int):
        self.out_dir, self.manifest, self.shard_tokens = out_dir, manifest, shard_tokens
        self.stack = None  # the open pair's files, None between pairs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.stack is not None:
            self.stack.__exit__(*exc)

    def _open(self) -> None:
        self.index = f"{len(self.manifest['shards']):04d}"
        self.stack, self.files, self.entry = ExitStack(), {}, {}
        for split in ("train", "val"):
            name = f"{split}_{self.index}.bin"
            tmp = self.stack.enter_context(atomic_output(self.out_dir / name))
            self.files[split] = self.stack.enter_context(open(tmp, "wb"))  # closed before its rename
            self.entry[split] = {"file": name, "tokens": 0, "documents": 0}

    def add(self, ids: np.ndarray, lengths: np.ndarray, val: np.ndarray, ends: list[tuple[int, int]]) -> None:
        """Writes a chunk from encode_documents; ends[i] is the input position after document i."""
        starts = np.concatenate([[0], np.cumsum(lengths)])
        first = 0
        while first < len(lengths):
            if self.stack is None:
                self._open()
            room = self.shard_tokens - self.entry["train"]["tokens"] - self.entry["val"]["tokens"]
            # the document that fills the pair (len(lengths): none in this chunk)
            filler = first + int(np.searchsorted(starts[first + 1:] - starts[first], room))
            stop = min(filler + 1, len(lengths))
            tokens, in_val = ids[starts[first]:starts[stop]], val[first:stop]
            for split, chosen in (("train", ~in_val), ("val", in_val)):
                mask = np.repeat(chosen, lengths[first:stop])
                self.files[split].write(tokens[mask].tobytes())
                self.entry[split]["tokens"] += int(mask.sum())
                self.entry[split]["documents"] += int(chosen.sum())
            if filler < len(lengths):
                self.close(ends[filler])
            first = stop

    def close(self, end: tuple[int, int]) -> None:
        """Closes the open pair (if any) and records it, with `end`, the input position after it."""
        if self.stack is None:
            return
        self.stack.close()  # both files renamed into place
        self.stack = None
        self.manifest["shards"][self.index] = {**self.entry, "end": list(end)}
        _save_manifest(self.out_dir / "manifest.json", self.manifest)


def pretokenize_records(files: list, tokenizer_dir: Path, out_dir: Path, text_field: str = "text",
                        workers: int = 2, val_permille: int = 10, shard_tokens: int = SHARD_TOKENS,
                        force: bool = False) -> Path:
    """The records of `files` (from sources.source_files) -> train/val pairs of about shard_tokens tokens in out_dir.

    A manifest.json among the files is skipped: it is this command's output (from this run, or from
    a run with another tokenizer in a folder beside it), never text."""
    files = [f for f in files if f.name != "manifest.json"]
    if not files:
        raise UserError("no source files besides pretokenize's own manifest.json")
    tokenizer_bin, tokenizer_model, header = _tokenizer(tokenizer_dir)
    header |= {"lang": "any", "val_permille": val_permille, "shard_tokens": shard_tokens, "text_field": text_field,
               "sources": [describe(f) for f in files]}
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(out_dir / "manifest.json", header, force)
    itemsize = np.dtype(header["dtype"]).itemsize
    done = _finished_pairs(manifest["shards"], out_dir, itemsize)
    manifest["shards"] = done
    start = tuple(done[max(done)]["end"]) if done else (0, 0)
    for stale in out_dir.glob("*.bin.*.tmp"):  # a pair a killed run was writing: it is redone whole
        stale.unlink()

    numbers = {file: n for n, file in enumerate(files)}
    docs = ((r.text, (numbers[r.file], r.index + 1)) for r in read_records(files, text_field, start))
    encode = partial(encode_documents, tokenizer_bin, FILE_DTYPES[header["dtype"]], val_permille)
    totals = {k: sum(e[s][k] for e in done.values() for s in ("train", "val")) for k in ("tokens", "documents")}
    what = files[0].name + (f" +{len(files) - 1} files" if len(files) > 1 else "")
    with ExitStack() as stack:
        pool = stack.enter_context(worker_pool(workers))  # forked before datasets starts its threads
        writer = stack.enter_context(ShardWriter(out_dir, manifest, shard_tokens))
        check_against_sentencepiece(((f"{r.file} record {r.index}", r.text)
                                     for r in read_records(files, text_field, start)), tokenizer_bin, tokenizer_model)
        bar = stack.enter_context(tqdm(unit="doc", initial=totals["documents"], desc=f"pretokenize {what}",
                                       disable=None))
        for chunk, (ids, lengths, val) in ordered_map(encode, chunked(docs, CHUNK_DOCUMENTS), pool, 2 * workers):
            writer.add(ids, lengths, val, [end for _, end in chunk])
            totals["tokens"] += int(lengths.sum())
            bar.set_postfix(file=f"{chunk[-1][1][0] + 1}/{len(files)}", tokens=f"{totals['tokens']:,}", refresh=False)
            bar.update(len(chunk))
        writer.close((len(files), 0))  # the last pair ends the input: a rerun reads nothing
    if not manifest["shards"]:
        raise UserError(f"no documents in {what}")
    _save_manifest(out_dir / "manifest.json", manifest)
    return out_dir


def _finished_pairs(shards: dict, out_dir: Path, itemsize: int) -> dict:
    """The manifest's leading pairs whose files are intact: a run resumes after the last of them."""
    kept = {}
    for key in sorted(shards):
        if key != f"{len(kept):04d}" or not _intact(shards[key], out_dir, itemsize):
            break
        kept[key] = shards[key]
    return kept


def _load_manifest(path: Path, header: dict, force: bool) -> dict:
    """The manifest to continue, or a new one; a different tokenizer, input or setting needs --force."""
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in header if old.get(k) != header[k]]
        if changed and not force:
            was, now = (_short(v) for v in (old.get(changed[0]), header[changed[0]]))
            raise UserError(f"{path.parent} was made with a different {', '.join(changed)} "
                            f"({was}, now {now}); use --force to redo it")
        if not changed:
            return old
    return {**header, "shards": {}}


def _short(value, limit: int = 100) -> str:
    """A value's repr cut to one short line (a list of sources can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _save_manifest(path: Path, manifest: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
