"""Shared fixtures: the reference files in ../shared and small random models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llama2zh.model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZERS = ("llama2en", "llama2enzh", "baichuan")


def shared_file(relative: str) -> Path:
    """A reference file from ../shared, or a skip saying it is missing."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"reference file {path} is absent (../shared is not beside the project)")
    return path


def random_model(seed: int = 0, **shape) -> Transformer:
    """A randomly initialised model; norms perturbed so a misplaced norm weight shows."""
    model = Transformer(ModelArgs(**shape))
    generator = torch.Generator().manual_seed(seed)
    model.init_weights(generator)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """Per shared tokenizer, a private directory holding a copy of its tokenizer.model."""
    dirs = {}
    for name in TOKENIZERS:
        source = shared_file(f"tokenizers/{name}/tokenizer.model")
        target = tmp_path_factory.mktemp(name)
        shutil.copyfile(source, target / "tokenizer.model")
        dirs[name] = target
    return dirs
