"""Translation memory: what makes two segments "the same", and TMX in and out.

A user's memory remembers every translated segment by (source language, target
language, engine, normalised source text); a later task's segments found there
are neither sent to the engine nor charged. This module holds the pure parts:
normalisation and keys, re-using a remembered translation in a new segment,
and TMX export and import through translate-toolkit's TMX store. The rows live
in the database (storage.py); processors and the server call this layer.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = [
    "BadTmx",
    "Entry",
    "Scope",
    "from_tmx",
    "memory_key",
    "normalise",
    "reuse",
    "to_tmx",
]

logger = logging.getLogger(__name__)

_SPACE_RE = re.compile(r"\s+")
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
    return _SPACE_RE.sub(" ", unicodedata.normalize("NFC", text)).strip()


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
