"""MinHash signatures of character shingles, LSH band keys, and a compact map of 64-bit keys.

A document's shingles are its 5-character substrings, whitespace removed: Chinese has no word
boundaries, and 5 characters are two or three words, so a changed character touches 5 shingles
of hundreds. Each shingle hashes to 32 bits x; the signature is its minimum under NUM_PERM random
functions, the top 32 bits of (a*x + b) mod 2^64 with a odd (multiply-shift hashing; the usual
(a*x + b) mod 2^61 - 1 with a, b < 2^32, to stay in uint64, rarely wraps, so all its functions
pick the same few smallest x and their positions agree or differ together). Two documents agree
at a signature position with probability their Jaccard similarity J, so the share of equal
positions estimates J (standard error sqrt(J(1 - J) / NUM_PERM)).

LSH cuts the signature into bands of `rows` positions and keys each band; a document whose key
in some band was seen before is a candidate, with probability 1 - (1 - J^rows)^bands, and a
near-duplicate when the signatures agree too (similar()). The rows are the most that still find
a pair at the threshold 90% of the time: at 0.8, 16 bands of 8 rows (found: 95% at J = 0.8, 99.4%
at 0.85; pairs at 0.5 by chance: 6%, at 0.3: 0.1%, which the signatures then clear).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import xxhash

SHINGLE = 5
NUM_PERM = 128
_rng = np.random.default_rng(14)  # fixed: signatures must not change between runs
A = _rng.integers(0, 1 << 64, NUM_PERM, dtype=np.uint64) | np.uint64(1)  # odd
B = _rng.integers(0, 1 << 64, NUM_PERM, dtype=np.uint64)
BLOCK = 1024  # shingles per (shingles x NUM_PERM) product, to bound its memory


def lsh_rows(threshold: float) -> int:
    """Rows per band: the most that find a pair of Jaccard `threshold` with probability >= 0.9."""
    return max(r for r in (1, 2, 4, 8, 16) if 1 - (1 - threshold ** r) ** (NUM_PERM // r) >= 0.9)


def shingle_hashes(text: str) -> np.ndarray:
    """The 32-bit hashes (as uint64) of the text's shingles, one per position; a short text is one shingle."""
    chars = np.frombuffer("".join(text.split()).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(chars) < SHINGLE:
        chars = np.concatenate([chars, np.zeros(SHINGLE - len(chars), np.uint64)])
    n = len(chars) - SHINGLE + 1
    h = np.zeros(n, np.uint64)
    for k in range(SHINGLE):  # a polynomial hash, wrapping mod 2^64
        h = h * np.uint64(0x100000001B3) + chars[k:k + n]
    h ^= h >> np.uint64(33)  # murmur3's finaliser: the top 32 bits depend on every character
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return h >> np.uint64(32)


def signature(hashes: np.ndarray) -> np.ndarray:
    """The MinHash signature (NUM_PERM uint32 values) of a set of shingle hashes."""
    signature = np.full(NUM_PERM, np.iinfo(np.uint64).max, np.uint64)
    for start in range(0, len(hashes), BLOCK):
        y = np.multiply(hashes[start:start + BLOCK, None], A)  # wraps mod 2^64 on purpose
        y += B
        np.minimum(signature, y.min(axis=0), out=signature)
    return (signature >> np.uint64(32)).astype(np.uint32)  # the shift keeps order: the minimum's top bits


def similar(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
    """Whether two signatures estimate a Jaccard similarity of at least `threshold`, less one standard
    error of the estimate there (sqrt(J(1 - J) / NUM_PERM): 0.035 at 0.8, so 98 of 128 positions).

    The slack keeps most pairs right at the threshold (84% of those at 0.8) while a pair at 0.7
    passes 5% of the time. Measured on the built-in stories: distinct stories that share a band
    estimate 0.51 (median) to 0.72 (the most of 600), a story with one character in 150 changed 0.85 to 0.93.
    """
    return int(np.count_nonzero(a == b)) >= NUM_PERM * (threshold - math.sqrt(threshold * (1 - threshold) / NUM_PERM))


def band_keys(signature: np.ndarray, rows: int) -> list[int]:
    """One 64-bit key per band; seeded by the band's number, so equal values in two bands differ."""
    return [xxhash.xxh3_64_intdigest(signature[start:start + rows].tobytes(), seed=start // rows)
            for start in range(0, NUM_PERM, rows)]


class KeyMap:
    """64-bit keys to 32-bit values (a key may have several) in about 12 bytes a key.

    New keys wait in a small dict, then become a sorted run of numpy arrays; runs merge while one is
    not more than twice the size of the next, like a binary counter: at most log2(n / BUFFER) runs
    to search, each key merged O(log n) times, and no Python object per key beyond the buffer.
    """

    BUFFER = 1 << 14

    def __init__(self):
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, their values), largest first
        self._new: dict[int, list[int]] = {}
        self._new_count = 0

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self._runs) + self._new_count

    def find(self, keys: list[int]) -> list[int]:
        """The values of any of `keys`, sorted, each once."""
        found = [value for key in keys for value in self._new.get(key, ())]
        wanted = np.array(keys, np.uint64)
        for run_keys, run_values in self._runs:
            low, high = np.searchsorted(run_keys, wanted, "left"), np.searchsorted(run_keys, wanted, "right")
            for a, b in zip(low[high > low].tolist(), high[high > low].tolist(), strict=True):
                found.extend(run_values[a:b].tolist())
        return sorted(set(found))

    def add(self, keys: Iterable[int], value: int) -> None:
        for key in keys:
            self._new.setdefault(key, []).append(value)
            self._new_count += 1
        if self._new_count >= self.BUFFER:
            keys = np.fromiter((key for key, values in self._new.items() for _ in values), np.uint64,
                               self._new_count)
            values = np.fromiter((v for values in self._new.values() for v in values), np.uint32, self._new_count)
            self._new.clear()
            self._new_count = 0
            self.extend(keys, values)

    def extend(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Adds keys[i] -> values[i] in bulk."""
        order = np.argsort(keys, kind="stable")
        self._runs.append((keys[order], values[order].astype(np.uint32)))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (keys, values), (big_keys, big_values) = self._runs.pop(), self._runs.pop()
            # a linear merge: each key of the smaller run goes after the bigger run's keys up to it
            at = np.searchsorted(big_keys, keys, "right") + np.arange(len(keys))
            rest = np.ones(len(big_keys) + len(keys), bool)
            rest[at] = False
            merged = np.empty(len(rest), np.uint64), np.empty(len(rest), np.uint32)
            for out, big, small in zip(merged, (big_keys, big_values), (keys, values), strict=True):
                out[at], out[rest] = small, big
            self._runs.append(merged)
