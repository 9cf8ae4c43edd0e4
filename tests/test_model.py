"""The PyTorch model: KV-cached generation equals recomputation, sampling, configs."""

from __future__ import annotations

import pytest
import torch

from llama2zh.config import Config, ConfigError, load_config
from llama2zh.model import KVCache, llama_hidden_dim, penalize, sample_token
from tests.conftest import random_model

GQA = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=48)


def test_hidden_dim_rule_matches_llama2c():
    assert llama_hidden_dim(288) == 768
    assert llama_hidden_dim(512) == 1376
    assert llama_hidden_dim(768) == 2048


@pytest.mark.parametrize("shared", [True, False])
def test_cached_generate_equals_full_recompute(shared):
    model = random_model(seed=1, shared_classifier=shared, **GQA)
    prompt = [1, 5, 9, 33]
    generated = model.generate(prompt, 30, temperature=0.0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert generated == ids[len(prompt):]


def test_block_after_cache_equals_full_forward():
    model = random_model(seed=2, **GQA)
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, batch=1)
        first = model(tokens[:, :7], 0, cache)
        rest = model(tokens[:, 7:], 7, cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_generate_stops_before_stop_id_and_at_seq_len():
    model = random_model(seed=3, **GQA)
    free = model.generate([1], 100)
    assert len(free) == GQA["max_seq_len"]  # positions 0..seq_len-1 each yield one token
    stop = free[5]
    stopped = model.generate([1], 100, stop_ids=(stop,))
    assert stopped == free[: free.index(stop)]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0])
    generator = torch.Generator().manual_seed(0)
    picks = {sample_token(logits, 1.0, 0.5, generator) for _ in range(200)}
    assert picks == {0}  # token 0 alone holds more than half the mass
    picks = {sample_token(logits, 1.0, 0.99, generator) for _ in range(400)}
    assert picks <= {0, 1, 2} and {0, 1} <= picks


def test_seeded_sampling_repeats():
    model = random_model(seed=4, **GQA)
    a = model.generate([1, 2], 20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = model.generate([1, 2], 20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert a == b


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("dim = 64\nn_heads = 4\nshared_classifier = false\n")
    config = load_config(path, ["--n_layers=3", "--norm_eps=1e-6", "--shared-classifier=true"])
    assert (config.dim, config.n_heads, config.n_layers) == (64, 4, 3)
    assert config.norm_eps == 1e-6 and config.shared_classifier is True
    args = config.model_args(vocab_size=100)
    assert args.n_kv_heads == 4 and args.hidden_dim == llama_hidden_dim(64)
    assert load_config(None, []) == Config()


@pytest.mark.parametrize("override, message", [
    ("--dimm=3", "unknown config key 'dimm'; valid keys: dim, n_layers"),
    ("--dim=abc", "dim must be an int"),
    ("--shared_classifier=maybe", "shared_classifier must be true or false"),
    ("dim", "not of the form --key=value"),
])
def test_bad_overrides_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_config_file_is_rejected(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('dim = "wide"\n')
    with pytest.raises(ConfigError, match="dim must be a int"):
        load_config(path)
    path.write_text("dim = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="dim 65 is not divisible by n_heads 6"):
        Config(dim=65).model_args(100)


def test_penalties_are_openai_s():
    """presence once for a token generated at all, frequency per time it was generated."""
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    assert penalize(logits, counts, 0.5, 0.25).tolist() == [1.0, 0.25, -0.25, 1.0]
    assert penalize(logits, counts, -1.0, 0.0).tolist() == [1.0, 2.0, 2.0, 1.0]  # negative: encourages


def test_penalties_break_a_greedy_loop():
    model = random_model(3, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=128)
    with torch.no_grad():  # every input predicts itself: greedy repeats the prompt's last token forever
        model.output.weight.copy_(model.tok_embeddings.weight * 2)
    plain = model.generate([1, 7], 40)
    assert set(plain) == {7}
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        penalized = model.generate([1, 7], 40, **penalty)
        assert penalized[0] == 7 and len(set(penalized)) == 40  # nothing generated yet, then never again


def test_targets_give_the_mean_cross_entropy_of_the_logits():
    model = random_model()
    tokens = torch.randint(model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    targets = tokens.roll(-1, dims=1)
    targets[0, :5] = -1  # not trained on
    logits = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
    assert torch.equal(model(tokens, targets=targets), expected)
