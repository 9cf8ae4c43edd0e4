"""`llama2zh pretokenize`: token shards that round-trip, the same bytes for any worker count, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llama2zh.corpus.pretokenize import is_val, pretokenize
from llama2zh.corpus.shards import documents, shard_paths
from tests.conftest import shared_file
from tests.test_cli import llama2zh


@pytest.fixture
def dataset(tmp_path):
    """Three shards of parallel stories built from the shared English and Chinese samples."""
    en = [json.loads(line)["story"] for line in shared_file("data/tinystories_en_sample.jsonl").open()]
    zh = [json.loads(line)["text"] for line in shared_file("data/zh_literature.jsonl").open()][:len(en)]
    root = tmp_path / "stories"
    root.mkdir()
    records = [{"id": f"s{i}", "story": z, "story_en": e} for i, (e, z) in enumerate(zip(en, zh, strict=True))]
    for n in range(3):
        (root / f"data{n:02d}.json").write_text(json.dumps(records[n::3], ensure_ascii=False))
    return root


@pytest.fixture
def tokenizer(tokenizer_dirs):
    return tokenizer_dirs["llama2enzh"]


def read_split(out_dir, split):
    manifest = json.loads((out_dir / "manifest.json").read_text())
    dtype = "<u2" if manifest["dtype"] == "uint16" else "<u4"
    entries = [manifest["shards"][k] for k in sorted(manifest["shards"])]
    return manifest, [np.fromfile(out_dir / e[split]["file"], dtype=dtype) for e in entries]


def split_documents(ids: np.ndarray, bos: int) -> list[list[int]]:
    starts = list(np.flatnonzero(ids == bos)) + [len(ids)]
    return [ids[a:b].tolist() for a, b in zip(starts, starts[1:], strict=False)]


def test_shards_round_trip_to_sentencepiece_ids(dataset, tokenizer):
    out = pretokenize(dataset, tokenizer, lang="enzh", workers=2)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    manifest, train = read_split(out, "train")
    _, val = read_split(out, "val")
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 55296
    for shard, train_ids, val_ids in zip(shard_paths(dataset), train, val, strict=True):
        expected = {"train": [], "val": []}
        for doc_id, text in documents(shard, "enzh"):
            expected["val" if is_val(doc_id, 10) else "train"].append([sp.bos_id()] + sp.encode(text))
        assert split_documents(train_ids, sp.bos_id()) == expected["train"]
        assert split_documents(val_ids, sp.bos_id()) == expected["val"]
        entry = manifest["shards"][shard.stem]
        assert entry["train"]["tokens"] == len(train_ids) and entry["train"]["documents"] == len(expected["train"])
    assert sum(len(v) for v in val) > 0


def test_same_bytes_for_one_and_two_workers(dataset, tokenizer):
    one = pretokenize(dataset, tokenizer, lang="zh", workers=1)
    first = {p.name: p.read_bytes() for p in one.iterdir()}
    for p in one.glob("*.bin"):
        p.unlink()
    (one / "manifest.json").unlink()
    pretokenize(dataset, tokenizer, lang="zh", workers=2)
    assert {p.name: p.read_bytes() for p in one.iterdir()} == first


def test_rerun_skips_finished_shards_and_redoes_missing_ones(dataset, tokenizer):
    out = pretokenize(dataset, tokenizer, lang="en", workers=1)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    (out / "train_0001.bin").unlink()  # as if killed before this shard finished
    pretokenize(dataset, tokenizer, lang="en", workers=2)
    assert (out / "train_0001.bin").exists()
    for name in ("train_0000.bin", "val_0000.bin", "train_0002.bin"):
        assert (out / name).stat().st_mtime_ns == stamps[name]


def test_another_tokenizer_with_the_same_name_is_refused(dataset, tokenizer, tmp_path):
    pretokenize(dataset, tokenizer, lang="en", workers=1)
    impostor = tmp_path / "other" / tokenizer.name
    impostor.mkdir(parents=True)
    (impostor / "tokenizer.model").write_bytes(shared_file("tokenizers/llama2en/tokenizer.model").read_bytes())
    result = llama2zh("pretokenize", dataset, "--tokenizer", impostor, "--lang", "en")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "different tokenizer_sha256" in result.stderr and "--force" in result.stderr
    assert llama2zh("pretokenize", dataset, "--tokenizer", impostor, "--lang", "en", "--force").returncode == 0


def test_vocab_over_65536_gives_uint32_shards(dataset, tmp_path):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(shared_file("tokenizers/llama2en/tokenizer.model").read_bytes())
    for i in range(70000 - len(proto.pieces)):
        proto.pieces.add(piece=f"<unused_{i}>", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED)
    big = tmp_path / "big"
    big.mkdir()
    (big / "tokenizer.model").write_bytes(proto.SerializeToString())
    out = pretokenize(dataset, big, lang="en", workers=2)
    manifest, train = read_split(out, "train")
    assert manifest["dtype"] == "uint32" and (out / "train_0000.bin").stat().st_size == 4 * len(train[0])
    sp = spm.SentencePieceProcessor(model_file=str(big / "tokenizer.model"))
    first_doc = next(text for doc_id, text in documents(shard_paths(dataset)[0], "en") if not is_val(doc_id, 10))
    assert train[0][: len(sp.encode(first_doc)) + 1].tolist() == [sp.bos_id()] + sp.encode(first_doc)


@pytest.mark.parametrize("args, status, message", [
    (["pretokenize", "/nonexistent", "--tokenizer", "/nonexistent"], 1, "no such dataset directory"),
    (["pretokenize", ".", "--tokenizer", "/nonexistent", "--lang", "fr"], 2, "invalid choice: 'fr'"),
    (["pretokenize", ".", "--tokenizer", "/nonexistent", "--workers", "0"], 2, "--workers must be at least 1"),
])
def test_pretokenize_usage_errors(tmp_path, args, status, message):
    result = llama2zh(*args, cwd=tmp_path)
    assert result.returncode == status and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
