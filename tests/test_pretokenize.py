"""`llama2zh pretokenize`: token shards that round-trip, the same bytes for any worker count, resume;
from story shards and from any source llama2zh.corpus.sources reads."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llama2zh.corpus import pretokenize as pretokenize_module
from llama2zh.corpus.dataset import TokenShards
from llama2zh.corpus.pretokenize import is_val, pretokenize, pretokenize_records
from llama2zh.corpus.shards import documents, is_story_folder, shard_paths
from llama2zh.corpus.sources import source_files
from tests.conftest import ROOT, shared_file
from tests.hub_standin import COMMIT, HubStandin
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
    (["pretokenize", "/nonexistent", "--tokenizer", "/nonexistent"], 1, "/nonexistent: no such file or folder"),
    (["pretokenize", "a.jsonl", "b.jsonl", "--tokenizer", "/nonexistent"], 1, "a.jsonl: no such file or folder"),
    (["pretokenize", ".", "--tokenizer", "/nonexistent", "--shard-tokens", "0"], 2, "--shard-tokens must be at"),
    (["pretokenize", ".", "--tokenizer", "/nonexistent", "--val-permille", "1001"], 2, "at most 1000"),
    (["pretokenize", ".", "--tokenizer", "/nonexistent", "--lang", "fr"], 2, "invalid choice: 'fr'"),
    (["pretokenize", ".", "--tokenizer", "/nonexistent", "--workers", "0"], 2, "--workers must be at least 1"),
])
def test_pretokenize_usage_errors(tmp_path, args, status, message):
    result = llama2zh(*args, cwd=tmp_path)
    assert result.returncode == status and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


# Any other source: files and folders of records, streamed into pairs of about --shard-tokens tokens.

@pytest.fixture(scope="module")
def texts():
    """Real English stories and Chinese paragraphs, interleaved, one line each (a .txt holds a document a line)."""
    en = [json.loads(line)["story"] for line in shared_file("data/tinystories_en_sample.jsonl").open()][:60]
    zh = [json.loads(line)["text"] for line in shared_file("data/zh_literature.jsonl").open()][:60]
    return [" ".join(t.split()) for pair in zip(en, zh, strict=True) for t in pair]


def write_source(kind: str, directory, texts):
    """texts as a source of one kind, with another field beside the text; the source's path."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    if kind == "jsonl":
        path = directory / "docs.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path = directory / "docs.json"
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif kind == "parquet":
        path = directory / "docs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":
        path = directory / "docs.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "text"])
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "txt":
        path = directory / "docs.txt"
        path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")  # blank lines between are skipped
    else:  # a folder of mixed files, read in sorted path order: a/docs.jsonl, a/docs.parquet, b.txt
        path = directory / "mixed"
        third = len(texts) // 3
        write_source("jsonl", path / "a", texts[:third])
        write_source("parquet", path / "a", texts[third:2 * third])
        (path / "b.txt").write_text("\n".join(texts[2 * third:]) + "\n", encoding="utf-8")
    return path


def read_documents(out_dir, split: str, bos: int) -> list[list[int]]:
    _, arrays = read_split(out_dir, split)
    return split_documents(np.concatenate(arrays), bos)


def expected_documents(texts, sp, val_permille: int) -> dict[str, list[list[int]]]:
    expected = {"train": [], "val": []}
    for text in texts:
        split = "val" if zlib.crc32(text.encode("utf-8")) % 1000 < val_permille else "train"
        expected[split].append([sp.bos_id()] + sp.encode(text))
    return expected


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "txt", "folder"])
def test_each_source_kind_gives_sentencepiece_ids(kind, texts, tokenizer, tmp_path):
    source = write_source(kind, tmp_path / "src", texts)
    out = pretokenize_records(source_files([source]), tokenizer, tmp_path / "out", workers=2, val_permille=200)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    expected = expected_documents(texts, sp, 200)
    assert expected["val"] and expected["train"]
    for split in ("train", "val"):
        assert read_documents(out, split, sp.bos_id()) == expected[split]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lang"] == "any" and manifest["text_field"] == "text" and len(manifest["shards"]) == 1
    assert [s["size"] for s in manifest["sources"]] == [f.stat().st_size for f in source_files([source])]


def test_text_field_names_another_field(texts, tokenizer, tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": "decoy", "body": t}, ensure_ascii=False) + "\n" for t in texts),
                      encoding="utf-8")
    result = llama2zh("pretokenize", source, "--tokenizer", tokenizer, "--out", tmp_path / "out", "--text-field",
                      "body", "--val-permille", "0")
    assert result.returncode == 0, result.stderr
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    assert read_documents(tmp_path / "out", "train", sp.bos_id()) == [[sp.bos_id()] + sp.encode(t) for t in texts]


def test_a_wrong_text_field_is_one_line_naming_it(texts, tokenizer, tmp_path):
    source = write_source("jsonl", tmp_path, texts)
    result = llama2zh("pretokenize", source, "--tokenizer", tokenizer, "--out", tmp_path / "out", "--text-field",
                      "content")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "'content'" in result.stderr and "--text-field" in result.stderr


def test_shards_workers_and_resume_give_the_same_bytes(texts, tokenizer, tmp_path, monkeypatch):
    source = write_source("jsonl", tmp_path / "src", texts * 3)
    files = source_files([source])
    one = pretokenize_records(files, tokenizer, tmp_path / "one", workers=1, val_permille=100, shard_tokens=4000)
    manifest, train = read_split(one, "train")
    _, val = read_split(one, "val")
    sizes = [len(t) + len(v) for t, v in zip(train, val, strict=True)]
    assert len(sizes) >= 4 and all(size >= 4000 for size in sizes[:-1])
    assert all(e["end"][0] == 0 for e in list(manifest["shards"].values())[:-1])  # the input position after each
    bytes_one = {p.name: p.read_bytes() for p in one.iterdir()}

    two = pretokenize_records(files, tokenizer, tmp_path / "two", workers=2, val_permille=100, shard_tokens=4000)
    assert {p.name: p.read_bytes() for p in two.iterdir()} == bytes_one

    # interrupted after two pairs: the third pair's files are in place, but not yet in the manifest
    save = pretokenize_module._save_manifest
    saves = []

    def interrupt_on_third(path, manifest):
        saves.append(path)
        if len(saves) == 3:
            raise KeyboardInterrupt
        save(path, manifest)

    monkeypatch.setattr(pretokenize_module, "_save_manifest", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        pretokenize_records(files, tokenizer, tmp_path / "cut", workers=2, val_permille=100, shard_tokens=4000)
    monkeypatch.setattr(pretokenize_module, "_save_manifest", save)
    assert len(json.loads((tmp_path / "cut" / "manifest.json").read_text())["shards"]) == 2
    assert not list((tmp_path / "cut").glob("*.tmp"))
    (tmp_path / "cut" / "train_0003.bin.x.tmp").write_bytes(b"as left by kill -9")
    pretokenize_records(files, tokenizer, tmp_path / "cut", workers=1, val_permille=100, shard_tokens=4000)
    assert {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir()} == bytes_one

    shards = TokenShards(one)
    assert shards.tokens("train") == sum(map(len, train)) and shards.tokens("val") == sum(map(len, val)) > 0


def test_ctrl_c_stops_cleanly_and_a_rerun_finishes_the_same_bytes(texts, tokenizer, tmp_path):
    source = write_source("jsonl", tmp_path / "src", texts * 20)
    args = ["pretokenize", str(source), "--tokenizer", str(tokenizer), "--shard-tokens", "5000"]
    assert llama2zh(*args, "--out", tmp_path / "whole").returncode == 0
    cut = tmp_path / "cut"
    # Ctrl-C reaches the whole process group, workers included (SIGINT as a terminal delivers it)
    run = subprocess.Popen([sys.executable, "-m", "llama2zh", *args, "--out", str(cut)], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300  # a safety net against a hang, not a speed requirement
    while not (cut / "manifest.json").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGINT)
    try:
        _, stderr = run.communicate(timeout=300)  # a pool whose worker died holding its queue's lock hangs here
    finally:
        run.kill()
    assert run.returncode == 130 and stderr.splitlines()[-1] == "llama2zh: interrupted", stderr
    done = json.loads((cut / "manifest.json").read_text())["shards"]
    assert 0 < len(done) < len(json.loads((tmp_path / "whole" / "manifest.json").read_text())["shards"])
    assert llama2zh(*args, "--out", cut).returncode == 0
    assert {p.name: p.read_bytes() for p in cut.iterdir()} == {p.name: p.read_bytes() for p in (tmp_path / "whole"
                                                                                                 ).iterdir()}


def test_a_hub_dataset_gives_the_bytes_its_local_copy_does(texts, tokenizer, tmp_path):
    local = write_source("folder", tmp_path / "local", texts)
    repo = {f"datasets/owner/corpus/{p.relative_to(local).as_posix()}": p.read_bytes()
            for p in local.rglob("*") if p.is_file()}
    mine = pretokenize_records(source_files([local]), tokenizer, tmp_path / "mine", shard_tokens=5000)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    with HubStandin(repo) as hub:
        result = subprocess.run([sys.executable, "-m", "llama2zh", "pretokenize", "owner/corpus", "--tokenizer",
                                 str(tokenizer), "--out", str(tmp_path / "hub"), "--shard-tokens", "5000"],
                                env=dict(env, HF_ENDPOINT=hub.url), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "hub").glob("*.bin")} == {
        p.name: p.read_bytes() for p in mine.glob("*.bin")}
    sources = json.loads((tmp_path / "hub" / "manifest.json").read_text())["sources"]
    assert [(s["repo"], s["revision"], s["path"]) for s in sources] == [
        ("owner/corpus", COMMIT, path) for path in ("a/docs.jsonl", "a/docs.parquet", "b.txt")]


def test_a_resumed_run_reads_on_from_the_last_finished_pair(texts, tokenizer, tmp_path):
    source = write_source("jsonl", tmp_path / "src", texts)
    out = pretokenize_records(source_files([source]), tokenizer, tmp_path / "out", workers=1, shard_tokens=3000)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    last = max(stamps)
    (out / last).unlink()  # a lost pair is redone; those before it are kept
    pretokenize_records(source_files([source]), tokenizer, tmp_path / "out", workers=2, shard_tokens=3000)
    assert (out / last).exists()
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items() if name[-8:] != last[-8:])


def test_a_folder_source_defaults_to_an_output_inside_it(texts, tokenizer, tmp_path):
    folder = write_source("folder", tmp_path, texts)
    assert not is_story_folder(folder)
    for _ in range(2):  # the rerun must not read its own manifest.json as input
        result = llama2zh("pretokenize", folder, "--tokenizer", tokenizer)
        assert result.returncode == 0, result.stderr
    manifest = json.loads((folder / tokenizer.name / "manifest.json").read_text())
    assert len(manifest["sources"]) == 3
    result = llama2zh("pretokenize", folder / "b.txt", "--tokenizer", tokenizer)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--out" in result.stderr


def test_changed_input_needs_force(texts, tokenizer, tmp_path):
    source = write_source("jsonl", tmp_path, texts)
    args = ("pretokenize", source, "--tokenizer", tokenizer, "--out", tmp_path / "out")
    assert llama2zh(*args).returncode == 0
    with source.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"id": -1, "text": "one more story"}) + "\n")
    result = llama2zh(*args)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "different sources" in result.stderr and "--force" in result.stderr
    assert llama2zh(*args, "--force").returncode == 0
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    documents_read = read_documents(tmp_path / "out", "train", sp.bos_id()) + read_documents(
        tmp_path / "out", "val", sp.bos_id())
    assert len(documents_read) == len(texts) + 1


def test_a_story_folder_is_read_as_stories_unless_a_text_field_is_named(dataset, tokenizer, tmp_path):
    assert is_story_folder(dataset)
    result = llama2zh("pretokenize", dataset, "--tokenizer", tokenizer, "--out", tmp_path / "stories", "--lang", "en")
    assert result.returncode == 0, result.stderr
    assert len(json.loads((tmp_path / "stories" / "manifest.json").read_text())["shards"]) == 3  # one per input shard
    result = llama2zh("pretokenize", dataset, "--tokenizer", tokenizer, "--out", tmp_path / "plain", "--text-field",
                      "story_en", "--val-permille", "0")
    assert result.returncode == 0, result.stderr
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    stories = [text for shard in shard_paths(dataset) for doc_id, text in documents(shard, "en")]
    assert read_documents(tmp_path / "plain", "train", sp.bos_id()) == [[sp.bos_id()] + sp.encode(t) for t in stories]
