"""Plain text and SubRip subtitles: encodings, lines, paragraphs, cues."""

from __future__ import annotations

import bisect
import codecs
import io
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import charset_normalizer

from .model import (
    _MAX_LINE_CHARS,
    _MAX_SEGMENT_CHARS,
    _READ_CHARS,
    BadDocument,
    TextEncoding,
    _chunked,
    _has_words,
    _Segment,
    _Token,
    _TokenDocument,
    tokens_data,
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- reading text

_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig", "utf-8"),
    (codecs.BOM_UTF32_LE, "utf-32", "utf-32-le"),  # before UTF-16 LE, whose BOM is its prefix
    (codecs.BOM_UTF32_BE, "utf-32", "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16", "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16", "utf-16-be"),
)
_EOL = re.compile(r"\r\n|\r|\n")
# charset-normalizer reads this much to guess a legacy encoding; the guess is then
# checked against the whole file.
_DETECT_SAMPLE_BYTES = 1 << 18


def _detect_encoding(path: Path, extension: str, declared: str | None = None,
                     data: bytes | None = None) -> TextEncoding:
    """UTF-8/16/32 by byte-order mark, else UTF-8, `declared`, charset-normalizer's
    guesses (Windows-1252, Latin-1, Shift-JIS, Big5, EUC-KR ...), GB18030: the first
    that decodes the whole file. `data`, when given, is the whole file already read."""
    if data is not None:
        head = data[:_DETECT_SAMPLE_BYTES]
    else:
        with path.open("rb") as f:
            head = f.read(_DETECT_SAMPLE_BYTES)

    def decodes(encoding: str) -> bool:
        blocks = [data] if data is not None else _blocks(path)
        return _decodes_as_text(blocks, encoding, extension)

    for bom, decode, codec in _BOMS:
        if head.startswith(bom):
            if decodes(decode):
                return TextEncoding(decode, codec, bom)
            break
    else:
        for encoding in _candidates(head, declared):
            if decodes(encoding):
                return TextEncoding(encoding, encoding)
    raise BadDocument(
        f"This {extension} file is not readable text in any encoding the server recognises "
        "(UTF-8, UTF-16 with a byte-order mark, Windows-1252, Latin-1, Shift-JIS, Big5, "
        "EUC-KR, GB18030 ...); save it as UTF-8 and upload it again."
    )


def _candidates(head: bytes, declared: str | None) -> Iterator[str]:
    """The encodings to try, in order, once each. charset-normalizer is asked only when
    neither UTF-8 nor the declared encoding fits (a generator runs no further than
    asked): most files are UTF-8, and its guess cost more than the rest of reading a
    short one."""
    tried: set[str] = set()

    def untried(encodings: Iterable[str]) -> Iterator[str]:
        for encoding in encodings:
            if encoding not in tried:
                tried.add(encoding)
                yield encoding

    yield from untried(["utf-8", *([declared] if declared else [])])
    yield from untried(_guesses(head))
    yield from untried(["gb18030"])


def _guesses(head: bytes) -> list[str]:
    """charset-normalizer's encodings for the sample, best first (none for binary)."""
    if b"\x00" in head:
        return []  # not a legacy 8-bit or multibyte text; leave it to the binary check
    return [match.encoding for match in charset_normalizer.from_bytes(head)]


def _blocks(path: Path) -> Iterator[bytes]:
    """The file in 1 MB blocks (validation must not load a 20 MB file at once)."""
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            yield block


def _decodes_as_text(blocks: Iterable[bytes], encoding: str, extension: str) -> bool:
    """Whether the whole of `blocks` decodes in `encoding` (and is text, not binary)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        for block in blocks:
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


def _read_lines(f: TextIO) -> Iterator[tuple[str, str]]:
    """(content, line ending) pairs of the text stream `f` (opened with ``newline=""``),
    streamed; "\\r\\n" is never split across reads.

    A line longer than `_MAX_LINE_CHARS` comes in pieces with an empty line ending.
    """
    with f:
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
    from .markdown import _inline_spans, _tag_inline  # markdown imports this module

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
        markup = None
        if markdown:
            text, markup = _tag_inline(text)
        if len(lines) > 1:
            cont = lines[1].prefix
        yield _Segment(raw, text, eol, cont, markup=markup) if _has_words(text) else raw
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


# A text file up to this size is read from disk once and decoded once: opening it,
# measuring it and rendering it each pass over its lines, and for a short file the
# opens and decodes cost more than the passes.
_WHOLE_TEXT_BYTES = 1 << 20


def _read_if_small(path: Path) -> bytes | None:
    """The whole file if it is at most `_WHOLE_TEXT_BYTES`, else None (read it in blocks)."""
    with path.open("rb") as f:
        data = f.read(_WHOLE_TEXT_BYTES + 1)
    return data if len(data) <= _WHOLE_TEXT_BYTES else None


class _TextFileDocument(_TokenDocument):
    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
        data = _read_if_small(path)
        self.encoding = _detect_encoding(path, extension, data=data)
        self._text = None if data is None else data.decode(self.encoding.decode)
        self._read: list[_Token] = []  # the tokens read so far (a small file only)
        self._reading: Iterator[_Token] | None = None
        self._broken: BaseException | None = None  # what ended the reading early, if any

    def _each_token(self) -> Iterator[_Token]:
        """A small file's tokens are read once and kept: opening a document checks its
        first segment, measuring or rendering it reads it all, and each pass picks up
        where the reading stands (passes may interleave)."""
        if self._text is None:
            return self._tokens()
        if self._reading is None:
            self._reading = self._tokens()
        return self._replay()

    def kept_tokens(self) -> dict[str, Any] | None:
        """The tokens as JSON data for rendering without the file (``KeptTokens``): a
        small file whose segments JSON can carry; None for anything else."""
        if self._text is None:
            return None
        return tokens_data(list(self._each_token()), self.encoding, self._unencodable,
                           self.extension)

    def _replay(self) -> Iterator[_Token]:
        assert self._reading is not None
        i = 0
        while True:
            if i == len(self._read):
                if self._broken is not None:
                    # What was read is not the whole document: no pass may end quietly
                    # at the point where the reading broke off.
                    raise RuntimeError("this document's reading failed earlier") \
                        from self._broken
                try:
                    token = next(self._reading, None)
                except BaseException as e:
                    self._broken = e
                    raise
                if token is None:
                    return
                self._read.append(token)
            yield self._read[i]
            i += 1

    def _lines(self) -> Iterator[tuple[str, str]]:
        if self._text is not None:
            return _read_lines(io.StringIO(self._text, newline=""))
        return _read_lines(self.path.open(encoding=self.encoding.decode, newline=""))

    def _source_encoding(self) -> TextEncoding | None:
        return self.encoding


class TextDocument(_TextFileDocument):
    """Plain text: paragraphs are segments; lines and blank lines are kept."""

    def _tokens(self) -> Iterator[_Token]:
        return _text_tokens(self._lines())


class SubtitleDocument(_TextFileDocument):
    """SubRip subtitles: each cue's text is a segment."""

    def _tokens(self) -> Iterator[_Token]:
        return _subtitle_tokens(self._lines())

    def plain_text(self) -> Iterator[str]:
        """The cues' text, a blank line between cues."""
        return _chunked(t.text + "\n\n" for t in self._each_token() if isinstance(t, _Segment))

    def _no_text_message(self) -> str:
        if not any(_SRT_TIMING.match(content) for content, _ in self._lines()):
            return (
                "This .srt file has no subtitle cues (no timing lines such as "
                '"00:00:01,000 --> 00:00:04,000").'
            )
        return "This .srt file has subtitle cues but no text in them."

