"""`llama2zh download model NAME`: the published tiny llamas, each with the tokenizer it needs.

Each entry names a model.bin on the hub, the shape its header must describe, and its tokenizer:
a name in tokenizers/registry.json, or a file beside the model (a SentencePiece .model, or a
llama2.c tokenizer.bin where that is all its authors put on the hub). Downloads go through the
hub client of corpus/download.py (HF_ENDPOINT mirrors, resume, one-line errors), and a model.bin
is refused unless its header parses, its size is the one the header implies, its shape is the
registry's and its sha256 is the registry's (else the hub's). DEST/NAME/ then holds model.bin,
tokenizer.bin and, where published, tokenizer.model, so that these work as they are:

    ./run DEST/NAME/model.bin -k DEST/NAME/tokenizer.bin
    llama2zh import DEST/NAME/model.bin --tokenizer DEST/NAME --out out/NAME
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath

from llama2zh.corpus.download import COMPLETE, Source, check_sha256, fetch, tokenizer_registry
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output, atomic_write_bytes

DEFAULT_DEST = Path("models")


@dataclass(frozen=True)
class Shape:
    """What a model.bin header says: llama2.c's seven ints, the classifier flag, the version."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool = True
    version: int = 0

    @classmethod
    def of(cls, header) -> Shape:
        """The shape an export.BinHeader describes."""
        a = header.args
        return cls(a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len,
                   a.shared_classifier, header.version)

    @property
    def params(self) -> int:
        kv_dim = self.dim * self.n_kv_heads // self.n_heads
        layer = 2 * self.dim + 2 * self.dim * self.dim + 2 * self.dim * kv_dim + 3 * self.dim * self.hidden_dim
        embeddings = self.vocab_size * self.dim * (1 if self.shared_classifier else 2)
        return self.n_layers * layer + self.dim + embeddings


@dataclass(frozen=True)
class Model:
    source: Source
    shape: Shape
    tokenizer: str | Source  # a name in tokenizers/registry.json, or a .model / tokenizer.bin on the hub
    note: str = ""  # printed after the download


def _hub(repo: str, file: str, sha256: str | None = None) -> Source:
    return Source(repo, file, "model", sha256)


# llama2.c's three sizes (karpathy/llama2.c README); the Chinese models reuse them with other vocabularies.
# hidden_dim is llama2.c's default, 2/3 of 4 * dim rounded up to a multiple of 32.
S15M = Shape(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, max_seq_len=256)
S42M = Shape(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, max_seq_len=1024)
S110M = Shape(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, max_seq_len=1024)

ZH = "adam89/tinyllamas-chinese"
TOK5000 = _hub(ZH, "tok5000.bin", "dc89b480fa6abf631bfde4581b4ad1f238c0db4bc0b4f6451047dc5d016d435a")
TOK5000_NOTE = ("tokenizer.model is rebuilt from tok5000.bin with llama2.c's train_vocab settings (the hub has no "
                "tok5000.model; jia-zhuang/chinese-llama2.c on GitHub has the original)")

# All are llama2.c's legacy (v0) files with a shared classifier: the sizes the hub lists (60.8 MB,
# 87.7 MB, 112 MB, ...) are those of v0 files of these shapes, not v1's or unshared ones.
# sha256: the hub's LFS pointers where known; otherwise the hub's etag is checked when downloading.
MODELS = {
    # https://huggingface.co/karpathy/tinyllamas (llama2.c's doc/stories260K.md: GQA, 8 heads, 4 kv heads)
    "stories260K": Model(
        _hub("karpathy/tinyllamas", "stories260K/stories260K.bin"),
        Shape(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=512),
        _hub("karpathy/tinyllamas", "stories260K/tok512.model")),
    "stories15M": Model(
        _hub("karpathy/tinyllamas", "stories15M.bin",
             "cd590644d963867a2b6e5a1107f51fad663c41d79c149fbecbbb1f95fa81f49a"), S15M, "llama2en"),
    "stories42M": Model(
        _hub("karpathy/tinyllamas", "stories42M.bin",
             "9f65a1000e17d0bc167dd6332e0ce5119a0222a3d920cead5bce413bfab2ee7b"), S42M, "llama2en"),
    "stories110M": Model(
        _hub("karpathy/tinyllamas", "stories110M.bin",
             "515267168726a1ed1317a64a408492e6af3b67c1f71c5bd98c01d9d721803a24"), S110M, "llama2en"),
    # https://huggingface.co/52AI/tinyllamas_zh, from chenyangMl/llama2.c-zh (README; train.py: 288/6/6, seq 256)
    "stories15M-llama2-enzh": Model(
        _hub("52AI/tinyllamas_zh", "stories15M-llama2-enzh.bin"), replace(S15M, vocab_size=55296), "llama2enzh"),
    "stories15M-baichuan": Model(
        _hub("52AI/tinyllamas_zh", "stories15M-baichuan.bin"), replace(S15M, vocab_size=64000), "baichuan"),
    # https://huggingface.co/adam89/tinyllamas-chinese, from jia-zhuang/chinese-llama2.c (README's table)
    "stories15M-zh": Model(_hub(ZH, "stories15M.bin"), replace(S15M, vocab_size=5000), TOK5000, TOK5000_NOTE),
    "stories42M-zh": Model(_hub(ZH, "stories42M.bin"), replace(S42M, vocab_size=5000), TOK5000, TOK5000_NOTE),
    "stories110M-zh": Model(_hub(ZH, "stories110M.bin"), replace(S110M, vocab_size=5000), TOK5000, TOK5000_NOTE),
}


def registry() -> dict[str, Model]:
    return MODELS


def format_registry() -> str:
    """The table `download model --list` prints."""
    rows = [("NAME", "PARAMS", "DIM", "LAYERS", "HEADS", "KV", "VOCAB", "SEQ", "V", "TOKENIZER", "REPO", "FILE")]
    for name, m in registry().items():
        s = m.shape
        tokenizer = m.tokenizer if isinstance(m.tokenizer, str) else PurePosixPath(m.tokenizer.file).name
        rows.append((name, _count(s.params), s.dim, s.n_layers, s.n_heads, s.n_kv_heads, s.vocab_size, s.max_seq_len,
                     f"v{s.version}", tokenizer, m.source.repo, m.source.file))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def check_model(path: Path, name: str, shape: Shape) -> None:
    """Refuses a file that is not the published model.bin: a header that does not parse or a size
    other than the header implies (export.read_header's checks), or a shape other than the registry's."""
    from llama2zh.export import read_header  # torch: not needed by --list

    found = Shape.of(read_header(path))
    wrong = [f"{k} {v} (expected {getattr(shape, k)})" for k, v in asdict(found).items() if v != getattr(shape, k)]
    if wrong:
        raise UserError(f"{path}: not the model.bin of {name}: {', '.join(wrong)}")


def download_model(name: str, dest: Path) -> Path:
    """dest/NAME/ with model.bin, tokenizer.bin and, where published, tokenizer.model; skipped
    when a previous run finished it."""
    from llama2zh.vocab.export import export_tokenizer
    from llama2zh.vocab.rebuild import rebuild_model

    models = registry()
    if name not in models:
        raise UserError(f"unknown model '{name}'; known: {', '.join(models)}")
    model = models[name]
    target = dest / name
    if (target / COMPLETE).exists():
        print(f"{target}: already downloaded")
        return target
    tokenizer = tokenizer_registry()[model.tokenizer] if isinstance(model.tokenizer, str) else model.tokenizer
    # both files are fetched and checked before anything is written into target
    tokenizer_path, expected = fetch(tokenizer, _cache(dest, tokenizer), hint="")
    check_sha256(tokenizer_path, expected)
    model_path, expected = fetch(model.source, _cache(dest, model.source), hint="")
    check_model(model_path, name, model.shape)
    digest = check_sha256(model_path, expected)

    target.mkdir(parents=True, exist_ok=True)
    if tokenizer_path.suffix == ".model":
        _copy(tokenizer_path, target / "tokenizer.model")
        export_tokenizer(target / "tokenizer.model", target / "tokenizer.bin")
    else:  # a llama2.c tokenizer.bin, which ./run reads as it is; import needs a tokenizer.model
        _copy(tokenizer_path, target / "tokenizer.bin")
        atomic_write_bytes(target / "tokenizer.model", [rebuild_model(target / "tokenizer.bin")])
    os.replace(model_path, target / "model.bin")  # moved, not copied: 438 MB need not be on disk twice
    record = {"source": f"{model.source.repo}/{model.source.file}", "sha256": digest,
              "tokenizer": f"{tokenizer.repo}/{tokenizer.file}"}
    with atomic_output(target / COMPLETE) as tmp:
        tmp.write_text(json.dumps(record) + "\n")
    print(f"{target}: model.bin ({_count(model.shape.params)} parameters, sha256 {digest}) and tokenizer; "
          f"run it with ./run {target}/model.bin -k {target}/tokenizer.bin")
    if model.note:
        print(f"{target}: {model.note}")
    return target


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _cache(dest: Path, source: Source) -> Path:
    # one folder per repo: karpathy's and adam89's stories15M.bin must not share a download
    return dest / ".downloads" / source.repo


def _copy(src: Path, dst: Path) -> None:
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)
