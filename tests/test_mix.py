"""Weighted mixes of datasets: proportions, the same global batch for any number of ranks, config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llama2zh.config import ConfigError, load_config
from llama2zh.corpus.dataset import Mixture, TokenShards, allocate
from llama2zh.errors import UserError


def write_shards(directory, low: int, sizes: list[int]) -> TokenShards:
    """Token shards whose ids all lie in [low, low + 100): a row tells which dataset it came from."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(low)
    shards = {}
    for i, size in enumerate(sizes):
        for split, n in (("train", size), ("val", size // 10)):
            (directory / f"{split}_{i:04d}.bin").write_bytes(rng.integers(low, low + 100, n, dtype="<u2").tobytes())
        shards[f"s{i}"] = {split: {"file": f"{split}_{i:04d}.bin", "tokens": n, "documents": 1}
                           for split, n in (("train", size), ("val", size // 10))}
    manifest = {"tokenizer": "t", "tokenizer_sha256": "0", "vocab_size": 300, "bos_id": 1, "dtype": "uint16",
                "lang": "any", "shards": shards}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return TokenShards(directory)


@pytest.fixture
def mixture(tmp_path) -> Mixture:
    """A big dataset at weight 0.3 and one a tenth of its size at 0.7."""
    big = write_shards(tmp_path / "big", 0, [40_000, 20_000])
    small = write_shards(tmp_path / "small", 100, [6_000])
    return Mixture([("big", 3.0, big), ("small", 7.0, small)])


def test_allocation_rounds_each_share_down_or_up_and_sums_to_the_rows():
    generator = torch.Generator().manual_seed(0)
    weights = [0.5, 0.2, 0.3]
    counts = np.array([allocate(weights, 7, generator) for _ in range(2000)])
    assert (counts.sum(1) == 7).all()
    for column, weight in zip(counts.T, weights, strict=True):
        assert set(column) <= {int(np.floor(weight * 7)), int(np.ceil(weight * 7))}


def test_a_two_dataset_mix_draws_tokens_within_two_percent_of_its_weights(mixture):
    generator = torch.Generator().manual_seed(1)
    small_tokens = total = 0
    for _ in range(300):  # 5 rows a batch: every batch rounds (3.5 small rows), only the average can be right
        x, y, segments = mixture.batch("train", 5, 32, generator)
        assert segments is None and torch.equal(x[:, 1:], y[:, :-1])
        small_tokens += int((x >= 100).sum())
        total += x.numel()
    assert abs(small_tokens / total - 0.7) <= 0.02 * 0.7
    assert mixture.drawn == [total - small_tokens, small_tokens]
    epochs = mixture.epochs()
    assert epochs["small"] == pytest.approx(small_tokens / 6_000) and epochs["big"] == pytest.approx(
        (total - small_tokens) / 60_000)
    assert epochs["small"] > 5 * epochs["big"]  # whatever the sizes: the small one is seen many times over


def test_every_rank_keeps_its_rows_of_the_one_global_batch(mixture):
    for seed in range(5):
        one = mixture.batch("train", 6, 16, torch.Generator().manual_seed(seed))
        for world in (2, 3):
            ranks = [mixture.batch("train", 6 // world, 16, torch.Generator().manual_seed(seed), rank, world)
                     for rank in range(world)]
            for i in (0, 1):
                assert torch.equal(torch.cat([r[i] for r in ranks]), one[i])


def test_the_counts_resume_and_a_changed_mix_is_refused(mixture, tmp_path):
    generator = torch.Generator().manual_seed(2)
    mixture.batch("train", 4, 8, generator)
    state, rng = mixture.state_dict(), generator.get_state()
    after = mixture.batch("train", 4, 8, generator)
    mixture.load_state_dict(state)
    generator.set_state(rng)
    assert torch.equal(mixture.batch("train", 4, 8, generator)[0], after[0])
    mixture.batch("val", 4, 8, generator)  # evaluation draws are not training epochs
    assert sum(mixture.drawn) == 8 * 8
    other = Mixture([("big", 1.0, mixture.parts[0]), ("small", 1.0, mixture.parts[1])])
    with pytest.raises(UserError, match="trained on the mix big=0.3, small=0.7; resume it with that mix"):
        other.load_state_dict(state)


@pytest.mark.parametrize("mix, message", [
    ("data/a=0.5, data/b", "got 'data/b'"),
    ("data/a=0", "positive weights, got 'data/a=0'"),
    ("data/a=-1", "positive weights"),
    ("data/a=heavy", "positive weights"),
    ("data/a=1,", "got ''"),
    ("data/a=1, other/a=1", "two datasets share a folder name (a, a)"),
])
def test_bad_mixes_are_config_errors(mix, message):
    with pytest.raises(ConfigError, match="mix") as error:
        load_config(None, [f"--mix={mix}"])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_mix_is_written_back_and_read_again(tmp_path):
    config = load_config(None, ["--mix=data/tinystories-zh=0.5, data/tinystories=0.2, data/wiki=0.3"])
    (tmp_path / "c.toml").write_text(config.to_toml())
    again = load_config(tmp_path / "c.toml")
    assert again.datasets == [("data/tinystories-zh", 0.5), ("data/tinystories", 0.2), ("data/wiki", 0.3)]
    assert load_config(None).datasets == [("data/sample", 1.0)]
