"""`download model`: the registry of published tiny llamas, downloaded from a local stand-in for the hub.

stories260K is served as the real upstream file (../shared/models/stories260K.bin). The others are
about 30 to 440 MB, too big to serve here, so for the download each is given a small shape (same
vocabulary, version and classifier) and served as a real model.bin of that shape, written by
export.write_model_bin. That the registry's real shapes pass the same checks is tested apart, on
sparse files of the real size. Tokenizers from tokenizers/registry.json are served as the real
files (their sha256 is checked); tok512.model and tok5000.bin, absent from ../shared, as files of
the same kind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import sentencepiece as spm
import torch

from llama2zh.corpus.download import COMPLETE, tokenizer_registry
from llama2zh.engine import CTokenizer
from llama2zh.errors import UserError
from llama2zh.export import encode_header, write_model_bin
from llama2zh.interop import registry
from llama2zh.interop.registry import check_model, download_model, format_registry
from llama2zh.model import ModelArgs, Transformer
from tests.conftest import ROOT, random_model, shared_file
from tests.hub_standin import HubStandin

SMALL = dict(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=8)
# the sizes the hub lists for the real files, 3 significant digits (stories260K: the size of ../shared's copy)
PUBLISHED_MB = {"stories260K": "1.06", "stories15M": "60.8", "stories42M": "167", "stories110M": "438",
                "stories15M-llama2-enzh": "87.7", "stories15M-baichuan": "97.7", "stories15M-zh": "29.7",
                "stories42M-zh": "112", "stories110M-zh": "355"}


def model_args(shape: registry.Shape) -> ModelArgs:
    return ModelArgs(**{k: v for k, v in asdict(shape).items() if k != "version"})


def v0_size(shape: registry.Shape) -> int:
    """llama2.c's legacy layout: 7 int32, the weights, then the RoPE tables (cos and sin)."""
    head_dim = shape.dim // shape.n_heads
    return 7 * 4 + 4 * (shape.params + shape.max_seq_len * head_dim)


def key(source) -> str:
    return f"{source.repo}/{source.file}"


@pytest.fixture
def hub(monkeypatch):
    """Starts a HubStandin and points the hub client at it, as HF_ENDPOINT does when the client is
    imported (in this process it already is: test_hf_endpoint_is_honoured sets the variable itself)."""
    from huggingface_hub import constants

    started = []

    def start(files, **options):
        stand_in = HubStandin(files, **options).__enter__()
        started.append(stand_in)
        monkeypatch.setattr(constants, "ENDPOINT", stand_in.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            stand_in.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        return stand_in

    yield start
    for stand_in in started:
        stand_in.__exit__(None, None, None)


def real_260k() -> bytes:
    return shared_file("models/stories260K.bin").read_bytes()


def small_model_bin(tmp_path, shape: registry.Shape) -> bytes:
    path = write_model_bin(random_model(**model_args(shape).to_dict()), tmp_path / "served.bin", version=shape.version)
    return path.read_bytes()


def make_small(monkeypatch, name: str, keep_sha256: bool = False) -> registry.Model:
    """The entry with a small shape, and the hub's sha256 in place of the registry's (the served
    files are not the published ones), unless keep_sha256."""
    entry = registry.MODELS[name]
    small = replace(entry, shape=replace(entry.shape, **SMALL))
    if not keep_sha256:
        tokenizer = entry.tokenizer if isinstance(entry.tokenizer, str) else replace(entry.tokenizer, sha256=None)
        small = replace(small, source=replace(entry.source, sha256=None), tokenizer=tokenizer)
    monkeypatch.setitem(registry.MODELS, name, small)
    return small


def tokenizer_files(entry: registry.Model) -> dict[str, bytes]:
    if isinstance(entry.tokenizer, str):
        source = tokenizer_registry()[entry.tokenizer]
        return {key(source): shared_file(f"tokenizers/{entry.tokenizer}/tokenizer.model").read_bytes()}
    kind = "tokenizers/llama2en/tokenizer.model" if entry.tokenizer.file.endswith(".model") else \
        "thirdparty/llama2c_zh/llama2en.bin"
    return {key(entry.tokenizer): shared_file(kind).read_bytes()}


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_every_entry_downloads_into_dest_name_once(tmp_path, hub, monkeypatch, name):
    if name == "stories260K":
        entry, served = registry.MODELS[name], real_260k()
    else:
        entry = make_small(monkeypatch, name)
        served = small_model_bin(tmp_path, entry.shape)
    stand_in = hub({key(entry.source): served, **tokenizer_files(entry)})
    target = download_model(name, tmp_path / "models")
    assert target == tmp_path / "models" / name
    assert (target / "model.bin").read_bytes() == served
    assert (target / "tokenizer.bin").stat().st_size > 0
    # every entry gets a tokenizer.model; where only a tokenizer.bin is published, it is rebuilt from that and
    # encodes as ./run reads the file
    sp = spm.SentencePieceProcessor(model_file=str(target / "tokenizer.model"))
    ctok = CTokenizer(target / "tokenizer.bin", 0)
    assert sp.vocab_size() == ctok.vocab_size
    text = "从前，有一个小女孩。Once upon a time 🙂"
    assert sp.encode(text) == ctok.encode(text, bos=False)
    assert json.loads((target / COMPLETE).read_text())["sha256"] == hashlib.sha256(served).hexdigest()
    count = len(stand_in.requests)
    assert download_model(name, tmp_path / "models") == target
    assert len(stand_in.requests) == count  # the finished download was not fetched again


def test_interrupted_download_resumes(tmp_path, hub, monkeypatch):
    from huggingface_hub import constants

    # the client keeps what it has read in chunks of 10 MB; a smaller one lets a 1 MB file resume mid-way
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    entry, served = registry.MODELS["stories260K"], real_260k()
    files = tokenizer_files(entry)  # no model yet: this first run fetches the tokenizer, then fails
    stand_in = hub(files)
    with pytest.raises(UserError, match="cannot download karpathy/tinyllamas/stories260K/stories260K.bin"):
        download_model("stories260K", tmp_path / "models")
    files[key(entry.source)] = served
    stand_in.cut_after = len(served) // 3  # the next GET, the model's (the tokenizer is cached), is dropped
    download_model("stories260K", tmp_path / "models")
    assert (tmp_path / "models/stories260K/model.bin").read_bytes() == served
    gets = [r for r in stand_in.requests if r[0] == "GET" and r[1].endswith("stories260K.bin")]
    assert len(gets) == 2 and gets[1][2] == f"bytes={len(served) // 3 // (1 << 16) * (1 << 16)}-"


@pytest.mark.parametrize("served, message", [
    (lambda tmp_path: real_260k()[:-4], "bytes, the header implies"),
    (lambda tmp_path: real_260k() + b"\0" * 4, "bytes, the header implies"),
    (lambda tmp_path: b"\xff" * 4096, "bad header"),
    (lambda tmp_path: shared_file("reference/stories260K_llama2c_v1.bin").read_bytes(), "version 1 (expected 0)"),
    (lambda tmp_path: small_model_bin(tmp_path, replace(registry.MODELS["stories260K"].shape, **SMALL)),
     "not the model.bin of stories260K: dim 16 (expected 64), hidden_dim 32 (expected 172)"),
])
def test_wrong_size_or_header_is_refused_in_one_line(tmp_path, hub, served, message):
    entry = registry.MODELS["stories260K"]
    hub({key(entry.source): served(tmp_path), **tokenizer_files(entry)})
    with pytest.raises(UserError, match=re.escape(message)) as error:
        download_model("stories260K", tmp_path / "models")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "models/stories260K/model.bin").exists()


def test_sha256_known_to_the_registry_is_checked(tmp_path, hub, monkeypatch):
    entry = make_small(monkeypatch, "stories15M", keep_sha256=True)
    hub({key(entry.source): small_model_bin(tmp_path, entry.shape), **tokenizer_files(entry)})
    with pytest.raises(UserError, match=f"differs from the expected {entry.source.sha256}"):
        download_model("stories15M", tmp_path / "models")
    assert not (tmp_path / "models/stories15M" / COMPLETE).exists()


def test_hf_endpoint_is_honoured(tmp_path):
    entry, served = registry.MODELS["stories260K"], real_260k()
    code = ("import sys; from pathlib import Path; from llama2zh.interop.registry import download_model; "
            "download_model('stories260K', Path(sys.argv[1]))")
    with HubStandin({key(entry.source): served, **tokenizer_files(entry)}) as stand_in:
        env = dict(os.environ, HF_ENDPOINT=stand_in.url, HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT))
        env.pop("HF_HUB_OFFLINE", None)
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "models")], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "models/stories260K/model.bin").read_bytes() == served
        assert any(path.endswith("stories260K/stories260K.bin") for _, path, _ in stand_in.requests)


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(UserError, match="unknown model 'nosuch'; known: stories260K, stories15M, "):
        download_model("nosuch", tmp_path)


def test_list_is_a_table_of_every_entry():
    lines = format_registry().splitlines()
    assert lines[0].split() == ["NAME", "PARAMS", "DIM", "LAYERS", "HEADS", "KV", "VOCAB", "SEQ", "V", "TOKENIZER",
                                "REPO", "FILE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == list(registry.MODELS)
    assert rows["stories260K"] == ["stories260K", "260K", "64", "5", "8", "4", "512", "512", "v0", "tok512.model",
                                   "karpathy/tinyllamas", "stories260K/stories260K.bin"]
    assert rows["stories110M"][1] == "109.5M" and rows["stories15M-baichuan"][9] == "baichuan"
    assert rows["stories42M-zh"][6:] == ["5000", "1024", "v0", "tok5000.bin", "adam89/tinyllamas-chinese",
                                         "stories42M.bin"]


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_real_shapes_pass_the_checks(tmp_path, name):
    """A file with the entry's real header and size passes (a sparse file: no disk is used), its size
    is the one the hub lists, and the parameter count is the model's."""
    shape = registry.MODELS[name].shape
    path = tmp_path / "model.bin"
    with open(path, "wb") as f:
        f.write(encode_header(model_args(shape), shape.version))
        f.truncate(v0_size(shape))
    check_model(path, name, shape)
    assert f"{v0_size(shape) / 1e6:.3g}" == PUBLISHED_MB[name]
    with torch.device("meta"):
        assert sum(p.numel() for p in Transformer(model_args(shape)).parameters()) == shape.params


def test_real_stories260k_passes_and_tokenizer_vocabularies_match():
    check_model(shared_file("models/stories260K.bin"), "stories260K", registry.MODELS["stories260K"].shape)

    for entry in registry.MODELS.values():
        if isinstance(entry.tokenizer, str):
            path = shared_file(f"tokenizers/{entry.tokenizer}/tokenizer.model")
            assert spm.SentencePieceProcessor(model_file=str(path)).vocab_size() == entry.shape.vocab_size
