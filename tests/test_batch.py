"""Batched decode (l2_batch_*, CBatch): sequences stepped together, each in its own slot and KV cache, get the
logits and greedy ids they get run alone (l2_model_prefill, l2_model_forward), while others join, leave and
reuse slots; fp32 and int8 model.bin files, each kernel set forced with LLAMA2ZH_KERNEL."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from llama2zh.engine import CBatch, CModel, EngineError
from llama2zh.export import write_model_bin
from tests.conftest import random_model

KERNELS = ("portable", "avx2", "avx512")
GQA = dict(dim=128, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=352, max_seq_len=320, vocab_size=300)
# seq_len 40 bounds a batch to 40 rows: a step of 90 sequences runs as 40 + 40 + 10 rows, the 40s shared out
# among 2 threads by rows of the batch (SPLIT_TOKENS = 16 or more each), the 10 by rows of the weights
SHORT = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192, max_seq_len=40, vocab_size=257,
             shared_classifier=False)
# Relative to the largest logit, for the one case that is not bitwise: float32 weights on the avx2 and avx512
# kernels, whose one-token matmul (four partial sums per row) adds the same products in another order than
# their many-token one (one sum per row and token); the rounding differences, about 1e-7 a matmul, grow
# through the layers. Everywhere else a token's sums do not depend on the other rows of its batch (int8 sums
# are exact integers per group, scaled in group order; the portable float loop is the same for every row), so
# the logits are the same bits. A wrong cache or position is off by the order of the logits themselves.
TOLERANCE = 1e-5


def bitwise(version: int, kernel: str) -> bool:
    return version == 2 or kernel == "portable"


def kernel_model(monkeypatch, path, kernel: str | None) -> CModel:
    """The model run by one kernel set (None: the default); skips when this CPU lacks it."""
    if kernel:
        monkeypatch.setenv("LLAMA2ZH_KERNEL", kernel)
    try:
        model = CModel(path)
    except EngineError as e:
        if "lacks" in str(e):
            pytest.skip(f"kernel {kernel}: {e}")
        raise
    assert kernel is None or model.kernel == kernel
    return model


@dataclass
class Seq:
    """A sequence: its prompt in chunks (each prefilled before a step of its own), joining the batch at step
    `join` or once a slot is free, then stepped n_steps times."""

    chunks: list[list[int]]
    join: int
    n_steps: int
    # while running: its slot, chunks prefilled, positions held, greedy ids and the logits behind each
    slot: int = -1
    done_chunks: int = 0
    pos: int = 0
    ids: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)


def prompt(rng, n: int, vocab: int) -> list[int]:
    return [int(t) for t in rng.integers(0, vocab, n)]


def alone(model: CModel, seq: Seq) -> tuple[list[int], list[np.ndarray]]:
    """Greedy ids and logits of seq run by itself on the model's own cache, its prompt in the same chunks."""
    pos = 0
    for chunk in seq.chunks:
        logits = model.prefill(chunk, pos, all_logits=False)
        pos += len(chunk)
    ids, all_logits = [], []
    for _ in range(seq.n_steps + 1):
        ids.append(int(logits.argmax()))
        all_logits.append(logits)
        if len(ids) <= seq.n_steps:
            logits = model.forward(ids[-1], pos)
            pos += 1
    return ids, all_logits


def batched(batch: CBatch, seqs: list[Seq]) -> int:
    """Runs seqs through the batch as a scheduler would: joining when a slot is free, one prefill chunk each
    between steps, every prefilled sequence in each step (in an order that changes), leaving when done. Returns
    how many steps ran."""
    free, waiting, running, step = list(range(batch.max_seqs)), list(seqs), [], 0
    while waiting or running:
        for seq in [s for s in waiting if s.join <= step]:
            if free:
                seq.slot = free.pop(0)
                waiting.remove(seq)
                running.append(seq)
        for seq in running:
            if seq.done_chunks < len(seq.chunks):
                chunk = seq.chunks[seq.done_chunks]
                logits = batch.prefill(seq.slot, chunk, seq.pos)
                seq.pos += len(chunk)
                seq.done_chunks += 1
                if seq.done_chunks == len(seq.chunks):
                    seq.ids.append(int(logits.argmax()))
                    seq.logits.append(logits)
        stepping = [s for s in running if s.done_chunks == len(s.chunks)]
        stepping = stepping[step % len(stepping):] + stepping[:step % len(stepping)] if stepping else []
        if stepping:
            out = batch.step([s.slot for s in stepping], [s.ids[-1] for s in stepping], [s.pos for s in stepping])
            for seq, logits in zip(stepping, out, strict=True):
                seq.pos += 1
                seq.ids.append(int(logits.argmax()))
                seq.logits.append(logits)
                if len(seq.ids) == seq.n_steps + 1:
                    running.remove(seq)
                    free.append(seq.slot)
        step += 1
    return step


def assert_same(seqs: list[Seq], model: CModel, exact: bool) -> None:
    for i, seq in enumerate(seqs):
        ids, logits = alone(model, seq)
        assert seq.ids == ids, f"sequence {i}"
        for got, expected in zip(seq.logits, logits, strict=True):
            if exact:
                assert np.array_equal(got, expected), f"sequence {i}"
            else:
                assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max(), f"sequence {i}"


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_decode_equals_each_sequence_alone(monkeypatch, tmp_path, version, kernel):
    path = write_model_bin(random_model(seed=30, **GQA), tmp_path / "m.bin", version)
    rng, vocab = np.random.default_rng(4), GQA["vocab_size"]
    seqs = [
        Seq([prompt(rng, 5, vocab)], join=0, n_steps=6),  # leaves early: its slot goes to the fifth
        Seq([prompt(rng, 20, vocab), prompt(rng, 17, vocab)], join=0, n_steps=12),  # a prompt in two chunks
        Seq([prompt(rng, 1, vocab)], join=0, n_steps=16),
        Seq([prompt(rng, 150, vocab)], join=2, n_steps=10),  # joins mid-run, past a 128-token prefill batch
        Seq([prompt(rng, 200, vocab), prompt(rng, 110, vocab)], join=3, n_steps=10),  # up to position 319, the last
        Seq([prompt(rng, 4, vocab), prompt(rng, 5, vocab)], join=4, n_steps=8),
    ]
    model = kernel_model(monkeypatch, path, kernel)
    batch = CBatch(model, 4)
    steps = batched(batch, seqs)
    assert 16 < steps < sum(s.n_steps + len(s.chunks) for s in seqs)  # sequences did share steps
    assert {s.slot for s in seqs} == {0, 1, 2, 3}  # and two slots were reused
    assert_same(seqs, kernel_model(monkeypatch, path, kernel), bitwise(version, kernel))


@pytest.mark.parametrize("version", [1, 2])
def test_steps_wider_than_a_batch_and_shared_by_threads(tmp_path, version):
    path = write_model_bin(random_model(seed=31, **SHORT), tmp_path / "m.bin", version)
    rng = np.random.default_rng(5)
    seqs = [Seq([prompt(rng, 1 + i % 7, SHORT["vocab_size"])], join=0, n_steps=3) for i in range(90)]
    model = CModel(path)
    assert model.set_threads(2) == 2
    batched(CBatch(model, 90), seqs)
    assert_same(seqs, CModel(path), bitwise(version, model.kernel))


def test_the_model_s_own_sequence_is_untouched_by_its_batches(tmp_path):
    path = write_model_bin(random_model(seed=32, **GQA), tmp_path / "m.bin", 2)
    model, fresh = CModel(path), CModel(path)
    batch = CBatch(model, 2)
    model.prefill([1, 2, 3])
    batch.prefill(0, [9, 8, 7, 6])
    batch.step([0], [5], [4])
    fresh.prefill([1, 2, 3])
    assert np.array_equal(model.forward(4, 3), fresh.forward(4, 3))


def test_bad_inputs_are_errors_that_change_nothing(tmp_path):
    path = write_model_bin(random_model(seed=33, **GQA), tmp_path / "m.bin", 2)
    model = CModel(path)
    with pytest.raises(EngineError, match="at least one slot"):
        CBatch(model, 0)
    batch = CBatch(model, 3)
    batch.prefill(0, [1, 2, 3])
    batch.prefill(1, [4, 5])
    before = [batch.logits(slot) for slot in (0, 1)]
    for args, message in [
        (([0, 3], [1, 1], [3, 2]), "slot 3 is out of range"),
        (([-1], [1], [0]), "slot -1 is out of range"),
        (([0, 1, 0], [1, 1, 1], [3, 2, 3]), "slot 0 is in the step twice"),
        (([0, 1], [1, 300], [3, 2]), "token 300 is out of range"),
        (([0, 1], [-1, 1], [3, 2]), "token -1 is out of range"),
        (([0, 1], [1, 1], [3, 3]), "slot 1 holds 2 positions: position 3 would leave a gap"),
        (([2], [1], [320]), "position 320 is out of range"),
        (([0], [1], [-1]), "position -1 is out of range"),
        (([], [], []), "at least one sequence"),
        (([0, 1], [1], [3, 2]), "as many tokens and positions as slots"),
    ]:
        with pytest.raises(EngineError, match=message):
            batch.step(*args)
    for args, message in [
        ((3, [1]), "slot 3 is out of range"),
        ((2, []), "at least one token"),
        ((2, [1, 300]), "token 300 is out of range"),
        ((2, [1], 1), "slot 2 holds 0 positions: position 1 would leave a gap"),
        ((0, [1, 2], 10), "slot 0 holds 3 positions"),
    ]:
        with pytest.raises(EngineError, match=message):
            batch.prefill(*args)
    with pytest.raises(EngineError, match="slot 3 is out of range"):
        batch.logits(3)
    assert all(np.array_equal(batch.logits(slot), logits) for slot, logits in zip((0, 1), before, strict=True))
    with pytest.raises(EngineError, match="gap"):  # the failed steps advanced nothing
        batch.step([0], [1], [4])
    batch.prefill(0, [1] * 317, 3)  # the cache full, up to position 319
    with pytest.raises(EngineError, match="positions 3..320 are out of range"):
        batch.prefill(0, [1] * 318, 3)
    with pytest.raises(EngineError, match="position 320 is out of range"):
        batch.step([0], [1], [320])
    batch.step([0], [1], [319])
