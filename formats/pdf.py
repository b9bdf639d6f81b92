"""PDF: the text layer, as paragraphs."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pypdf import PdfReader
from pypdf.errors import DependencyError, PyPdfError

from .model import BadDocument, _Token, _TokenDocument
from .stats import _CJK
from .text import _line, _paragraph_tokens

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- pdf


_PARAGRAPH_END = tuple(".!?:;。！？：；…\"'”’)")


def _join_pdf_lines(lines: list[str]) -> str:
    """Undo the line wrapping of extracted text: a space between lines, none after a
    hyphen or between CJK characters."""
    parts = [lines[0]]
    for before, after in itertools.pairwise(lines):
        glue = before[-1] == "-" or bool(_CJK.match(before[-1]) or _CJK.match(after[0]))
        parts += [after] if glue else [" ", after]
    return "".join(parts)


def _pdf_paragraphs(page_text: str) -> Iterator[str]:
    """Paragraphs of a page: a blank line, or a short line (a heading, the end of a
    paragraph), ends one. Extracted text rarely has blank lines."""
    lines = [line.strip() for line in page_text.splitlines()]
    lengths = sorted(len(line) for line in lines if line)
    if not lengths:
        return
    full = lengths[min(len(lengths) - 1, int(len(lengths) * 0.9))]
    para: list[str] = []
    for line in lines:
        if line:
            para.append(line)
        if para and (
            not line
            or len(line) < 0.5 * full
            or (len(line) < 0.8 * full and line.endswith(_PARAGRAPH_END))
        ):
            yield _join_pdf_lines(para)
            para = []
    if para:
        yield _join_pdf_lines(para)


_DAMAGED = ("This .pdf file is damaged and cannot be read; save or export it as PDF again "
            "and upload the new file.")

class PdfDocument(_TokenDocument):
    """A PDF's text layer, as paragraphs; the translation is a UTF-8 .txt file."""

    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
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
        self._texts: list[str] = []  # extraction is slow: each page's text, once

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

    def _page_texts(self) -> Iterator[str]:
        for index, page in enumerate(self._pages()):
            if index == len(self._texts):
                try:
                    self._texts.append(page.extract_text() or "")
                except (PyPdfError, ValueError, KeyError, TypeError) as e:
                    logger.warning("%s: no text from page %d: %s", self.path.name, index + 1, e)
                    self._texts.append("")
            yield self._texts[index]

    def _tokens(self) -> Iterator[_Token]:
        separator = ""
        for page_text in self._page_texts():
            for paragraph in _pdf_paragraphs(page_text):
                yield separator
                yield from _paragraph_tokens([_line("", paragraph, "")])
                separator = "\n\n"
        yield "\n"

    def result_name(self, file_name: str) -> str:
        """The translation of "report.pdf" is "report.txt"."""
        return str(Path(file_name).with_suffix(".txt"))

    def _no_text_message(self) -> str:
        return (
            "This PDF has no text layer (it may be a scanned image); run it through OCR "
            "(text recognition) first, then upload the result."
        )

