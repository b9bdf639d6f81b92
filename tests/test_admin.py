"""Administrators: the role (schema v7), the admin API, and the CLI commands beside it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from helpers import add_user, create

from storage import SCHEMA_VERSION, TaskStore
from zhiyi_server import STORE

FIXTURES = Path(__file__).parent / "fixtures"


async def add_admin(client: TestClient, name: str = "root") -> dict[str, str]:
    store = client.app[STORE]
    await store.add_user(name, 0, admin=True)
    return {"Authorization": f"Bearer {await store.issue_token(name)}"}


async def test_a_v1_database_gains_the_role_with_nobody_an_admin(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as db:
        db.executescript((FIXTURES / "schema_v1.sql").read_text())
        db.execute("INSERT INTO users VALUES ('alice', 4, '2025-01-01T00:00:00.000Z')")
    store = await TaskStore.open(path)
    try:
        alice = await store.get_user("alice")
        assert alice is not None and alice.is_admin is False and alice.credits == 4
        await store.set_user_admin("alice", True)
        assert (await store.get_user("alice")).is_admin is True
        await store.add_user("bob", 0, admin=True)
        assert [(u.id, u.is_admin) for u in await store.list_users()] == [
            ("alice", True), ("bob", True)]
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


ADMIN_GETS = ("/api/admin/users", "/api/admin/tasks", "/api/admin/engines")


async def test_only_administrators_may_use_the_admin_api(idle_client: TestClient) -> None:
    user = await add_user(idle_client, "alice", 10)
    for path in ADMIN_GETS:
        assert (await idle_client.get(path)).status == 401
        answer = await idle_client.get(path, headers=user)
        body = await answer.json()
        assert answer.status == 403 and body["code"] == "not_admin", path
        assert "zhiyi user admin NAME" in body["message"]
    for path, body in (("/api/admin/users", {"userId": "eve"}),
                       ("/api/admin/users/alice/credits", {"amount": 5}),
                       ("/api/admin/users/alice/revoke", None)):
        answer = await idle_client.post(path, json=body, headers=user)
        assert answer.status == 403, path
    store = idle_client.app[STORE]
    assert [u.id for u in await store.list_users()] == ["alice"]
    assert (await store.get_user("alice")).credits == 10  # nothing changed


async def test_users_with_balances_and_usage(idle_client: TestClient) -> None:
    admin = await add_admin(idle_client)
    alice = await add_user(idle_client, "alice", 100)
    task = await create(idle_client, alice, params={"targetLang": "de", "engine": "pseudo"})
    cost = task["task"]["creditsCost"]
    users = (await (await idle_client.get("/api/admin/users", headers=admin)).json())["users"]
    by_name = {u["userId"]: u for u in users}
    assert by_name["alice"] == {"userId": "alice", "credits": 100 - cost, "isAdmin": False,
                                "disabled": False, "createdAt": by_name["alice"]["createdAt"],
                                "tasks": 1, "creditsSpent": cost}
    assert by_name["root"]["isAdmin"] is True and by_name["root"]["tasks"] == 0
    # Every task, whoever owns it.
    await add_user(idle_client, "bob", 100)
    listed = await (await idle_client.get("/api/admin/tasks", headers=admin)).json()
    assert [(t["taskId"], t["userId"]) for t in listed["tasks"]] == [(task["taskId"], "alice")]
    bad = await idle_client.get("/api/admin/tasks?status=nope", headers=admin)
    assert bad.status == 400


async def test_create_grant_and_revoke(idle_client: TestClient) -> None:
    admin = await add_admin(idle_client)
    made = await idle_client.post("/api/admin/users", headers=admin,
                                  json={"userId": "carol", "credits": 7})
    body = await made.json()
    assert made.status == 201, body
    assert body["loginUrl"].endswith(f"/?token={body['token']}")
    carol = {"Authorization": f"Bearer {body['token']}"}
    me = await (await idle_client.get("/api/me", headers=carol)).json()
    assert me == {"success": True, "userId": "carol", "credits": 7}
    again = await idle_client.post("/api/admin/users", headers=admin, json={"userId": "carol"})
    assert again.status == 409 and (await again.json())["code"] == "user_exists"
    for bad in ({"userId": "bad name!"}, {"userId": "x", "credits": -1},
                {"userId": "x", "credits": 1.5}, {"userId": "x", "admin": "yes"}):
        answer = await idle_client.post("/api/admin/users", headers=admin, json=bad)
        assert answer.status == 400, bad
    granted = await idle_client.post("/api/admin/users/carol/credits", headers=admin,
                                     json={"amount": 5})
    assert (await granted.json())["credits"] == 12
    too_much = await idle_client.post("/api/admin/users/carol/credits", headers=admin,
                                      json={"amount": -50})
    assert too_much.status == 409 and (await too_much.json())["balance"] == 12
    for bad in ({"amount": 0}, {"amount": "5"}, {}):
        answer = await idle_client.post("/api/admin/users/carol/credits", headers=admin,
                                        json=bad)
        assert answer.status == 400, bad
    missing = await idle_client.post("/api/admin/users/nobody/credits", headers=admin,
                                     json={"amount": 5})
    assert missing.status == 404 and (await missing.json())["code"] == "user_not_found"
    revoked = await idle_client.post("/api/admin/users/carol/revoke", headers=admin)
    assert (await revoked.json())["revoked"] == 1
    assert (await idle_client.get("/api/me", headers=carol)).status == 401
    assert (await idle_client.post("/api/admin/users/nobody/revoke",
                                   headers=admin)).status == 404


async def test_engines_health(idle_client: TestClient) -> None:
    admin = await add_admin(idle_client)
    engines = (await (await idle_client.get("/api/admin/engines", headers=admin)).json())
    by_name = {e["name"]: e for e in engines["engines"]}
    assert by_name["pseudo"]["available"] is True
    assert by_name["libretranslate"]["available"] is False
    assert "LIBRETRANSLATE_URL" in by_name["libretranslate"]["reason"]


async def test_the_admin_page_is_served(idle_client: TestClient) -> None:
    page = await idle_client.get("/admin")
    assert page.status == 200 and "static/admin.js" in await page.text()
    assert (await idle_client.get("/static/admin.js")).status == 200


# ----------------------------------------------------------------------- CLI
def test_cli_admin_role_usage_and_engines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import cli

    data = str(tmp_path / "data")
    assert cli.main(["user", "add", "root", "--admin", "--data", data]) == 0
    assert cli.main(["user", "add", "bob", "--credits", "3", "--data", data]) == 0
    capsys.readouterr()
    assert cli.main(["user", "list", "--data", data]) == 0
    assert capsys.readouterr().out.splitlines() == ["bob\t3", "root\t0\tadmin"]
    assert cli.main(["user", "admin", "bob", "--data", data]) == 0
    assert "bob is an administrator" in capsys.readouterr().out
    assert cli.main(["user", "admin", "root", "--remove", "--data", data]) == 0
    assert cli.main(["user", "list", "--usage", "--data", data]) == 0
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "user\tcredits\ttasks\tcredits spent\trole", "bob\t3\t0\t0\tadmin", "root\t0\t0\t0\tuser"]
    assert cli.main(["user", "admin", "nobody", "--data", data]) == 1
    assert capsys.readouterr().err.strip() == "zhiyi: no user named 'nobody'"
    assert cli.main(["engine", "status"]) == 0
    lines = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["pseudo"] == "available"
    assert lines["deepl"].startswith("not available: Set DEEPL_API_KEY")
