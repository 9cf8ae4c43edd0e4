"""Seed inputs for fuzz_loaders.c (`make fuzz`): small valid files of every kind, written by
the project's own writers, behind the byte that picks the loader (0 model, 1 tokenizer).

usage: python csrc/fuzz_seeds.py OUT_DIR
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from llama2zh.chat import add_chat_pieces
from llama2zh.export import write_model_bin
from llama2zh.model import ModelArgs, Transformer
from llama2zh.vocab.export import tokenizer_data, write_tokenizer_bin

MODELS = {  # tiny shapes; "odd" has a group size of 2 and unaligned int8 scales (v2 and v3)
    "gqa": dict(dim=8, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=16, vocab_size=24, max_seq_len=8),
    "untied": dict(dim=8, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=16, vocab_size=13, max_seq_len=6,
                   shared_classifier=False),
    "odd": dict(dim=6, n_layers=1, n_heads=1, n_kv_heads=1, hidden_dim=10, vocab_size=7, max_seq_len=4),
}
TEXT = ["Once upon a time, there was a little girl named Lily.", "从前，有一个小女孩叫莉莉。",
        "She liked to play with her dog in the park.", "她喜欢和她的小狗在公园里玩。"] * 20


def model_seeds(out: Path, scratch: Path) -> None:
    for name, shape in MODELS.items():
        model = Transformer(ModelArgs(**shape))
        model.init_weights(torch.Generator().manual_seed(0))
        for version in (0, 1, 2):
            path = write_model_bin(model, scratch / f"{name}_v{version}.bin", version)
            (out / f"model_{name}_v{version}").write_bytes(b"\0" + path.read_bytes())
        # v3 in 4-bit groups of 8 (the SIMD layout) or 2 ("odd": the portable loops), the embedding 4- or
        # 8-bit, "gqa" with its first layer int8 (the default); the harness runs byte 2 (bit 1 of the first
        # byte) on the portable kernels
        for bits in (4, 8):
            path = write_model_bin(model, scratch / f"{name}_v3_{bits}.bin", 3, embedding_bits=bits)
            for first in (0, 2):
                (out / f"model_{name}_v3_e{bits}_{first}").write_bytes(bytes([first]) + path.read_bytes())


def tokenizer_seeds(out: Path, scratch: Path) -> None:
    pieces = [f"[{i}]".encode() for i in range(40)]
    plain = {"max_token_length": 4, "pieces": pieces, "scores": [-float(i) for i in range(40)], "trailer": None}
    (out / "tokenizer_ids").write_bytes(b"\1" + write_tokenizer_bin(plain, scratch / "ids.bin").read_bytes())
    # a few normalizer rules (full-width to ASCII), not NFKC's megabytes of them
    rules = scratch / "rules.tsv"
    rules.write_text("".join(f"{0xFF01 + i:X}\t{0x21 + i:X}\n" for i in range(94)))
    for model_type in ("bpe", "unigram"):
        prefix = scratch / model_type
        spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_prefix=str(prefix), vocab_size=310,
                                       model_type=model_type, byte_fallback=True, character_coverage=1.0,
                                       normalization_rule_tsv=str(rules), minloglevel=2)
        # and as a chat-tuned model's: trailer version 2, with the chat section
        Path(f"{prefix}_chat.model").write_bytes(add_chat_pieces(Path(f"{prefix}.model").read_bytes())[0])
        for name in (model_type, f"{model_type}_chat"):
            path = write_tokenizer_bin(tokenizer_data(scratch / f"{name}.model"), scratch / f"{name}.bin")
            (out / f"tokenizer_{name}").write_bytes(b"\1" + path.read_bytes())


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        model_seeds(out, Path(scratch))
        tokenizer_seeds(out, Path(scratch))


if __name__ == "__main__":
    main()
