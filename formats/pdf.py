"""PDF: the text layer rebuilt as a Word document, which is what a translation returns."""

from __future__ import annotations

import io
import itertools
import logging
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docx
import pdfplumber
from pdfminer.psexceptions import PSException
from pdfplumber.utils.exceptions import PdfminerException
from pypdf import PdfReader
from pypdf.errors import DependencyError, PyPdfError

from .model import BadDocument, _BaseDocument
from .stats import _CJK
from .word import DocxDocument

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- pdf


_PARAGRAPH_END = tuple(".!?:;。！？：；…\"'”’)")


def _glue(before: str, after: str) -> str:
    """What joins two wrapped lines: a space, or nothing after a hyphen or between CJK
    characters."""
    joined = before[-1:] == "-" or bool(_CJK.match(before[-1:]) or _CJK.match(after[:1]))
    return "" if joined else " "


def _join_pdf_lines(lines: list[str]) -> str:
    """Undo the line wrapping of extracted text."""
    parts = [lines[0]]
    for before, after in itertools.pairwise(lines):
        parts += [_glue(before, after), after]
    return "".join(parts)


_DAMAGED = ("This .pdf file is damaged and cannot be read; save or export it as PDF again "
            "and upload the new file.")

class PdfDocument(DocxDocument):
    """A PDF's text layer, rebuilt as a Word document (headings, paragraphs, lists,
    tables, page breaks) with pdfplumber; the translation is that .docx."""

    def __init__(self, path: Path, extension: str) -> None:
        _BaseDocument.__init__(self, path, extension)
        with path.open("rb") as f:
            if b"%PDF-" not in f.read(1024):
                raise BadDocument("This .pdf file is not a PDF document (it has no %PDF header).")
        try:
            self._reader = PdfReader(path)
            if self._reader.is_encrypted and not self._reader.decrypt(""):
                raise BadDocument(
                    "This PDF is password-protected; remove the password and upload it again."
                )
        except DependencyError as e:
            raise BadDocument(
                "This PDF is encrypted in a way the server cannot open; remove the protection "
                "and upload it again."
            ) from e
        # pypdf raises plain ValueError/KeyError on some malformed files, too.
        except (PyPdfError, ValueError, KeyError) as e:
            logger.info("%s: unreadable PDF: %s", path.name, e)
            raise BadDocument(_DAMAGED) from e
        for _ in self._pages():  # a damaged page tree fails here, with a sentence
            pass
        self._docx = _pdf_to_docx(path)
        self._document = self._load()

    def _load(self) -> Any:
        return docx.Document(io.BytesIO(self._docx))

    def _package_path(self) -> Path | None:
        return None  # the package was made here: python-docx's save is the whole result

    def _pages(self) -> Iterator[Any]:
        # pypdf reads the page tree lazily: a damaged one fails here, not at open.
        pages = iter(self._reader.pages)
        while True:
            try:
                page = next(pages)
            except StopIteration:
                return
            except (PyPdfError, ValueError, KeyError, TypeError, AttributeError) as e:
                logger.info("%s: unreadable page tree: %s", self.path.name, e)
                raise BadDocument(_DAMAGED) from e
            yield page

    @classmethod
    def result_name_for(cls, file_name: str) -> str:
        """The translation of "report.pdf" is "report.docx"."""
        return str(Path(file_name).with_suffix(".docx"))

    def _no_text_message(self) -> str:
        return (
            "This PDF has no text layer (it may be a scanned image); run it through OCR "
            "(text recognition) first, then upload the result."
        )


# --------------------------------------------------------------------------- pdf -> docx

_BULLET = re.compile(r"^(?:[•◦▪‣●○■□–—*-]|\(?\d{1,3}[.)]|[a-z][.)])\s+")
_NUMBERED = re.compile(r"^\(?\d{1,3}[.)]\s+")


@dataclass
class _Line:
    text: str
    top: float
    bottom: float
    x1: float
    size: float
    bold: bool
    italic: bool


@dataclass
class _Block:
    """What goes into the Word document, in reading order: a paragraph or a table."""

    top: float
    kind: str  # "heading", "paragraph", "bullet", "number", "table"
    lines: list[_Line] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def _line_of(raw: dict[str, Any]) -> _Line:
    chars = [c for c in raw.get("chars", []) if str(c.get("text", "")).strip()]
    fonts = [str(c.get("fontname", "")) for c in chars]
    size = max((float(c.get("size", 0)) for c in chars), default=0.0)
    bold = bool(fonts) and sum("bold" in f.lower() for f in fonts) > len(fonts) / 2
    italic = bool(fonts) and sum(
        "italic" in f.lower() or "oblique" in f.lower() for f in fonts
    ) > len(fonts) / 2
    return _Line(str(raw["text"]).strip(), float(raw["top"]), float(raw["bottom"]),
                 float(raw["x1"]), size, bold, italic)


def _inside(line: _Line, box: tuple[float, float, float, float]) -> bool:
    return box[1] - 1 <= (line.top + line.bottom) / 2 <= box[3] + 1


def _page_blocks(page: Any, body_size: float) -> list[_Block]:
    tables = page.find_tables()
    boxes = [table.bbox for table in tables]
    blocks = [
        _Block(box[1], "table", rows=[[cell or "" for cell in row] for row in table.extract()])
        for box, table in zip(boxes, tables, strict=True)
    ]
    lines = [_line_of(raw) for raw in page.extract_text_lines(return_chars=True)]
    lines = [line for line in lines if line.text and not any(_inside(line, b) for b in boxes)]
    widest = max((line.x1 for line in lines), default=0.0)
    current: _Block | None = None
    for line in lines:
        kind = _line_kind(line, body_size)
        if current is not None and _continues(current, line, kind, widest):
            current.lines.append(line)
            continue
        current = _Block(line.top, kind, [line])
        blocks.append(current)
    return sorted(blocks, key=lambda block: block.top)


def _line_kind(line: _Line, body_size: float) -> str:
    if body_size and line.size >= 1.2 * body_size and len(line.text) < 150:
        return "heading"
    if _NUMBERED.match(line.text):
        return "number"
    if _BULLET.match(line.text):
        return "bullet"
    return "paragraph"


def _continues(block: _Block, line: _Line, kind: str, widest: float) -> bool:
    """Whether `line` goes on the paragraph of `block` (wrapped text) or starts anew."""
    last = block.lines[-1]
    height = max(last.bottom - last.top, 1.0)
    if block.kind == "table" or line.top - last.bottom > 0.8 * height:
        return False
    if kind in ("bullet", "number") or (block.kind == "heading") != (kind == "heading"):
        return False
    if abs(line.size - last.size) > 0.15 * max(last.size, 1.0):
        return False
    # A line that stops well short of the margin ended its paragraph (a title, a last
    # line); one a little short did if it ends a sentence.
    if last.x1 < 0.5 * widest:
        return False
    return last.x1 >= 0.8 * widest or not last.text.endswith(_PARAGRAPH_END)


def _body_size(pdf: Any) -> float:
    sizes: list[float] = []
    for page in pdf.pages[:50]:
        sizes += [round(float(c.get("size", 0)), 1) for c in page.chars[:5000]]
    return statistics.median(sizes) if sizes else 0.0


def _heading_size(block: _Block) -> float:
    return round(max(line.size for line in block.lines))


def _write_block(document: Any, block: _Block, levels: dict[float, int]) -> None:
    if block.kind == "table":
        columns = max((len(row) for row in block.rows), default=0)
        if not columns:
            return
        table = document.add_table(rows=len(block.rows), cols=columns)
        table.style = "Table Grid"
        for r, row in enumerate(block.rows):
            for c, text in enumerate(row):
                table.cell(r, c).text = " ".join(text.split())
        return
    if block.kind == "heading":
        paragraph = document.add_heading(level=levels[_heading_size(block)])
    elif block.kind == "bullet":
        paragraph = document.add_paragraph(style="List Bullet")
        block.lines[0].text = _BULLET.sub("", block.lines[0].text, count=1)
    elif block.kind == "number":
        paragraph = document.add_paragraph(style="List Number")
        block.lines[0].text = _NUMBERED.sub("", block.lines[0].text, count=1)
    else:
        paragraph = document.add_paragraph()
    texts = [line.text for line in block.lines]
    joined = _join_pdf_lines(texts) if texts else ""
    if all(line.bold == block.lines[0].bold and line.italic == block.lines[0].italic
           for line in block.lines):
        run = paragraph.add_run(joined)
        run.bold = block.lines[0].bold or None
        run.italic = block.lines[0].italic or None
        return
    for index, line in enumerate(block.lines):  # formatting changes line by line
        glue = _glue(texts[index - 1], line.text) if index else ""
        run = paragraph.add_run(glue + line.text)
        run.bold = line.bold or None
        run.italic = line.italic or None


def _pdf_to_docx(path: Path) -> bytes:
    """The PDF's text as a Word document: headings by font size, paragraphs from wrapped
    lines, bullet and numbered lists, tables pdfplumber detects, a page break per page."""
    document = docx.Document()
    try:
        # The file is opened here: pdfplumber leaks its handle when its parser fails.
        with path.open("rb") as f, pdfplumber.open(f) as pdf:
            body = _body_size(pdf)
            pages = [_page_blocks(page, body) for page in pdf.pages]
    # pdfminer reads damaged files leniently and fails in many ways when it cannot.
    except (PSException, PdfminerException, ValueError, KeyError, TypeError, AttributeError,
            IndexError, AssertionError, RecursionError) as e:
        logger.info("%s: pdfplumber cannot read it: %s", path.name, e)
        raise BadDocument(_DAMAGED) from e
    # Heading levels by size: the largest heading text is level 1, the next 2, then 3.
    sizes = sorted({_heading_size(b) for blocks in pages for b in blocks if b.kind == "heading"},
                   reverse=True)
    levels = {size: min(rank, 3) for rank, size in enumerate(sizes, 1)}
    for number, blocks in enumerate(pages):
        if number:
            document.add_page_break()
        for block in blocks:
            _write_block(document, block, levels)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()
