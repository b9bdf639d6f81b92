"""Inline tags: the shared model of formatting inside a segment.

A segment that has inline structure (a bold word, a link, a footnote reference) carries it
as numbered tags: ``<x1>bold words</x1>`` for a span, ``<x2/>`` for something that is not
text (a line break, a field, a footnote mark, a code span). The numbers are local to the
segment and start at 1. Engines receive the tags (see engines.py, ``inline tags``) and
return them around the translated words; `parse_tagged` reads them back.

When an engine drops, duplicates, invents or mis-nests tags, `parse_tagged` gives up and
`fallback_pieces` keeps every word and every self-closing element (never lost: a footnote
mark or a field stays in the document), putting the text in the segment's main style.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

__all__ = [
    "TAG",
    "Piece",
    "fallback_pieces",
    "has_tag_lookalike",
    "is_balanced",
    "parse_tagged",
    "strip_tags",
]

logger = logging.getLogger(__name__)

#: One inline tag: ``<x1>``, ``</x1>`` or ``<x1/>`` (engines may add spaces or change case).
TAG = re.compile(r"<\s*(/?)\s*[xX](\d{1,4})\s*(/?)\s*>")


@dataclass(frozen=True, slots=True)
class Piece:
    """A stretch of a translated segment: text inside span `tag` (None: untagged), or,
    with `empty`, the self-closing element `tag` (and no text)."""

    text: str
    tag: int | None = None
    empty: bool = False


def has_tag_lookalike(text: str) -> bool:
    """Whether source text already contains something shaped like our tags; such a
    segment is sent without tags, so a literal "<x1>" is never taken for one."""
    return TAG.search(text) is not None


def strip_tags(text: str) -> str:
    """The text without any inline tag."""
    return TAG.sub("", text)


def parse_tagged(text: str, spans: set[int], empties: set[int]) -> list[Piece] | None:
    """The pieces of a translation whose source had span tags `spans` and self-closing
    tags `empties`; None when the tags came back broken (missing, repeated, unknown,
    nested or unbalanced). Adjacent pieces of one span are not merged."""
    pieces: list[Piece] = []
    seen: set[int] = set()
    open_tag: int | None = None
    pos = 0
    for match in TAG.finditer(text):
        closing, number, self_closing = match.group(1), int(match.group(2)), match.group(3)
        if match.start() > pos:
            pieces.append(Piece(text[pos : match.start()], open_tag))
        pos = match.end()
        if self_closing and not closing:
            if number not in empties or number in seen:
                return None
            seen.add(number)
            pieces.append(Piece("", number, empty=True))
        elif closing and not self_closing:
            if open_tag != number:
                return None
            open_tag = None
        elif not closing:
            if open_tag is not None or number not in spans or number in seen:
                return None  # our spans never nest: nesting means the engine moved tags
            seen.add(number)
            open_tag = number
        else:
            return None  # "</x1/>"
    if open_tag is not None or seen != spans | empties:
        return None
    if pos < len(text):
        pieces.append(Piece(text[pos:], None))
    return pieces


def is_balanced(text: str, spans: set[int], empties: set[int]) -> bool:
    """Whether a translation has every tag of its source exactly once, spans properly
    nested (they may nest, as HTML elements do, and move with their words)."""
    stack: list[int] = []
    seen: set[int] = set()
    for match in TAG.finditer(text):
        closing, number, self_closing = match.group(1), int(match.group(2)), match.group(3)
        if closing and self_closing:
            return False
        if self_closing or not closing:
            if number in seen or number not in (empties if self_closing else spans):
                return False
            seen.add(number)
            if not self_closing:
                stack.append(number)
        elif not stack or stack.pop() != number:
            return False
    return not stack and seen == spans | empties


def fallback_pieces(text: str, empties: list[int]) -> list[Piece]:
    """Every word of `text` untagged, and every self-closing element exactly once: where
    the translation kept it (first occurrence), else at the end, in source order."""
    pieces: list[Piece] = []
    placed: set[int] = set()
    pos = 0
    buffer: list[str] = []
    for match in TAG.finditer(text):
        buffer.append(text[pos : match.start()])
        pos = match.end()
        number = int(match.group(2))
        if match.group(3) and not match.group(1) and number in empties and number not in placed:
            pieces.append(Piece("".join(buffer)))
            buffer = []
            placed.add(number)
            pieces.append(Piece("", number, empty=True))
    buffer.append(text[pos:])
    pieces.append(Piece("".join(buffer)))
    pieces.extend(Piece("", n, empty=True) for n in empties if n not in placed)
    return [p for p in pieces if p.empty or p.text]
