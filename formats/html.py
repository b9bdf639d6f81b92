"""HTML: text nodes and text attributes are segments; markup is kept as written."""

from __future__ import annotations

import codecs
import html
import logging
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

from .model import TextEncoding, _has_words, _Segment, _Token, _TokenDocument
from .tags import has_tag_lookalike, strip_tags
from .text import _detect_encoding

logger = logging.getLogger(__name__)

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


def _html_tokens(source: str, utf8: bool = True) -> Iterator[_Token]:
    events = _html_events(source)
    kept: list[str] = []  # open elements whose content is not translated
    i = 0
    while i < len(events):
        end = i if kept else _inline_run_end(events, i)
        if end > i + 1:
            run = events[i:end]
            tagged = _inline_run_tokens(source, run)
            if tagged is not None:
                yield from tagged
            else:
                for event in run:
                    yield from _event_tokens(source, event, kept, utf8)
            i = end
        else:
            yield from _event_tokens(source, events[i], kept, utf8)
            i += 1


def _event_tokens(
    source: str, event: _HtmlEvent, kept: list[str], utf8: bool = True
) -> Iterator[_Token]:
    """One event on its own: a text node or a tag's text attributes are segments."""
    raw = source[event.start : event.end]
    if event.kind == "data" and not kept:
        yield from _html_text_tokens(raw)
    elif event.kind in ("start", "startend"):
        no_translate = _no_translate(event.attrs)
        yield from _html_tag_tokens(raw, event, not kept and not no_translate, utf8)
        if (
            event.kind == "start"
            and event.tag not in _VOID_TAGS
            and (kept or no_translate or event.tag in _KEEP_CONTENT)
        ):
            kept.append(event.tag)
    else:
        if event.kind == "end" and event.tag in kept:
            del kept[len(kept) - 1 - kept[::-1].index(event.tag) :]
        if utf8 and event.kind == "other" and raw.startswith("<?xml"):
            raw = _XML_ENCODING.sub(_utf8_charset, raw)  # XHTML's declaration, too
        yield raw


# --------------------------------------------------------------------------- inline runs

# Phrasing elements that live inside a sentence: they become inline tags of the text
# around them instead of cutting it into pieces.
_INLINE_TAGS = frozenset(
    "a abbr b bdi bdo big cite data del dfn em font i ins mark q s small span strike strong "
    "sub sup time tt u var br wbr img".split()
)
# Inline elements whose content is kept as it is: one self-closing tag for the whole.
_ATOMIC_INLINE = frozenset({"code", "kbd", "samp"})


def _matching_end(events: list[_HtmlEvent], i: int) -> int | None:
    """The index of the end tag closing the start tag at `i`, or None."""
    tag, depth = events[i].tag, 0
    for j in range(i, len(events)):
        if events[j].tag == tag and events[j].kind == "start":
            depth += 1
        elif events[j].tag == tag and events[j].kind == "end":
            depth -= 1
            if depth == 0:
                return j
    return None


def _inline_run_end(events: list[_HtmlEvent], i: int) -> int:
    """Where the run of text and inline elements starting at `i` ends (exclusive)."""
    j = i
    while j < len(events):
        event = events[j]
        if event.kind == "data":
            j += 1
        elif event.tag in _INLINE_TAGS and event.kind == "end":
            j += 1
        elif event.tag in _INLINE_TAGS and not (
            event.kind == "start" and _no_translate(event.attrs)
        ):
            j += 1
        elif event.kind == "start" and (
            event.tag in _ATOMIC_INLINE
            or (event.tag in _INLINE_TAGS and _no_translate(event.attrs))
        ):
            end = _matching_end(events, j)
            if end is None:
                break
            j = end + 1
        else:
            break
    return j


class _Item(NamedTuple):
    kind: str  # "text", "open", "close" or "atom"
    tokens: list[_Token]  # its source; a tag's text attributes are segments
    pair: int = -1  # for "open" and "close": the index of the other half

    @property
    def raw(self) -> str:
        return "".join(t if isinstance(t, str) else t.raw for t in self.tokens)


def _inline_items(source: str, run: list[_HtmlEvent]) -> list[_Item]:
    items: list[_Item] = []
    stack: list[tuple[str, int]] = []
    i = 0
    while i < len(run):
        event = run[i]
        raw = source[event.start : event.end]
        if event.kind == "data":
            items.append(_Item("text", [raw]))
        elif event.kind == "start" and (
            event.tag in _ATOMIC_INLINE or _no_translate(event.attrs)
        ):
            end = _matching_end(run, i)
            assert end is not None  # _inline_run_end made sure
            items.append(_Item("atom", [source[event.start : run[end].end]]))
            i = end
        elif event.kind in ("start", "startend"):
            tokens = list(_html_tag_tokens(raw, event, translate=True))
            if event.kind == "start" and event.tag not in _VOID_TAGS:
                stack.append((event.tag, len(items)))
            items.append(_Item("atom", tokens))  # an "open" once its end tag is found
        elif event.kind == "end" and stack and stack[-1][0] == event.tag:
            _, opening = stack.pop()
            items[opening] = _Item("open", items[opening].tokens, len(items))
            items.append(_Item("close", [raw], opening))
        else:
            items.append(_Item("atom", [raw]))
        i += 1
    return items


def _template(item: _Item, nested: list[_Segment]) -> str:
    """The item's markup with ``\\x00k\\x00`` for each segment in it (added to `nested`)."""
    parts = []
    for token in item.tokens:
        if isinstance(token, str):
            parts.append(token)
        else:
            parts.append(f"\x00{len(nested)}\x00")
            nested.append(token)
    return "".join(parts)


def _inline_run_tokens(source: str, run: list[_HtmlEvent]) -> list[_Token] | None:
    """One segment for a run of text and inline elements, with the elements as tags;
    None when the run is better taken event by event (no tags, or text that looks
    like our tags)."""
    items = _inline_items(source, run)
    lo, hi = 0, len(items)
    # Markup around the whole run (a <b> wrapping a heading's text) stays outside.
    while lo < hi:
        first, last = items[lo], items[hi - 1]
        if first.kind == "atom" or (first.kind == "text" and not first.raw.strip(_HTML_SPACE)):
            lo += 1
        elif last.kind == "atom" or (last.kind == "text" and not last.raw.strip(_HTML_SPACE)):
            hi -= 1
        elif first.kind == "open" and first.pair == hi - 1:
            lo, hi = lo + 1, hi - 1
        else:
            break
    if not any(item.kind != "text" for item in items[lo:hi]):
        return None
    texts = [html.unescape(item.raw) for item in items[lo:hi] if item.kind == "text"]
    if has_tag_lookalike(" ".join(texts)):
        return None
    parts: list[str] = []
    spans: dict[int, tuple[str, str]] = {}
    empties: dict[int, str] = {}
    numbers: dict[int, int] = {}
    nested: list[_Segment] = []
    for index in range(lo, hi):
        item = items[index]
        if item.kind == "text":
            parts.append(_HTML_SPACE_RUN.sub(" ", html.unescape(item.raw)))
        elif item.kind == "open":
            number = numbers[index] = len(spans) + len(empties) + 1
            spans[number] = (_template(item, nested), items[item.pair].raw)
            parts.append(f"<x{number}>")
        elif item.kind == "close":
            parts.append(f"</x{numbers[item.pair]}>")
        else:
            number = len(spans) + len(empties) + 1
            empties[number] = _template(item, nested)
            parts.append(f"<x{number}/>")
    core = "".join(item.raw for item in items[lo:hi])
    lead = core[: len(core) - len(core.lstrip(_HTML_SPACE))]
    trail = core[len(core.rstrip(_HTML_SPACE)) :]
    core = core.strip(_HTML_SPACE)
    text = "".join(parts).strip(" ")
    head = [token for item in items[:lo] for token in item.tokens]
    tail = [token for item in items[hi:] for token in item.tokens]
    if not _has_words(strip_tags(text)):
        return [*head, *(token for item in items[lo:hi] for token in item.tokens), *tail]
    segment = _Segment(
        core, text, escape=_escape_text, markup=(spans, empties), nested=tuple(nested)
    )
    return [*head, lead, segment, trail, *tail]


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


def _html_tag_tokens(
    raw: str, event: _HtmlEvent, translate: bool, utf8: bool = True
) -> Iterator[_Token]:
    if utf8 and event.tag == "meta":
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


class HtmlDocument(_TokenDocument):
    """HTML: text nodes and text attributes are segments; markup is kept as written."""

    def __init__(self, path: Path, extension: str) -> None:
        super().__init__(path, extension)
        self.encoding = _detect_encoding(path, extension, _declared_charset(path))
        with path.open(encoding=self.encoding.decode, newline="") as f:
            self._source = f.read()

    # Characters the page's own encoding cannot hold become character references.
    _unencodable = "xmlcharrefreplace"

    def _source_encoding(self) -> TextEncoding | None:
        return self.encoding

    def _tokens(self) -> Iterator[_Token]:
        # A page kept in its encoding keeps its <meta charset>; a UTF-8 one says UTF-8.
        return _html_tokens(self._source, utf8=self._utf8_output)

    def plain_text(self) -> Iterator[str]:
        """The visible text, a line per block element."""
        yield _html_plain_text(self._source)

