"""Issue 11's figures: concurrent batches against a slow capped engine, and memory savings.

    .venv/bin/python bench/engine_figures.py            # ~1.5 min
    .venv/bin/python bench/engine_figures.py --quick    # smaller documents, L = 0.2 s

The engine is the tests' loopback LibreTranslate fake (tests/fakes.py) with a fixed
latency L per request and its own concurrency cap (429 past it). The real app
(``create_app`` over a SQLite file in a temporary folder) runs in this process
beside it; both mostly wait, so sharing a process costs little. Figures are
ratios to the ideal ``batches / cap × L`` (the engine busy at its cap all the time),
or of the revised document to the first translation.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fakes import FakeLibreTranslate  # noqa: E402

from zhiyi_server import STORE, Config, create_app  # noqa: E402

BATCH = 25  # processors.BATCH_MAX_ITEMS: one request per 25 short paragraphs


def paragraphs(n: int, tag: str = "") -> list[str]:
    return [f"Paragraph {tag}{i} of the report says something worth reading." for i in range(n)]


class Bench:
    """One app and one fake engine, both on loopback."""

    def __init__(self, latency: float, capacity: int, workers: int,
                 engine_concurrency: int = 4) -> None:
        self.fake = FakeLibreTranslate(latency=latency, capacity=capacity)
        self.workers = workers
        self.engine_concurrency = engine_concurrency
        self.folder = tempfile.TemporaryDirectory(prefix="zhiyi-bench-engines-")

    async def __aenter__(self) -> Bench:
        self.fake_server = TestServer(self.fake.app, host="127.0.0.1")
        await self.fake_server.start_server()
        config = Config(data_path=Path(self.folder.name), worker_concurrency=self.workers,
                        engine_concurrency=self.engine_concurrency,
                        libretranslate_url=self.fake.url(self.fake_server),
                        reconcile_seconds=3600, starter_credits=0)
        self.runner = web.AppRunner(create_app(config))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        store = self.runner.app[STORE]
        await store.add_user("bench", 1_000_000)
        token = await store.issue_token("bench")
        self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        await self.runner.cleanup()
        await self.fake_server.close()
        self.folder.cleanup()

    async def translate(self, texts: list[str], name: str = "doc.txt") -> dict:
        """Create a translate task and wait for it; returns the task plus its quote."""
        form = aiohttp.FormData()
        form.add_field("taskType", "translate")
        form.add_field("params", json.dumps({"targetLang": "fr", "sourceLang": "en",
                                             "engine": "libretranslate"}))
        form.add_field("file", io.BytesIO("\n\n".join(texts).encode()), filename=name)
        async with self.session.post(f"{self.url}/api/tasks/create", data=form) as resp:
            created = await resp.json()
            assert resp.status == 201, created
        while True:
            async with self.session.get(f"{self.url}/api/tasks/{created['taskId']}") as resp:
                task = (await resp.json())["task"]
            if task["taskStatus"] not in ("pending", "processing"):
                break
            await asyncio.sleep(0.05)
        assert task["taskStatus"] == "completed", task
        return {**task, "quote": created["quote"]}


async def one_document(n: int, latency: float, engine_concurrency: int = 4) -> dict:
    async with Bench(latency, capacity=4, workers=1,
                     engine_concurrency=engine_concurrency) as bench:
        started = time.monotonic()
        await bench.translate(paragraphs(n))
        wall = time.monotonic() - started
        requests = len(bench.fake.requests)
        ideal = math.ceil(n / BATCH) / 4 * latency
        return {"wall": wall, "ideal": ideal, "ratio": wall / ideal, "requests": requests,
                "refused": bench.fake.refused, "maxInflight": bench.fake.max_inflight}


async def ten_documents(n: int, latency: float) -> dict:
    async with Bench(latency, capacity=8, workers=10) as bench:
        started = time.monotonic()
        await asyncio.gather(*(bench.translate(paragraphs(n, f"{d}-"), f"d{d}.txt")
                               for d in range(10)))
        wall = time.monotonic() - started
        ideal = 10 * math.ceil(n / BATCH) / 8 * latency
        return {"wall": wall, "ideal": ideal, "ratio": wall / ideal,
                "requests": len(bench.fake.requests), "refused": bench.fake.refused,
                "maxInflight": bench.fake.max_inflight}


async def revised_document(n: int, changed: int) -> dict:
    async with Bench(0.0, capacity=4, workers=1) as bench:
        original = paragraphs(n)
        first = await bench.translate(original)
        first_requests = len(bench.fake.requests)
        revised = list(original)
        for i in range(0, n, n // changed)[:changed]:
            revised[i] = f"Paragraph {i} was rewritten for the second edition."
        second = await bench.translate(revised)
        second_requests = len(bench.fake.requests) - first_requests
        target = changed / n + 1 / math.ceil(n / BATCH)
        return {"requests": (first_requests, second_requests),
                "credits": (first["creditsCost"], second["creditsCost"]),
                "requestRatio": second_requests / first_requests,
                "creditRatio": second["creditsCost"] / first["creditsCost"],
                "quoteEqualsCharge": second["quote"]["credits"] == second["creditsCost"],
                "target": target}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, latency, revised_n = (200, 0.2, 100) if args.quick else (1000, 0.5, 1000)
    single = await one_document(n, latency)
    print(f"1 document, {n} paragraphs, L = {latency} s, engine cap 4, ENGINE_CONCURRENCY 4: "
          f"wall {single['wall']:.2f} s, ideal {single['ideal']:.2f} s, "
          f"ratio {single['ratio']:.3f} (target <= 1.15); {single['requests']} requests, "
          f"{single['refused']} refused, max in flight {single['maxInflight']}")
    one_at_a_time = await one_document(n, latency, engine_concurrency=1)
    print(f"  the same, one batch at a time (before issue 11), in this run: wall "
          f"{one_at_a_time['wall']:.2f} s, ratio {one_at_a_time['ratio']:.3f}")
    many = await ten_documents(n // 5 if args.quick else n, latency)
    print(f"10 documents at once, engine cap 8, ENGINE_MAX_INFLIGHT 16: "
          f"wall {many['wall']:.2f} s, ideal {many['ideal']:.2f} s, "
          f"ratio {many['ratio']:.3f} (target <= 1.2); {many['requests']} requests, "
          f"{many['refused']} refused (429), max in flight {many['maxInflight']}")
    rev = await revised_document(revised_n, max(3, revised_n * 3 // 100))
    print(f"revised document ({revised_n} paragraphs, 3 % changed): requests "
          f"{rev['requests'][1]} / {rev['requests'][0]} = {rev['requestRatio']:.3f}, credits "
          f"{rev['credits'][1]} / {rev['credits'][0]} = {rev['creditRatio']:.3f} "
          f"(target <= {rev['target']:.3f}); quote == charge: {rev['quoteEqualsCharge']}")


if __name__ == "__main__":
    asyncio.run(main())
