"""Document formats: split a file into translatable segments, put it back with translations.

One class per format (.txt, .md, .srt, .html/.htm, .docx, .odt, .pptx, .xlsx, .xlf/.xliff,
.po, .pdf) implements the `Document` protocol; `open_document` picks one and validates the
file. Everything here is pure and synchronous (no asyncio, HTTP or database): callers run
it in a thread pool.

One module per format family (`text`, `markdown`, `html`, `word`, `opendocument`,
`slides`, `sheets`, `exchange`, `pdf`); `model` holds what they share (segments, tokens,
the base classes), `tags` the inline-tag model, `runs` the Office paragraphs built on it,
`stats` the statistics.

The text formats are a stream of tokens: plain strings copied to the output as they are,
and `_Segment`s whose text goes to the translator. The tokens' source text, concatenated,
is the document itself; that makes an identity render byte-exact and lets `segments()` and
`render()` stream from the file instead of holding it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .exchange import PoDocument, XliffDocument
from .html import HtmlDocument
from .markdown import MarkdownDocument
from .model import BadDocument, Document, DocumentStats, KeptTokens, _BaseDocument
from .opendocument import OdtDocument
from .pdf import PdfDocument
from .sheets import XlsxDocument
from .slides import PptxDocument
from .stats import count_words, document_stats, guess_language
from .text import SubtitleDocument, TextDocument
from .word import DocxDocument

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "BadDocument",
    "Document",
    "DocumentStats",
    "KeptTokens",
    "count_words",
    "document_stats",
    "guess_language",
    "kept_tokens",
    "may_keep_tokens",
    "open_document",
    "result_extension",
]

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS: tuple[str, ...] = (
    ".txt", ".md", ".srt", ".html", ".htm", ".docx", ".odt", ".pptx", ".xlsx", ".xlf", ".xliff",
    ".po", ".pdf",
)

# --------------------------------------------------------------------------- opening

_FORMATS: dict[str, type[_BaseDocument]] = {
    ".txt": TextDocument,
    ".md": MarkdownDocument,
    ".srt": SubtitleDocument,
    ".html": HtmlDocument,
    ".htm": HtmlDocument,
    ".docx": DocxDocument,
    ".odt": OdtDocument,
    ".pptx": PptxDocument,
    ".xlsx": XlsxDocument,
    ".xlf": XliffDocument,
    ".xliff": XliffDocument,
    ".po": PoDocument,
    ".pdf": PdfDocument,
}


def result_extension(extension: str) -> str:
    """What a translated file of this extension is: a PDF becomes a Word document, the
    rest stay what they were."""
    factory = _FORMATS.get(extension.lower())
    if factory is None:
        return extension
    return Path(factory.result_name_for("x" + extension)).suffix


def open_document(path: Path, extension: str | None = None) -> Document:
    """Open `path` as the format its extension (or `extension`) names, and validate it.

    Raises BadDocument when the file is not what its extension says, cannot be decoded
    or has no text at all; ValueError for an unsupported extension.
    """
    ext = (path.suffix if extension is None else extension).lower()
    if ext and not ext.startswith("."):
        ext = "." + ext
    factory = _FORMATS.get(ext)
    if factory is None:
        raise ValueError(
            f"Unsupported file type {ext or '(none)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}."
        )
    if path.stat().st_size == 0:
        raise BadDocument(f"This {ext} file is empty.")
    document = factory(path, ext)
    segments = document.segments()
    try:
        empty = next(segments, None) is None
    finally:
        getattr(segments, "close", lambda: None)()  # close the file a text format streams from
    if empty:
        raise BadDocument(document._no_text_message())
    return document



def may_keep_tokens(extension: str) -> bool:
    """Whether a document of this extension can have its tokens kept (``kept_tokens``)."""
    return hasattr(_FORMATS.get(extension.lower()), "kept_tokens")


def kept_tokens(document: Document) -> dict[str, Any] | None:
    """What a later render needs of ``document`` without its file, as JSON data (see
    :class:`KeptTokens`); None for a format or a document it is not kept for."""
    keep = getattr(document, "kept_tokens", None)
    return keep() if keep is not None else None
