"""What reading a document in the sandbox costs, against reading it in a thread.

Prices the same files the way create does: ``formats.document_stats`` of
``formats.open_document``, (a) in a thread of this process (the old way) and
(b) in a sandbox parser (``DocumentSandbox.stats``, warm parser processes). Both run
in the same process and the same run; the figures are the ratio of the median
elapsed times, and the CPU per read of everything involved (this process's
threads, plus for (b) the parser processes and the forkserver, by psutil).

    .venv/bin/python bench/parse_sandbox.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import docx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import formats
from sandbox import DocumentSandbox


def documents(folder: Path) -> dict[str, Path]:
    small = folder / "small.txt"
    small.write_text("Hello world. This is a short note.\n\nA second paragraph.\n")
    text = folder / "large.txt"
    text.write_text(("A sentence of a longer document, with some words in it. " * 20
                     + "\n\n") * 2000)
    word = docx.Document()
    for n in range(500):
        word.add_paragraph(f"Paragraph {n}: the quick brown fox jumps over the lazy dog.")
    buffer = io.BytesIO()
    word.save(buffer)
    report = folder / "report.docx"
    report.write_bytes(buffer.getvalue())
    return {"small .txt (60 B)": small, "large .txt (2.3 MB)": text,
            "docx (500 paragraphs)": report}


def in_process(path: Path) -> formats.DocumentStats:
    return formats.document_stats(formats.open_document(path))


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of every process below it, live or
    reaped (a parser that retired was reaped by the forkserver, which counts it)."""
    total = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


async def timed(make: object, rounds: int) -> tuple[float, float]:
    """(median elapsed seconds, mean CPU seconds) of one read."""
    samples = []
    cpu_before = cpu_seconds()
    for _ in range(rounds):
        start = time.perf_counter()
        await make()  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), (cpu_seconds() - cpu_before) / rounds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    sandbox = DocumentSandbox()
    await sandbox.start()
    with tempfile.TemporaryDirectory() as tmp:
        files = documents(Path(tmp))
        await sandbox.stats(files["small .txt (60 B)"], user="warm-up")
        print(f"{'document':24} {'thread ms':>10} {'sandbox ms':>11} {'ratio':>6}"
              f" {'thread CPU ms':>14} {'sandbox CPU ms':>15} {'ratio':>6}")
        for name, path in files.items():
            thread, thread_cpu = await timed(
                lambda p=path: asyncio.to_thread(in_process, p), args.rounds)
            child, child_cpu = await timed(
                lambda p=path: sandbox.stats(p, user="bench"), args.rounds)
            print(f"{name:24} {thread * 1000:10.1f} {child * 1000:11.1f} {child / thread:6.2f}"
                  f" {thread_cpu * 1000:14.2f} {child_cpu * 1000:15.2f}"
                  f" {child_cpu / thread_cpu:6.2f}")
    await sandbox.close()


if __name__ == "__main__":
    asyncio.run(main())
