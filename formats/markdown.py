"""Markdown: a line-at-a-time block scanner; code, URLs, HTML and front matter kept."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

from .model import _MAX_SEGMENT_CHARS, _Token
from .tags import has_tag_lookalike
from .text import _Line, _line, _paragraph_tokens, _TextFileDocument

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- markdown

_MD_INLINE = re.compile(
    "|".join(
        [
            r"(?<![\\`])(?P<ticks>`+)(?!`).*?(?<!`)(?P=ticks)(?!`)",  # code span
            r"<(?:[A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]*|[\w.+-]+@[\w-]+(?:\.[\w-]+)+)>",  # autolink
            r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>",  # inline HTML
            r"(?<=\]\()(?:<[^<>\n]*>|[^\s()<>]+(?:\([^\s()]*\)[^\s()<>]*)*)",  # link target
            r"(?<=\]\[)[^\]\n]+(?=\])",  # reference label
            r"\[\^[^\]\s]+\]",  # footnote reference
            r"(?:(?:https?|ftp)://|www\.)[^\s<>]*[^\s<>.,;:!?'\")\]]",  # bare URL
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
    """Where the atoms are: code spans, autolinks, inline HTML, bare URLs."""
    return [m.span() for m in _MD_INLINE.finditer(text) if m.end() > m.start()]


# Inline constructs that become tags. Atoms (`_MD_INLINE`: code, autolinks, inline HTML,
# bare URLs) are self-closing and kept as written; links, images and emphasis are spans
# around their (translated) text. A practical subset of CommonMark: no "_" emphasis
# inside a word.
_MD_SPAN = re.compile(
    r"(?P<link>(?<!\\)(?P<bang>!?)\[(?P<label>(?:[^\[\]\\]|\\.){1,1000})\]"
    r"(?P<target>\((?:<[^<>\n]*>|[^\s()<>]*(?:\([^\s()]*\)[^\s()<>]*)*)"
    r"(?:\s+(?:\"[^\"\n]*\"|'[^'\n]*'))?\)|\[[^\]\n]*\]))"
    r"|(?<![\\*])(?P<star>\*\*|\*)(?=[^\s*])(?P<starred>.+?)(?<=[^\s*\\])(?P=star)(?!\*)"
    r"|(?<![\\\w_])(?P<under>__|_)(?=[^\s_])(?P<underlined>.+?)(?<=[^\s_\\])(?P=under)(?![\w_])"
    r"|(?<![\\~])~~(?=\S)(?P<struck>.+?)(?<=\S)~~",
    re.DOTALL,
)


class _InlineTagger:
    """Turns a Markdown paragraph's inline constructs into numbered tags."""

    def __init__(self) -> None:
        self.spans: dict[int, tuple[str, str]] = {}
        self.empties: dict[int, str] = {}

    def _number(self) -> int:
        return len(self.spans) + len(self.empties) + 1

    def tag(self, text: str) -> str:
        """`text` with atoms as ``<xN/>`` and spans as ``<xN>…</xN>``."""
        parts: list[str] = []
        pos = 0
        for start, end in _inline_spans(text):  # atoms first: nothing parses inside them
            if text[max(0, start - 2) : start] in ("](", "]["):
                continue  # a link's target: part of the link's span
            parts.append(self._spans(text[pos:start]))
            number = self._number()
            self.empties[number] = text[start:end]
            parts.append(f"<x{number}/>")
            pos = end
        parts.append(self._spans(text[pos:]))
        return "".join(parts)

    def _spans(self, text: str) -> str:
        parts: list[str] = []
        pos = 0
        for match in _MD_SPAN.finditer(text):
            parts.append(text[pos : match.start()])
            pos = match.end()
            number = self._number()
            if match["link"]:
                opening, inner, closing = match["bang"] + "[", match["label"], "]" + match["target"]
            else:
                delimiter = match["star"] or match["under"] or "~~"
                inner = match["starred"] or match["underlined"] or match["struck"]
                opening = closing = delimiter
            self.spans[number] = (opening, closing)
            parts.append(f"<x{number}>{self._spans(inner)}</x{number}>")
        parts.append(text[pos:])
        return "".join(parts)


def _tag_inline(
    text: str,
) -> tuple[str, tuple[dict[int, tuple[str, str]], dict[int, str]] | None]:
    """A Markdown paragraph's text with inline code, URLs and HTML as self-closing tags,
    links, images and emphasis as spans; the markup, or None when there is none (or the
    text already holds something shaped like our tags)."""
    if has_tag_lookalike(text):
        return text, None
    tagger = _InlineTagger()
    tagged = tagger.tag(text)
    if not tagger.spans and not tagger.empties:
        return text, None
    return tagged, (tagger.spans, tagger.empties)


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


class MarkdownDocument(_TextFileDocument):
    """Markdown: block text is segmented; code, URLs, HTML and front matter are kept."""

    def _tokens(self) -> Iterator[_Token]:
        return _markdown_tokens(self._lines())

