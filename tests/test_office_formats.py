""".pptx, .xlsx, .xlf/.xliff and .po: real files made by the libraries people use,
translated, read back by the same libraries."""

from __future__ import annotations

import datetime
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import docx
import openpyxl
import polib
import pptx
import pytest
from fpdf import FPDF
from openpyxl.cell.rich_text import CellRichText, TextBlock
from openpyxl.cell.text import InlineFont
from pptx.util import Inches
from translate.storage import xliff, xliff2

from formats import BadDocument, open_document
from formats.tags import TAG

PLACEHOLDER = re.compile(r"\{[^{}\s]*\}|%\(\w+\)[sd]|%[sd]")


def upper(text: str) -> str:
    """A translator keeping tags and placeholders, upper-casing the rest, bracketed."""
    keep = re.compile(f"{TAG.pattern}|{PLACEHOLDER.pattern}")
    parts, pos = [], 0
    for match in keep.finditer(text):
        parts += [text[pos : match.start()].upper(), match.group()]
        pos = match.end()
    parts.append(text[pos:].upper())
    return "[" + "".join(parts) + "]"


def render(path: Path, translate: Callable[[str], str]) -> tuple[Path, int, list[str]]:
    doc = open_document(path)
    segments = list(doc.segments())
    out = path.with_name("out-" + path.name)
    lost = doc.render((translate(s) for s in segments), out)
    return out, lost, segments


# --------------------------------------------------------------------------- pptx


def make_pptx(path: Path) -> Path:
    presentation = pptx.Presentation()
    slide = presentation.slides.add_slide(presentation.slide_layouts[1])
    slide.shapes.title.text = "Quarterly results"
    body = slide.placeholders[1].text_frame
    body.text = "Revenue grew"
    paragraph = body.add_paragraph()
    paragraph.add_run().text = "Costs fell "
    bold = paragraph.add_run()
    bold.text = "sharply"
    bold.font.bold = True
    linked = paragraph.add_run()
    linked.text = " see the report"
    linked.hyperlink.address = "https://zhiyi.example/report"
    table = slide.shapes.add_table(2, 2, Inches(1), Inches(4), Inches(4), Inches(1)).table
    table.cell(0, 0).text = "Region"
    table.cell(0, 1).text = "12345"
    group = slide.shapes.add_group_shape()
    box = group.shapes.add_textbox(Inches(5), Inches(1), Inches(2), Inches(1))
    box.text_frame.text = "Grouped note for {name}"
    slide.notes_slide.notes_text_frame.text = "Speaker notes here"
    presentation.save(str(path))
    return path


def test_pptx_round_trip(tmp_path: Path) -> None:
    source = make_pptx(tmp_path / "deck.pptx")
    out, lost, segments = render(source, upper)
    assert lost == 0
    assert segments == [
        "Quarterly results",
        "Revenue grew",
        "Costs fell <x1>sharply</x1><x2> see the report</x2>",
        "Region",
        "12345",  # digits only: the engines return it as it is
        "Grouped note for {name}",
        "Speaker notes here",
    ]
    slide = pptx.Presentation(str(out)).slides[0]
    assert slide.shapes.title.text == "[QUARTERLY RESULTS]"
    runs = slide.placeholders[1].text_frame.paragraphs[1].runs
    assert [(r.text, r.font.bold) for r in runs] == [
        ("[COSTS FELL ", None), ("SHARPLY", True), (" SEE THE REPORT", None), ("]", None)
    ]
    assert runs[2].hyperlink.address == "https://zhiyi.example/report"
    table = next(s for s in slide.shapes if s.has_table).table
    assert table.cell(0, 0).text == "[REGION]" and table.cell(0, 1).text == "[12345]"
    group = next(s for s in slide.shapes if s.shape_type == 6)
    assert group.shapes[0].text_frame.text == "[GROUPED NOTE FOR {name}]"
    assert slide.notes_slide.notes_text_frame.text == "[SPEAKER NOTES HERE]"
    with zipfile.ZipFile(source) as before, zipfile.ZipFile(out) as after:
        assert before.namelist() == after.namelist()
        changed = {n for n in before.namelist() if before.read(n) != after.read(n)}
    assert changed == {"ppt/slides/slide1.xml", "ppt/notesSlides/notesSlide1.xml"}


def test_pptx_broken_tags_keep_text(tmp_path: Path) -> None:
    source = make_pptx(tmp_path / "deck.pptx")
    out, lost, _ = render(source, lambda t: TAG.sub("", upper(t)) + "<x7>")
    assert lost == 1
    text = pptx.Presentation(str(out)).slides[0].placeholders[1].text_frame.text
    assert "COSTS FELL SHARPLY SEE THE REPORT" in text


# --------------------------------------------------------------------------- xlsx


def make_xlsx(path: Path) -> Path:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.title = "Summary"
    sheet["A1"] = "Product name"
    sheet["B1"] = 42
    sheet["C1"] = datetime.date(2024, 5, 17)
    sheet["D1"] = "=B1*2"
    sheet["A2"] = "Product name"  # a shared string, used twice
    sheet["A3"] = CellRichText(["Plain start ", TextBlock(InlineFont(b=True), "bold end")])
    sheet["A4"] = "  padded {name}  "
    data = workbook.create_sheet("Data")
    data["A1"] = "Row label"
    data["B1"] = "=Summary!B1+1"  # refers to Summary by name: that name stays
    workbook.save(str(path))
    return path


def test_xlsx_round_trip(tmp_path: Path) -> None:
    source = make_xlsx(tmp_path / "book.xlsx")
    out, lost, segments = render(source, upper)
    assert lost == 0
    assert segments == [
        "Product name",  # openpyxl writes inline strings: one segment per cell
        "Product name",
        "Plain start <x1>bold end</x1>",
        "padded {name}",
        "Row label",
        "Data",  # "Summary" is named in a formula: not offered
    ]
    workbook = openpyxl.load_workbook(str(out), rich_text=True)
    assert workbook.sheetnames == ["Summary", "DATA"]  # "[" and "]" cannot be in a name
    sheet = workbook["Summary"]
    assert sheet["A1"].value == sheet["A2"].value == "[PRODUCT NAME]"
    assert sheet["B1"].value == 42
    assert sheet["C1"].value == datetime.datetime(2024, 5, 17)
    assert sheet["D1"].value == "=B1*2"
    rich = sheet["A3"].value
    assert isinstance(rich, CellRichText)
    blocks = [(b.text, b.font.b) if isinstance(b, TextBlock) else (b, None) for b in rich]
    assert blocks == [("[PLAIN START ", None), ("BOLD END", True), ("]", None)]
    assert sheet["A4"].value == "  [PADDED {name}]  "
    assert workbook["DATA"]["B1"].value == "=Summary!B1+1"
    # Every part but the strings and the workbook is byte-identical.
    with zipfile.ZipFile(source) as before, zipfile.ZipFile(out) as after:
        assert before.namelist() == after.namelist()
        changed = {n for n in before.namelist() if before.read(n) != after.read(n)}
    assert changed == {"xl/worksheets/sheet1.xml", "xl/worksheets/sheet2.xml", "xl/workbook.xml"}


def test_xlsx_refuses_other_zips(tmp_path: Path) -> None:
    path = tmp_path / "fake.xlsx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(BadDocument, match="not an Excel workbook"):
        open_document(path)


# --------------------------------------------------------------------------- xliff and po

XLIFF12 = """<?xml version="1.0" encoding="UTF-8"?>
<xliff version="1.2" xmlns="urn:oasis:names:tc:xliff:document:1.2">
  <file original="app" source-language="en" target-language="de" datatype="plaintext">
    <body>
      <trans-unit id="greeting"><source>Hello {name}</source></trans-unit>
      <trans-unit id="done"><source>Goodbye</source>
        <target state="final">Tschüss</target></trans-unit>
    </body>
  </file>
</xliff>
"""

XLIFF20 = """<?xml version="1.0" encoding="UTF-8"?>
<xliff xmlns="urn:oasis:names:tc:xliff:document:2.0" version="2.0" srcLang="en" trgLang="de">
  <file id="f1">
    <unit id="u1"><segment><source>Open the file</source></segment></unit>
    <unit id="u2"><segment state="final"><source>Save</source>
      <target>Speichern</target></segment></unit>
  </file>
</xliff>
"""


def test_xliff_12_fills_targets_and_marks_them(tmp_path: Path) -> None:
    path = tmp_path / "app.xlf"
    path.write_text(XLIFF12, encoding="utf-8")
    out, _, segments = render(path, upper)
    assert segments == ["Hello {name}"]  # the translated unit is not sent again
    store = xliff.xlifffile.parsestring(out.read_bytes())
    units = {u.getid().split("\x04")[-1]: u for u in store.units}  # "file\x04id"
    assert units["greeting"].source == "Hello {name}"
    assert units["greeting"].target == "[HELLO {name}]"
    assert 'state="needs-review-translation"' in out.read_text(encoding="utf-8")
    assert units["done"].target == "Tschüss"


def test_xliff_20_fills_targets(tmp_path: Path) -> None:
    path = tmp_path / "app.xliff"
    path.write_text(XLIFF20, encoding="utf-8")
    out, _, segments = render(path, upper)
    assert segments == ["Open the file"]
    store = xliff2.Xliff2File.parsestring(out.read_bytes())
    targets = {u.getid(): (u.source, u.target) for u in store.units}
    assert targets == {"u1": ("Open the file", "[OPEN THE FILE]"), "u2": ("Save", "Speichern")}
    assert '<segment state="translated">' in out.read_text(encoding="utf-8")


def test_po_fills_msgstr_and_flags_fuzzy(tmp_path: Path) -> None:
    catalog = polib.POFile()
    catalog.metadata = {"Content-Type": "text/plain; charset=UTF-8",
                        "Plural-Forms": "nplurals=2; plural=(n != 1);"}
    catalog.append(polib.POEntry(msgid="Hello %(user)s", msgstr=""))
    catalog.append(polib.POEntry(msgid="%d file", msgid_plural="%d files", msgstr_plural={}))
    catalog.append(polib.POEntry(msgid="Done", msgstr="Fertig"))
    path = tmp_path / "de.po"
    catalog.save(str(path))
    out, _, segments = render(path, upper)
    assert segments == ["Hello %(user)s", "%d file", "%d files"]
    result = {e.msgid: e for e in polib.pofile(str(out))}
    assert result["Hello %(user)s"].msgstr == "[HELLO %(user)s]"
    assert "fuzzy" in result["Hello %(user)s"].flags
    assert result["%d file"].msgstr_plural == {0: "[%d FILE]", 1: "[%d FILES]"}
    assert result["Done"].msgstr == "Fertig" and "fuzzy" not in result["Done"].flags


def test_broken_xliff_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.xlf"
    path.write_text("<xliff><file>", encoding="utf-8")
    with pytest.raises(BadDocument, match="not valid XLIFF"):
        open_document(path)


# --------------------------------------------------------------------------- pdf


def make_pdf(path: Path) -> Path:
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 20)
    pdf.cell(0, 12, "Annual Report", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 11)
    pdf.multi_cell(0, 6, "The first paragraph wraps over several lines of the page, so the "
                   "converter has to join them back into one paragraph before anything is "
                   "translated, with {name} kept.")
    pdf.ln(4)
    with pdf.table() as table:
        for cells in (("Region", "Sales"), ("North", "100")):
            row = table.row()
            for text in cells:
                row.cell(text)
    pdf.add_page()
    pdf.multi_cell(0, 6, "- First bullet item\n- Second bullet item")
    pdf.output(str(path))
    return path


def test_pdf_becomes_docx_with_headings_tables_lists_and_pages(tmp_path: Path) -> None:
    source = make_pdf(tmp_path / "report.pdf")
    doc = open_document(source)
    assert doc.result_name("report.pdf") == "report.docx"
    out, lost, segments = render(source, upper)
    assert lost == 0
    assert segments[0] == "Annual Report"
    assert segments[1].startswith("The first paragraph wraps") and segments[1].endswith("kept.")
    assert {"Region", "Sales", "North", "First bullet item", "Second bullet item"} <= set(
        segments
    )
    result = docx.Document(str(out))
    styles = [(p.style.name, p.text) for p in result.paragraphs if p.text]
    assert styles[0] == ("Heading 1", "[ANNUAL REPORT]")
    assert styles[1][1].startswith("[THE FIRST PARAGRAPH WRAPS") and "{name}" in styles[1][1]
    assert ("List Bullet", "[FIRST BULLET ITEM]") in styles
    assert [[c.text for c in row.cells] for row in result.tables[0].rows] == [
        ["[REGION]", "[SALES]"], ["[NORTH]", "[100]"]
    ]
    assert 'w:type="page"' in result.element.xml  # the second page starts on its own
