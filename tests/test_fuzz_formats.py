"""Fuzzing the document readers: random bytes and mutations of real files.

Whatever the bytes, reading a document (open, statistics, plain text, an identity render)
ends in a result or ``BadDocument``: never another exception. A hang would trip the
per-test timeout. The budget is fixed (``max_examples``), so the run is bounded and the
same on every machine; ``derandomize`` makes it the same on every run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from helpers import small_docx, write_pdf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats

FIXTURES = Path(__file__).parent / "fixtures" / "formats"

# ZHIYI_FUZZ_EXAMPLES raises the budget for a longer hunt; the suite's default stays small.
FUZZ = settings(max_examples=int(os.environ.get("ZHIYI_FUZZ_EXAMPLES", "60")), deadline=None,
                derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _pdf_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = write_pdf(Path(folder) / "seed.pdf", ["Quarterly report", "Sales rose (a lot)."])
        return path.read_bytes()


SEEDS: dict[str, bytes] = {
    ".txt": b"First paragraph, {name} kept.\n\nSecond one.\r\nThird line.\n",
    ".md": (FIXTURES / "sample.md").read_bytes(),
    ".srt": (FIXTURES / "sample.srt").read_bytes(),
    ".html": (FIXTURES / "sample.html").read_bytes(),
    ".docx": small_docx(),
    ".pdf": _pdf_bytes(),
}


def read_everything(data: bytes, extension: str) -> None:
    """What the server does with an upload; only ``BadDocument`` may escape."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"doc{extension}"
        path.write_bytes(data)
        try:
            document = formats.open_document(path)
            formats.document_stats(document)
            "".join(document.plain_text())
            segments = list(document.segments())
            document.render(iter(segments), Path(folder) / f"out{extension}")
        except formats.BadDocument as e:
            assert str(e).strip(), "a refusal must say why"


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed with a few bytes flipped, a slice cut out, or random bytes spliced in."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "splice", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            del data[at:]
    return bytes(data)


@pytest.mark.parametrize("extension", sorted(SEEDS))
def test_seeds_are_real_documents(extension: str) -> None:
    """The seeds themselves read cleanly, so mutations start from valid files."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"seed{extension}"
        path.write_bytes(SEEDS[extension])
        assert list(formats.open_document(path).segments())


@pytest.mark.parametrize("extension", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_mutated_files_are_read_or_refused(extension: str, data: st.DataObject) -> None:
    read_everything(data.draw(mutated(SEEDS[extension])), extension)


@pytest.mark.parametrize("extension", sorted(SEEDS))
@FUZZ
@given(raw=st.binary(max_size=2048))
def test_random_bytes_are_read_or_refused(extension: str, raw: bytes) -> None:
    read_everything(raw, extension)
