"""Documents written by LibreOffice (Debian's libreoffice-writer-nogui) go through.

LibreOffice converts a python-docx document to PDF and, through .odt, back to .docx:
files whose XML and fonts come from another writer than the one the other tests use.
scripts/setup --test installs it; off CI a machine without it skips these tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import docx
import pytest

from formats import open_document

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def soffice() -> str:
    path = shutil.which("soffice")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("LibreOffice is missing on CI: scripts/setup --test installs it.")
        pytest.skip("LibreOffice (soffice) is not installed; scripts/setup --test installs it.")
    return path


def convert(soffice: str, source: Path, to: str, folder: Path) -> Path:
    """``soffice --headless --convert-to``, with a profile of its own in the test folder."""
    folder.mkdir(exist_ok=True)
    subprocess.run(
        [soffice, "--headless", "--norestore", f"-env:UserInstallation={folder.as_uri()}/lo",
         "--convert-to", to, "--outdir", str(folder), str(source)],
        check=True, capture_output=True, timeout=180,
    )
    return folder / f"{source.stem}.{to}"


def make_source(path: Path) -> Path:
    document = docx.Document()
    document.add_heading("Quarterly report", level=1)
    paragraph = document.add_paragraph("Sales rose ")
    paragraph.add_run("sharply").bold = True
    paragraph.add_run(" this year, says {name}.")
    table = document.add_table(rows=2, cols=2)
    table.style = "Table Grid"
    for (row, column), text in {(0, 0): "Region", (0, 1): "Sales",
                                (1, 0): "North", (1, 1): "Forty"}.items():
        table.cell(row, column).text = text
    document.save(str(path))
    return path


def upper(text: str) -> str:
    return text.upper().replace("<X", "<x").replace("</X", "</x").replace("{NAME}", "{name}")


def test_libreoffice_docx_keeps_inline_bold(soffice: str, tmp_path: Path) -> None:
    odt = convert(soffice, make_source(tmp_path / "report.docx"), "odt", tmp_path / "odt")
    written = convert(soffice, odt, "docx", tmp_path / "lo")  # LibreOffice's own .docx
    doc = open_document(written)
    segments = list(doc.segments())
    assert "Quarterly report" in segments
    sentence = next(s for s in segments if s.startswith("Sales rose"))
    assert "<x1>sharply</x1>" in sentence and "{name}" in sentence
    out = tmp_path / "out.docx"
    assert doc.render((upper(s) for s in segments), out) == 0
    result = docx.Document(str(out))
    paragraph = next(p for p in result.paragraphs if p.text.startswith("SALES ROSE"))
    assert paragraph.text == "SALES ROSE SHARPLY THIS YEAR, SAYS {name}."
    assert [r.text for r in paragraph.runs if r.bold] == ["SHARPLY"]
    assert result.tables[0].cell(1, 1).text == "FORTY"
    # Only the parts with text changed: styles, numbering, settings stay byte for byte.
    with zipfile.ZipFile(written) as before, zipfile.ZipFile(out) as after:
        assert before.namelist() == after.namelist()
        changed = {n for n in before.namelist() if before.read(n) != after.read(n)}
    assert changed == {"word/document.xml"}


def test_libreoffice_pdf_becomes_a_docx(soffice: str, tmp_path: Path) -> None:
    pdf = convert(soffice, make_source(tmp_path / "report.docx"), "pdf", tmp_path / "pdf")
    doc = open_document(pdf)
    segments = list(doc.segments())
    assert segments[0] == "Quarterly report"
    assert "Sales rose sharply this year, says {name}." in segments
    assert {"Region", "Sales", "North", "Forty"} <= set(segments)
    out = tmp_path / "out.docx"
    doc.render((upper(s) for s in segments), out)
    result = docx.Document(str(out))
    assert result.paragraphs[0].style.name == "Heading 1"
    assert result.paragraphs[0].text == "QUARTERLY REPORT"
    assert [c.text for c in result.tables[0].rows[1].cells] == ["NORTH", "FORTY"]


def test_libreoffice_odt_round_trip(soffice: str, tmp_path: Path) -> None:
    odt = convert(soffice, make_source(tmp_path / "report.docx"), "odt", tmp_path / "odt")
    doc = open_document(odt)
    segments = list(doc.segments())
    assert segments[0] == "Quarterly report"
    assert "Sales rose <x1>sharply</x1> this year, says {name}." in segments
    assert {"Region", "Sales", "North", "Forty"} <= set(segments)
    out = tmp_path / "translated.odt"
    assert doc.render((upper(s) for s in segments), out) == 0
    text = convert(soffice, out, "txt", tmp_path / "txt").read_text(encoding="utf-8-sig")
    assert "QUARTERLY REPORT" in text and "SALES ROSE SHARPLY THIS YEAR, SAYS {name}." in text
    assert "FORTY" in text
    # The bold span is still a span with its automatic style, around the translated word.
    with zipfile.ZipFile(out) as archive:
        content = archive.read("content.xml").decode()
        assert archive.namelist()[0] == "mimetype"
    assert re.search(r'<text:span text:style-name="[^"]+">SHARPLY</text:span>', content)
    # An engine that loses the tags: every word stays, LibreOffice still opens it.
    broken = tmp_path / "broken.odt"
    assert doc.render((upper(s).replace("</x1>", "") for s in segments), broken) == 1
    text = convert(soffice, broken, "txt", tmp_path / "txt2").read_text(encoding="utf-8-sig")
    assert "SALES ROSE SHARPLY THIS YEAR, SAYS {name}." in text
