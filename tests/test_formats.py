"""formats.py: real files round-tripped through segments() and render()."""

from __future__ import annotations

import re
import tracemalloc
import zipfile
from collections.abc import Callable, Iterable
from html.parser import HTMLParser
from pathlib import Path

import docx
import pytest
from docx.opc.constants import RELATIONSHIP_TYPE as RT
from docx.oxml import OxmlElement
from docx.oxml.ns import qn
from helpers import write_pdf
from hypothesis import given, settings
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pypdf import PdfWriter

import formats.text as formats_text
from formats import (
    SUPPORTED_EXTENSIONS,
    BadDocument,
    Document,
    count_words,
    document_stats,
    guess_language,
    open_document,
)

FIXTURES = Path(__file__).parent / "fixtures" / "formats"

# What a translation engine must keep verbatim: {{x}}, {name}, %(x)d, %s, tags, entities.
PLACEHOLDER = re.compile(r"\{\{[^{}]*\}\}|\{[^{}\s]*\}|%\(\w+\)[sd]|%[sd]|<[^<>]+>|&\w+;")


def pseudo(text: str) -> str:
    """A stand-in translator: upper-cases and brackets the text, keeping placeholders."""
    parts, pos = [], 0
    for match in PLACEHOLDER.finditer(text):
        parts += [text[pos : match.start()].upper(), match.group()]
        pos = match.end()
    parts.append(text[pos:].upper())
    return "[" + "".join(parts) + "]"


def identity(text: str) -> str:
    return text


def round_trip(
    path: Path, translate: Callable[[str], str], extension: str | None = None
) -> tuple[Document, Path]:
    doc = open_document(path, extension)
    out = path.with_name("out-" + doc.result_name(path.name))
    doc.render((translate(s) for s in doc.segments()), out)
    return doc, out


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def fixture(tmp_path: Path, name: str, eol: str = "\n") -> Path:
    """A copy of a fixture in tmp_path, with the line ending asked for."""
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return write(tmp_path, name, text.replace("\n", eol))


# --------------------------------------------------------------------------- plain text

TEXT = (
    "Title line\n"
    "\n"
    "First paragraph, line one,\n"
    "  indented line two with {name} and %s.   \n"
    "   \n"
    "\n"
    "Second paragraph %(count)d {{user}}.\n"
    "----\n"
    "\n"
    "Last line without a newline"
)


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_text_identity_render_is_byte_exact(tmp_path: Path, eol: str) -> None:
    path = write(tmp_path, "a.txt", TEXT.replace("\n", eol))
    _, out = round_trip(path, identity)
    assert out.read_bytes() == path.read_bytes()


def test_text_paragraphs_are_segments(tmp_path: Path) -> None:
    doc = open_document(write(tmp_path, "a.txt", TEXT))
    assert list(doc.segments()) == [
        "Title line",
        "First paragraph, line one,\nindented line two with {name} and %s.",
        "Second paragraph %(count)d {{user}}.\n----",
        "Last line without a newline",
    ]
    assert list(doc.segments()) == list(doc.segments())  # re-iterable


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_text_translation_keeps_lines_and_line_endings(tmp_path: Path, eol: str) -> None:
    path = write(tmp_path, "a.txt", TEXT.replace("\n", eol))
    _, out = round_trip(path, pseudo)
    data = out.read_bytes()
    assert data.count(b"\n") == TEXT.count("\n")
    assert data.count(b"\r\n") == (TEXT.count("\n") if eol == "\r\n" else 0)
    lines = data.decode("utf-8").split(eol)
    assert [line.strip() == "" for line in lines] == [
        line.strip() == "" for line in TEXT.split("\n")
    ]
    assert lines[3] == "  INDENTED LINE TWO WITH {name} AND %s.]   "
    assert "SECOND PARAGRAPH %(count)d {{user}}." in lines[6]


def test_text_long_paragraphs_are_split(tmp_path: Path) -> None:
    sentences = " ".join(f"Sentence number {i} is here." for i in range(300))  # one long line
    lines = "\n".join(f"Line {i} of a long paragraph without blank lines." for i in range(150))
    cjk = "这是一个没有空格的很长的中文段落" * 300  # no spaces, no sentence ends: a hard cut
    path = write(tmp_path, "long.txt", f"{sentences}\n\n{lines}\n\n{cjk}\n")
    doc = open_document(path)
    segments = list(doc.segments())
    assert all(len(s) <= 2000 for s in segments)
    assert len(segments) >= 2 + 2 + 3
    assert all(s.endswith(".") for s in segments if s.startswith(("Sentence", "Line")))
    assert all(s.startswith("Line") for s in segments if "Line" in s)  # cut at line ends
    assert "".join(s for s in segments if s.startswith("这")) == cjk
    _, out = round_trip(path, identity)
    assert out.read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_large_text_file_streams(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    paragraph = "Zhiyi reads large files a line at a time, {name}. " * 8 + "Then it ends.\n"
    block = (paragraph * 3 + "\n") * 1000
    with path.open("w", encoding="utf-8", newline="") as f:
        for _ in range(20_000_000 // len(block) + 1):
            f.write(block)
    size = path.stat().st_size
    assert size > 20_000_000
    out = tmp_path / "big-out.txt"
    tracemalloc.start()
    try:
        doc = open_document(path)
        count = sum(1 for _ in doc.segments())
        _, peak_segments = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        doc.render((s.upper() for s in doc.segments()), out)
        _, peak_render = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count > 15_000
    assert peak_segments < 8_000_000, peak_segments
    assert peak_render < 8_000_000, peak_render
    assert out.stat().st_size == size
    with out.open(encoding="utf-8") as f:
        assert f.readline() == paragraph.upper()


@pytest.mark.slow
def test_file_without_line_breaks_streams(tmp_path: Path) -> None:
    path = write(tmp_path, "one-line.txt", "没有换行也没有句号的中文" * 400_000)  # 14 MB
    out = tmp_path / "out.txt"
    tracemalloc.start()
    try:
        doc = open_document(path)
        longest = max(len(s) for s in doc.segments())
        doc.render(doc.segments(), out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert longest <= 2000
    assert peak < 8_000_000, peak
    assert out.stat().st_size == path.stat().st_size


# --------------------------------------------------------------------------- markdown

# Everything in the Markdown fixture that must come back byte for byte.
MD_VERBATIM = [
    '---\ntitle: "Release notes for {product}"\ntags: [news, release]\n---\n',
    "`code`",
    "https://example.com/notes?v=2",
    "`inline code`",
    '<span class="x">',
    "</span>",
    "<https://auto.example.org/page>",
    "https://bare.example.net/x",
    '> ```python\n> quoted = "code stays"\n> ```\n',
    "`pip install zhiyi`",
    '```js\nconst x = "not translated";   // ``` inside is not a fence end\n```\n',
    "~~~\ntilde fence stays\n~~~\n",
    "    indented code block stays\n",
    '<div class="note">\nHTML block text stays.\n</div>\n',
    "|------|:-----:|\n",
    '[ref]: https://ref.example.com "Reference title"\n',
    "images/logo.png",
]


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_markdown_identity_render_is_byte_exact(tmp_path: Path, eol: str) -> None:
    path = fixture(tmp_path, "sample.md", eol)
    _, out = round_trip(path, identity)
    assert out.read_bytes() == path.read_bytes()


def test_markdown_segments_hold_no_code_urls_or_markers(tmp_path: Path) -> None:
    segments = list(open_document(fixture(tmp_path, "sample.md")).segments())
    assert segments[:2] == [
        # Code, URLs and inline HTML are self-closing tags; links and emphasis spans.
        "Release notes with <x1/> and a <x2>link</x2>",
        "Intro paragraph with <x1>bold</x1>, <x2/>, <x3/>inline html<x4/>,\n"
        "an autolink <x5/> and a bare URL <x6/>.\n"
        "Placeholders {name}, %s, %(count)d and {{user}} stay.",
    ]
    assert "See <x1>the docs</x1> and <x2>an image</x2> for more." in segments
    assert "Final paragraph with a footnote<x1/>." in segments
    assert "A quote line one\ncontinues here." in segments
    assert "item two\ncontinued line" in segments
    assert "nested ordered item" in segments
    assert {"Name", "Value", "alpha <x1/>", "beta \\| gamma"} <= set(segments)
    assert "Footnote text here." in segments
    for segment in segments:
        assert not segment.startswith(("#", "-", ">", "|", "1.", "[^1]"))
        assert "http" not in segment and "`" not in segment and "stays" not in segment


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_markdown_translation_keeps_code_urls_and_front_matter(tmp_path: Path, eol: str) -> None:
    path = fixture(tmp_path, "sample.md", eol)
    _, out = round_trip(path, pseudo)
    result = out.read_bytes().decode("utf-8")
    for verbatim in MD_VERBATIM:
        assert verbatim.replace("\n", eol) in result
    assert result.count("\n") == result.count(eol) == path.read_text().count("\n")
    assert "# [RELEASE NOTES WITH `code` AND A [LINK](https://example.com/notes?v=2" in result
    assert f"> [A QUOTE LINE ONE{eol}> CONTINUES HERE.]" in result
    assert f"- [ITEM TWO{eol}  CONTINUED LINE]" in result
    assert "| [ALPHA `code`] | [BETA \\| GAMMA] |" in result
    assert "{name}, %s, %(count)d AND {{user}} STAY." in result
    assert "[^1]: [FOOTNOTE TEXT HERE.]" in result


def test_markdown_toml_front_matter_and_literal_tokens(tmp_path: Path) -> None:
    text = '+++\ntitle = "Hello"\n+++\n\nKeep {{0}} and `code` here.\n'
    path = write(tmp_path, "t.md", text)
    doc = open_document(path)
    assert list(doc.segments()) == ["Keep {{0}} and <x1/> here."]
    _, out = round_trip(path, str.upper)
    assert out.read_text() == '+++\ntitle = "Hello"\n+++\n\nKEEP {{0}} AND `code` HERE.\n'


MD_EDGES = """\
- item

# Heading
    code after a heading

```
    ```
    still code: an indented fence does not close
```

| a | b |
|---|---|
| c | d |
    code after a table

> quote
    code after a quote?
"""


def test_markdown_code_edge_cases(tmp_path: Path) -> None:
    path = write(tmp_path, "edges.md", MD_EDGES)
    assert list(open_document(path).segments()) == ["item", "Heading", "a", "b", "c", "d", "quote"]
    _, out = round_trip(path, pseudo)
    assert out.read_text() == (
        MD_EDGES.replace("- item", "- [ITEM]")
        .replace("# Heading", "# [HEADING]")
        .replace("| a | b |", "| [A] | [B] |")
        .replace("| c | d |", "| [C] | [D] |")
        .replace("> quote", "> [QUOTE]")
    )


def test_markdown_dropped_token_is_kept(tmp_path: Path) -> None:
    """A translator that loses a token must not lose the code it stood for."""
    doc = open_document(write(tmp_path, "t.md", "Run `make test` now.\n"))
    out = tmp_path / "out.md"
    assert doc.render(["Lancez maintenant."], out) == 1  # one segment lost its tags
    assert out.read_text() == "Lancez maintenant.`make test`\n"


# --------------------------------------------------------------------------- subtitles

TIMING_OR_INDEX = re.compile(r"^(\d+|\d+:\d\d:\d\d,\d+ --> \d+:\d\d:\d\d,\d+)$")


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_subtitles_round_trip(tmp_path: Path, eol: str) -> None:
    path = fixture(tmp_path, "sample.srt", eol)
    doc, same = round_trip(path, identity)
    assert same.read_bytes() == path.read_bytes()
    assert list(doc.segments()) == [
        "Hello {name}, welcome to Zhiyi.",
        "<i>Two lines</i>\nof subtitle text with %s.",
        "The end.",
    ]
    _, out = round_trip(path, pseudo)
    source, result = path.read_bytes().decode().split(eol), out.read_bytes().decode().split(eol)
    assert len(result) == len(source)
    assert [line for line in result if TIMING_OR_INDEX.match(line)] == [
        line for line in source if TIMING_OR_INDEX.match(line)
    ]
    assert result[6:8] == ["[<i>TWO LINES</i>", "OF SUBTITLE TEXT WITH %s.]"]
    assert "♪" in result
    assert "".join(doc.plain_text()).startswith("Hello {name}, welcome to Zhiyi.\n\n<i>Two")


# --------------------------------------------------------------------------- html


class TagTree(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, str, tuple[str, ...]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(("start", tag, tuple(name for name, _ in attrs)))

    def handle_endtag(self, tag: str) -> None:
        self.tags.append(("end", tag, ()))


def tag_tree(source: str) -> list[tuple[str, str, tuple[str, ...]]]:
    parser = TagTree()
    parser.feed(source)
    parser.close()
    return parser.tags


def between(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start)) + len(end)]


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_html_identity_render_is_byte_exact(tmp_path: Path, eol: str) -> None:
    path = fixture(tmp_path, "sample.html", eol)
    _, out = round_trip(path, identity)
    assert out.read_bytes() == path.read_bytes()


def test_html_segments_are_text_and_text_attributes(tmp_path: Path) -> None:
    segments = list(open_document(fixture(tmp_path, "sample.html")).segments())
    assert segments == [
        "Sample & Title",
        "A page about things",
        "Main heading",
        "Hello {name}, welcome!",
        # Inline elements are tags of their sentence; a link's title follows it.
        "Text with <x1>bold</x1> and <x2>a link</x2>. Second line\xa0here <tag> and %s.",
        "Link title",
        "An image",
        "Send",
        "Type here",
        "Use <x1/> here.",  # inline code is kept, as one self-closing tag
        "First item",
        "Second item",
    ]


def test_html_translation_keeps_the_tag_tree(tmp_path: Path) -> None:
    path = fixture(tmp_path, "sample.html")
    _, out = round_trip(path, pseudo)
    source, result = path.read_text(), out.read_text()
    assert tag_tree(result) == tag_tree(source)
    for start, end in [
        ("<style>", "</style>"),
        ("<script>", "</script>"),
        ("<pre>", "</pre>"),
        ("<code>", "</code>"),
        ('<p translate="no">', "</p>"),
        ("<!--", "-->"),
        ("<!DOCTYPE", ">"),
        ('<a href="', '"'),
    ]:
        assert between(result, start, end) == between(source, start, end)
    assert "<title>[SAMPLE &amp; TITLE]</title>" in result
    assert '<h1 title="[MAIN HEADING]">[HELLO {name}, WELCOME!]</h1>' in result
    assert "title='[LINK TITLE]'" in result
    assert (
        "<p>[TEXT WITH <b>BOLD</b> AND <a href=\"https://x.org/?a=1&amp;b=2\" "
        "title='[LINK TITLE]'>A LINK</a>. SECOND LINE&nbsp;HERE &lt;tag&gt; AND %s.]</p>"
    ) in result
    assert '<input type=submit value="[SEND]" placeholder="[TYPE HERE]">' in result
    assert '<img src="logo.png" alt="[AN IMAGE]" width=20>' in result


def test_html_plain_text(tmp_path: Path) -> None:
    text = "".join(open_document(fixture(tmp_path, "sample.html")).plain_text())
    assert "Text with bold and a link. Second line\xa0here <tag> and %s." in text
    assert "not text" not in text and "color" not in text
    assert "keep   this\npreformatted" in text


# --------------------------------------------------------------------------- docx

COUNTED = ("p", "r", "tc", "tbl", "fldChar", "instrText", "b", "i")


def add_field(paragraph, instruction: str) -> None:
    """A complex field (begin, instruction, separate, cached result, end), as Word writes."""
    parts = []
    for kind in ("begin", "instr", "separate", "result", "end"):
        if kind == "instr":
            part = OxmlElement("w:instrText")
            part.text = f" {instruction} "
        elif kind == "result":
            part = OxmlElement("w:t")
            part.text = "1"
        else:
            part = OxmlElement("w:fldChar")
            part.set(qn("w:fldCharType"), kind)
        parts.append(part)
    for part in parts:
        run = OxmlElement("w:r")
        run.append(part)
        paragraph._p.append(run)


def add_hyperlink(paragraph, url: str, text: str) -> None:
    link = OxmlElement("w:hyperlink")
    link.set(qn("r:id"), paragraph.part.relate_to(url, RT.HYPERLINK, is_external=True))
    run = OxmlElement("w:r")
    run.append(OxmlElement("w:t"))
    run[0].text = text
    link.append(run)
    paragraph._p.append(link)


def make_docx(path: Path) -> Path:
    document = docx.Document()
    section = document.sections[0]
    section.header.paragraphs[0].text = "Confidential header"
    footer = section.footer.paragraphs[0]
    footer.add_run("Page ")
    add_field(footer, "PAGE")
    footer.add_run(" of the report")
    document.add_heading("Quarterly report", level=1)
    paragraph = document.add_paragraph()
    paragraph.add_run("Bold start, ").bold = True
    paragraph.add_run("plain middle, ")
    paragraph.add_run("italic end with {name}.").italic = True
    document.add_paragraph("Second paragraph with %s and %(count)d placeholders.")
    linked = document.add_paragraph("See the ")
    add_hyperlink(linked, "https://zhiyi.example/docs", "Zhiyi website")
    linked.add_run(" for details.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "Cell one"
    table.cell(0, 1).text = "Cell two"
    table.cell(1, 0).text = "Cell three"
    nested = table.cell(1, 1).add_table(rows=1, cols=2)
    nested.cell(0, 0).text = "Nested left"
    nested.cell(0, 1).text = "Nested right"
    document.add_paragraph("   ")
    document.save(str(path))
    return path


def xml_counts(path: Path) -> dict[str, tuple[int, ...]]:
    """Elements per XML part of a .docx: <w:p>, <w:r>, <w:tc>, ..."""
    with zipfile.ZipFile(path) as archive:
        return {
            name: tuple(
                len(re.findall(rf"<w:{tag}[ >/]", archive.read(name).decode())) for tag in COUNTED
            )
            for name in archive.namelist()
            if name.startswith("word/") and name.endswith(".xml")
        }


def test_docx_segments(tmp_path: Path) -> None:
    doc = open_document(make_docx(tmp_path / "report.docx"))
    segments = list(doc.segments())
    assert segments[:9] == [
        "Quarterly report",
        # The longest run's style is the paragraph's own; the others are inline tags.
        "<x1>Bold start, </x1><x2>plain middle, </x2>italic end with {name}.",
        "Second paragraph with %s and %(count)d placeholders.",
        "See the <x1>Zhiyi website</x1> for details.",  # the link is a tag, in its sentence
        "Cell one",
        "Cell two",
        "Cell three",
        "Nested left",
        "Nested right",
    ]
    # The footer's field is a self-closing tag; its cached result is not text.
    assert sorted(segments[9:]) == ["Confidential header", "Page <x1/> of the report"]


def test_docx_translation_keeps_structure_and_styles(tmp_path: Path) -> None:
    path = make_docx(tmp_path / "report.docx")
    _, out = round_trip(path, pseudo)
    assert without_runs(xml_counts(out)) == without_runs(xml_counts(path))
    result = docx.Document(str(out))
    paragraph = result.paragraphs[1]
    assert paragraph.text == "[BOLD START, PLAIN MIDDLE, ITALIC END WITH {name}.]"
    assert [(r.text, r.bold, r.italic) for r in paragraph.runs] == [
        ("[", None, True),
        ("BOLD START, ", True, None),
        ("PLAIN MIDDLE, ", None, None),
        ("ITALIC END WITH {name}.]", None, True),
    ]
    assert result.paragraphs[2].text == "[SECOND PARAGRAPH WITH %s AND %(count)d PLACEHOLDERS.]"
    linked = result.paragraphs[3]
    assert linked.text == "[SEE THE ZHIYI WEBSITE FOR DETAILS.]"
    assert [link.text for link in linked.hyperlinks] == ["ZHIYI WEBSITE"]
    assert linked.hyperlinks[0].url == "https://zhiyi.example/docs"
    outer = result.tables[0]
    assert outer.cell(0, 0).text == "[CELL ONE]"
    assert outer.cell(1, 1).tables[0].cell(0, 1).text == "[NESTED RIGHT]"
    section = result.sections[0]
    assert section.header.paragraphs[0].text == "[CONFIDENTIAL HEADER]"
    footer_xml = section.footer.paragraphs[0]._p.xml
    assert "PAGE" in footer_xml
    assert section.footer.paragraphs[0].text == "[PAGE 1 OF THE REPORT]"


def without_runs(counts: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """`xml_counts` less runs and their bold/italic marks: inline tags rebuild a
    paragraph's runs (the formatting of the new runs is asserted by text)."""
    keep = [i for i, tag in enumerate(COUNTED) if tag not in ("r", "b", "i")]
    return {name: tuple(row[i] for i in keep) for name, row in counts.items()}


def test_docx_translation_with_characters_xml_cannot_hold(tmp_path: Path) -> None:
    path = make_docx(tmp_path / "report.docx")
    _, out = round_trip(path, lambda s: f"\x01{s}\x0b\ufffe\ttab\nline")
    assert docx.Document(str(out)).paragraphs[0].text == "Quarterly report\ttab\nline"


def test_docx_identity_render_keeps_text(tmp_path: Path) -> None:
    path = make_docx(tmp_path / "report.docx")
    doc, out = round_trip(path, identity)
    assert list(open_document(out).segments()) == list(doc.segments())
    assert xml_counts(out) == xml_counts(path)
    assert "Bold start, plain middle, italic end with {name}.\n" in "".join(doc.plain_text())


# --------------------------------------------------------------------------- pdf


PDF_LINES = [
    "Zhiyi sample report",
    "This is the first paragraph of the sample document, and it",
    "continues on a second line.",
    "A second paragraph with a {name} placeholder.",
]


def test_pdf_becomes_a_word_document(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "report.pdf", PDF_LINES)
    doc = open_document(path)
    assert doc.result_name("report.pdf") == "report.docx"
    assert list(doc.segments()) == [
        "Zhiyi sample report",
        "This is the first paragraph of the sample document, and it continues on a second line.",
        "A second paragraph with a {name} placeholder.",
    ]
    _, out = round_trip(path, pseudo)
    assert out.name == "out-report.docx"
    assert [p.text for p in docx.Document(str(out)).paragraphs] == [
        "[ZHIYI SAMPLE REPORT]",
        "[THIS IS THE FIRST PARAGRAPH OF THE SAMPLE DOCUMENT, AND IT CONTINUES ON A SECOND LINE.]",
        "[A SECOND PARAGRAPH WITH A {name} PLACEHOLDER.]",
    ]
    assert "".join(doc.plain_text()).startswith("Zhiyi sample report\nThis is the first")


# --------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    ("encoding", "prefix"),
    [
        ("gb18030", b""),
        ("utf-16-le", b"\xff\xfe"),
        ("utf-16-be", b"\xfe\xff"),
        ("utf-8", b"\xef\xbb\xbf"),
    ],
)
@pytest.mark.parametrize("name", ["notes.txt", "notes.md", "notes.srt", "notes.html"])
def test_encodings_round_trip(tmp_path: Path, encoding: str, prefix: bytes, name: str) -> None:
    body = "你好，{name}！这是第一段。\r\n\r\n第二段：€ 和 ß。\r\n"
    if name.endswith(".srt"):
        body = "1\r\n00:00:01,000 --> 00:00:02,000\r\n" + body
    elif name.endswith(".html"):
        body = f"<p>{body}</p>\r\n"
    path = tmp_path / name
    path.write_bytes(prefix + body.encode(encoding))
    doc, same = round_trip(path, identity)
    assert same.read_bytes() == path.read_bytes()  # its own encoding and byte-order mark
    assert "你好，{name}！这是第一段。" in next(iter(doc.segments()))
    _, out = round_trip(path, pseudo)
    data = out.read_bytes()
    assert data.startswith(prefix)
    assert "[你好，{name}！这是第一段。" in data[len(prefix) :].decode(encoding)
    utf8 = tmp_path / ("utf8-" + name)
    doc.render(iter(doc.segments()), utf8, "utf-8")
    assert utf8.read_bytes() == body.encode("utf-8")  # asked for: UTF-8, no byte-order mark


@pytest.mark.parametrize(
    ("source", "encoding", "declared"),
    [
        ('<html><head><meta charset="gb2312"></head><body><p>中文</p></body></html>', "gb18030",
         "gb2312"),
        ('<?xml version="1.0" encoding="ISO-8859-1"?>\n<html><body><p>Café crème</p></body></html>',
         "latin-1", "ISO-8859-1"),
    ],
)  # fmt: skip
def test_html_declared_charset_is_kept_or_becomes_utf8(
    tmp_path: Path, source: str, encoding: str, declared: str
) -> None:
    path = write(tmp_path, "page.html", source, encoding)
    doc, same = round_trip(path, identity)
    assert same.read_bytes() == path.read_bytes()
    out = tmp_path / "utf8.html"
    doc.render(iter(doc.segments()), out, "utf-8")
    assert out.read_text(encoding="utf-8") == source.replace(declared, "utf-8")


# Legacy encodings as people save them: charset-normalizer tells them apart.
LEGACY = [
    ("cp1252", "notes.txt", "Le café coûte 3 € — « très » cher, n'est-ce pas ?\n\nÀ bientôt.\n"),
    ("latin-1", "notes.md", "# Überschrift\n\nDie Straße ist schön, sagt Jürgen.\n"),
    ("shift_jis", "notes.txt", "これは日本語の文章です。東京はとても大きな都市です。\n"),
    ("big5", "notes.srt", "1\n00:00:01,000 --> 00:00:02,000\n這是繁體中文的字幕，我們去台北。\n"),
    ("euc-kr", "notes.txt", "안녕하세요. 이것은 한국어 문장입니다. 서울은 큰 도시입니다.\n"),
]


@pytest.mark.parametrize(("encoding", "name", "text"), LEGACY)
def test_legacy_encodings_are_read_and_kept(
    tmp_path: Path, encoding: str, name: str, text: str
) -> None:
    path = write(tmp_path, name, text, encoding)
    doc = open_document(path)
    assert all(segment in text for segment in doc.segments())
    _, same = round_trip(path, identity)
    assert same.read_bytes() == path.read_bytes()
    _, out = round_trip(path, str.upper)  # still fits the encoding
    assert out.read_bytes() == text.upper().encode(encoding)


def test_a_translation_the_encoding_cannot_hold_falls_back_to_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", "Café crème\n", "cp1252")
    _, out = round_trip(path, lambda s: "咖啡")
    assert out.read_bytes() == "咖啡\n".encode()
    page = write(tmp_path, "page.html", "<p>Café crème</p>\n", "cp1252")
    _, out = round_trip(page, lambda s: "咖啡 é")
    assert out.read_bytes() == b"<p>&#21654;&#21857; \xe9</p>\n"  # references, still cp1252


# --------------------------------------------------------------------------- bad documents


def test_unknown_extension_is_a_value_error(tmp_path: Path) -> None:
    path = write(tmp_path, "data.xyz", "text")
    with pytest.raises(ValueError, match=r"Unsupported file type '\.xyz'"):
        open_document(path)
    assert list(open_document(path, "md").segments()) == ["text"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.docx", b"plain text, not a zip", "is not a valid Word document (it is not a zip"),
        ("a.docx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100), "old Word (.doc) file"),
        ("a.pdf", b"<html>not a pdf</html>", "is not a PDF document"),
        ("a.pdf", b"%PDF-1.4\ntruncated", "is damaged and cannot be read"),
        ("a.txt", bytes(range(256)) * 8, "not readable text"),
        ("a.txt", b"\x00\x01\x02binary\x00\x00" * 50, "contains binary data"),
        ("a.txt", b" \n\t\r\n  \n", "contains no text to translate"),
        ("a.srt", b"just some words\n", "has no subtitle cues"),
        ("a.srt", b"1\n00:00:01,000 --> 00:00:02,000\n\n", "cues but no text"),
        ("a.html", b"<html><body><img src=x.png></body></html>", "no text to translate"),
        ("a.md", b"```\ncode only\n```\n", "no text to translate"),
    ],
)
def test_bad_documents(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadDocument, match=re.escape(message)) as caught:
        open_document(path)
    assert str(caught.value).startswith("This ") and str(caught.value).endswith(".")


@pytest.mark.parametrize("extension", SUPPORTED_EXTENSIONS)
def test_empty_files_are_bad(tmp_path: Path, extension: str) -> None:
    path = tmp_path / f"empty{extension}"
    path.write_bytes(b"")
    with pytest.raises(BadDocument, match=rf"^This \{extension} file is empty\.$"):
        open_document(path)


def test_docx_zip_that_is_not_word(tmp_path: Path) -> None:
    path = tmp_path / "a.docx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(BadDocument, match=r"^This \.docx file"):
        open_document(path)


def test_pdf_without_text_layer(tmp_path: Path) -> None:
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    path = tmp_path / "scan.pdf"
    with path.open("wb") as f:
        writer.write(f)
    with pytest.raises(BadDocument, match=r"^This PDF has no text layer \(it may be a scanned"):
        open_document(path)


@pytest.mark.parametrize("count", [2, 4])
def test_render_with_the_wrong_number_of_translations(tmp_path: Path, count: int) -> None:
    doc = open_document(write(tmp_path, "a.txt", "one\n\ntwo\n\nthree\n"))
    out = tmp_path / "out.txt"
    with pytest.raises(ValueError, match=r"^Too (few|many) translations"):
        doc.render(["x"] * count, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "a.txt"]  # no temporary file left


# --------------------------------------------------------------------------- all formats


def all_documents(tmp_path: Path) -> Iterable[Document]:
    yield open_document(write(tmp_path, "a.txt", TEXT))
    for name in ("sample.md", "sample.html", "sample.srt"):
        yield open_document(fixture(tmp_path, name))
    yield open_document(make_docx(tmp_path / "report.docx"))
    yield open_document(write_pdf(tmp_path / "report.pdf", PDF_LINES))


def test_segments_are_never_blank_and_placeholders_pass_through(tmp_path: Path) -> None:
    for doc in all_documents(tmp_path):
        segments = list(doc.segments())
        assert segments and all(s.strip() for s in segments), doc.extension
        assert any("{name}" in s for s in segments), doc.extension


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Hello, world!", 2),
        ("don't stop-gap now", 3),
        ("你好世界", 4),
        ("Hello 世界 again", 4),
        ("日本語のテキストです", 10),
        ("한국어 문장", 5),
        ("Привет, мир 2024", 3),
        ("", 0),
    ],
)
def test_count_words(text: str, words: int) -> None:
    assert count_words(text) == words


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("The quick brown fox jumps over the lazy dog and it is happy.", "en"),
        ("这是一个用于测试语言识别的中文句子。", "zh"),
        ("これは言語を判定するための日本語の文章です。", "ja"),
        ("이것은 언어 감지를 위한 한국어 문장입니다.", "ko"),
        ("Это предложение на русском языке для проверки.", "ru"),
        ("هذه جملة باللغة العربية لاختبار اللغة.", "ar"),
        ("Das ist ein Satz, und er ist nicht auf Englisch.", "de"),
        ("Ceci est une phrase pour les tests et elle est en français.", "fr"),
        ("Esta es una frase para las pruebas y no es muy larga.", "es"),
        ("Quarterly report: revenue grew this quarter", "en"),
        ("de", "unknown"),
        ("12345 !!! ---", "unknown"),
        ("", "unknown"),
    ],
)
def test_guess_language(text: str, language: str) -> None:
    assert guess_language(text) == language


@pytest.mark.parametrize(
    ("text", "language", "words"),
    [
        ("The report is ready.\n\nIt has two paragraphs and a table.\n", "en", 11),
        ("报告已经准备好了。\n\n它有两段。\n", "zh", 12),
        ("レポートの準備ができました。\n\n二つの段落があります。\n", "ja", 23),
        ("Отчёт готов.\n\nВ нём два абзаца и таблица.\n", "ru", 8),
    ],
)
def test_document_stats(tmp_path: Path, text: str, language: str, words: int) -> None:
    doc = open_document(write(tmp_path, "a.txt", text))
    stats = document_stats(doc)
    segments = list(doc.segments())
    assert stats.segments == len(segments) == 2
    assert stats.characters == sum(map(len, segments))
    assert stats.words == words
    assert stats.language == language


# --------------------------------------------------------------------------- properties

# Pieces that stress the scanners: markers, fences, tags, entities, line endings, CJK.
FRAGMENTS = [
    "\n", "\r\n", "\r", " ", "    ", "\t", "word", "Two words.", "中文。", "{name}", "%s",
    "# ", "> ", "- ", "1. ", "|", "---", "===", "```", "~~~", "`", "[", "](", ")", "<",
    ">", "&amp;", "&", '"', "'", "=", "http://x.example/a", "<div>", "</div>", "<!--",
    "-->", "<b>", "</b>", "<script>", "</script>", "<pre>", "</pre>", '<img alt="Pic">',
    " title=", "{{0}}", "\\", "00:00:01,000 --> 00:00:02,000", "1",
]  # fmt: skip
documents = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


@settings(max_examples=300, deadline=None)
@given(text=documents, extension=st.sampled_from([".txt", ".md", ".srt", ".html"]))
def test_any_text_document_round_trips(scratch: Path, text: str, extension: str) -> None:
    path = write(scratch, "doc" + extension, text)
    try:
        doc = open_document(path)
    except BadDocument:
        return
    segments = list(doc.segments())
    assert segments and all(s.strip() for s in segments)
    _, same = round_trip(path, identity)
    assert same.read_bytes() == path.read_bytes()
    _, out = round_trip(path, pseudo)
    if extension != ".html":  # HTML text is whitespace-collapsed; the others keep lines
        assert line_count(out.read_bytes()) >= line_count(path.read_bytes())


def line_count(data: bytes) -> int:
    return len(re.findall(rb"\r\n|\r|\n", data))


CODE_LINES = ["x = 1", "# not a heading", "> not a quote", "- item", "<div>", "", "  ~~", "a|b"]
code_lines = st.lists(st.sampled_from(CODE_LINES), max_size=5)
code_blocks = st.builds(
    lambda fence, lines: "\n".join([fence + "py", *lines, fence]) + "\n",
    st.sampled_from(["```", "~~~", "````"]),
    code_lines,
)
PROSE = ["Some words", " ", "`code`", "http://x.example/a", "{name}", "\n", "- ", "# "]
prose = st.lists(st.sampled_from(PROSE), min_size=1, max_size=12).map(
    lambda parts: "".join(parts).strip("\n") + "\n"
)


@settings(max_examples=200, deadline=None)
@given(blocks=st.lists(st.one_of(code_blocks, prose), min_size=1, max_size=8))
def test_markdown_code_blocks_survive_translation(scratch: Path, blocks: list[str]) -> None:
    path = write(scratch, "doc.md", "\n".join(blocks) + "\nThe end.\n")
    _, out = round_trip(path, pseudo)
    result = out.read_text(encoding="utf-8")
    for block in blocks:
        if block.startswith(("```", "~~~")):
            assert block in result


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(
    "abcXYZ éüßñ αβγ абвії אב عرب پ कख 中文日本 かな 한국 ١٢ 3_- \n'’Ⅻ𝔄"), max_size=60))
def test_script_counts_match_the_character_by_character_definition(sample: str) -> None:
    """The ASCII fast path counts what classifying every letter one by one counts."""
    from collections import Counter

    from formats import stats

    slow = Counter(s for ch in sample if ch.isalpha() and (s := stats._script(ch)))
    assert stats._script_counts(sample) == slow


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
def test_ascii_words_are_counted_as_the_unicode_pattern_counts_them(text: str) -> None:
    from formats import stats

    assert stats._words(text) == stats._WORD.findall(text)
    assert count_words(text) == len(stats._WORD.findall(text))


# ------------------------------------------------------------- small text files, read once


_TEXT_PIECES = st.lists(
    st.sampled_from(["Hello there.", "Zweite Zeile", "  indented", "", "你好。", "- item",
                     "> quoted", "```", "x" * 700, "1", "00:00:01,000 --> 00:00:02,000"]),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(pieces=_TEXT_PIECES, eol=st.sampled_from(["\n", "\r\n", "\r"]),
       name=st.sampled_from(["a.txt", "a.md", "a.srt"]))
def test_small_text_in_memory_reads_like_the_stream(
        pieces: list[str], eol: str, name: str,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A small file is decoded once and its tokens kept between passes; what it gives must
    be exactly what reading the file in blocks gives (line endings, long lines, markup)."""
    path = tmp_path_factory.mktemp("whole") / name
    path.write_bytes((eol.join(pieces) + "x").encode("utf-8"))

    def read(*, in_blocks: bool) -> tuple[Document, list[str], bytes]:
        with pytest.MonkeyPatch.context() as patch:
            if in_blocks:  # as a big file is read
                patch.setattr(formats_text, "_WHOLE_TEXT_BYTES", 0)
            doc = open_document(path)
            segments = list(doc.segments())
            out = path.with_name(f"out-{in_blocks}{path.suffix}")
            doc.render(iter(pseudo(s) for s in segments), out)
            return doc, segments, out.read_bytes()

    try:
        whole = read(in_blocks=False)
    except BadDocument as e:
        with pytest.raises(BadDocument, match=re.escape(str(e))):
            read(in_blocks=True)
        return
    streamed = read(in_blocks=True)
    assert whole[0]._text is not None and streamed[0]._text is None  # type: ignore[attr-defined]
    assert whole[1:] == streamed[1:]


def test_small_text_file_is_read_and_split_once(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening (which checks the first segment), measuring and rendering a small file read
    it from disk and split it into paragraphs once, even with passes interleaved."""
    path = write(tmp_path, "notes.txt", "One.\nTwo.\n\nThree.\n\n" * 20)
    splits = []
    real = formats_text._text_tokens

    def counted(lines: Iterable[tuple[str, str]]) -> Iterable[object]:
        splits.append(1)
        return real(lines)

    monkeypatch.setattr(formats_text, "_text_tokens", counted)
    doc = open_document(path)
    path.unlink()  # everything after the open comes from memory
    first, second = doc.segments(), doc.segments()
    assert next(first) == next(second) == "One.\nTwo."
    assert document_stats(doc).segments == 40
    assert list(first) == list(second) == ["Three.", "One.\nTwo."] * 19 + ["Three."]
    doc.render(iter(pseudo(s) for s in doc.segments()), tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").startswith("[ONE.\nTWO.]\n\n")
    assert len(splits) == 1


def test_charset_guess_only_when_utf8_does_not_fit(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    guessed = []
    real = formats_text._guesses

    def counted(head: bytes) -> list[str]:
        guessed.append(head)
        return real(head)

    monkeypatch.setattr(formats_text, "_guesses", counted)
    utf8 = write(tmp_path, "utf8.txt", "Grüße aus Köln, ça va ? 你好。")
    assert "Grüße" in next(open_document(utf8).segments())
    assert guessed == []
    legacy = write(tmp_path, "legacy.txt", "Grüße aus Köln, ça va très bien ? " * 4, "cp1252")
    assert "Grüße" in next(open_document(legacy).segments())
    assert len(guessed) == 1


# ---------------------------------------------------- kept tokens (a render without the file)


@settings(max_examples=60, deadline=None)
@given(pieces=_TEXT_PIECES, eol=st.sampled_from(["\n", "\r\n"]),
       name=st.sampled_from(["a.txt", "a.srt", "a.md"]),
       encoding=st.sampled_from([("utf-8", b""), ("utf-16-le", b"\xff\xfe"), ("cp1252", b"")]),
       output=st.sampled_from(["source", "utf-8"]))
def test_kept_tokens_render_as_the_document_does(
        pieces: list[str], eol: str, name: str, encoding: tuple[str, bytes], output: str,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A document rebuilt from its kept tokens (JSON, as a parser writes them) renders
    byte for byte as the document read from its file, in either output encoding."""
    import json

    from formats import KeptTokens, kept_tokens

    codec, bom = encoding
    text = eol.join(p for p in pieces if codec != "cp1252" or p.isascii()) + "x"
    path = tmp_path_factory.mktemp("kept") / name
    path.write_bytes(bom + text.encode(codec))
    try:
        doc = open_document(path)
    except BadDocument:
        return
    data = kept_tokens(doc)
    if data is None:  # markup JSON does not carry (markdown's code spans, links ...)
        return
    translated = [pseudo(s) for s in doc.segments()]
    doc.render(iter(translated), path.with_name("from-file" + path.suffix), output)
    path.unlink()  # the kept render needs no file
    kept = KeptTokens(json.loads(json.dumps(data)), path)
    kept.render(iter(translated), path.with_name("from-tokens" + path.suffix), output)
    assert (path.with_name("from-tokens" + path.suffix).read_bytes()
            == path.with_name("from-file" + path.suffix).read_bytes())


def test_tokens_are_kept_only_for_small_plain_text(tmp_path: Path) -> None:
    from formats import kept_tokens
    from formats.model import KEEP_TOKENS_CHARS

    plain = write(tmp_path, "plain.txt", "One.\n\nTwo.\n")
    assert kept_tokens(open_document(plain)) is not None
    code = write(tmp_path, "code.md", "Run `make test` and see [the docs](https://x.org).\n")
    assert kept_tokens(open_document(code)) is None  # protected spans and inline tags
    big = write(tmp_path, "big.txt", "A line of text.\n\n" * (KEEP_TOKENS_CHARS // 16))
    assert kept_tokens(open_document(big)) is None
    # past the cap in text that is no segment (punctuation lines are kept as they are)
    marks = write(tmp_path, "marks.txt", "Word.\n\n" + "---\n\n" * (KEEP_TOKENS_CHARS // 5))
    assert kept_tokens(open_document(marks)) is None
    html = write(tmp_path, "page.html", "<p>One.</p>")
    assert kept_tokens(open_document(html)) is None  # not a text file's tokens


@pytest.mark.parametrize("data", [
    None, [], {"extension": ".txt", "unencodable": "strict", "encoding": None},
    {"extension": ".txt", "unencodable": "strict", "encoding": None, "tokens": [1]},
    {"extension": ".txt", "unencodable": "strict", "encoding": None, "tokens": [["a", "b"]]},
    {"extension": ".txt", "unencodable": "strict", "encoding": ["nope", "nope", ""],
     "tokens": []},
    {"extension": ".txt", "unencodable": "strict", "encoding": ["utf-8", "utf-8", "zz"],
     "tokens": []},
    {"extension": 7, "unencodable": "strict", "encoding": None, "tokens": []},
])
def test_kept_tokens_of_an_unexpected_shape_are_refused(data: object, tmp_path: Path) -> None:
    from formats import KeptTokens

    with pytest.raises(ValueError):
        KeptTokens(data, tmp_path / "a.txt")


def test_a_reading_that_broke_off_is_never_taken_for_the_whole_document(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens are kept between passes; a pass whose reading failed must not leave later
    passes ending quietly where it broke off."""
    path = write(tmp_path, "notes.txt", "One.\n\nTwo.\n\nThree.\n")
    real = formats_text._text_tokens

    def breaking(lines: Iterable[tuple[str, str]]) -> Iterable[object]:
        for number, token in enumerate(real(lines)):
            if number == 3:
                raise MemoryError("simulated")
            yield token

    monkeypatch.setattr(formats_text, "_text_tokens", breaking)
    doc = formats_text.TextDocument(path, ".txt")
    with pytest.raises(MemoryError):
        list(doc.segments())
    with pytest.raises(RuntimeError, match="failed earlier"):
        list(doc.segments())
