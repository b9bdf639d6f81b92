"""PowerPoint (.pptx): every paragraph of the slides and their notes, through shapes,
groups and tables, with inline formatting (bold, links, fonts) as tags.

python-pptx opens and saves the package (it keeps every part it does not know as it is);
the text is edited in the slides' DrawingML directly, paragraph by paragraph, so fields
(slide numbers) and line breaks stay where they are.
"""

from __future__ import annotations

import copy
import io
import logging
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pptx
from lxml import etree
from pptx.exc import PackageNotFoundError
from pptx.oxml.ns import qn

from .model import BadDocument, _atomic_output, _BaseDocument, _has_words, _Translations
from .runs import TaggedParagraph, _Barrier, _Span
from .tags import strip_tags
from .word import _write_text_parts

__all__ = ["PptxDocument"]

logger = logging.getLogger(__name__)

_A_P, _A_R, _A_T, _A_RPR = qn("a:p"), qn("a:r"), qn("a:t"), qn("a:rPr")
# Paragraph children that neither are text nor move: properties, the end mark.
_FIXED = frozenset({qn("a:pPr"), qn("a:endParaRPr")})
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _paragraph_items(paragraph: etree._Element) -> list[_Span | _Barrier]:
    items: list[_Span | _Barrier] = []
    for child in paragraph:
        if child.tag in _FIXED or not isinstance(child.tag, str):
            continue
        if child.tag == _A_R:
            rpr = child.find(_A_RPR)
            key = (None, b"" if rpr is None else etree.tostring(rpr))
            text = "".join(t.text or "" for t in child.iter(_A_T))
            last = items[-1] if items else None
            if isinstance(last, _Span) and last.key == key:
                last.runs.append(child)
                last.text += text
            else:
                items.append(_Span(key, [child], text))
        elif items and isinstance(items[-1], _Barrier):
            items[-1].elements.append(child)  # a:br, a:fld (slide number), equations
        else:
            items.append(_Barrier([child]))
    return items


def _run_like(template: etree._Element, text: str) -> etree._Element:
    run = etree.Element(_A_R)
    rpr = template.find(_A_RPR)
    if rpr is not None:
        run.append(copy.deepcopy(rpr))
    t = etree.SubElement(run, _A_T)
    # A run holds one line: a line break the engine added becomes a space.
    t.text = _XML_INVALID.sub("", text).replace("\r\n", " ").replace("\n", " ")
    return run


def _roots(presentation: Any) -> Iterator[etree._Element]:
    """Each slide's XML, then its notes'."""
    for slide in presentation.slides:
        yield slide._element
        if slide.has_notes_slide:
            yield slide.notes_slide._element


def _text_part_names(presentation: Any) -> set[str]:
    names = set()
    for slide in presentation.slides:
        names.add(slide.part.partname.lstrip("/"))
        if slide.has_notes_slide:
            names.add(slide.notes_slide.part.partname.lstrip("/"))
    return names


def _segments(presentation: Any) -> Iterator[TaggedParagraph]:
    for root in _roots(presentation):
        for paragraph in list(root.iter(_A_P)):
            tagged = TaggedParagraph.build(paragraph, _paragraph_items(paragraph), _run_like)
            if tagged is not None and _has_words(strip_tags(tagged.text)):
                yield tagged


def _load(path: Path) -> Any:
    if not zipfile.is_zipfile(path):
        raise BadDocument(
            "This .pptx file is not a valid PowerPoint presentation (it is not a zip "
            "archive; an old .ppt must be saved as .pptx first)."
        )
    try:
        return pptx.Presentation(str(path))
    except (ValueError, KeyError) as e:  # a zip of another kind: the main part is missing
        raise BadDocument(
            "This .pptx file is a zip archive but not a PowerPoint presentation."
        ) from e
    except (PackageNotFoundError, zipfile.BadZipFile, etree.XMLSyntaxError) as e:
        raise BadDocument(
            "This .pptx file is damaged; open and save it again in PowerPoint."
        ) from e


class PptxDocument(_BaseDocument):
    """A presentation: slides (shapes, groups, tables) and speaker notes."""

    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
        self._presentation = _load(path)

    def segments(self) -> Iterator[str]:
        """Each paragraph's tagged text, slide by slide, notes after their slide."""
        for segment in _segments(self._presentation):
            yield segment.text

    def render(
        self, translations: Iterable[str], out: Path, output_encoding: str = "source"
    ) -> int:
        """Write a copy with the paragraphs translated; returns how many segments lost
        their inline formatting."""
        presentation = _load(self.path)
        feed = _Translations(translations)
        lost = sum(segment.apply(feed.take()) for segment in list(_segments(presentation)))
        feed.finish()
        saved = io.BytesIO()
        presentation.save(saved)
        with _atomic_output(out) as tmp:  # other parts byte for byte
            _write_text_parts(self.path, saved, _text_part_names(presentation), tmp)
        return lost

    def plain_text(self) -> Iterator[str]:
        """A line per paragraph with text."""
        for root in _roots(self._presentation):
            for paragraph in root.iter(_A_P):
                text = "".join(t.text or "" for t in paragraph.iter(_A_T))
                if text.strip():
                    yield text + "\n"

    def _no_text_message(self) -> str:
        return "This presentation contains no text to translate."
