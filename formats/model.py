"""The shared model: segments, tokens, the Document protocol and its base classes."""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .tags import TAG, fallback_pieces, is_balanced

logger = logging.getLogger(__name__)


# Translation engines limit their input; longer paragraphs are cut into several segments.
_MAX_SEGMENT_CHARS = 2000
_READ_CHARS = 1 << 16
# A line longer than this (a file with no line breaks) is read in pieces, to bound memory.
_MAX_LINE_CHARS = 1 << 18
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


@dataclass(frozen=True)
class TextEncoding:
    """How a text file is encoded: `decode` reads it (a BOM included), `codec` and
    `bom` write it back the same way."""

    decode: str
    codec: str
    bom: bytes = b""

    @property
    def is_utf8(self) -> bool:
        return self.codec == "utf-8" and not self.bom


class Document(Protocol):
    """An opened document; see `open_document`."""

    extension: str  #: ".txt", ".md", ...

    def segments(self) -> Iterator[str]:
        """The translatable segments in document order; each call starts over.

        Never yields blank segments. Text formats stream from the file.
        """
        ...

    def render(
        self, translations: Iterable[str], out: Path, output_encoding: str = "source"
    ) -> int:
        """Write the document to `out` with segment i replaced by the i-th translation.

        Consumes `translations` lazily and in order; everything that is not a segment is
        kept. Text formats keep the source's encoding and byte-order mark
        (`output_encoding` "source"; a text the encoding cannot hold falls back to
        UTF-8) or write UTF-8 ("utf-8"). Raises ValueError if the counts differ (and
        then leaves no file at `out`). Returns how many segments lost their inline
        formatting because the translation's tags were broken (their text is kept).
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
_NESTED = re.compile("\x00(\\d+)\x00")


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
    #: inline tags: span number -> (opening, closing) source markup, and self-closing
    #: number -> source text; None for a segment without tags
    markup: tuple[dict[int, tuple[str, str]], dict[int, str]] | None = None
    #: segments inside the markup (a link's title): their translations follow this
    #: segment's, and ``\x00k\x00`` in the markup stands for the k-th one rendered
    nested: tuple[_Segment, ...] = ()

    def texts(self) -> Iterator[str]:
        """What goes to the translator: this segment's text, then its nested ones'."""
        yield self.text
        for segment in self.nested:
            yield segment.text

    def render(self, translation: str) -> str:
        """The source text for `translation`."""
        return self.render_checked(translation)[0]

    def render_checked(
        self, translation: str, nested: Sequence[str] = ()
    ) -> tuple[str, bool]:
        """The source text for `translation` (and the nested segments' translations),
        and whether its inline tags were broken (then the text is kept without its
        inline formatting)."""
        nested_same = all(n.text == t for n, t in zip(self.nested, nested, strict=True))
        if translation == self.text and nested_same:
            return self.raw, False  # an unchanged segment keeps its exact source
        text = _NEWLINE.sub("\n", translation)
        if self.markup is None:
            return self._plain(text), False
        filled = [n.render(t) for n, t in zip(self.nested, nested, strict=True)]

        def fill(markup: str) -> str:
            return _NESTED.sub(lambda m: filled[int(m.group(1))], markup) if filled else markup

        spans, empties = self.markup
        if is_balanced(text, set(spans), set(empties)):
            out: list[str] = []
            pos = 0
            for match in TAG.finditer(text):
                out.append(self._plain(text[pos : match.start()]))
                pos = match.end()
                closing, number, self_closing = match.group(1), int(match.group(2)), match[3]
                if self_closing:
                    out.append(fill(empties[number]))
                else:
                    out.append(fill(spans[number][1 if closing else 0]))
            out.append(self._plain(text[pos:]))
            return "".join(out), False
        out = []
        for piece in fallback_pieces(text, sorted(empties)):
            out.append(fill(empties[piece.tag or 0]) if piece.empty else self._plain(piece.text))
        return "".join(out), bool(spans or empties)

    def _plain(self, text: str) -> str:
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
    return any(ch.isalnum() for ch in TAG.sub("", _TOKEN.sub("", text)))


@contextlib.contextmanager
def _atomic_output(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to it on success, so no half-written result."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.part")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _transcode(path: Path, encoding: TextEncoding, errors: str) -> bool:
    """Re-encode the UTF-8 file at `path` into `encoding` (with its BOM), in place;
    False (and the file left as it was) when a character does not fit."""
    encoded = path.with_name(path.name + ".enc")
    encoder = codecs.getincrementalencoder(encoding.codec)(errors)
    try:
        with path.open(encoding="utf-8", newline="") as src, encoded.open("wb") as dst:
            dst.write(encoding.bom)
            while chunk := src.read(_READ_CHARS):
                dst.write(encoder.encode(chunk))
            dst.write(encoder.encode("", final=True))
    except UnicodeEncodeError:
        encoded.unlink(missing_ok=True)
        return False
    os.replace(encoded, path)
    return True


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


# --------------------------------------------------------------------------- base documents


class _BaseDocument:
    """What every format shares; subclasses implement the `Document` methods."""

    def __init__(self, path: Path, extension: str) -> None:
        self.path = path
        self.extension = extension

    def segments(self) -> Iterator[str]:
        raise NotImplementedError

    def render(
        self, translations: Iterable[str], out: Path, output_encoding: str = "source"
    ) -> int:
        raise NotImplementedError

    def plain_text(self) -> Iterator[str]:
        raise NotImplementedError

    def result_name(self, file_name: str) -> str:
        """The translated result keeps the file name."""
        return self.result_name_for(file_name)

    @classmethod
    def result_name_for(cls, file_name: str) -> str:
        """`result_name` without opening a file."""
        return file_name

    def _no_text_message(self) -> str:
        return f"This {self.extension} file contains no text to translate."


class _TokenDocument(_BaseDocument):
    """A document read as a stream of tokens (see the module docstring)."""

    def _tokens(self) -> Iterator[_Token]:
        raise NotImplementedError

    def _each_token(self) -> Iterator[_Token]:
        """One pass over the tokens; each call starts over (`_tokens`, unless a format
        keeps what an earlier pass read)."""
        return self._tokens()

    def segments(self) -> Iterator[str]:
        """The translatable segments in document order; each call starts over."""
        for token in self._each_token():
            if isinstance(token, _Segment):
                yield from token.texts()

    def render(
        self, translations: Iterable[str], out: Path, output_encoding: str = "source"
    ) -> int:
        """Write the document with its segments translated, streaming, in the source's
        encoding (or UTF-8); return how many segments lost their inline formatting."""
        source = self._source_encoding()
        target = None if output_encoding.lower() in ("utf-8", "utf8") else source
        if target is not None and target.is_utf8:
            target = None
        self._utf8_output = target is None
        feed = _Translations(translations)
        lost = 0
        # errors="replace": a stray surrogate from an engine must not fail a whole job.
        with (
            _atomic_output(out) as tmp,
            tmp.open("w", encoding="utf-8", newline="", errors="replace") as f,
        ):
            for token in self._each_token():
                if isinstance(token, str):
                    f.write(token)
                    continue
                translation = feed.take()
                nested = [feed.take() for _ in token.nested]
                text, broken = token.render_checked(translation, nested)
                f.write(text)
                lost += broken
            feed.finish()
            f.close()
            if target is not None and not _transcode(tmp, target, self._unencodable):
                logger.warning(
                    "%s: the translation does not fit %s; the result is UTF-8",
                    self.path.name, target.codec,
                )
        return lost

    #: What to do with a character the source's encoding cannot hold: HTML writes a
    #: character reference; plain text formats cannot, and fall back to UTF-8.
    _unencodable = "strict"
    _utf8_output = True

    def _source_encoding(self) -> TextEncoding | None:
        """The encoding a render keeps; None: the output is UTF-8."""
        return None

    def plain_text(self) -> Iterator[str]:
        """The document's text as it is, in chunks."""
        return _chunked(t if isinstance(t, str) else t.raw for t in self._each_token())



# --------------------------------------------------------------------------- kept tokens

#: A document's tokens are kept for its render only up to this many characters: the
#: render from them runs in the server's own thread pool, so only small documents.
KEEP_TOKENS_CHARS = 256 * 1024


def tokens_data(tokens: Sequence[_Token], encoding: TextEncoding | None, unencodable: str,
                extension: str) -> dict[str, Any] | None:
    """``tokens`` as JSON data for :class:`KeptTokens`, or None when JSON cannot carry
    them (a segment with protected spans, inline tags, escaping or nested segments) or
    they are past ``KEEP_TOKENS_CHARS``."""
    items: list[str | list[str]] = []
    size = 0
    for token in tokens:
        if isinstance(token, str):
            items.append(token)
            size += len(token)
        elif token.protected or token.escape or token.markup is not None or token.nested:
            return None
        else:
            items.append([token.raw, token.text, token.eol, token.cont])
            size += len(token.raw) + len(token.text)
        if size > KEEP_TOKENS_CHARS:
            return None
    return {
        "extension": extension, "unencodable": unencodable, "tokens": items,
        "encoding": None if encoding is None else
        [encoding.decode, encoding.codec, encoding.bom.hex()],
    }


class KeptTokens(_TokenDocument):
    """A document rebuilt from :func:`tokens_data`: it renders exactly as the document
    it was read from (the same tokens through the same ``render``) without the source
    file. The data comes from a parser process: anything not of the expected shape is a
    ``ValueError``, and the caller renders from the file instead."""

    def __init__(self, data: Any, source: Path) -> None:
        if not isinstance(data, dict):
            raise ValueError("kept tokens: not an object")
        super().__init__(source, _text(data.get("extension")))
        self._unencodable = _text(data.get("unencodable"))
        self._encoding = _kept_encoding(data.get("encoding"))
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise ValueError("kept tokens: no token list")
        self._kept = [_kept_token(item) for item in tokens]

    def _tokens(self) -> Iterator[_Token]:
        return iter(self._kept)

    def _source_encoding(self) -> TextEncoding | None:
        return self._encoding


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("kept tokens: a string was expected")
    return value


def _kept_token(item: Any) -> _Token:
    if isinstance(item, str):
        return item
    if not (isinstance(item, list) and len(item) == 4):
        raise ValueError("kept tokens: a segment is [raw, text, eol, cont]")
    raw, text, eol, cont = map(_text, item)
    return _Segment(raw, text, eol, cont)


def _kept_encoding(value: Any) -> TextEncoding | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 3):
        raise ValueError("kept tokens: an encoding is [decode, codec, bom]")
    decode, codec, bom = map(_text, value)
    for name in (decode, codec):
        try:
            codecs.lookup(name)
        except LookupError as e:
            raise ValueError(f"kept tokens: {e}") from e
    return TextEncoding(decode, codec, bytes.fromhex(bom))
