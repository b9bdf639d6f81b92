"""The alert rules in alerts/: valid, unit-tested with promtool, and watching real metrics."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from helpers import add_user, create

from zhiyi_server import CONFIG, STORE

ALERTS = Path(__file__).resolve().parent.parent / "alerts"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="promtool (Debian's prometheus package) is not installed; scripts/setup --test "
           "installs it",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "CI must have promtool: scripts/setup --test installs it"
    return subprocess.run([PROMTOOL, *args], cwd=ALERTS, capture_output=True, text=True,
                          timeout=60, check=False)


@needs_promtool
def test_rules_are_valid() -> None:
    done = _promtool("check", "rules", "zhiyi.rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


@needs_promtool
def test_rules_fire_on_their_series_and_not_on_healthy_ones() -> None:
    done = _promtool("test", "rules", "zhiyi.rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def _metric_names_in_rules() -> set[str]:
    return set(re.findall(r"\bzhiyi_[a-z_]+\b", (ALERTS / "zhiyi.rules.yml").read_text()))


async def test_every_metric_the_rules_watch_is_exported(idle_client: TestClient) -> None:
    body = await (await idle_client.get("/metrics")).text()
    exported = set(re.findall(r"^# TYPE (\S+) (\w+)", body, re.M))
    names = {name for name, _ in exported}
    names |= {f"{name}_total" for name, kind in exported if kind == "counter"}
    missing = _metric_names_in_rules() - names
    assert not missing, f"alert rules watch metrics the server does not export: {missing}"


def _sample(body: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", body, re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


async def test_health_figures_come_from_the_database(idle_client: TestClient) -> None:
    auth = await add_user(idle_client, "alice", credits=50)
    waiting = await create(idle_client, auth)
    failing = await create(idle_client, auth)
    store = idle_client.app[STORE]
    await store.fail_task(failing["taskId"], "No callback in time.", "external_timeout")
    body = await (await idle_client.get("/metrics")).text()
    assert _sample(body, "zhiyi_failed_tasks", '{error_code="external_timeout"}') == 1
    assert _sample(body, "zhiyi_ledger_drift_users") == 0
    assert _sample(body, "zhiyi_queue_depth") == 1
    assert _sample(body, "zhiyi_queue_oldest_seconds") >= 0
    assert _sample(body, "zhiyi_disk_total_bytes") >= _sample(body, "zhiyi_disk_free_bytes") > 0
    assert waiting["task"]["taskStatus"] == "pending"

    # A balance changed behind the ledger's back is drift, and the gauge says so.
    def corrupt(db_path: Path) -> None:
        with sqlite3.connect(db_path) as db:
            db.execute("UPDATE users SET credits = credits + 7 WHERE id = 'alice'")
    corrupt(idle_client.app[CONFIG].database)
    body = await (await idle_client.get("/metrics")).text()
    assert _sample(body, "zhiyi_ledger_drift_users") == 1
