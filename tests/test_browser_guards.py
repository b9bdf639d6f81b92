"""What protects a logged-in browser: same-origin writes, the ?token= login, headers.

The session cookie rides along on any request the browser makes, whichever
site asked for it; a bearer token never does. So cookie-authenticated
changes must prove they come from Zhiyi's own page, and bearer ones are left
alone.
"""

from __future__ import annotations

import re

import pytest
from aiohttp.test_utils import TestClient
from helpers import add_user, create, form, wait_status

from zhiyi_server import SESSION_COOKIE

NAVIGATION = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}


async def logged_in(client: TestClient, credits: int = 100) -> dict[str, str]:
    """A user whose session cookie is in the client's jar; returns its bearer header."""
    auth = await add_user(client, credits=credits)
    resp = await client.post("/api/session",
                             json={"token": auth["Authorization"].split()[1]},
                             headers={"Sec-Fetch-Site": "same-origin"})
    assert resp.status == 200
    return auth


def own_origin(client: TestClient) -> str:
    return str(client.make_url("/")).rstrip("/")


CROSS_SITE_HEADERS = [
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # another port or subdomain of the same host
    {"Sec-Fetch-Site": "none"},
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Referer": "http://evil.example/page"},
    {},  # a cookie with nothing saying where the request comes from
]


@pytest.mark.parametrize("headers", CROSS_SITE_HEADERS)
async def test_cross_site_cookie_writes_are_403_and_change_nothing(
    idle_client: TestClient, headers: dict[str, str]
) -> None:
    auth = await logged_in(idle_client)
    task_id = (await create(idle_client, auth))["taskId"]
    for method, path in [("POST", f"/api/tasks/{task_id}/cancel"),
                         ("DELETE", f"/api/tasks/{task_id}"),
                         ("DELETE", "/api/session")]:
        resp = await idle_client.request(method, path, headers=headers)
        body = await resp.json()
        assert resp.status == 403 and body["code"] == "cross_site", (method, path, body)
    resp = await idle_client.post("/api/tasks/create", data=form(), headers=headers)
    assert resp.status == 403 and (await resp.json())["code"] == "cross_site"
    tasks = (await (await idle_client.get("/api/tasks", headers=auth)).json())["tasks"]
    assert [(t["taskId"], t["taskStatus"]) for t in tasks] == [(task_id, "pending")]
    assert (await idle_client.get("/api/me")).status == 200  # the session still works


@pytest.mark.parametrize("kind", ["sec-fetch-site", "origin", "referer", "public-url"])
async def test_same_origin_cookie_writes_are_accepted(make_client, kind: str) -> None:
    # http: the test client would not send a Secure cookie back over plain HTTP
    client = await make_client(worker_concurrency=0, public_url="http://zhiyi.example:8443")
    await logged_in(client)
    headers = {
        "sec-fetch-site": {"Sec-Fetch-Site": "same-origin"},
        "origin": {"Origin": own_origin(client)},
        "referer": {"Referer": own_origin(client) + "/?x=1"},
        "public-url": {"Origin": "http://zhiyi.example:8443"},  # behind a proxy
    }[kind]
    resp = await client.post("/api/tasks/create", data=form(), headers=headers)  # the page's
    assert resp.status == 201, await resp.text()  # multipart upload
    task_id = (await resp.json())["taskId"]
    resp = await client.post(f"/api/tasks/{task_id}/cancel", headers=headers)
    assert resp.status == 200 and (await resp.json())["task"]["taskStatus"] == "cancelled"
    resp = await client.delete("/api/session", headers=headers)
    assert resp.status == 200
    assert (await client.get("/api/me")).status == 401


async def test_bearer_requests_are_not_affected(idle_client: TestClient) -> None:
    auth = await add_user(idle_client)
    hostile = {**auth, "Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}
    task_id = (await create(idle_client, hostile))["taskId"]
    resp = await idle_client.post(f"/api/tasks/{task_id}/cancel", headers=hostile)
    assert resp.status == 200
    resp = await idle_client.delete(f"/api/tasks/{task_id}", headers=hostile)
    assert resp.status == 200


async def test_login_from_another_site_is_403(idle_client: TestClient) -> None:
    auth = await add_user(idle_client)
    token = auth["Authorization"].split()[1]
    resp = await idle_client.post("/api/session", json={"token": token},
                                  headers={"Sec-Fetch-Site": "cross-site"})
    assert resp.status == 403 and (await resp.json())["code"] == "cross_site"
    assert SESSION_COOKIE not in resp.cookies
    resp = await idle_client.post("/api/session", json={"token": token},
                                  headers={"Origin": "http://evil.example"})
    assert resp.status == 403


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Dest": "image", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Dest": "iframe", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Dest": "script", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Site": "same-site"},
    {"Sec-Fetch-Dest": "empty", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "cross-site"},
    {"Accept": "image/avif,image/webp,*/*"},  # an older browser's <img>
])
async def test_token_login_from_a_sub_request_is_refused(idle_client: TestClient,
                                                        headers: dict[str, str]) -> None:
    auth = await add_user(idle_client)
    token = auth["Authorization"].split()[1]
    resp = await idle_client.get(f"/?token={token}", allow_redirects=False, headers=headers)
    assert resp.status == 403 and (await resp.json())["code"] == "cross_site"
    assert SESSION_COOKIE not in resp.cookies
    assert (await idle_client.get("/api/me")).status == 401


@pytest.mark.parametrize("headers", [
    {**NAVIGATION, "Sec-Fetch-Site": "none"},  # pasted into the address bar
    {**NAVIGATION, "Sec-Fetch-Site": "cross-site"},  # a link in a chat
    {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"},  # an older browser
])
async def test_token_login_by_navigation_works(idle_client: TestClient,
                                               headers: dict[str, str]) -> None:
    auth = await add_user(idle_client)
    token = auth["Authorization"].split()[1]
    resp = await idle_client.get(f"/?token={token}", allow_redirects=False, headers=headers)
    assert resp.status == 302 and SESSION_COOKIE in resp.cookies
    assert (await idle_client.get("/api/me")).status == 200


async def test_cookie_is_secure_when_public_url_is_https(make_client) -> None:
    client = await make_client(worker_concurrency=0, public_url="https://zhiyi.example/")
    auth = await add_user(client)
    resp = await client.post("/api/session", json={"token": auth["Authorization"].split()[1]})
    cookie = resp.headers["Set-Cookie"]
    assert resp.status == 200 and "Secure" in cookie and "HttpOnly" in cookie
    plain = await make_client(worker_concurrency=0, public_url="http://127.0.0.1:1")
    auth = await add_user(plain, "bob")
    resp = await plain.post("/api/session", json={"token": auth["Authorization"].split()[1]})
    assert "Secure" not in resp.headers["Set-Cookie"]


# -------------------------------------------------------------------- headers
def assert_protective_headers(headers) -> None:
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] in {"same-origin", "no-referrer",
                                          "strict-origin-when-cross-origin"}


async def test_security_headers_on_every_kind_of_answer(client: TestClient) -> None:
    auth = await add_user(client)
    page = await client.get("/")
    assert page.status == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp
    for resp in [page, await client.get("/static/app.js"), await client.get("/api/me"),
                 await client.get("/nothing-here"), await client.get("/healthz"),
                 await client.get("/api/task-types")]:
        assert_protective_headers(resp.headers)
    stream = await client.get("/api/sse/notifications", headers=auth)
    assert_protective_headers(stream.headers)
    stream.close()


async def test_results_are_sandboxed_attachments(client: TestClient) -> None:
    auth = await add_user(client)
    task_id = (await create(client, auth, name="page.html",
                            content="<p>Hello</p><script>alert(1)</script>"))["taskId"]
    task = await wait_status(client, auth, task_id, "completed", "failed")
    assert task["taskStatus"] == "completed", task
    resp = await client.get(task["resultUrl"], headers=auth)
    assert resp.status == 200
    assert resp.headers["Content-Disposition"].startswith("attachment;")
    assert "sandbox" in resp.headers["Content-Security-Policy"]
    assert_protective_headers(resp.headers)


def test_the_page_has_no_inline_script_or_style() -> None:
    from zhiyi_server import resource

    html = (resource("static") / "index.html").read_text(encoding="utf-8").lower()
    assert "<style" not in html and " style=" not in html and "javascript:" not in html
    assert not re.search(r"\son[a-z]+\s*=", html)  # no onclick= and the like
    for start in range(len(html)):
        start = html.find("<script", start)
        if start < 0:
            break
        tag = html[start:html.find(">", start)]
        assert "src=" in tag, tag


def test_every_cookie_write_documents_its_403() -> None:
    """openapi.yaml: each protected POST/PUT/PATCH/DELETE says it can answer 403 cross_site."""
    import yaml

    from zhiyi_server import resource

    spec = yaml.safe_load(resource("openapi.yaml").read_text(encoding="utf-8"))
    missing = [
        f"{method.upper()} {path}"
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in {"post", "put", "patch", "delete"}
        and op.get("security", spec.get("security")) != []
        and "403" not in op["responses"]
    ]
    assert missing == []
