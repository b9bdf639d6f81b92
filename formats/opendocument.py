"""OpenDocument text (.odt): every paragraph and heading of the body (tables, lists,
frames, notes) and of the page headers and footers, its spans and links as inline tags.

ODF keeps a paragraph's formatting as nested elements in mixed content (``<text:span>``,
``<text:a>``), much like HTML, so spans nest and may move in the translation. The
package is copied part by part; only content.xml and styles.xml are rewritten.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from .model import BadDocument, _atomic_output, _BaseDocument, _has_words, _Translations
from .tags import TAG, fallback_pieces, has_tag_lookalike, is_balanced, strip_tags

__all__ = ["OdtDocument"]

logger = logging.getLogger(__name__)

_TEXT = "urn:oasis:names:tc:opendocument:xmlns:text:1.0"
_OFFICE = "urn:oasis:names:tc:opendocument:xmlns:office:1.0"
_P, _H, _SPAN, _A, _S = (f"{{{_TEXT}}}{t}" for t in ("p", "h", "span", "a", "s"))
_SPANS = frozenset({_SPAN, _A})
_ROOTS = {"content.xml": f"{{{_OFFICE}}}body", "styles.xml": f"{{{_OFFICE}}}master-styles"}
_MIMETYPE = b"application/vnd.oasis.opendocument.text"
_SPACE_RUN = re.compile(r"\s+")
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass
class _Paragraph:
    """A text:p or text:h as one segment: spans and links are ``<xN>…</xN>``, anything
    else inside (tabs, breaks, notes, fields, frames, bookmarks) ``<xN/>``."""

    element: etree._Element
    text: str
    spans: dict[int, etree._Element]
    atoms: dict[int, etree._Element]

    @classmethod
    def build(cls, element: etree._Element) -> _Paragraph | None:
        spans: dict[int, etree._Element] = {}
        atoms: dict[int, etree._Element] = {}
        parts: list[str] = []

        def walk(node: etree._Element) -> None:
            parts.append(node.text or "")
            for child in node:
                number = len(spans) + len(atoms) + 1
                if child.tag == _S:
                    parts.append(" ")
                elif child.tag in _SPANS:
                    spans[number] = child
                    parts.append(f"<x{number}>")
                    walk(child)
                    parts.append(f"</x{number}>")
                else:
                    atoms[number] = child
                    parts.append(f"<x{number}/>")
                parts.append(child.tail or "")

        walk(element)
        text = _SPACE_RUN.sub(" ", "".join(parts)).strip()
        plain = _SPACE_RUN.sub(" ", "".join(element.itertext()))
        if not _has_words(strip_tags(text)) or has_tag_lookalike(plain):
            return None
        return cls(element, text, spans, atoms)

    def apply(self, translation: str) -> bool:
        if translation == self.text:
            return False
        text = _XML_INVALID.sub("", translation)
        for child in list(self.element):  # its tail goes with it; text:s become spaces
            self.element.remove(child)
        self.element.text = None
        if is_balanced(text, set(self.spans), set(self.atoms)):
            self._rebuild(text)
            return False
        for piece in fallback_pieces(text, sorted(self.atoms)):
            if piece.empty:
                self.element.append(self._atom(piece.tag or 0))
            else:
                _append_text(self.element, piece.text)
        return bool(self.spans or self.atoms)

    def _rebuild(self, text: str) -> None:
        stack = [self.element]
        pos = 0
        for match in TAG.finditer(text):
            _append_text(stack[-1], text[pos : match.start()])
            pos = match.end()
            closing, number, self_closing = match.group(1), int(match.group(2)), match[3]
            if self_closing:
                stack[-1].append(self._atom(number))
            elif closing:
                stack.pop()
            else:
                source = self.spans[number]
                span = etree.Element(source.tag, dict(source.attrib), nsmap=source.nsmap)
                stack[-1].append(span)
                stack.append(span)
        _append_text(stack[-1], text[pos:])

    def _atom(self, number: int) -> etree._Element:
        atom = self.atoms[number]
        atom.tail = None
        return atom


def _append_text(parent: etree._Element, text: str) -> None:
    if not text:
        return
    if len(parent):
        parent[-1].tail = (parent[-1].tail or "") + text
    else:
        parent.text = (parent.text or "") + text


def _parse(archive: zipfile.ZipFile, name: str) -> etree._Element:
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    return etree.fromstring(archive.read(name), parser)


def _open(path: Path) -> tuple[dict[str, etree._Element], list[_Paragraph]]:
    if not zipfile.is_zipfile(path):
        raise BadDocument("This .odt file is not an OpenDocument text (it is not a zip archive).")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "content.xml" not in names or (
                "mimetype" in names and archive.read("mimetype").strip() != _MIMETYPE
            ):
                raise BadDocument(
                    "This .odt file is a zip archive but not an OpenDocument text document."
                )
            roots = {name: _parse(archive, name) for name in _ROOTS if name in names}
    except (zipfile.BadZipFile, KeyError, etree.XMLSyntaxError) as e:
        raise BadDocument("This .odt file is damaged; open and save it again.") from e
    paragraphs: list[_Paragraph] = []
    for name, root in roots.items():
        for top in root.iter(_ROOTS[name]):
            for element in list(top.iter(_P, _H)):
                paragraph = _Paragraph.build(element)
                if paragraph is not None:
                    paragraphs.append(paragraph)
    return roots, paragraphs


class OdtDocument(_BaseDocument):
    """An OpenDocument text: body paragraphs and headings, then headers and footers."""

    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
        _, self._paragraphs = _open(path)

    def segments(self) -> Iterator[str]:
        """Each paragraph's tagged text, in document order."""
        for paragraph in self._paragraphs:
            yield paragraph.text

    def render(
        self, translations: Iterable[str], out: Path, output_encoding: str = "source"
    ) -> int:
        """Write a copy with the paragraphs translated; other parts byte for byte."""
        roots, paragraphs = _open(self.path)
        feed = _Translations(translations)
        lost = sum(paragraph.apply(feed.take()) for paragraph in paragraphs)
        feed.finish()
        with (
            _atomic_output(out) as tmp,
            zipfile.ZipFile(self.path) as source,
            zipfile.ZipFile(tmp, "w") as target,
        ):
            for info in source.infolist():  # "mimetype" stays first and stored
                root = roots.get(info.filename)
                data = source.read(info.filename) if root is None else etree.tostring(
                    root, xml_declaration=True, encoding="UTF-8"
                )
                target.writestr(info, data)
        return lost

    def plain_text(self) -> Iterator[str]:
        """A line per paragraph."""
        for paragraph in self._paragraphs:
            yield strip_tags(paragraph.text) + "\n"

    def _no_text_message(self) -> str:
        return "This OpenDocument text contains no text to translate."
