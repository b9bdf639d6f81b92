"""Excel (.xlsx): text cells (shared and inline strings, rich text with its formatting as
inline tags) and sheet names; formulas, numbers, dates, charts and everything else
untouched.

The strings are replaced in the package's XML and every other part is copied byte for
byte: openpyxl (used by the tests to read the result) rewrites a whole workbook on save
and drops what it does not model (charts, images, pivot tables), so it does not write.
"""

from __future__ import annotations

import copy
import html
import logging
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lxml import etree

from .model import BadDocument, _atomic_output, _BaseDocument, _has_words, _Translations
from .runs import TaggedParagraph, _Barrier, _Span
from .tags import strip_tags

__all__ = ["XlsxDocument"]

logger = logging.getLogger(__name__)

_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_SI, _IS, _R, _T, _RPR = (f"{{{_NS}}}{t}" for t in ("si", "is", "r", "t", "rPr"))
_SHEET = f"{{{_NS}}}sheet"
_XML_SPACE = "{http://www.w3.org/XML/1998/namespace}space"
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_SHEET_NAME_FORBIDDEN = re.compile(r"[\[\]:*?/\\]")
_SHEET_NAME_MAX = 31


class _Segment(Protocol):
    text: str

    def apply(self, translation: str) -> bool: ...


@dataclass
class _PlainString:
    """A string item that is one <t>: the translation replaces its text."""

    element: etree._Element
    text: str
    lead: str
    trail: str

    def apply(self, translation: str) -> bool:
        if translation != self.text:
            text = self.lead + strip_tags(translation) + self.trail
            self.element.text = _XML_INVALID.sub("", text)
            self.element.set(_XML_SPACE, "preserve")
        return False


@dataclass
class _SheetName:
    """A sheet's name (no formula, chart or defined name refers to it)."""

    element: etree._Element
    text: str
    taken: set[str]

    def apply(self, translation: str) -> bool:
        name = _SHEET_NAME_FORBIDDEN.sub(" ", strip_tags(translation)).strip()[:_SHEET_NAME_MAX]
        name = name.strip("'") or self.text
        self.taken.discard(self.text.lower())  # this sheet's own name is free to keep
        base, number = name, 2
        while name.lower() in self.taken:
            suffix = f" ({number})"
            name, number = base[: _SHEET_NAME_MAX - len(suffix)] + suffix, number + 1
        self.taken.add(name.lower())
        self.element.set("name", name)
        return False


def _run_items(item: etree._Element) -> list[_Span | _Barrier]:
    items: list[_Span | _Barrier] = []
    for child in item:
        if child.tag != _R:
            continue  # phonetic runs and properties stay
        rpr = child.find(_RPR)
        key = (None, b"" if rpr is None else etree.tostring(rpr))
        text = "".join(t.text or "" for t in child.iter(_T))
        if items and isinstance(items[-1], _Span) and items[-1].key == key:
            items[-1].runs.append(child)
            items[-1].text += text
        else:
            items.append(_Span(key, [child], text))
    return items


def _run_like(template: etree._Element, text: str) -> etree._Element:
    run = etree.Element(_R)
    rpr = template.find(_RPR)
    if rpr is not None:
        run.append(copy.deepcopy(rpr))
    t = etree.SubElement(run, _T)
    t.text = _XML_INVALID.sub("", text)
    t.set(_XML_SPACE, "preserve")
    return run


def _string_segment(item: etree._Element) -> _Segment | None:
    """A shared or inline string item as a segment, or None without words."""
    plain = item.find(_T)
    if plain is not None:
        full = plain.text or ""
        text = full.strip()
        if not _has_words(text):
            return None
        start = full.index(text)
        return _PlainString(plain, text, full[:start], full[start + len(text) :])
    tagged = TaggedParagraph.build(item, _run_items(item), _run_like)
    if tagged is None or not _has_words(strip_tags(tagged.text)):
        return None
    return tagged


@dataclass
class _Package:
    """The workbook's parsed text parts, ready to be edited and written back."""

    parts: dict[str, etree._Element]
    segments: list[_Segment]


def _parse(archive: zipfile.ZipFile, name: str) -> etree._Element:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    return etree.fromstring(archive.read(name), parser)


def _open_package(path: Path) -> _Package:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "xl/workbook.xml" not in names:
                raise BadDocument(
                    "This .xlsx file is a zip archive but not an Excel workbook."
                )
            parts: dict[str, etree._Element] = {}
            segments: list[_Segment] = []
            for name in names:
                if name.endswith("sharedStrings.xml") and name.startswith("xl/"):
                    parts[name] = root = _parse(archive, name)
                    segments += filter(None, map(_string_segment, root.iter(_SI)))
            for name in sorted(n for n in names if re.fullmatch(r"xl/worksheets/[^/]+\.xml", n)):
                data = archive.read(name)
                if b"inlineStr" in data:
                    parts[name] = root = _parse(archive, name)
                    segments += filter(None, map(_string_segment, root.iter(_IS)))
            parts["xl/workbook.xml"] = workbook = _parse(archive, "xl/workbook.xml")
            segments += _sheet_names(archive, workbook)
    except (zipfile.BadZipFile, KeyError, etree.XMLSyntaxError) as e:
        raise BadDocument("This .xlsx file is damaged; open and save it again in Excel.") from e
    return _Package(parts, segments)


_FORMULA = re.compile(r"<(?:\w+:)?f(?:\s[^>]*)?>([^<]*)</(?:\w+:)?f>")
_DEFINED_NAME = re.compile(r"<(?:\w+:)?definedName(?:\s[^>]*)?>([^<]*)</(?:\w+:)?definedName>")


def _sheet_names(archive: zipfile.ZipFile, workbook: etree._Element) -> list[_Segment]:
    """Sheet names that nothing refers to by name (formulas, charts, defined names):
    renaming one of those would break the reference."""
    sheets = list(workbook.iter(_SHEET))
    taken = {(sheet.get("name") or "").lower() for sheet in sheets}
    formulas = _DEFINED_NAME.findall(etree.tostring(workbook, encoding="unicode"))
    for name in archive.namelist():
        if name.endswith(".xml") and name.startswith("xl/") and name != "xl/workbook.xml":
            formulas += _FORMULA.findall(archive.read(name).decode("utf-8", "replace"))
    segments: list[_Segment] = []
    for sheet in sheets:
        name = sheet.get("name") or ""
        quoted = html.escape(name.replace("'", "''"), quote=False)
        reference = re.compile(rf"(?<![\w.])'?{re.escape(quoted)}'?!", re.IGNORECASE)
        if _has_words(name) and not any(reference.search(f) for f in formulas):
            segments.append(_SheetName(sheet, name, taken))
    return segments


def _check_zip(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        raise BadDocument(
            "This .xlsx file is an old Excel (.xls) file or password-protected; open it in "
            "Excel, remove any password and save it as .xlsx."
        )
    if not zipfile.is_zipfile(path):
        raise BadDocument(
            "This .xlsx file is not a valid Excel workbook (it is not a zip archive)."
        )


class XlsxDocument(_BaseDocument):
    """A workbook: shared and inline strings (rich text with tags), then sheet names."""

    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
        _check_zip(path)
        self._package = _open_package(path)

    def segments(self) -> Iterator[str]:
        """Text cells in the workbook's string table order, inline strings, sheet names."""
        for segment in self._package.segments:
            yield segment.text

    def render(
        self, translations: Iterable[str], out: Path, output_encoding: str = "source"
    ) -> int:
        """Write a copy with text cells and free sheet names translated."""
        package = _open_package(self.path)
        feed = _Translations(translations)
        lost = sum(segment.apply(feed.take()) for segment in package.segments)
        feed.finish()
        with (
            _atomic_output(out) as tmp,
            zipfile.ZipFile(self.path) as source,
            zipfile.ZipFile(tmp, "w") as target,
        ):
            for info in source.infolist():
                root = package.parts.get(info.filename)
                if root is None:
                    target.writestr(info, source.read(info.filename))
                else:
                    data = etree.tostring(
                        root, xml_declaration=True, encoding="UTF-8", standalone=True
                    )
                    target.writestr(info, data)
        return lost

    def plain_text(self) -> Iterator[str]:
        """A line per text cell."""
        for segment in self._package.segments:
            yield strip_tags(segment.text) + "\n"

    def _no_text_message(self) -> str:
        return "This workbook contains no text cells to translate."
