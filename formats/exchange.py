"""The translation industry's exchange formats: XLIFF 1.2 and 2.0 (.xlf, .xliff) with
translate-toolkit, gettext .po with polib.

The untranslated units' sources are the segments; rendering fills their targets, leaves
every source as it was, and marks what a machine translated: XLIFF 1.2 targets get
state="needs-review-translation", XLIFF 2.0 segments state="translated", and .po entries
the "fuzzy" flag (gettext's "to be reviewed"). Units that already have a translation
are kept, not sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polib
from lxml import etree
from translate.storage import xliff, xliff2

from .model import BadDocument, _atomic_output, _BaseDocument, _has_words, _Translations
from .tags import strip_tags

__all__ = ["PoDocument", "XliffDocument"]

logger = logging.getLogger(__name__)

_XLIFF2_NS = "urn:oasis:names:tc:xliff:document:2.0"


def _load_xliff(path: Path) -> Any:
    data = path.read_bytes()
    head = data[:4096]
    try:
        if _XLIFF2_NS.encode() in head or b'version="2.' in head:
            return xliff2.Xliff2File.parsestring(data)
        return xliff.xlifffile.parsestring(data)
    except (etree.XMLSyntaxError, ValueError, AttributeError, KeyError) as e:
        raise BadDocument(
            f"This {path.suffix.lower()} file is not valid XLIFF: {_short(e)}."
        ) from e


def _short(error: Exception) -> str:
    return str(error).split("\n")[0][:200] or type(error).__name__


def _untranslated(store: Any) -> Iterator[Any]:
    for unit in store.units:
        if unit.isheader() or (unit.target or "").strip():
            continue
        if _has_words(unit.source or ""):
            yield unit


class XliffDocument(_BaseDocument):
    """XLIFF 1.2 or 2.0: each unit without a target is a segment."""

    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
        self._store = _load_xliff(path)
        if not self._store.units:
            raise BadDocument(f"This {extension} file has no translation units.")

    def segments(self) -> Iterator[str]:
        """The sources of the units that have no target yet, in file order."""
        for unit in _untranslated(self._store):
            yield unit.source

    def render(
        self, translations: Iterable[str], out: Path, output_encoding: str = "source"
    ) -> int:
        """Write a copy with those units' targets filled and marked machine-made."""
        store = _load_xliff(self.path)
        feed = _Translations(translations)
        version2 = isinstance(store, xliff2.Xliff2File)
        for unit in list(_untranslated(store)):
            unit.target = strip_tags(feed.take())
            element = unit.xmlelement
            if version2:
                for segment in element.iter(f"{{{_XLIFF2_NS}}}segment"):
                    segment.set("state", "translated")
            else:
                element.attrib.pop("approved", None)  # a machine translation is not approved
                target = element.find(f"{{{element.nsmap.get(None, '')}}}target")
                if target is not None:
                    target.set("state", "needs-review-translation")
        feed.finish()
        with _atomic_output(out) as tmp:
            tmp.write_bytes(bytes(store))
        return 0

    def plain_text(self) -> Iterator[str]:
        """Each unit's source, a line each."""
        for unit in self._store.units:
            if not unit.isheader() and unit.source:
                yield unit.source + "\n"

    def _no_text_message(self) -> str:
        return f"This {self.extension} file has no untranslated units with text."


def _load_po(path: Path) -> polib.POFile:
    try:
        return polib.pofile(str(path), wrapwidth=0)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BadDocument(f"This .po file cannot be read: {_short(e)}.") from e


def _po_pending(catalog: polib.POFile) -> Iterator[tuple[polib.POEntry, str]]:
    """(entry, "msgid" or "plural") for every text an untranslated entry needs."""
    for entry in catalog:
        done = entry.msgstr or any(entry.msgstr_plural.values())
        if entry.obsolete or not entry.msgid or done or not _has_words(entry.msgid):
            continue
        yield entry, "msgid"
        if entry.msgid_plural:
            yield entry, "plural"


class PoDocument(_BaseDocument):
    """A gettext catalog: untranslated entries' msgid (and msgid_plural) are segments."""

    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
        self._catalog = _load_po(path)

    def segments(self) -> Iterator[str]:
        """msgid, then msgid_plural of plural entries, for entries not yet translated."""
        for entry, which in _po_pending(self._catalog):
            yield entry.msgid if which == "msgid" else entry.msgid_plural

    def render(
        self, translations: Iterable[str], out: Path, output_encoding: str = "source"
    ) -> int:
        """Write the catalog with msgstr filled and the entries flagged fuzzy."""
        catalog = _load_po(self.path)
        feed = _Translations(translations)
        for entry, which in list(_po_pending(catalog)):
            text = strip_tags(feed.take())
            if entry.msgid_plural:
                forms = _plural_forms(catalog)
                if which == "msgid":
                    entry.msgstr_plural = {0: text}
                else:
                    entry.msgstr_plural.update({n: text for n in range(1, forms)})
            else:
                entry.msgstr = text
            if "fuzzy" not in entry.flags:
                entry.flags.append("fuzzy")
        feed.finish()
        with _atomic_output(out) as tmp:
            catalog.save(str(tmp))
        return 0

    def plain_text(self) -> Iterator[str]:
        """Each entry's msgid, a line each."""
        for entry in self._catalog:
            if entry.msgid:
                yield entry.msgid + "\n"

    def _no_text_message(self) -> str:
        return "This .po file has no untranslated entries."


def _plural_forms(catalog: polib.POFile) -> int:
    header = catalog.metadata.get("Plural-Forms", "")
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name.strip() == "nplurals" and value.strip().isdigit():
            return max(1, int(value))
    return 2
