"""PyTorch <-> C parity on random models of several shapes with the three shared tokenizers."""

from __future__ import annotations

import subprocess
import zlib

import pytest
import sentencepiece as spm
import torch

from llama2zh.engine import CModel, CTokenizer, EngineError, run_binary
from llama2zh.export import read_model_bin, write_model_bin
from llama2zh.verify import Subject, tokenizer_bin_for, verify
from tests.conftest import TOKENIZERS, random_model, shared_file

VOCAB = {"llama2en": 32000, "llama2enzh": 55296, "baichuan": 64000}
SHAPES = {
    "mha-untied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=172, max_seq_len=256,
                       shared_classifier=False),
    "gqa-tied": dict(dim=128, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=344, max_seq_len=320),
    "15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, max_seq_len=256),
}
CASES = [(shape, tok) for shape in ("mha-untied", "gqa-tied") for tok in TOKENIZERS] + [("15M", "llama2enzh")]


def make_subject(tmp_path, tokenizer_dirs, shape: str, tokenizer: str, version: int = 1) -> Subject:
    model = random_model(seed=zlib.crc32(f"{shape}/{tokenizer}".encode()), vocab_size=VOCAB[tokenizer], **SHAPES[shape])
    model_bin = write_model_bin(model, tmp_path / "model.bin", version)
    directory = tokenizer_dirs[tokenizer]
    return Subject(model_bin, model, directory / "tokenizer.model", tokenizer_bin_for(directory))


@pytest.mark.parametrize("shape, tokenizer", CASES)
def test_verify_passes_on_random_models(tmp_path, tokenizer_dirs, shape, tokenizer):
    checks = verify(make_subject(tmp_path, tokenizer_dirs, shape, tokenizer))
    assert [c.name for c in checks] == ["logits", "tokens", "greedy", "text"]
    for check in checks:
        assert check.passed, check.line()
    assert "200 tokens" in checks[2].detail


def test_verify_passes_on_a_legacy_v0_file(tmp_path, tokenizer_dirs):
    checks = verify(make_subject(tmp_path, tokenizer_dirs, "gqa-tied", "llama2en", version=0))
    assert all(c.passed for c in checks), [c.line() for c in checks]


@pytest.mark.parametrize("prompt", ["从前，有一个小女孩", "她在花园里看见了一只蝴蝶。", "小狗说：“你好！”"])
def test_run_prints_byte_fallback_chinese_as_sentencepiece_does(tmp_path, tokenizer_dirs, prompt):
    # llama2en holds few Chinese characters: most of these prompts and outputs are byte pieces
    subject = make_subject(tmp_path, tokenizer_dirs, "mha-untied", "llama2en")
    sp = spm.SentencePieceProcessor(model_file=str(subject.tokenizer_model))
    ids = [sp.bos_id()] + sp.encode(prompt)
    assert any(sp.is_byte(i) for i in ids)
    ctok = CTokenizer(subject.tokenizer_bin)
    generated = CModel(subject.model_bin).generate(ctok, prompt, 120, temperature=0.0)
    out = subprocess.run([str(run_binary()), str(subject.model_bin), "-k", str(subject.tokenizer_bin), "-t", "0",
                          "-n", "120", "-i", prompt], capture_output=True, check=True, timeout=120)
    assert out.stdout == sp.decode(ids + generated).encode("utf-8") + b"\n"


def test_stories260K_256_greedy_tokens_match_pytorch():
    model_bin = shared_file("models/stories260K.bin")
    ids_tokenizer = CTokenizer(shared_file("reference/idtok512.bin"), vocab_size=512)
    c_ids = CModel(model_bin).generate(ids_tokenizer, "", 256, temperature=0.0)
    assert c_ids == read_model_bin(model_bin).generate([1], 256, temperature=0.0)
    assert len(c_ids) == 256


def test_forward_logits_match_per_position():
    model_bin = shared_file("models/stories260K.bin")
    cmodel, model = CModel(model_bin), read_model_bin(model_bin)
    tokens = [1, 400, 30, 421, 7, 88]
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0].numpy()
    for pos, token in enumerate(tokens):
        got = cmodel.forward(token, pos)
        assert got.shape == (512,) and got.dtype.name == "float32"
        assert abs(got - expected[pos]).max() <= 1e-5 * abs(expected[pos]).max()


def test_engine_errors_become_exceptions(tmp_path):
    model_bin = shared_file("models/stories260K.bin")
    cmodel = CModel(model_bin)
    with pytest.raises(EngineError, match="token"):
        cmodel.forward(512, 0)
    with pytest.raises(EngineError, match="pos"):
        cmodel.forward(1, 512)
    truncated = tmp_path / "t.bin"
    truncated.write_bytes(model_bin.read_bytes()[:-4])
    with pytest.raises(EngineError, match="t.bin"):
        CModel(truncated)
    with pytest.raises(EngineError):
        CModel(tmp_path / "missing.bin")
    with pytest.raises(EngineError):
        CTokenizer(shared_file("reference/idtok512.bin"), vocab_size=1000)
