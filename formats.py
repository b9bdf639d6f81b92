"""Document formats: split a file into translatable segments, put it back with translations.

One class per format (.txt, .md, .srt, .html/.htm, .docx, .pdf) implements the `Document`
protocol; `open_document` picks one and validates the file. Everything here is pure and
synchronous (no asyncio, HTTP or database): callers run it in a thread pool.

The text formats are a stream of tokens: plain strings copied to the output as they are,
and `_Segment`s whose text goes to the translator. The tokens' source text, concatenated,
is the document itself; that makes an identity render byte-exact and lets `segments()` and
`render()` stream from the file instead of holding it.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import html
import itertools
import logging
import os
import re
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import docx
from docx.opc.constants import RELATIONSHIP_TYPE as RT
from docx.opc.exceptions import PackageNotFoundError
from docx.oxml import OxmlElement
from docx.oxml.ns import qn
from lxml import etree
from pypdf import PdfReader
from pypdf.errors import DependencyError, PyPdfError

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "BadDocument",
    "Document",
    "DocumentStats",
    "count_words",
    "document_stats",
    "guess_language",
    "open_document",
]

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".txt", ".md", ".srt", ".html", ".htm", ".docx", ".pdf")

# Translation engines limit their input; longer paragraphs are cut into several segments.
_MAX_SEGMENT_CHARS = 2000
_READ_CHARS = 1 << 16
# A line longer than this (a file with no line breaks) is read in pieces, to bound memory.
_MAX_LINE_CHARS = 1 << 18
_LANGUAGE_SAMPLE_CHARS = 20_000
_MISSING: Any = object()


class BadDocument(Exception):
    """The file cannot be read as its extension says.

    ``str(exc)`` is one sentence a person can act on, e.g. "This .docx file is not a
    valid Word document (it is not a zip archive)."
    """


@dataclass(frozen=True)
class DocumentStats:
    """What `document_stats` measures over a document's translatable segments."""

    characters: int  #: sum of len() of all translatable segments
    words: int  #: words; each CJK character (Han, Kana, Hangul) counts as one
    segments: int  #: number of translatable segments
    language: str  #: ISO 639-1 guess ("en", "zh", ...) or "unknown"


class Document(Protocol):
    """An opened document; see `open_document`."""

    extension: str  #: ".txt", ".md", ...

    def segments(self) -> Iterator[str]:
        """The translatable segments in document order; each call starts over.

        Never yields blank segments. Text formats stream from the file.
        """
        ...

    def render(self, translations: Iterable[str], out: Path) -> None:
        """Write the document to `out` with segment i replaced by the i-th translation.

        Consumes `translations` lazily and in order; everything that is not a segment is
        kept. Text output is UTF-8. Raises ValueError if the counts differ (and then
        leaves no file at `out`).
        """
        ...

    def plain_text(self) -> Iterator[str]:
        """The document's plain text, in chunks."""
        ...

    def result_name(self, file_name: str) -> str:
        """The file name of the translated result ("report.pdf" -> "report.txt")."""
        ...


# --------------------------------------------------------------------------- tokens

_NEWLINE = re.compile(r"\r\n?")
_TOKEN = re.compile(r"\{\{\s*(\d+)\s*\}\}")


@dataclass(frozen=True, slots=True)
class _Segment:
    """A translatable piece of a text document.

    `raw` is its exact source text; `text` is what the translator sees (line breaks as
    "\\n", markup that must survive replaced by ``{{N}}`` tokens whose values are in
    `protected`). A translated line break becomes `eol` followed by `cont`, the prefix
    (indentation, "> ") continuation lines need.
    """

    raw: str
    text: str
    eol: str = "\n"
    cont: str = ""
    protected: tuple[str, ...] = ()
    escape: Callable[[str], str] | None = None

    def render(self, translation: str) -> str:
        if translation == self.text:
            return self.raw  # an unchanged segment keeps its exact source
        text = _NEWLINE.sub("\n", translation)
        if self.escape is not None:
            return self.escape(text)
        return _restore(text, self.protected).replace("\n", self.eol + self.cont)


_Token = str | _Segment


class _Translations:
    """Hands out translations in order and checks their number matches the segments."""

    def __init__(self, translations: Iterable[str]) -> None:
        self._items = iter(translations)
        self.count = 0

    def take(self) -> str:
        translation = next(self._items, _MISSING)
        if translation is _MISSING:
            raise ValueError(
                f"Too few translations: got {self.count} for a document with more segments."
            )
        self.count += 1
        return translation

    def finish(self) -> None:
        if next(self._items, _MISSING) is not _MISSING:
            raise ValueError(f"Too many translations: the document has {self.count} segments.")


def _restore(text: str, values: tuple[str, ...]) -> str:
    """Put protected values back in place of their ``{{N}}`` tokens."""
    if not values:
        return text
    used: set[int] = set()

    def value(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if index >= len(values):
            return match.group()
        used.add(index)
        return values[index]

    text = _TOKEN.sub(value, text)
    missing = [v for i, v in enumerate(values) if i not in used]
    if missing:
        # Code and URLs must survive even a sloppy translation: keep them, out of place.
        logger.warning("a translation dropped %d protected fragment(s); appended", len(missing))
        text = " ".join([text, *missing])
    return text


def _has_words(text: str) -> bool:
    """Whether there is anything to translate: "---", "{{0}}" or "♪" need no translator."""
    return any(ch.isalnum() for ch in _TOKEN.sub("", text))


@contextlib.contextmanager
def _atomic_output(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to it on success, so no half-written result."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.part")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _chunked(pieces: Iterable[str], size: int = _READ_CHARS) -> Iterator[str]:
    """Join small strings into chunks of about `size` characters."""
    buffer: list[str] = []
    length = 0
    for piece in pieces:
        buffer.append(piece)
        length += len(piece)
        if length >= size:
            yield "".join(buffer)
            buffer, length = [], 0
    if buffer:
        yield "".join(buffer)


# --------------------------------------------------------------------------- reading text

_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE, whose BOM is its prefix
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_EOL = re.compile(r"\r\n|\r|\n")


def _detect_encoding(path: Path, extension: str, declared: str | None = None) -> str:
    """UTF-8/16/32 by byte-order mark, else UTF-8, `declared`, GB18030: the first that fits."""
    with path.open("rb") as f:
        head = f.read(4)
    candidates = next(([name] for bom, name in _BOMS if head.startswith(bom)), None)
    if candidates is None:
        candidates = ["utf-8", *([declared] if declared else []), "gb18030"]
    for encoding in candidates:
        if _decodes_as_text(path, encoding, extension):
            return encoding
    raise BadDocument(
        f"This {extension} file is not readable text: it is not UTF-8, UTF-16 with a "
        "byte-order mark, or GB18030; save it as UTF-8 and upload it again."
    )


def _decodes_as_text(path: Path, encoding: str, extension: str) -> bool:
    """Decode the whole file in blocks (validation must not load a 20 MB file at once)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                _reject_binary(decoder.decode(block), extension)
            _reject_binary(decoder.decode(b"", final=True), extension)
    except UnicodeDecodeError:
        return False
    return True


def _reject_binary(text: str, extension: str) -> None:
    if "\x00" in text:
        raise BadDocument(
            f"This {extension} file contains binary data, not text (if it is UTF-16, "
            "save it with a byte-order mark or as UTF-8)."
        )


def _read_lines(path: Path, encoding: str) -> Iterator[tuple[str, str]]:
    """(content, line ending) pairs, streamed; "\\r\\n" is never split across reads.

    A line longer than `_MAX_LINE_CHARS` comes in pieces with an empty line ending.
    """
    with path.open(encoding=encoding, newline="") as f:
        buffer = ""
        while True:
            chunk = f.read(_READ_CHARS)
            buffer += chunk
            start = 0
            for match in _EOL.finditer(buffer):
                if chunk and match.end() == len(buffer) and match.group() == "\r":
                    break  # may be the first half of "\r\n"; decide after the next read
                yield buffer[start : match.start()], match.group()
                start = match.end()
            buffer = buffer[start:]
            if not chunk:
                if buffer:
                    yield buffer, ""
                return
            while len(buffer) > _MAX_LINE_CHARS:
                yield buffer[:_MAX_LINE_CHARS], ""
                buffer = buffer[_MAX_LINE_CHARS:]


# --------------------------------------------------------------------------- paragraphs


@dataclass(frozen=True, slots=True)
class _Line:
    """A source line: `prefix` (indentation, markers) + `text` + `trail` + `eol`."""

    prefix: str
    text: str
    trail: str
    eol: str


def _line(prefix: str, body: str, eol: str, suffix: str = "") -> _Line:
    text = body.strip()
    lead = len(body) - len(body.lstrip())
    return _Line(prefix + body[:lead], text, body[lead + len(text) :] + suffix, eol)


_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*\s+|[。！？；][\"'”’」』）]*\s*")


def _split_long(text: str, spans: list[tuple[int, int]]) -> list[str]:
    """Cut `text` into pieces of at most ~_MAX_SEGMENT_CHARS: at sentence ends, else at a
    space, else anywhere; never inside one of the (sorted) protected `spans`."""
    starts = [s for s, _ in spans]

    def allowed(i: int) -> bool:
        k = bisect.bisect_left(starts, i) - 1
        return k < 0 or spans[k][1] <= i

    cuts = [m.end() for m in _SENTENCE_END.finditer(text) if allowed(m.end())]
    pieces: list[str] = []
    start = 0
    while len(text) - start > _MAX_SEGMENT_CHARS:
        end = start + _MAX_SEGMENT_CHARS
        k = bisect.bisect_right(cuts, end) - 1
        cut = cuts[k] if k >= 0 and cuts[k] > start else 0
        if not cut:
            space = text.rfind(" ", start + 1, end)
            while space > start and not allowed(space + 1):
                space = text.rfind(" ", start + 1, space)
            cut = space + 1 if space > start else end
        if not allowed(cut):  # a hard cut inside a code span: cut before it, or after it
            span = spans[bisect.bisect_left(starts, cut) - 1]
            cut = span[0] if span[0] > start else span[1]
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _paragraph_tokens(
    lines: list[_Line], cont: str = "", markdown: bool = False, eol: str | None = None
) -> Iterator[_Token]:
    """Tokens of consecutive lines that make one segment (or several, if it is too long).

    The first prefix and the last line's trailing space stay outside the segment; the
    text joins the lines with "\\n".
    """
    first, last = lines[0], lines[-1]
    eol = eol or next((line.eol for line in lines if line.eol), "\n")
    yield first.prefix
    if len(lines) == 1 and len(first.text) > _MAX_SEGMENT_CHARS:
        pieces = _split_long(first.text, _inline_spans(first.text) if markdown else [])
    else:
        pieces = []
    if len(pieces) > 1:  # one piece: a single code span too long to cut
        for piece in pieces:
            yield from _paragraph_tokens([_line("", piece, "")], "", markdown, eol)
    else:
        parts = []
        for line in lines:
            if line is not first:
                parts.append(line.prefix)
            parts.append(line.text)
            if line is not last:
                parts.append(line.trail + line.eol)
        raw = "".join(parts)
        text = "\n".join(line.text for line in lines)
        protected: tuple[str, ...] = ()
        if markdown:
            text, protected = _protect_inline(text)
        if len(lines) > 1:
            cont = lines[1].prefix
        yield _Segment(raw, text, eol, cont, protected) if _has_words(text) else raw
    yield last.trail + last.eol


def _text_tokens(lines: Iterable[tuple[str, str]]) -> Iterator[_Token]:
    """Plain text: paragraphs (runs of non-blank lines) are segments."""
    para: list[_Line] = []
    size = 0
    for content, eol in lines:
        if para and (not content.strip() or size + len(content) > _MAX_SEGMENT_CHARS):
            yield from _paragraph_tokens(para)
            para, size = [], 0
        if not content.strip():
            yield content + eol
            continue
        para.append(_line("", content, eol))
        size += len(content) + 1
    if para:
        yield from _paragraph_tokens(para)


_SRT_TIMING = re.compile(r"\s*\d+:\d{2}:\d{2}[,.]\d{1,3}\s*-->\s*\d+:\d{2}:\d{2}[,.]\d{1,3}")


def _subtitle_tokens(lines: Iterable[tuple[str, str]]) -> Iterator[_Token]:
    """SubRip: the text lines of each cue are one segment; indices and timings are kept."""
    cue: list[_Line] = []
    in_cue = False
    for content, eol in lines:
        if in_cue and content.strip():
            cue.append(_line("", content, eol))
            continue
        if cue:
            yield from _paragraph_tokens(cue)
            cue = []
        in_cue = bool(_SRT_TIMING.match(content))
        yield content + eol
    if cue:
        yield from _paragraph_tokens(cue)


# --------------------------------------------------------------------------- markdown

_MD_INLINE = re.compile(
    "|".join(
        [
            r"(?<![\\`])(?P<ticks>`+)(?!`).*?(?<!`)(?P=ticks)(?!`)",  # code span
            r"<(?:[A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]*|[\w.+-]+@[\w-]+(?:\.[\w-]+)+)>",  # autolink
            r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>",  # inline HTML
            r"(?<=\]\()(?:<[^<>\n]*>|[^\s()<>]+(?:\([^\s()]*\)[^\s()<>]*)*)",  # link target
            r"(?<=\]\[)[^\]\n]+(?=\])",  # reference label
            r"(?:(?:https?|ftp)://|www\.)[^\s<>]*[^\s<>.,;:!?'\")\]]",  # bare URL
            r"\{\{\s*\d+\s*\}\}",  # a literal token, so it cannot be taken for one of ours
        ]
    ),
    re.DOTALL,
)
_QUOTE = re.compile(r"(?:[ ]{0,3}>[ ]?)+")
_ONE_QUOTE = re.compile(r"[ ]{0,3}>[ ]?")
_FENCE = re.compile(r"[ \t]*(?P<fence>`{3,}|~{3,})(?P<info>.*)")
_ATX = re.compile(r"[ ]{0,3}#{1,6}(?=[ \t]|$)")
_ATX_CLOSE = re.compile(r"(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"[ ]{0,3}(?:=+|-+)[ \t]*$")
_THEMATIC = re.compile(r"[ ]{0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_LIST_ITEM = re.compile(r"[ \t]*(?:[-+*]|\d{1,9}[.)])(?:[ \t]+(?:\[[ xX]\][ \t]+)?|$)")
_FOOTNOTE = re.compile(r"[ ]{0,3}\[\^[^\]]+\]:[ \t]*")
_LINK_DEF = re.compile(r"[ ]{0,3}\[[^\]]+\]:[ \t]*\S")
_TABLE_DELIMITER = re.compile(r"\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?")
_CELL_SPLIT = re.compile(r"((?<!\\)\|)")
_HTML_BLOCK_NAMES = (
    "address|article|aside|base|basefont|blockquote|body|caption|center|col|colgroup|dd|"
    "details|dialog|dir|div|dl|dt|fieldset|figcaption|figure|footer|form|frame|frameset|"
    "h[1-6]|head|header|hr|html|iframe|legend|li|link|main|menu|menuitem|nav|noframes|ol|"
    "optgroup|option|p|param|search|section|summary|table|tbody|td|tfoot|th|thead|title|"
    "tr|track|ul"
)
# CommonMark's HTML block kinds: (start, end); end None means "until a blank line".
_HTML_BLOCKS: tuple[tuple[re.Pattern[str], re.Pattern[str] | None], ...] = (
    (
        re.compile(r"[ ]{0,3}<(?:script|pre|style|textarea)(?:\s|>|$)", re.I),
        re.compile(r"</(?:script|pre|style|textarea)>", re.I),
    ),
    (re.compile(r"[ ]{0,3}<!--"), re.compile(r"-->")),
    (re.compile(r"[ ]{0,3}<\?"), re.compile(r"\?>")),
    (re.compile(r"[ ]{0,3}<!\[CDATA\["), re.compile(r"\]\]>")),
    (re.compile(r"[ ]{0,3}<![A-Za-z]"), re.compile(r">")),
    (re.compile(rf"[ ]{{0,3}}</?(?:{_HTML_BLOCK_NAMES})(?:\s|/?>|$)", re.I), None),
)
_HTML_TAG_LINE = re.compile(r"[ ]{0,3}(?:<[A-Za-z][\w-]*(?:\s[^<>]*)?/?>|</[A-Za-z][\w-]*\s*>)\s*$")
_FRONT_MATTER_MAX_LINES = 500


def _inline_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _MD_INLINE.finditer(text) if m.end() > m.start()]


def _protect_inline(text: str) -> tuple[str, tuple[str, ...]]:
    """Replace inline code, URLs and inline HTML with ``{{N}}`` tokens."""
    parts: list[str] = []
    values: list[str] = []
    pos = 0
    for start, end in _inline_spans(text):
        parts += [text[pos:start], f"{{{{{len(values)}}}}}"]
        values.append(text[start:end])
        pos = end
    parts.append(text[pos:])
    return "".join(parts), tuple(values)


def _indent(text: str) -> int:
    return len(text[: len(text) - len(text.lstrip(" \t"))].expandtabs(4))


def _strip_quotes(content: str, depth: int) -> str | None:
    """`content` without `depth` blockquote markers, or None if it has fewer."""
    pos = 0
    for _ in range(depth):
        match = _ONE_QUOTE.match(content, pos)
        if match is None:
            return None
        pos = match.end()
    return content[pos:]


def _is_table_delimiter(line: str | None, depth: int) -> bool:
    """Whether `line` is a GFM table's delimiter row ("|---|:--:|")."""
    row = _strip_quotes(line, depth) if line is not None else None
    return row is not None and "|" in row and bool(_TABLE_DELIMITER.fullmatch(row.strip()))


def _table_row_tokens(quote: str, body: str, eol: str) -> Iterator[_Token]:
    yield quote
    for part in _CELL_SPLIT.split(body):
        if part == "|":
            yield part
        elif part:
            yield from _paragraph_tokens([_line("", part, "")], markdown=True)
    yield eol


class _MarkdownScanner:
    """Line-at-a-time Markdown block scanner: a practical subset of CommonMark and GFM.

    Code blocks, HTML blocks, front matter and link definitions are copied as they are;
    paragraphs, headings, list items and table cells become segments without their
    markers. Feed lines, take tokens from `out`.
    """

    def __init__(self) -> None:
        self.out: list[_Token] = []
        self._para: list[_Line] = []
        self._para_cont = ""
        self._para_size = 0
        self._depth = 0  # blockquote depth of the open paragraph or table
        self._table = False
        self._list: int | None = None  # content column of the current list item
        # An open verbatim block: (kind, blockquote depth, detail).
        self._keep: tuple[str, int, Any] | None = None
        self._front: list[tuple[str, str]] | None = None
        self._pending: tuple[str, str] | None = None  # one line of lookahead, for tables
        self._lines = 0

    def feed(self, content: str, eol: str) -> None:
        self._lines += 1
        if self._lines == 1 and content.rstrip() in ("---", "+++"):
            self._front = [(content, eol)]
            return
        if self._front is not None:
            self._front.append((content, eol))
            if content.rstrip() in ("---", "...", "+++") and (content[0] == "+") == (
                self._front[0][0][0] == "+"
            ):
                self.out.append("".join(c + e for c, e in self._front))
                self._front = None
            elif len(self._front) > _FRONT_MATTER_MAX_LINES:
                self._replay_front()
            return
        if self._pending is not None:
            self._process(*self._pending, following=content)
        self._pending = (content, eol)

    def finish(self) -> None:
        if self._front is not None:
            self._replay_front()  # never closed: it was not front matter
        if self._pending is not None:
            self._process(*self._pending, following=None)
            self._pending = None
        self._flush()

    def _replay_front(self) -> None:
        lines, self._front = self._front or [], None
        for content, eol in lines:
            self.feed(content, eol)

    def _flush(self) -> None:
        if self._para:
            self.out.extend(_paragraph_tokens(self._para, self._para_cont, markdown=True))
            self._para, self._para_size = [], 0

    def _start_para(self, line: _Line, cont: str) -> None:
        self._flush()
        self._para, self._para_size, self._para_cont = [line], len(line.text), cont

    def _continue_kept(self, content: str, eol: str) -> bool:
        """Copy a line of the open code or HTML block; False once the block has ended."""
        assert self._keep is not None
        kind, depth, detail = self._keep
        body = _strip_quotes(content, depth)
        if body is None:  # the blockquote around the block ended
            self._keep = None
            return False
        if kind == "fence":
            self.out.append(content + eol)
            char, length, indent = detail
            closing = body.strip()
            # A deeper-indented fence line is code (say, Markdown quoted in Markdown).
            if len(closing) >= length and closing == char * len(closing):
                self._keep = None if _indent(body) <= indent + 3 else self._keep
            return True
        if (kind == "code" and body.strip() and _indent(body) < detail) or (
            kind == "html" and detail is None and not body.strip()
        ):
            self._keep = None
            return False
        self.out.append(content + eol)
        if kind == "html" and detail is not None and detail.search(content):
            self._keep = None
        return True

    def _process(self, content: str, eol: str, following: str | None) -> None:
        if self._keep is not None and self._continue_kept(content, eol):
            return
        quote = _QUOTE.match(content)
        prefix = quote.group() if quote else ""
        depth = prefix.count(">")
        body = content[len(prefix) :]
        if not body.strip():
            self._flush()
            self._table = False
            self.out.append(content + eol)
            return
        if depth != self._depth:
            self._flush()
            self._table, self._depth = False, depth
        indent = _indent(body)
        if self._list is not None and indent < self._list and not _LIST_ITEM.match(body):
            # Back at the margin: the list is over (or this is a lazy line; then ending
            # it early only makes more lines count as code, the safe side).
            self._list = None
        if self._table and "|" not in body:
            self._table = False
        if self._block_start(content, eol, body, depth, indent):
            return
        if "|" in body and (self._table or _is_table_delimiter(following, depth)):
            self._flush()
            self._table = True
            self.out.extend(_table_row_tokens(prefix, body, eol))
            return
        self._table = False
        if heading := _ATX.match(body):
            self._flush()
            rest = body[heading.end() :]
            close = _ATX_CLOSE.search(rest)
            assert close is not None  # the pattern matches the empty end of any string
            line = _line(
                prefix + heading.group(), rest[: close.start()], eol, rest[close.start() :]
            )
            self.out.extend(_paragraph_tokens([line], markdown=True))
            return
        if not self._para and _LINK_DEF.match(body) and not body.lstrip().startswith("[^"):
            self.out.append(content + eol)
            return
        if marker := _FOOTNOTE.match(body) or _LIST_ITEM.match(body):
            self._flush()
            width = len(marker.group().expandtabs(4)) + (marker.group()[-1:] not in (" ", "\t"))
            if marker.re is _LIST_ITEM:
                self._list = width
            rest = body[marker.end() :]
            if not rest.strip():
                self.out.append(content + eol)
            else:
                self._start_para(_line(prefix + marker.group(), rest, eol), prefix + " " * width)
            return
        line = _line(prefix, body, eol)
        if self._para and self._para_size + len(line.text) <= _MAX_SEGMENT_CHARS:
            self._para.append(line)
            self._para_size += len(line.text) + 1
        else:
            self._start_para(line, line.prefix)

    def _block_start(self, content: str, eol: str, body: str, depth: int, indent: int) -> bool:
        """Open a verbatim block (code, HTML) or copy a rule; True if the line was taken."""
        code_indent = 4 + (self._list or 0)
        if not self._para and not self._table and indent >= code_indent:
            # An indented code block (which cannot interrupt a paragraph).
            self._keep = ("code", depth, code_indent)
        elif (fence := _FENCE.fullmatch(body)) and not (
            fence["fence"][0] == "`" and "`" in fence["info"]
        ):
            marker = fence["fence"]
            self._keep = ("fence", depth, (marker[0], len(marker), _indent(body)))
        elif html_block := self._html_block(body):
            start, end = html_block
            if end is None or not end.search(body, start):
                self._keep = ("html", depth, end)
        elif not ((self._para and _SETEXT.match(body)) or _THEMATIC.match(body)):
            return False
        self._flush()
        self._table = False
        self.out.append(content + eol)
        return True

    def _html_block(self, body: str) -> tuple[int, re.Pattern[str] | None] | None:
        for start, end in _HTML_BLOCKS:
            if match := start.match(body):
                return match.end(), end
        if not self._para and _HTML_TAG_LINE.match(body):
            return 0, None
        return None


def _markdown_tokens(lines: Iterable[tuple[str, str]]) -> Iterator[_Token]:
    scanner = _MarkdownScanner()
    for content, eol in lines:
        scanner.feed(content, eol)
        yield from scanner.out
        scanner.out.clear()
    scanner.finish()
    yield from scanner.out


# --------------------------------------------------------------------------- html

_HTML_SPACE = " \t\n\r\f"
_HTML_SPACE_RUN = re.compile(r"[ \t\n\r\f]+")
_KEEP_CONTENT = frozenset({"script", "style", "code", "pre", "kbd", "samp", "textarea"})
_VOID_TAGS = frozenset(
    "area base br col embed hr img input link meta param source track wbr".split()
)
_TEXT_ATTRIBUTES = frozenset({"alt", "title", "placeholder", "aria-label"})
_META_TEXT = frozenset({"description", "og:title", "og:description", "twitter:description"})
_BUTTON_INPUTS = frozenset({"submit", "button", "reset"})
_ATTRIBUTE = re.compile(
    r"""(?P<name>[^\s"'<>/=]+)(?:\s*=\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<uq>[^\s"'=<>`]+)))?"""
)
_TAG_NAME = re.compile(r"<[^\s/>]*")
_CHARSET = re.compile(r"(charset\s*=\s*[\"']?\s*)([^\s\"';>/]+)", re.I)
_XML_ENCODING = re.compile(r"(encoding\s*=\s*[\"'])([^\"']+)")
_DECLARED_CHARSET = re.compile(
    rb"(?:<meta[^>]*?charset\s*=\s*[\"']?|<\?xml[^>]*?encoding\s*=\s*[\"'])\s*([\w.:-]+)", re.I
)
_HTML_BREAKS = frozenset(
    "address article aside blockquote br dd div dl dt figcaption footer form h1 h2 h3 h4 h5 "
    "h6 header hr li main nav ol p pre section table td th title tr ul".split()
)


class _HtmlEvent(NamedTuple):
    start: int
    end: int
    kind: str  # "start", "startend", "end", "data" or "other"
    tag: str
    attrs: list[tuple[str, str | None]]


class _HtmlScanner(HTMLParser):
    """Records where each construct starts; the source up to the next start is its text."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        # html.parser reports (line, column) with lines split at "\n" only.
        self._line_starts = [0, *(m.end() for m in re.finditer("\n", source))]
        self.marks: list[tuple[int, str, str, list[tuple[str, str | None]]]] = []

    def _mark(self, kind: str, tag: str = "", attrs: list[tuple[str, str | None]] | None = None):
        line, column = self.getpos()
        self.marks.append((self._line_starts[line - 1] + column, kind, tag, attrs or []))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._mark("start", tag, attrs)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._mark("startend", tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        self._mark("end", tag)

    def handle_data(self, data: str) -> None:
        self._mark("data")

    def handle_comment(self, data: str) -> None:
        self._mark("other")

    handle_decl = handle_pi = unknown_decl = handle_comment


def _html_events(source: str) -> list[_HtmlEvent]:
    scanner = _HtmlScanner(source)
    scanner.feed(source)
    scanner.close()
    marks = scanner.marks
    if not marks or marks[0][0] > 0:
        marks.insert(0, (0, "other", "", []))
    events: list[_HtmlEvent] = []
    for i, (start, kind, tag, attrs) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else len(source)
        if kind == "data" and events and events[-1].kind == "data":
            events[-1] = events[-1]._replace(end=end)  # "a < b" arrives in several pieces
        else:
            events.append(_HtmlEvent(start, end, kind, tag, attrs))
    return events


def _no_translate(attrs: list[tuple[str, str | None]]) -> bool:
    """HTML's translate="no" (and the common class="notranslate")."""
    values = {name: (value or "").lower() for name, value in attrs}
    return values.get("translate") == "no" or "notranslate" in values.get("class", "").split()


def _html_tokens(source: str) -> Iterator[_Token]:
    kept: list[str] = []  # open elements whose content is not translated
    for event in _html_events(source):
        raw = source[event.start : event.end]
        if event.kind == "data" and not kept:
            yield from _html_text_tokens(raw)
        elif event.kind in ("start", "startend"):
            no_translate = _no_translate(event.attrs)
            yield from _html_tag_tokens(raw, event, translate=not kept and not no_translate)
            if (
                event.kind == "start"
                and event.tag not in _VOID_TAGS
                and (kept or no_translate or event.tag in _KEEP_CONTENT)
            ):
                kept.append(event.tag)
        else:
            if event.kind == "end" and event.tag in kept:
                del kept[len(kept) - 1 - kept[::-1].index(event.tag) :]
            if event.kind == "other" and raw.startswith("<?xml"):
                raw = _XML_ENCODING.sub(_utf8_charset, raw)  # XHTML's declaration, too
            yield raw


def _escape_text(text: str) -> str:
    # A no-break space is invisible in the source: write it back as the entity it was.
    return html.escape(text, quote=False).replace("\xa0", "&nbsp;")


def _escape_attribute(text: str) -> str:
    return html.escape(text, quote=True).replace("\xa0", "&nbsp;")


def _escape_unquoted(text: str) -> str:
    return f'"{_escape_attribute(text)}"'


def _html_text_tokens(raw: str) -> Iterator[_Token]:
    core = raw.strip(_HTML_SPACE)
    if not core:
        yield raw
        return
    lead = raw[: len(raw) - len(raw.lstrip(_HTML_SPACE))]
    text = _HTML_SPACE_RUN.sub(" ", html.unescape(core))
    yield lead
    yield _Segment(core, text, escape=_escape_text) if _has_words(text) else core
    yield raw[len(lead) + len(core) :]


def _text_attributes(event: _HtmlEvent) -> frozenset[str]:
    values = {name: (value or "").lower() for name, value in event.attrs}
    names = _TEXT_ATTRIBUTES
    if event.tag == "meta" and (values.get("name") or values.get("property")) in _META_TEXT:
        names |= {"content"}
    if event.tag == "input" and values.get("type") in _BUTTON_INPUTS:
        names |= {"value"}
    return names


def _utf8_charset(match: re.Match[str]) -> str:
    return match.group() if match.group(2).lower() in ("utf-8", "utf8") else match[1] + "utf-8"


def _html_tag_tokens(raw: str, event: _HtmlEvent, translate: bool) -> Iterator[_Token]:
    if event.tag == "meta":
        raw = _CHARSET.sub(_utf8_charset, raw)  # the output is UTF-8 whatever the input was
    if not translate:
        yield raw
        return
    names = _text_attributes(event)
    name_end = _TAG_NAME.match(raw)
    pos = 0
    for match in _ATTRIBUTE.finditer(raw, name_end.end() if name_end else 0):
        group = next((g for g in ("dq", "sq", "uq") if match.group(g) is not None), None)
        if group is None or match["name"].lower() not in names:
            continue
        value = match.group(group)
        text = _HTML_SPACE_RUN.sub(" ", html.unescape(value)).strip()
        if not _has_words(text):
            continue
        start, end = match.span(group)
        escape = _escape_unquoted if group == "uq" else _escape_attribute
        yield raw[pos:start]
        yield _Segment(value, text, escape=escape)
        pos = end
    yield raw[pos:]


def _html_plain_text(source: str) -> str:
    parts: list[str] = []
    hidden = preformatted = 0
    for event in _html_events(source):
        if event.kind == "data":
            if not hidden:
                text = html.unescape(source[event.start : event.end])
                parts.append(text if preformatted else _HTML_SPACE_RUN.sub(" ", text))
        elif event.kind in ("start", "end"):
            step = 1 if event.kind == "start" else -1
            if event.tag in ("script", "style", "template"):
                hidden = max(0, hidden + step)
            elif event.tag == "pre":
                preformatted = max(0, preformatted + step)
        if event.tag in _HTML_BREAKS and event.kind != "data":
            parts.append("\n")
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", "".join(parts))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _declared_charset(path: Path) -> str | None:
    """The <meta charset> (or XML encoding) of an HTML file, if Python knows it."""
    with path.open("rb") as f:
        match = _DECLARED_CHARSET.search(f.read(4096))
    if match is None:
        return None
    try:
        name = codecs.lookup(match.group(1).decode("ascii")).name
    except LookupError:
        return None
    return None if name.startswith(("utf-16", "utf-32")) else name


# --------------------------------------------------------------------------- text documents


class _BaseDocument:
    """What every format shares; subclasses implement the `Document` methods."""

    def __init__(self, path: Path, extension: str) -> None:
        self.path = path
        self.extension = extension

    def segments(self) -> Iterator[str]:
        raise NotImplementedError

    def render(self, translations: Iterable[str], out: Path) -> None:
        raise NotImplementedError

    def plain_text(self) -> Iterator[str]:
        raise NotImplementedError

    def result_name(self, file_name: str) -> str:
        """The translated result keeps the file name."""
        return file_name

    def _no_text_message(self) -> str:
        return f"This {self.extension} file contains no text to translate."


class _TokenDocument(_BaseDocument):
    """A document read as a stream of tokens (see the module docstring)."""

    def _tokens(self) -> Iterator[_Token]:
        raise NotImplementedError

    def segments(self) -> Iterator[str]:
        """The translatable segments in document order; each call starts over."""
        for token in self._tokens():
            if isinstance(token, _Segment):
                yield token.text

    def render(self, translations: Iterable[str], out: Path) -> None:
        """Write the document with its segments translated, streaming, as UTF-8."""
        feed = _Translations(translations)
        # errors="replace": a stray surrogate from an engine must not fail a whole job.
        with (
            _atomic_output(out) as tmp,
            tmp.open("w", encoding="utf-8", newline="", errors="replace") as f,
        ):
            for token in self._tokens():
                f.write(token if isinstance(token, str) else token.render(feed.take()))
            feed.finish()

    def plain_text(self) -> Iterator[str]:
        """The document's text as it is, in chunks."""
        return _chunked(t if isinstance(t, str) else t.raw for t in self._tokens())


class _TextFileDocument(_TokenDocument):
    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
        self.encoding = _detect_encoding(path, extension)

    def _lines(self) -> Iterator[tuple[str, str]]:
        return _read_lines(self.path, self.encoding)


class TextDocument(_TextFileDocument):
    """Plain text: paragraphs are segments; lines and blank lines are kept."""

    def _tokens(self) -> Iterator[_Token]:
        return _text_tokens(self._lines())


class MarkdownDocument(_TextFileDocument):
    """Markdown: block text is segmented; code, URLs, HTML and front matter are kept."""

    def _tokens(self) -> Iterator[_Token]:
        return _markdown_tokens(self._lines())


class SubtitleDocument(_TextFileDocument):
    """SubRip subtitles: each cue's text is a segment."""

    def _tokens(self) -> Iterator[_Token]:
        return _subtitle_tokens(self._lines())

    def plain_text(self) -> Iterator[str]:
        """The cues' text, a blank line between cues."""
        return _chunked(t.text + "\n\n" for t in self._tokens() if isinstance(t, _Segment))

    def _no_text_message(self) -> str:
        if not any(_SRT_TIMING.match(content) for content, _ in self._lines()):
            return (
                "This .srt file has no subtitle cues (no timing lines such as "
                '"00:00:01,000 --> 00:00:04,000").'
            )
        return "This .srt file has subtitle cues but no text in them."


class HtmlDocument(_TokenDocument):
    """HTML: text nodes and text attributes are segments; markup is kept as written."""

    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
        encoding = _detect_encoding(path, extension, _declared_charset(path))
        with path.open(encoding=encoding, newline="") as f:
            self._source = f.read()

    def _tokens(self) -> Iterator[_Token]:
        return _html_tokens(self._source)

    def plain_text(self) -> Iterator[str]:
        """The visible text, a line per block element."""
        yield _html_plain_text(self._source)


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
    except (PackageNotFoundError, KeyError, zipfile.BadZipFile, etree.XMLSyntaxError) as e:
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


# --------------------------------------------------------------------------- pdf

_CJK = re.compile(
    "[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\ua960-\ua97f\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]"
)
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
            raise BadDocument(
                "This .pdf file is damaged and cannot be read; save or export it as PDF "
                "again and upload the new file."
            ) from e
        self._texts: list[str] = []  # extraction is slow: each page's text, once

    def _page_texts(self) -> Iterator[str]:
        for index, page in enumerate(self._reader.pages):
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


# --------------------------------------------------------------------------- opening

_FORMATS: dict[str, type[_BaseDocument]] = {
    ".txt": TextDocument,
    ".md": MarkdownDocument,
    ".srt": SubtitleDocument,
    ".html": HtmlDocument,
    ".htm": HtmlDocument,
    ".docx": DocxDocument,
    ".pdf": PdfDocument,
}


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


# --------------------------------------------------------------------------- statistics

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def count_words(text: str) -> int:
    """Words in `text`; each CJK character (Han, Kana, Hangul) counts as one word."""
    cjk = len(_CJK.findall(text))
    return cjk + len(_WORD.findall(_CJK.sub(" ", text) if cjk else text))


def document_stats(doc: Document) -> DocumentStats:
    """Characters, words, segments and language, in one streaming pass over the segments."""
    characters = words = segments = 0
    sample: list[str] = []
    sample_size = 0
    for segment in doc.segments():
        characters += len(segment)
        words += count_words(segment)
        segments += 1
        if sample_size < _LANGUAGE_SAMPLE_CHARS:
            sample.append(segment)
            sample_size += len(segment)
    return DocumentStats(characters, words, segments, guess_language("\n".join(sample)))


# (first code point, last code point, script); letters outside these count as "other".
_SCRIPT_RANGES = (
    (0x0041, 0x024F, "latin"),
    (0x0370, 0x03FF, "greek"),
    (0x0400, 0x052F, "cyrillic"),
    (0x0530, 0x058F, "armenian"),
    (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"),
    (0x0750, 0x077F, "arabic"),
    (0x0900, 0x097F, "devanagari"),
    (0x0980, 0x09FF, "bengali"),
    (0x0B80, 0x0BFF, "tamil"),
    (0x0E00, 0x0E7F, "thai"),
    (0x10A0, 0x10FF, "georgian"),
    (0x1100, 0x11FF, "hangul"),
    (0x1E00, 0x1EFF, "latin"),
    (0x3040, 0x30FF, "kana"),
    (0x3130, 0x318F, "hangul"),
    (0x31F0, 0x31FF, "kana"),
    (0x3400, 0x4DBF, "han"),
    (0x4E00, 0x9FFF, "han"),
    (0xAC00, 0xD7AF, "hangul"),
    (0xF900, 0xFAFF, "han"),
    (0xFB50, 0xFDFF, "arabic"),
    (0xFE70, 0xFEFF, "arabic"),
    (0xFF66, 0xFF9F, "kana"),
    (0x20000, 0x3134F, "han"),
)
_RANGE_STARTS = [start for start, _, _ in _SCRIPT_RANGES]
_SCRIPT_LANGUAGE = {
    "greek": "el", "armenian": "hy", "hebrew": "he", "devanagari": "hi", "bengali": "bn",
    "tamil": "ta", "thai": "th", "georgian": "ka", "hangul": "ko", "han": "zh", "kana": "ja",
}  # fmt: skip
_STOPWORDS = {
    "en": "the and of to is in that it for with was on are this be as you not have",
    "de": "der die das und ist nicht ein eine zu mit den von sich auf für dem auch ich es",
    "fr": "le la les et des est une un du que dans pour pas qui sur au avec ce il elle nous",
    "es": "el la los las y de que en es un una por con para del se no al lo como más",
    "it": "il di che e la un una per non sono del della con gli è le si da ho anche",
    "pt": "o a os as de que e do da em um uma para com não por mais se ao é são",
    "nl": "de het een en van is dat niet op te zijn met voor ik die aan er maar",
    "pl": "i w na z że nie się do jest to jak co ale o dla są tak",
    "tr": "ve bir bu da de için ile çok ne gibi daha olarak ama değil",
    "vi": "và của là có không được cho những một các người trong với",
}
_STOPWORD_SETS = {lang: frozenset(words.split()) for lang, words in _STOPWORDS.items()}
# Letters that, in some quantity, single a language out of its script.
_MARKERS = (
    ("cyrillic", "uk", set("іїєґ")),
    ("cyrillic", "sr", set("ђјљњћџ")),
    ("arabic", "fa", set("پچژگ")),
)


def _script(char: str) -> str | None:
    code = ord(char)
    k = bisect.bisect_right(_RANGE_STARTS, code) - 1
    if k >= 0 and code <= _SCRIPT_RANGES[k][1]:
        return _SCRIPT_RANGES[k][2]
    return None


def guess_language(sample: str) -> str:
    """An ISO 639-1 guess for `sample` ("en", "zh", "ja", ...), or "unknown".

    The script decides most languages; kana among Han means Japanese; Latin-script
    languages are told apart by their commonest words.
    """
    sample = sample[:_LANGUAGE_SAMPLE_CHARS]
    scripts = Counter(s for ch in sample if ch.isalpha() and (s := _script(ch)))
    if not scripts:
        return "unknown"
    kana, han, hangul = scripts["kana"], scripts["han"], scripts["hangul"]
    cjk = kana + han + hangul
    # A CJK character carries about as much as a short word, not as a letter.
    if 3 * cjk >= max(scripts.values()):
        if hangul > kana + han:
            return "ko"
        return "ja" if kana >= 0.05 * (kana + han) else "zh"
    script = scripts.most_common(1)[0][0]
    for marked, language, letters in _MARKERS:
        if script == marked and sum(ch in letters for ch in sample) >= 0.01 * scripts[script]:
            return language
    if script == "cyrillic":
        return "ru"
    if script == "arabic":
        return "ar"
    if script != "latin":
        return _SCRIPT_LANGUAGE.get(script, "unknown")
    words = Counter(w.lower() for w in _WORD.findall(sample))
    hits = {lang: sum(words[w] for w in stop) for lang, stop in _STOPWORD_SETS.items()}
    (best, top), (_, runner_up) = sorted(hits.items(), key=lambda item: -item[1])[:2]
    return best if top > runner_up else "unknown"  # a tie on "de" or "la" says nothing
