"""Translation memory and glossaries: the user's translation assets, as pure functions.

A user's memory remembers every translated segment by (source language, target
language, engine, normalised source text); a later task's segments found there
are neither sent to the engine nor charged. This module holds the pure parts:
normalisation and keys, re-using a remembered translation in a new segment,
and TMX export and import through translate-toolkit's TMX store.

A glossary is a list of term pairs for one language pair, read from CSV or TBX
(translate-toolkit's TBX store). :class:`TermPlan` finds the source terms in a
segment and swaps them for private-use placeholders, which every engine keeps
verbatim, then puts the target terms in their place. The rows live in the
database (storage.py); processors and the server call this layer.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BadGlossary",
    "BadTmx",
    "Entry",
    "Glossary",
    "Scope",
    "TermPlan",
    "from_tmx",
    "glossary_fingerprint",
    "memory_key",
    "normalise",
    "parse_glossary",
    "reuse",
    "to_tmx",
]

logger = logging.getLogger(__name__)

#: Note on a TMX unit naming the engine that translated it (our export, read back on import).
ENGINE_NOTE = "x-zhiyi-engine: "


class BadTmx(ValueError):
    """An uploaded TMX file cannot be read; ``str()`` says why, in a sentence."""


@dataclass(frozen=True, slots=True)
class Scope:
    """Which memory a segment is looked up in: the pair and the engine."""

    source: str
    target: str
    engine: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One remembered segment."""

    source_lang: str
    target_lang: str
    engine: str
    source: str
    target: str

    @property
    def key(self) -> str:
        return memory_key(self.source)


def normalise(text: str) -> str:
    """The form segments are compared in: NFC, runs of white space as one space, trimmed."""
    # str.split() cuts at exactly what \s matches (str.isspace) and drops the ends: the
    # regular expression's sub-and-strip, four times faster (every segment, several times
    # a task).
    return " ".join(unicodedata.normalize("NFC", text).split())


def memory_key(text: str) -> str:
    """A fixed-size key for the normalised text (SHA-256, hex)."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def reuse(remembered: str, segment: str) -> str:
    """A remembered translation fitted to ``segment``: its own leading and trailing space."""
    core = segment.strip()
    if not core:
        return segment
    start = len(segment) - len(segment.lstrip())
    return segment[:start] + remembered.strip() + segment[start + len(core):]


# --------------------------------------------------------------------------- TMX

_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


def to_tmx(entries: Iterable[Entry]) -> bytes:
    """A TMX 1.4 document of ``entries``; each unit notes its engine."""
    from translate.storage import tmx

    store = tmx.tmxfile()
    for entry in entries:
        unit = tmx.tmxunit(None)
        unit.setsource(entry.source, entry.source_lang)
        unit.settarget(entry.target, entry.target_lang)
        unit.addnote(ENGINE_NOTE + entry.engine, origin="translator")
        store.addunit(unit)
    return bytes(store)


def from_tmx(data: bytes, default_engine: str | None) -> Iterator[Entry]:
    """The units of a TMX document as entries (the first two languages of each unit).

    A unit's engine is the one our export noted on it, else ``default_engine``;
    raises :class:`BadTmx` when neither says.
    """
    from translate.storage import tmx

    try:
        store = tmx.tmxfile.parsestring(data)
    except Exception as e:  # lxml and the toolkit raise several kinds for bad XML
        detail = f" ({e})" if str(e) else ""
        raise BadTmx(f"The file is not a TMX document{detail}.") from e
    for number, unit in enumerate(store.units, 1):
        nodes = unit.getlanguageNodes()
        if len(nodes) < 2:
            continue
        source_lang, target_lang = (_lang(node) for node in nodes[:2])
        if not source_lang or not target_lang:
            raise BadTmx(f"Translation unit {number} has a <tuv> without xml:lang.")
        engine = _engine_of(unit) or default_engine
        if engine is None:
            raise BadTmx(
                f"Translation unit {number} does not say which engine it belongs to; "
                "import with ?engine=NAME."
            )
        source, target = unit.source or "", unit.target or ""
        if normalise(source) and target.strip():
            yield Entry(source_lang, target_lang, engine, source, target)


def _lang(node: object) -> str:
    get = getattr(node, "get", None)
    value = (get(_XML_LANG) or get("lang") or "") if get else ""
    return str(value).strip()


def _engine_of(unit: object) -> str | None:
    notes = getattr(unit, "getnotes", lambda: "")() or ""
    for line in notes.splitlines():
        if line.startswith(ENGINE_NOTE):
            return line[len(ENGINE_NOTE):].strip() or None
    return None


# --------------------------------------------------------------------------- glossaries

#: Most term pairs one glossary may hold, and the longest term.
MAX_TERMS = 10_000
MAX_TERM_CHARS = 200
_HEADER_WORDS = {"source", "target", "term", "terms", "translation", "src", "tgt"}
#: First private-use code point of term placeholders: one per term occurrence in a
#: segment. engines.py protects [U+E000, U+F8FF]; this end of it is left to glossaries.
_TERM_BASE = 0xF000
_TERM_LAST = 0xF8FF


@dataclass(frozen=True, slots=True)
class Glossary:
    """A user's named glossary for one language pair."""

    name: str
    source_lang: str
    target_lang: str
    terms: list[tuple[str, str]]
    created_at: str = ""


class BadGlossary(ValueError):
    """An uploaded glossary cannot be read; ``str()`` says why, in a sentence."""


Terms = Sequence[tuple[str, str]]


def parse_glossary(data: bytes, file_name: str, source: str, target: str) -> list[tuple[str, str]]:
    """Term pairs from a ``.csv`` (source, target columns) or ``.tbx`` file.

    A CSV's first row is skipped when it is a header (``source,target`` or the two
    language codes). A TBX entry gives the term of ``source`` and of ``target``.
    Raises :class:`BadGlossary`.
    """
    name = file_name.lower()
    if name.endswith(".tbx"):
        pairs = _tbx_pairs(data, source, target)
    elif name.endswith((".csv", ".tsv", ".txt")):
        pairs = _csv_pairs(data, source, target)
    else:
        raise BadGlossary("Upload the glossary as a .csv (source,target) or .tbx file.")
    cleaned: dict[str, str] = {}
    for number, (term, translation) in enumerate(pairs, 1):
        term, translation = normalise(term), normalise(translation)
        if not term or not translation:
            raise BadGlossary(f"Entry {number} has an empty term.")
        if max(len(term), len(translation)) > MAX_TERM_CHARS:
            raise BadGlossary(f"Entry {number} is longer than {MAX_TERM_CHARS} characters.")
        cleaned.setdefault(term, translation)
    if not cleaned:
        raise BadGlossary("The glossary has no term pairs.")
    if len(cleaned) > MAX_TERMS:
        raise BadGlossary(f"A glossary holds at most {MAX_TERMS:,} terms.")
    return list(cleaned.items())


def _csv_pairs(data: bytes, source: str, target: str) -> list[tuple[str, str]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadGlossary("The CSV file is not UTF-8 text.") from e
    try:
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = [row for row in csv.reader(io.StringIO(text), dialect) if any(c.strip() for c in row)]
    for number, row in enumerate(rows, 1):
        if len(row) < 2:
            raise BadGlossary(f"Row {number} of the CSV file needs two columns: source,target.")
    if rows and _is_header(rows[0], source, target):
        rows = rows[1:]
    return [(row[0], row[1]) for row in rows]


def _is_header(row: list[str], source: str, target: str) -> bool:
    cells = [cell.strip().lower() for cell in row[:2]]
    return cells == [source.lower(), target.lower()] or set(cells) <= _HEADER_WORDS


def _tbx_pairs(data: bytes, source: str, target: str) -> list[tuple[str, str]]:
    from translate.storage import tbx

    try:
        store = tbx.tbxfile.parsestring(data)
    except Exception as e:  # lxml and the toolkit raise several kinds for bad XML
        detail = f" ({e})" if str(e) else ""
        raise BadGlossary(f"The file is not a TBX document{detail}.") from e
    pairs = []
    for unit in store.units:
        by_lang = {_lang(node).lower().split("-")[0]: unit.getNodeText(node)
                   for node in unit.getlanguageNodes()}
        term = by_lang.get(source.lower().split("-")[0])
        translation = by_lang.get(target.lower().split("-")[0])
        if term and translation:
            pairs.append((term, translation))
    return pairs


def glossary_fingerprint(terms: Terms) -> str:
    """A short digest of the terms: translations made with them are remembered apart."""
    return hashlib.sha256(json.dumps(list(terms), ensure_ascii=False).encode()).hexdigest()[:12]


class TermPlan:
    """Finds a glossary's source terms in segments (whole words, any case, longest first)."""

    def __init__(self, terms: Terms) -> None:
        self.targets = {term.casefold(): translation for term, translation in terms}
        alternatives = sorted((term for term, _ in terms), key=len, reverse=True)
        self._pattern = re.compile(
            "|".join(_bounded(re.escape(term), term) for term in alternatives), re.IGNORECASE
        ) if alternatives else None

    def find(self, text: str) -> list[str]:
        """The source terms in ``text``, in order (as written there)."""
        return [m.group() for m in self._pattern.finditer(text)] if self._pattern else []

    def protect(self, text: str) -> tuple[str, list[str]]:
        """``text`` with each term replaced by a placeholder, and the target terms in order.

        A segment that already holds characters of the placeholder range is left alone.
        """
        if self._pattern is None or any(_TERM_BASE <= ord(c) <= _TERM_LAST for c in text):
            return text, []
        targets: list[str] = []

        def placeholder(match: re.Match[str]) -> str:
            if len(targets) > _TERM_LAST - _TERM_BASE:
                return match.group()
            targets.append(self.targets.get(match.group().casefold(), match.group()))
            return chr(_TERM_BASE + len(targets) - 1)

        return self._pattern.sub(placeholder, text), targets

    def restore(self, text: str, targets: list[str]) -> str:
        """Put the target terms back in place of their placeholders."""
        for number, term in enumerate(targets):
            text = text.replace(chr(_TERM_BASE + number), term)
        return text


def _bounded(escaped: str, term: str) -> str:
    """Word boundaries where the term starts or ends with a word character."""
    start = r"(?<!\w)" if term[:1].isalnum() or term[:1] == "_" else ""
    end = r"(?!\w)" if term[-1:].isalnum() or term[-1:] == "_" else ""
    return f"{start}{escaped}{end}"
