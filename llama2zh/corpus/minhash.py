"""MinHash signatures of character shingles, LSH band keys, and a compact set of 64-bit keys.

A document's shingles are its 5-character substrings, whitespace removed: Chinese has no word
boundaries, and 5 characters are two or three words, so a changed character touches 5 shingles
of hundreds. Each shingle hashes to 32 bits; the signature is its minimum under NUM_PERM random
functions (a*x + b) mod p, p = 2^61 - 1 (a, b < 2^32: a*x + b never overflows uint64). Two
documents agree at a signature position with probability their Jaccard similarity J.

LSH cuts the signature into bands of `rows` positions and keys each band; a document whose key
in some band was seen before is a near-duplicate, with probability 1 - (1 - J^rows)^bands. The
rows are the most that still catch a pair at the threshold 90% of the time: at 0.8, 16 bands of
8 rows (caught: 95% at J = 0.8, 99.4% at 0.85; pairs at 0.5 by chance: 6%, at 0.3: 0.1%).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xxhash

SHINGLE = 5
NUM_PERM = 128
MERSENNE = np.uint64((1 << 61) - 1)
_rng = np.random.default_rng(14)  # fixed: signatures must not change between runs
A = _rng.integers(1, 1 << 32, NUM_PERM, dtype=np.uint64)
B = _rng.integers(0, 1 << 32, NUM_PERM, dtype=np.uint64)
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
    """The MinHash signature (NUM_PERM values < 2^61) of a set of shingle hashes."""
    signature = np.full(NUM_PERM, MERSENNE, np.uint64)
    for start in range(0, len(hashes), BLOCK):
        y = hashes[start:start + BLOCK, None] * A + B
        y = (y & MERSENNE) + (y >> np.uint64(61))  # mod 2^61 - 1 without a division
        y[y >= MERSENNE] -= MERSENNE
        np.minimum(signature, y.min(axis=0), out=signature)
    return signature


def band_keys(signature: np.ndarray, rows: int) -> list[int]:
    """One 64-bit key per band; seeded by the band's number, so equal values in two bands differ."""
    return [xxhash.xxh3_64_intdigest(signature[start:start + rows].tobytes(), seed=start // rows)
            for start in range(0, NUM_PERM, rows)]


class KeySet:
    """64-bit keys in about 8 bytes each: a sorted array, and a Python set of the latest, merged in bulk."""

    def __init__(self):
        self._sorted = np.empty(0, np.uint64)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def any_of(self, keys: list[int]) -> bool:
        if any(key in self._recent for key in keys):
            return True
        wanted = np.array(keys, np.uint64)
        at = np.minimum(np.searchsorted(self._sorted, wanted), max(0, len(self._sorted) - 1))
        return bool(len(self._sorted)) and bool((self._sorted[at] == wanted).any())

    def add(self, keys: Iterable[int]) -> None:
        self._recent.update(keys)
        if len(self._recent) > max(1 << 16, len(self._sorted) // 8):  # the set costs ~70 bytes a key
            recent = np.fromiter(self._recent, np.uint64, len(self._recent))
            self._sorted = np.sort(np.concatenate([self._sorted, recent]), kind="stable")  # merges two runs
            self._recent.clear()
