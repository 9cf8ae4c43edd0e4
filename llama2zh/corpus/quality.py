"""Does a translated story look like Chinese for its English? Three cheap checks per story."""

from __future__ import annotations

import re
from dataclasses import dataclass

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN_WORD = re.compile(r"[A-Za-z]{2,}")
ENGLISH_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Rules:
    min_cjk_share: float = 0.7  # of the letters in the translation
    min_length_ratio: float = 0.15  # Chinese characters per English character, spaces not counted;
    max_length_ratio: float = 1.0  # a good translation is about 0.3
    max_latin_share: float = 0.05  # Latin words left in the translation, per English word


def problem(english: str, chinese: str, rules: Rules = Rules()) -> str | None:
    """Why the translation is rejected, or None when it passes."""
    letters = sum(ch.isalpha() for ch in chinese)
    cjk_share = len(CJK.findall(chinese)) / letters if letters else 0.0
    if cjk_share < rules.min_cjk_share:
        return f"CJK share {cjk_share:.2f} < {rules.min_cjk_share}"
    ratio = len("".join(chinese.split())) / max(1, len("".join(english.split())))
    if not rules.min_length_ratio <= ratio <= rules.max_length_ratio:
        return f"length ratio {ratio:.2f} outside [{rules.min_length_ratio}, {rules.max_length_ratio}]"
    latin = LATIN_WORD.findall(chinese)
    if len(latin) > rules.max_latin_share * len(ENGLISH_WORD.findall(english)):
        return f"{len(latin)} Latin words left: {' '.join(latin[:5])}"
    return None
