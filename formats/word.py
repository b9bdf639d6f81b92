"""Word (.docx): paragraphs of the body, tables, headers and footers."""

from __future__ import annotations

import logging
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import docx
from docx.opc.constants import RELATIONSHIP_TYPE as RT
from docx.opc.exceptions import PackageNotFoundError
from docx.oxml import OxmlElement
from docx.oxml.ns import qn
from lxml import etree

from .model import BadDocument, _atomic_output, _BaseDocument, _has_words, _Translations

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


def _block_paragraphs(container: etree._Element) -> Iterator[etree._Element]:
    """Paragraphs in document order, through tables (nested too) and content controls."""
    for child in container:
        if child.tag == _W_P:
            yield child
        elif child.tag == _W_TBL:
            for row in child.iterchildren(_W_TR):
                for cell in row.iterchildren(_W_TC):
                    yield from _block_paragraphs(cell)
        elif child.tag in _BLOCK_CONTAINERS:
            yield from _block_paragraphs(child)


def _docx_roots(document: Any) -> Iterator[etree._Element]:
    """The body, then every header and footer part once (linked sections share one)."""
    yield document.element.body
    for rel in document.part.rels.values():
        if rel.reltype in (RT.HEADER, RT.FOOTER) and not rel.is_external:
            yield rel.target_part.element


def _docx_segments(document: Any) -> Iterator[tuple[list[etree._Element], str]]:
    for root in _docx_roots(document):
        for paragraph in _block_paragraphs(root):
            for runs in _run_groups(paragraph):
                text = "".join(_run_text(run) for run in runs).strip()
                if _has_words(text):
                    yield runs, text


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
    """A Word document: paragraphs of the body, tables, headers and footers are segments."""

    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
        self._document = _load_docx(path)

    def segments(self) -> Iterator[str]:
        """Each paragraph's text (split around fields and images), in document order."""
        for _, text in _docx_segments(self._document):
            yield text

    def render(self, translations: Iterable[str], out: Path) -> None:
        """Write a copy with translated paragraphs; runs, styles and tables are kept."""
        document = _load_docx(self.path)  # a fresh copy: rendering edits the XML in place
        feed = _Translations(translations)
        for runs, text in _docx_segments(document):
            translation = feed.take()
            if translation != text:
                _replace_text(runs, translation)
        feed.finish()
        with _atomic_output(out) as tmp:
            document.save(str(tmp))

    def plain_text(self) -> Iterator[str]:
        """A line per non-empty paragraph."""
        for root in _docx_roots(self._document):
            for paragraph in _block_paragraphs(root):
                runs = (run for run in _paragraph_runs(paragraph) if run.tag == _W_R)
                text = "".join(_run_text(run) for run in runs)
                if text.strip():
                    yield text + "\n"

    def _no_text_message(self) -> str:
        return "This Word document contains no text to translate."

