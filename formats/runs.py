"""OOXML paragraphs (Word, PowerPoint, Excel rich text) as segments with inline tags.

A format module lists a paragraph's items: `_Span`s (consecutive text runs with one
formatting) and `_Barrier`s (children that are not text); `TaggedParagraph` makes them
one segment and puts a translation back by rebuilding the paragraph's runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from .tags import Piece, fallback_pieces, has_tag_lookalike, parse_tagged

__all__ = ["TaggedParagraph"]

logger = logging.getLogger(__name__)


@dataclass
class _Span:
    """Consecutive text runs with one formatting: one stretch of a tagged segment."""

    key: tuple[Any, bytes]  #: (the hyperlink or other container, or None; the rPr XML)
    runs: list[etree._Element]
    text: str


@dataclass
class _Barrier:
    """Paragraph children that are not text (fields, images, footnote marks): one
    self-closing tag, moved as they are."""

    elements: list[etree._Element]


@dataclass
class TaggedParagraph:
    """A paragraph as one segment whose formatting changes are inline tags.

    The span with the most text is the paragraph's main style and goes untagged; every
    other span is ``<xN>...</xN>``, every barrier ``<xN/>``. Rendering rebuilds the
    paragraph's runs from the translated pieces: new runs copy the formatting of the
    span they belong to, links are re-made around their translated text, and barriers
    are moved as they are. Bookmarks, comment marks and deletions stay in place.
    """

    paragraph: etree._Element
    text: str
    lead: str
    trail: str
    main: _Span
    spans: dict[int, _Span]
    barriers: dict[int, _Barrier]
    units: list[etree._Element]
    run_like: Callable[[etree._Element, str], etree._Element]

    @classmethod
    def build(
        cls,
        paragraph: etree._Element,
        items: list[_Span | _Barrier] | None,
        run_like: Callable[[etree._Element, str], etree._Element],
    ) -> TaggedParagraph | None:
        """The paragraph as a tagged segment; None when `items` (its spans and barriers,
        or None for a paragraph beyond inline tags) hold no text."""
        text_spans = [item for item in items or () if isinstance(item, _Span)]
        if items is None or not text_spans:
            return None
        # Barriers at either end (a comment mark, a leading image) need no tag: they stay
        # where they are, before or after the rebuilt runs.
        while isinstance(items[0], _Barrier):
            items.pop(0)
        while isinstance(items[-1], _Barrier):
            items.pop()
        if has_tag_lookalike("".join(span.text for span in text_spans)):
            return None
        weight: dict[tuple[Any, bytes], int] = {}
        for span in text_spans:
            weight[span.key] = weight.get(span.key, 0) + len(span.text.strip())
        # The main style is plain text's: not a link (a container or a link in the run
        # properties), else the one with the most text.
        main_key = max(
            weight, key=lambda key: (key[0] is None and b"hlinkClick" not in key[1], weight[key])
        )
        parts: list[str] = []
        spans: dict[int, _Span] = {}
        barriers: dict[int, _Barrier] = {}
        for item in items:
            if isinstance(item, _Barrier):
                number = len(spans) + len(barriers) + 1
                barriers[number] = item
                parts.append(f"<x{number}/>")
            elif item.key == main_key:
                parts.append(item.text)
            else:
                number = len(spans) + len(barriers) + 1
                spans[number] = item
                parts.append(f"<x{number}>{item.text}</x{number}>")
        full = "".join(parts)
        text = full.strip()
        start = full.index(text) if text else 0
        main = next(span for span in text_spans if span.key == main_key)
        return cls(paragraph, text, full[:start], full[start + len(text) :], main, spans,
                   barriers, _units(paragraph, items), run_like)

    def apply(self, translation: str) -> bool:
        if translation == self.text:
            return False
        pieces = parse_tagged(translation, set(self.spans), set(self.barriers))
        lost = pieces is None and bool(self.spans or self.barriers)  # else: tags invented
        if pieces is None:
            pieces = fallback_pieces(translation, sorted(self.barriers))
        pieces = [Piece(self.lead), *pieces, Piece(self.trail)]
        new: list[etree._Element] = []
        container: etree._Element | None = None  # the source of the last copied container
        for piece in pieces:
            if piece.empty:
                assert piece.tag is not None
                new.extend(self.barriers[piece.tag].elements)
                container = None
                continue
            if not piece.text:
                continue
            span = self.main if piece.tag is None else self.spans[piece.tag]
            run = self.run_like(span.runs[0], piece.text)
            source = span.key[0]
            if source is None:
                new.append(run)
            elif source is container:
                new[-1].append(run)
            else:
                copy = etree.Element(source.tag, dict(source.attrib))
                copy.append(run)
                new.append(copy)
            container = source
        index = self.paragraph.index(self.units[0])
        for unit in self.units:
            self.paragraph.remove(unit)
        for offset, element in enumerate(new):
            self.paragraph.insert(index + offset, element)
        return lost


def _units(paragraph: etree._Element, items: list[_Span | _Barrier]) -> list[etree._Element]:
    """The paragraph's children that the items came from, each once, in order."""
    found: dict[int, etree._Element] = {}
    for item in items:
        elements = item.elements if isinstance(item, _Barrier) else item.runs
        for element in elements:
            top = element if element.getparent() is paragraph else element.getparent()
            found.setdefault(id(top), top)
    return sorted(found.values(), key=paragraph.index)


