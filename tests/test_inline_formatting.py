"""Inline formatting as numbered tags: real files, real engines' wire forms, broken tags."""

from __future__ import annotations

import html
import random
import re
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import docx
import pytest
from docx.opc.constants import RELATIONSHIP_TYPE as RT
from docx.oxml import OxmlElement
from docx.oxml.ns import qn
from docx.oxml.parser import parse_xml
from fakes import FakeLibreTranslate, FakeOpenAI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engines
from formats import open_document
from formats.tags import TAG, fallback_pieces, parse_tagged

WORDS = re.compile(r"[^\W_]+")


def upper(text: str) -> str:
    """A translator that keeps tags where they are and upper-cases the words."""
    parts = TAG.split(text)
    out = []
    for i, part in enumerate(parts):
        # TAG.split yields text, then the tag's three groups, then text again ...
        if i % 4 == 0:
            out.append(part.upper())
    tags = TAG.findall(text)
    result = out[0]
    for (closing, number, self_closing), part in zip(tags, out[1:], strict=True):
        result += f"<{closing}x{number}{self_closing}>" + part
    return result


def add_hyperlink(paragraph, url: str, text: str, bold: bool = False) -> None:
    link = OxmlElement("w:hyperlink")
    link.set(qn("r:id"), paragraph.part.relate_to(url, RT.HYPERLINK, is_external=True))
    run = OxmlElement("w:r")
    if bold:
        rpr = OxmlElement("w:rPr")
        rpr.append(OxmlElement("w:b"))
        run.append(rpr)
    t = OxmlElement("w:t")
    t.text = text
    run.append(t)
    link.append(run)
    paragraph._p.append(link)


def add_page_field(paragraph) -> None:
    for kind in ("begin", "instr", "separate", "result", "end"):
        run = OxmlElement("w:r")
        if kind == "instr":
            part = OxmlElement("w:instrText")
            part.text = " PAGE "
        elif kind == "result":
            part = OxmlElement("w:t")
            part.text = "7"
        else:
            part = OxmlElement("w:fldChar")
            part.set(qn("w:fldCharType"), kind)
        run.append(part)
        paragraph._p.append(run)


def add_bookmark(paragraph, name: str) -> None:
    start = OxmlElement("w:bookmarkStart")
    start.set(qn("w:id"), "0")
    start.set(qn("w:name"), name)
    end = OxmlElement("w:bookmarkEnd")
    end.set(qn("w:id"), "0")
    paragraph._p.append(start)
    paragraph._p.append(end)


def make_rich_docx(path: Path) -> Path:
    document = docx.Document()
    paragraph = document.add_paragraph("The ")
    paragraph.add_run("quick").bold = True
    paragraph.add_run(" brown fox jumps over the ")
    paragraph.add_run("lazy").italic = True
    paragraph.add_run(" dog, see ")
    add_hyperlink(paragraph, "https://zhiyi.example/fox", "the fox page")
    paragraph.add_run(" on page ")
    add_page_field(paragraph)
    add_bookmark(paragraph, "fox")
    paragraph.add_run(".")
    document.add_paragraph("A plain paragraph with {name} in it.")
    commented = document.add_paragraph("Commented words here.")
    document.add_comment(commented.runs, text="Check this sentence please.", author="Ann")
    document.sections[0].footer.paragraphs[0].text = "Footer words"
    document.save(str(path))
    return path


def render(path: Path, translate: Callable[[str], str]) -> tuple[Path, int]:
    doc = open_document(path)
    out = path.with_name("out-" + path.name)
    lost = doc.render((translate(s) for s in doc.segments()), out)
    return out, lost


def test_docx_paragraph_is_one_segment_with_tags(tmp_path: Path) -> None:
    doc = open_document(make_rich_docx(tmp_path / "rich.docx"))
    segments = list(doc.segments())
    assert segments[0] == (
        "The <x1>quick</x1> brown fox jumps over the <x2>lazy</x2> dog, see "
        "<x3>the fox page</x3> on page <x4/>."
    )
    assert "A plain paragraph with {name} in it." in segments
    assert "Footer words" in segments
    assert "Check this sentence please." in segments  # the comment part
    assert "Commented words here." in segments


def test_docx_tags_map_back_onto_runs_links_and_fields(tmp_path: Path) -> None:
    source = make_rich_docx(tmp_path / "rich.docx")
    out, lost = render(source, upper)
    assert lost == 0
    result = docx.Document(str(out))
    paragraph = result.paragraphs[0]
    assert paragraph.text == (
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG, SEE THE FOX PAGE ON PAGE 7."
    )
    runs = {r.text: (r.bold, r.italic) for r in paragraph.runs}
    assert runs["QUICK"] == (True, None)
    assert runs["LAZY"] == (None, True)
    assert [link.text for link in paragraph.hyperlinks] == ["THE FOX PAGE"]
    assert paragraph.hyperlinks[0].url == "https://zhiyi.example/fox"
    xml = paragraph._p.xml
    assert xml.count("w:fldChar ") == 3 and "PAGE" in xml and 'w:name="fox"' in xml
    assert result.sections[0].footer.paragraphs[0].text == "FOOTER WORDS"
    comments = [c.text for c in result.comments]
    assert comments == ["CHECK THIS SENTENCE PLEASE."]
    assert result.paragraphs[1].text == "A PLAIN PARAGRAPH WITH {NAME} IN IT."


def test_docx_tags_can_move_with_their_words(tmp_path: Path) -> None:
    source = make_rich_docx(tmp_path / "rich.docx")

    def reorder(text: str) -> str:
        if text.startswith("The <x1>"):
            return (
                "Auf Seite <x4/>: <x3>die Fuchsseite</x3>, der <x2>faule</x2> Hund, "
                "<x1>flink</x1>."
            )
        return text

    out, lost = render(source, reorder)
    assert lost == 0
    paragraph = docx.Document(str(out)).paragraphs[0]
    assert paragraph.text == "Auf Seite 7: die Fuchsseite, der faule Hund, flink."
    assert {r.text: r.bold for r in paragraph.runs}["flink"] is True
    assert [link.text for link in paragraph.hyperlinks] == ["die Fuchsseite"]


SCRAMBLES: list[Callable[[str], str]] = [
    lambda t: TAG.sub("", t),  # every tag dropped
    lambda t: t.replace("</x1>", ""),  # an unclosed span
    lambda t: t.replace("<x1>", "<x1><x1>"),  # a duplicated tag
    lambda t: t + "<x9>invented</x9>",  # a tag that was never sent
    lambda t: re.sub(r"<x1>(.*?)</x1>", r"</x1>\1<x1>", t),  # crossed
    lambda t: t.replace("<x2>", "<x1>").replace("</x2>", "</x1>"),  # renumbered
    lambda t: t.replace("<x4/>", "<x4/><x4/>"),  # a field twice
]


@pytest.mark.parametrize("scramble", SCRAMBLES)
def test_broken_tags_keep_all_text_and_a_valid_file(tmp_path: Path, scramble) -> None:
    source = make_rich_docx(tmp_path / "rich.docx")
    out, lost = render(source, lambda t: scramble(upper(t)))
    assert lost == 1  # only the rich paragraph had tags
    result = docx.Document(str(out))  # it opens
    paragraph = result.paragraphs[0]
    first = next(open_document(source).segments())
    expected = WORDS.findall(TAG.sub("", scramble(upper(first))))
    got = WORDS.findall(paragraph.text)
    for word in expected:
        assert word in got
    assert paragraph._p.xml.count("w:fldChar ") == 3  # the field is kept exactly once
    assert len(paragraph.hyperlinks) <= 1


def random_scramble(seed: int) -> Callable[[str], str]:
    rng = random.Random(seed)

    def scramble(text: str) -> str:
        tags = TAG.findall(text)
        words = TAG.split(text)[::4]
        rng.shuffle(tags)
        keep = [t for t in tags if rng.random() < 0.7]
        out = words[0]
        for i, word in enumerate(words[1:]):
            if i < len(keep):
                closing, number, self_closing = keep[i]
                out += f"<{closing}x{number}{self_closing}>"
            out += word
        return out

    return scramble


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    runs=st.lists(
        st.tuples(
            st.text(alphabet="abcdefgh <>&{}", min_size=1, max_size=12),
            st.booleans(),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 1000),
)
def test_generated_docx_never_loses_text(tmp_path: Path, runs, seed: int) -> None:
    document = docx.Document()
    paragraph = document.add_paragraph()
    for text, bold, italic in runs:
        run = paragraph.add_run(text)
        run.bold, run.italic = bold or None, italic or None
    path = tmp_path / f"gen-{seed}.docx"
    document.save(str(path))
    source_text = "".join(text for text, _, _ in runs)
    if not any(ch.isalnum() for ch in source_text):
        return
    for translate in (upper, lambda t: random_scramble(seed)(upper(t))):
        out, _ = render(path, translate)
        result = docx.Document(str(out)).paragraphs[0]
        assert WORDS.findall(result.text) == WORDS.findall(source_text.upper())
    out, lost = render(path, upper)
    assert lost == 0
    # Every bold character of the source is bold in the result (upper-cased).
    bold_source = "".join(t for t, b, _ in runs if b).upper().strip()
    bold_result = "".join(r.text for r in docx.Document(str(out)).paragraphs[0].runs if r.bold)
    assert WORDS.findall(bold_result) == WORDS.findall(bold_source) or not bold_source.strip()


def test_parse_and_fallback() -> None:
    assert parse_tagged("a <x1>b</x1> <x2/>", {1}, {2}) is not None
    assert parse_tagged("a <x1>b</x1>", {1}, {2}) is None  # the field went missing
    pieces = fallback_pieces("a <x1>b <x2/> c", [2, 3])
    assert [(p.text, p.tag) for p in pieces] == [("a b ", None), ("", 2), (" c", None), ("", 3)]


# --------------------------------------------------------------------------- engines


async def test_libretranslate_gets_tagged_segments_in_html_mode(aiohttp_server) -> None:
    fake = FakeLibreTranslate()
    server = await aiohttp_server(fake.app)
    settings_ = replace(engines.EngineSettings(), libretranslate_url=fake.url(server),
                        max_retries=0)
    async with aiohttp.ClientSession() as session:
        engine = engines.make_engine("libretranslate", settings_, session)
        result = await engine.translate(
            ["R&D <x1>bold</x1> a < b {name}", "plain & simple"], "en", "de"
        )
    tagged = plain = fake.requests[0].body  # one batch
    assert tagged["format"] == "html"
    assert tagged["q"][0] == "R&amp;D <x1>bold</x1> a &lt; b [X2X]"  # tokens keep their numbers
    assert result[0] == "<de>R&D <x1>bold</x1> a < b {name}"
    assert plain["q"][1] == "plain &amp; simple"
    assert result[1] == "<de>plain & simple"


async def test_an_engine_that_drops_tags_is_not_retried(aiohttp_server) -> None:
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app)
    fake.reply_next({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": '{"segments": {"1": "Gras [X2X] ohne Tags"}}'}}]})
    settings_ = replace(engines.EngineSettings(), openai_base_url=fake.url(server),
                        max_retries=0)
    async with aiohttp.ClientSession() as session:
        engine = engines.make_engine("openai", settings_, session)
        result = await engine.translate(["<x1>Bold</x1> {name} without tags"], "en", "de")
    assert result == ["Gras {name} ohne Tags"]
    system = fake.requests[0].body["messages"][0]["content"]
    assert "<x1>" in system
    assert "<x1>Bold</x1> [X2X] without tags" in fake.requests[0].body["messages"][1]["content"]


async def test_pseudo_keeps_inline_tags() -> None:
    engine = engines.make_engine("pseudo", engines.EngineSettings(), None)  # type: ignore[arg-type]
    [out] = await engine.translate(["<x1>Bold</x1> and <x2/>"], "en", "de")
    assert "<x1>" in out and "</x1>" in out and "<x2/>" in out


# --------------------------------------------------------------------------- html


class Balance(HTMLParser):
    """Start and end tags seen, and the visible words."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.words: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag not in ("br", "img"):
            self.opened[tag] += 1

    def handle_endtag(self, tag: str) -> None:
        self.closed[tag] += 1

    def handle_data(self, data: str) -> None:
        self.words += WORDS.findall(data)


def parsed(text: str) -> Balance:
    parser = Balance()
    parser.feed(text)
    parser.close()
    return parser


INLINE_HTML = (
    "<!DOCTYPE html><html><body>\n"
    '<p>Read <b>the <i>whole</i> guide</b> at <a href="https://z.example/g?a=1&amp;b=2">'
    "our site</a>,<br>then run <code>zhiyi serve</code> &amp; enjoy.</p>\n"
    "<h2><em>Only emphasis</em></h2>\n"
    "</body></html>\n"
)


def test_html_inline_elements_nest_and_move(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text(INLINE_HTML, encoding="utf-8")
    segments = list(open_document(path).segments())
    assert segments == [
        "Read <x1>the <x2>whole</x2> guide</x1> at <x3>our site</x3>,<x4/>then run <x5/> & enjoy.",
        "Only emphasis",  # markup around all of it stays outside
    ]
    german = (
        "Lies <x3>auf unserer Seite</x3> <x1>den <x2>ganzen</x2> Leitfaden</x1>,<x4/>"
        "dann <x5/> & los."
    )
    out, lost = render(path, lambda t: german if t.startswith("Read") else t.upper())
    assert lost == 0
    result = out.read_text(encoding="utf-8")
    assert (
        '<p>Lies <a href="https://z.example/g?a=1&amp;b=2">auf unserer Seite</a> '
        "<b>den <i>ganzen</i> Leitfaden</b>,<br>dann <code>zhiyi serve</code> &amp; los.</p>"
    ) in result
    assert "<h2><em>ONLY EMPHASIS</em></h2>" in result


@pytest.mark.parametrize("scramble", SCRAMBLES)
def test_html_broken_tags_keep_text_and_balance(tmp_path: Path, scramble) -> None:
    path = tmp_path / "page.html"
    path.write_text(INLINE_HTML, encoding="utf-8")
    out, lost = render(path, lambda t: scramble(upper(t)))
    assert lost == 1  # the paragraph; the heading had no tags
    result = parsed(out.read_text(encoding="utf-8"))
    assert result.opened == result.closed  # still well formed
    code = ("zhiyi", "serve")
    expected = [w if w in code else w.upper() for w in parsed(INLINE_HTML).words]
    for word in expected:
        assert word in result.words
    assert "ZHIYI" not in result.words and "zhiyi" in result.words  # the code is kept


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(
        st.tuples(
            st.sampled_from(["", "b", "i", "a", "code", "br", "span"]),
            st.text(alphabet="abcdef gh<&>", min_size=1, max_size=10),
        ),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 1000),
)
def test_generated_html_never_loses_text(tmp_path: Path, pieces, seed: int) -> None:
    body = []
    for tag, text in pieces:
        escaped = html.escape(text, quote=False)
        if tag == "br":
            body.append(escaped + "<br>")
        elif tag == "a":
            body.append(f'<a href="https://x.example/{seed}">{escaped}</a>')
        elif tag:
            body.append(f"<{tag}>{escaped}</{tag}>")
        else:
            body.append(escaped)
    source = f"<html><body><p>{''.join(body)}</p></body></html>\n"
    path = tmp_path / f"gen-{seed}.html"
    path.write_text(source, encoding="utf-8")
    if not any(ch.isalnum() for tag, text in pieces if tag != "code" for ch in text):
        return
    doc = open_document(path)
    out, lost = render(path, upper)
    assert lost == 0
    result = out.read_text(encoding="utf-8")
    assert parsed(result).opened == parsed(source).opened  # every element kept
    want = letters("".join(t if tag == "code" else t.upper() for tag, t in pieces))
    assert letters(" ".join(parsed(result).words)) == want
    out, _ = render(path, lambda t: random_scramble(seed)(upper(t)))
    scrambled = parsed(out.read_text(encoding="utf-8"))
    assert scrambled.opened == scrambled.closed
    assert sorted(letters(" ".join(scrambled.words))) == sorted(want)
    assert list(doc.segments())


def letters(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum())


# --------------------------------------------------------------------------- markdown

MARKDOWN = (
    "# Guide\n\n"
    "Read **the _whole_ guide** at [our site](https://z.example/g \"Guide\"), then run\n"
    "`zhiyi serve` and enjoy ~~nothing~~.\n"
)


def test_markdown_emphasis_links_and_code_are_tags(tmp_path: Path) -> None:
    path = tmp_path / "guide.md"
    path.write_text(MARKDOWN, encoding="utf-8")
    segments = list(open_document(path).segments())
    assert segments[1] == (
        "Read <x1>the <x2>whole</x2> guide</x1> at <x3>our site</x3>, then run\n"
        "<x4/> and enjoy <x5>nothing</x5>."
    )
    german = (
        "Lies <x3>auf unserer Seite</x3> <x1>den <x2>ganzen</x2> Leitfaden</x1>, dann\n"
        "<x4/> und genieße <x5>nichts</x5>."
    )
    out, lost = render(path, lambda t: german if t.startswith("Read") else t.upper())
    assert lost == 0
    assert out.read_text(encoding="utf-8") == (
        "# GUIDE\n\n"
        'Lies [auf unserer Seite](https://z.example/g "Guide") **den _ganzen_ Leitfaden**, '
        "dann\n`zhiyi serve` und genieße ~~nichts~~.\n"
    )


@pytest.mark.parametrize("scramble", SCRAMBLES)
def test_markdown_broken_tags_keep_text_and_code(tmp_path: Path, scramble) -> None:
    path = tmp_path / "guide.md"
    path.write_text(MARKDOWN, encoding="utf-8")
    out, lost = render(path, lambda t: scramble(upper(t)))
    assert lost == 1
    result = out.read_text(encoding="utf-8")
    assert "`zhiyi serve`" in result  # the code span, once
    assert result.count("zhiyi serve") == 1
    for word in ("READ", "WHOLE", "GUIDE", "SITE", "ENJOY", "NOTHING"):
        assert word in result


# --------------------------------------------------------------------------- docx parts

W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
FOOTNOTES = (
    f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<w:footnotes xmlns:w="{W}">'
    '<w:footnote w:type="separator" w:id="-1"><w:p><w:r><w:separator/></w:r></w:p>'
    '</w:footnote><w:footnote w:id="1"><w:p><w:r><w:footnoteRef/></w:r>'
    "<w:r><w:t xml:space=\"preserve\"> A footnote about the method.</w:t></w:r></w:p>"
    "</w:footnote></w:footnotes>"
)


def add_xml(paragraph, xml: str) -> None:
    paragraph._p.append(parse_xml(xml))


def make_parts_docx(path: Path) -> Path:
    """Footnote, text box, tracked insertion and deletion, a numbered list, an image."""
    document = docx.Document()
    noted = document.add_paragraph("The method is new")
    add_xml(noted, f'<w:r xmlns:w="{W}"><w:rPr><w:rStyle w:val="FootnoteReference"/></w:rPr>'
                   '<w:footnoteReference w:id="1"/></w:r>')
    noted.add_run(" and it works.")
    boxed = document.add_paragraph("Before the box.")
    add_xml(boxed, f'<w:r xmlns:w="{W}" xmlns:v="urn:schemas-microsoft-com:vml"><w:pict>'
                   '<v:shape><v:textbox><w:txbxContent><w:p><w:r><w:t>Text inside a box'
                   "</w:t></w:r></w:p></w:txbxContent></v:textbox></v:shape></w:pict></w:r>")
    tracked = document.add_paragraph("Kept words ")
    add_xml(tracked, f'<w:ins xmlns:w="{W}" w:id="7" w:author="Ann" w:date="2024-01-01T00:00:00Z">'
                     "<w:r><w:t>inserted words</w:t></w:r></w:ins>")
    add_xml(tracked, f'<w:del xmlns:w="{W}" w:id="8" w:author="Ann" w:date="2024-01-01T00:00:00Z">'
                     "<w:r><w:delText>deleted words</w:delText></w:r></w:del>")
    document.add_paragraph("First numbered step", style="List Number")
    document.save(str(path))
    with zipfile.ZipFile(path) as source:
        parts = {name: source.read(name) for name in source.namelist()}
    parts["word/footnotes.xml"] = FOOTNOTES.encode()
    parts["[Content_Types].xml"] = parts["[Content_Types].xml"].replace(
        b"</Types>",
        b'<Override PartName="/word/footnotes.xml" ContentType="application/vnd.openxmlformats'
        b'-officedocument.wordprocessingml.footnotes+xml"/></Types>',
    )
    parts["word/_rels/document.xml.rels"] = parts["word/_rels/document.xml.rels"].replace(
        b"</Relationships>",
        b'<Relationship Id="rIdFn" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
        b'relationships/footnotes" Target="footnotes.xml"/></Relationships>',
    )
    with zipfile.ZipFile(path, "w") as target:
        for name, data in parts.items():
            target.writestr(name, data)
    return path


def test_docx_footnotes_text_boxes_tracked_changes_and_lists(tmp_path: Path) -> None:
    source = make_parts_docx(tmp_path / "parts.docx")
    segments = list(open_document(source).segments())
    assert "The method is new<x1/> and it works." in segments
    assert "Text inside a box" in segments
    assert "Kept words <x1>inserted words</x1>" in segments
    assert "A footnote about the method." in segments
    assert not any("deleted" in s for s in segments)  # a deletion is not text any more
    out, lost = render(source, upper)
    assert lost == 0
    result = docx.Document(str(out))
    xml = result.element.xml
    assert "THE METHOD IS NEW" in xml and '<w:footnoteReference w:id="1"/>' in xml
    assert "TEXT INSIDE A BOX" in xml and "<w:txbxContent>" in xml
    tracked = result.paragraphs[2]._p.xml
    assert 'w:author="Ann"' in tracked and "INSERTED WORDS" in tracked
    assert "<w:delText>deleted words</w:delText>" in tracked  # untouched
    numbered = result.paragraphs[3]
    assert numbered.style.name == "List Number" and numbered.text == "FIRST NUMBERED STEP"
    with zipfile.ZipFile(out) as archive:
        notes = archive.read("word/footnotes.xml").decode()
    assert "A FOOTNOTE ABOUT THE METHOD." in notes and 'w:type="separator"' in notes
