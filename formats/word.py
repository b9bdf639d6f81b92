"""Word (.docx): paragraphs of the body, tables, headers and footers."""

from __future__ import annotations

import copy
import io
import logging
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import docx
from docx.opc.constants import RELATIONSHIP_TYPE as RT
from docx.opc.exceptions import PackageNotFoundError
from docx.oxml import OxmlElement
from docx.oxml.ns import qn
from docx.oxml.parser import parse_xml
from lxml import etree

from .model import BadDocument, _atomic_output, _BaseDocument, _has_words, _Translations
from .runs import TaggedParagraph, _Barrier, _Span
from .tags import strip_tags

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- docx

_W_P, _W_R, _W_T, _W_TAB, _W_BR, _W_CR = (
    qn(t) for t in ("w:p", "w:r", "w:t", "w:tab", "w:br", "w:cr")
)
_W_TBL, _W_TR, _W_TC = qn("w:tbl"), qn("w:tr"), qn("w:tc")
_W_FLDCHAR, _W_FLDSIMPLE = qn("w:fldChar"), qn("w:fldSimple")
_W_NOBREAKHYPHEN = qn("w:noBreakHyphen")
# Elements that hold paragraphs or runs without being content themselves.
_BLOCK_CONTAINERS = frozenset(qn(t) for t in ("w:sdt", "w:sdtContent", "w:customXml"))
_W_HYPERLINK = qn("w:hyperlink")
_RUN_CONTAINERS = _BLOCK_CONTAINERS | {_W_HYPERLINK, qn("w:ins"), qn("w:smartTag")}
# Run content that neither is text nor pins the text around it in place.
_NEUTRAL = frozenset(qn(t) for t in ("w:rPr", "w:lastRenderedPageBreak", "w:softHyphen"))


def _is_text_element(element: etree._Element) -> bool:
    if element.tag == _W_BR:  # page and column breaks are not text
        return element.get(qn("w:type")) in (None, "textWrapping")
    return element.tag in (_W_T, _W_TAB, _W_CR, _W_NOBREAKHYPHEN)


def _run_text(run: etree._Element) -> str:
    parts = []
    for child in run:
        if child.tag == _W_T:
            parts.append(child.text or "")
        elif child.tag == _W_TAB:
            parts.append("\t")
        elif child.tag == _W_NOBREAKHYPHEN:
            parts.append("-")
        elif _is_text_element(child):
            parts.append("\n")
    return "".join(parts)


def _paragraph_runs(element: etree._Element) -> Iterator[etree._Element]:
    """The runs (and simple fields) of a paragraph, in order, through hyperlinks etc."""
    for child in element:
        if child.tag in (_W_R, _W_FLDSIMPLE):
            yield child
        elif child.tag in _RUN_CONTAINERS:
            yield from _paragraph_runs(child)


def _run_groups(paragraph: etree._Element) -> Iterator[list[etree._Element]]:
    """Runs of text between fields, images, footnote marks and hyperlink edges.

    Each group becomes one segment; what separates the groups stays where it is, so
    "Page {PAGE} of {NUMPAGES}" keeps its fields in place around the translated words,
    and a link keeps its (translated) text instead of losing it to the sentence around.
    """
    group: list[etree._Element] = []
    field_depth = 0
    link = None
    for run in _paragraph_runs(paragraph):
        barrier = run.tag == _W_FLDSIMPLE or field_depth > 0
        if (run_link := next(run.iterancestors(_W_HYPERLINK), None)) is not link:
            link = run_link
            if group:
                yield group
            group = []
        for child in run:
            if child.tag == _W_FLDCHAR:
                field_depth += {"begin": 1, "end": -1}.get(child.get(qn("w:fldCharType")), 0)
            if not _is_text_element(child) and child.tag not in _NEUTRAL:
                barrier = True
        if barrier:
            if group:
                yield group
            group = []
        elif any(_is_text_element(child) for child in run):
            group.append(run)
    if group:
        yield group


def _part_roots(document: Any) -> Iterator[tuple[Any, etree._Element]]:
    """(part, root element) of the body, then every header, footer, footnotes, endnotes
    and comments part once (linked sections share one header).

    python-docx keeps footnotes and endnotes as opaque parts: their XML is parsed here
    and written back by `_store_parsed_parts`.
    """
    yield document.part, document.element.body
    for rel in document.part.rels.values():
        if rel.reltype not in _TEXT_PART_TYPES or rel.is_external:
            continue
        part = rel.target_part
        element = getattr(part, "element", None)
        if element is None:
            element = parse_xml(part.blob)
        yield part, element


_TEXT_PART_TYPES = frozenset(
    (RT.HEADER, RT.FOOTER, RT.FOOTNOTES, RT.ENDNOTES, RT.COMMENTS)
)


def _store_parsed_parts(parsed: list[tuple[Any, etree._Element]]) -> None:
    """Write the XML of opaque parts (footnotes, endnotes) back into the package."""
    for part, root in parsed:
        if getattr(part, "element", None) is None:
            # A plain python-docx Part serves its bytes from _blob; there is no setter.
            part._blob = etree.tostring(
                root, encoding="UTF-8", xml_declaration=True, standalone=True
            )


def _all_paragraphs(root: etree._Element) -> list[etree._Element]:
    """Every paragraph in document order: tables (nested too), content controls, text
    boxes and shapes; listed first, because rendering moves elements around."""
    return list(root.iter(_W_P))


class _DocxSegment(Protocol):
    text: str

    def apply(self, translation: str) -> bool:
        """Put the translation in the document; True if inline formatting was lost."""
        ...


@dataclass
class _RunGroup:
    """Runs of one paragraph translated as one plain segment (the older, simpler way,
    for paragraphs whose structure inline tags do not cover)."""

    runs: list[etree._Element]
    text: str

    def apply(self, translation: str) -> bool:
        if translation != self.text:
            _replace_text(self.runs, translation)
        return False


def _docx_segments(document: Any) -> Iterator[_DocxSegment]:
    for _, root in _part_roots(document):
        yield from _root_segments(root)


def _root_segments(root: etree._Element) -> Iterator[_DocxSegment]:
    for paragraph in _all_paragraphs(root):
        tagged = TaggedParagraph.build(paragraph, _paragraph_items(paragraph), _run_like)
        if tagged is not None:
            if _has_words(strip_tags(tagged.text)):
                yield tagged
            continue
        for runs in _run_groups(paragraph):
            text = "".join(_run_text(run) for run in runs).strip()
            if _has_words(text):
                yield _RunGroup(runs, text)


# --------------------------------------------------------------------------- inline tags

_SIMPLE_CONTAINERS = frozenset({_W_HYPERLINK, qn("w:ins"), qn("w:smartTag")})


def _run_kind(run: etree._Element, in_field: bool) -> str:
    """"text", "empty" (formatting only) or "barrier" (anything else, or a field part)."""
    kinds = {
        "text" if _is_text_element(c) else "neutral" if c.tag in _NEUTRAL else "other"
        for c in run
    }
    if in_field or "other" in kinds:
        return "barrier"
    return "text" if "text" in kinds else "empty"


def _field_step(run: etree._Element) -> int:
    steps = {"begin": 1, "end": -1}
    return sum(steps.get(c.get(qn("w:fldCharType")), 0) for c in run.iter(_W_FLDCHAR))


def _paragraph_items(paragraph: etree._Element) -> list[_Span | _Barrier] | None:
    """The paragraph's text spans and barriers, with the top-level elements they came
    from; None when its structure is beyond inline tags (content controls, fields or
    images inside links): then it is translated group by group, as before."""
    items: list[_Span | _Barrier] = []
    depth = 0

    def add_text(run: etree._Element, container: etree._Element | None) -> None:
        rpr = run.find(qn("w:rPr"))
        key = (container, b"" if rpr is None else etree.tostring(rpr))
        text = _run_text(run)
        last = items[-1] if items else None
        if isinstance(last, _Span) and last.key[0] is container and last.key == key:
            last.runs.append(run)
            last.text += text
        else:
            items.append(_Span(key, [run], text))

    def add_barrier(element: etree._Element) -> None:
        if items and isinstance(items[-1], _Barrier):
            items[-1].elements.append(element)
        else:
            items.append(_Barrier([element]))

    for child in paragraph:
        if child.tag == _W_R:
            kind = _run_kind(child, depth > 0)
            depth += _field_step(child)
            if kind == "text":
                add_text(child, None)
            elif kind == "barrier":
                add_barrier(child)
        elif child.tag == _W_FLDSIMPLE:
            add_barrier(child)
        elif child.tag in _SIMPLE_CONTAINERS:
            if depth > 0 or any(
                sub.tag != _W_R or _run_kind(sub, False) == "barrier" for sub in child
            ):
                return None
            for sub in child:
                if _run_kind(sub, False) == "text":
                    add_text(sub, child)
        elif child.tag in _BLOCK_CONTAINERS and next(child.iter(_W_T), None) is not None:
            return None
    return items


def _run_like(template: etree._Element, text: str) -> etree._Element:
    """A new run with `template`'s formatting and `text`."""
    run = etree.Element(template.tag, dict(template.attrib))
    rpr = template.find(qn("w:rPr"))
    if rpr is not None:
        run.append(copy.deepcopy(rpr))
    run.extend(_text_elements(text))
    return run


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text_elements(text: str) -> Iterator[etree._Element]:
    # Characters XML cannot hold would make lxml refuse the whole translation.
    for piece in re.split(r"(\n|\t)", _XML_INVALID.sub("", text)):
        if piece == "\n":
            yield OxmlElement("w:br")
        elif piece == "\t":
            yield OxmlElement("w:tab")
        elif piece:
            element = OxmlElement("w:t")
            element.text = piece
            element.set(qn("xml:space"), "preserve")
            yield element


def _replace_text(runs: list[etree._Element], translation: str) -> None:
    """Put the translation in the run with the most text (its style is the paragraph's
    main one) and empty the others; every run stays, with its formatting."""
    texts = [_run_text(run) for run in runs]
    full = "".join(texts)
    lead = full[: len(full) - len(full.lstrip())]
    trail = full[len(full.rstrip()) :]
    target = runs[max(range(len(runs)), key=lambda i: len(texts[i].strip()))]
    for run in runs:
        old = [child for child in run if _is_text_element(child)]
        index = run.index(old[0])
        for child in old:
            run.remove(child)
        if run is target:
            for offset, element in enumerate(_text_elements(lead + translation + trail)):
                run.insert(index + offset, element)


def _write_text_parts(
    source: Path | None, saved: io.BytesIO, names: set[str], out: Path
) -> None:
    """Write `out` as the source package with only the text parts (`names`) taken from
    python-docx's save: every other part stays byte for byte (python-docx re-serializes
    styles, numbering and settings even when nothing in them changed)."""
    if source is None:
        out.write_bytes(saved.getvalue())
        return
    with (
        zipfile.ZipFile(source) as original,
        zipfile.ZipFile(saved) as edited,
        zipfile.ZipFile(out, "w") as target,
    ):
        for info in original.infolist():
            data = edited.read(info.filename) if info.filename in names else (
                original.read(info.filename)
            )
            target.writestr(info, data)


def _load_docx(path: Path) -> Any:
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        raise BadDocument(
            "This .docx file is an old Word (.doc) file or password-protected; open it in "
            "Word, remove any password and save it as .docx."
        )
    if not zipfile.is_zipfile(path):
        raise BadDocument("This .docx file is not a valid Word document (it is not a zip archive).")
    try:
        return docx.Document(str(path))
    except ValueError as e:  # python-docx: a zip of another kind, e.g. an .xlsx
        raise BadDocument(
            "This .docx file is a zip archive but not a Word document (it may be another "
            "Office format)."
        ) from e
    # A corrupt member fails while it is inflated: zlib.error, EOFError (cut short),
    # NotImplementedError (a compression method zipfile lacks), OSError (a seek before the
    # start of the file, from offsets in a damaged directory).
    except (PackageNotFoundError, KeyError, zipfile.BadZipFile, etree.XMLSyntaxError,
            zlib.error, EOFError, NotImplementedError, OSError) as e:
        raise BadDocument(
            "This .docx file is damaged: it is a zip archive without a readable Word document "
            "inside; open and save it again in Word."
        ) from e


class DocxDocument(_BaseDocument):
    """A Word document: every paragraph of the body, tables, text boxes, headers, footers,
    footnotes, endnotes and comments is a segment, its inline formatting as tags."""

    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
        self._document = self._load()

    def _load(self) -> Any:
        """A fresh python-docx Document of this file (rendering edits one in place)."""
        return _load_docx(self.path)

    def segments(self) -> Iterator[str]:
        """Each paragraph's tagged text, in document order, part by part."""
        for segment in _docx_segments(self._document):
            yield segment.text

    def render(
        self, translations: Iterable[str], out: Path, output_encoding: str = "source"
    ) -> int:
        """Write a copy with translated paragraphs; runs, styles and tables are kept.

        Returns how many segments lost their inline formatting (broken tags)."""
        document = self._load()  # a fresh copy: rendering edits the XML in place
        feed = _Translations(translations)
        parts = list(_part_roots(document))
        lost = 0
        for _, root in parts:
            for segment in list(_root_segments(root)):
                lost += segment.apply(feed.take())
        feed.finish()
        _store_parsed_parts(parts)
        saved = io.BytesIO()
        document.save(saved)
        with _atomic_output(out) as tmp:
            names = {part.partname.lstrip("/") for part, _ in parts}
            _write_text_parts(self._package_path(), saved, names, tmp)
        return lost

    def _package_path(self) -> Path | None:
        """The source package whose other parts are copied as they are."""
        return self.path

    def plain_text(self) -> Iterator[str]:
        """A line per non-empty paragraph."""
        for _, root in _part_roots(self._document):
            for paragraph in _all_paragraphs(root):
                runs = (run for run in _paragraph_runs(paragraph) if run.tag == _W_R)
                text = "".join(_run_text(run) for run in runs)
                if text.strip():
                    yield text + "\n"

    def _no_text_message(self) -> str:
        return "This Word document contains no text to translate."
