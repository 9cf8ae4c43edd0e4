"""Splitting a story into pieces a translation service can take, so that joining them gives it back.

A piece never spans a newline: the story's newlines (and each line's leading and trailing spaces)
stay outside the pieces, verbatim, whatever the service does with them. A line longer than the
limit is cut at sentence ends, else at spaces, else anywhere. Pieces without a letter ("...",
"3.") are kept as they are: there is nothing to translate, and a service that echoes them makes
deep-translator return None. To save requests, `pack` puts several pieces in one request, one
a line; the client checks that the answer has as many lines (see client.translate_many).
"""

from __future__ import annotations

import re

SENTENCE = re.compile(r"\S.*?(?:[.!?…]+[\"'”’)\]]*(?=\s|$)|$)\s*")
WORD = re.compile(r"\S+\s*")
LINE = re.compile(r"^(\s*)(.*?)(\s*)$", re.S)
LETTER = re.compile(r"[^\W\d_]")


def split_story(story: str, limit: int) -> list[tuple[str, bool]]:
    """(text, translate?) pieces whose texts join back into `story` exactly. A piece to translate
    is at most `limit` characters, holds no newline and has a letter; its surrounding spaces go
    with it, and the service's answer (stripped) replaces the whole piece."""
    pieces = []
    for i, line in enumerate(story.split("\n")):
        if i:
            pieces.append(("\n", False))
        lead, body, trail = LINE.match(line).groups()
        pieces.append((lead, False))
        pieces.extend((chunk, bool(LETTER.search(chunk))) for chunk in _cut(body, limit, (SENTENCE, WORD)))
        pieces.append((trail, False))
    return [piece for piece in pieces if piece[0]]


def _cut(text: str, limit: int, patterns) -> list[str]:
    """Consecutive pieces of at most `limit` characters, cut with the first pattern that helps."""
    if len(text) <= limit:
        return [text]
    if not patterns:
        return [text[i:i + limit] for i in range(0, len(text), limit)]
    units = [part for unit in patterns[0].findall(text) for part in _cut(unit, limit, patterns[1:])]
    packed = []
    for unit in units:  # greedy: as few requests as the limit allows
        if packed and len(packed[-1]) + len(unit) <= limit:
            packed[-1] += unit
        else:
            packed.append(unit)
    return packed


def pack(texts: list[str], limit: int) -> list[list[str]]:
    """Consecutive groups of texts whose newline-joined length stays within `limit`."""
    packs = []
    for text in texts:
        if packs and len("\n".join(packs[-1])) + 1 + len(text) <= limit:
            packs[-1].append(text)
        else:
            packs.append([text])
    return packs
