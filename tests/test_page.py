"""The page in a real browser (Debian's Chromium via Playwright) against real servers.

Each test starts ``zhiyi serve`` in a subprocess on a free port with its own
data directory; translations use a slow fake OpenAI-compatible engine so that
a task runs long enough to watch, cancel, or survive a server restart.
Screenshots of each state go to ``test-results/screenshots/``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from page_helpers import (
    REPO,
    FakeEngine,
    ZhiyiServer,
    add_user,
    api,
    create_task,
    free_port,
    slow_document,
    wait_until,
)

CHROMIUM = Path("/usr/bin/chromium")
if not os.environ.get("CI"):  # on CI a missing browser fails the tests instead
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium is not installed at /usr/bin/chromium "
                    "(apt-get install -y chromium); CI runs these tests", allow_module_level=True)
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = REPO / "test-results" / "screenshots"
TIMEOUT_MS = 30_000

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    fake = FakeEngine(delay=0.4).start()
    yield fake
    fake.stop()


@pytest.fixture
def server(tmp_path: Path, engine: FakeEngine) -> Iterator[ZhiyiServer]:
    zhiyi = ZhiyiServer(tmp_path / "data", env=engine.server_env()).start()
    yield zhiyi
    zhiyi.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(accept_downloads=True, locale="en-US",
                                  viewport={"width": 1100, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The server's Content-Security-Policy must not block anything the page does.
    page.on("console", lambda message: errors.append(message.text)
            if message.type == "error" and "Content Security Policy" in message.text else None)
    yield page
    context.close()
    assert not errors, f"errors in the page: {errors}"


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def log_in(page: Page, server: ZhiyiServer, base: str | None = None) -> None:
    page.goto(f"{base or server.url + '/'}?token={server.local_token}")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")


def credits(page: Page) -> int:
    return int(page.locator("#credits").get_attribute("data-credits") or "-1")


def upload(page: Page, path: Path, *, engine: str = "openai", target: str = "zh") -> None:
    page.set_input_files("#file-input", str(path))
    page.select_option("#task-type", "translate")
    page.select_option("#param-engine", engine)
    page.select_option("#param-targetLang", target)
    page.click("#upload-submit")


def row(page: Page, file_name: str) -> Any:
    return page.locator(".task", has=page.locator(".task-name", has_text=file_name))


def test_upload_progress_and_download(page: Page, server: ZhiyiServer, tmp_path: Path) -> None:
    """Log in by URL, upload, watch the bar reach 100 %, download what the API serves."""
    log_in(page, server)
    expect(page.locator("#credits")).to_have_text("Credits: 1000")
    expect(page.locator("#cost-rule")).to_contain_text("1 credit per 1,000 characters")
    shot(page, "01-logged-in")
    doc = slow_document(tmp_path / "report.txt", 150)
    upload(page, doc)
    task = row(page, "report.txt")
    expect(task).to_have_attribute("data-status", "processing")
    expect(task.locator("progress")).not_to_have_attribute("value", "0")
    shot(page, "02-processing")
    expect(task).to_have_attribute("data-status", "completed")
    expect(task.locator("progress")).to_have_attribute("value", "100")
    expect(task.locator("[data-role=percent]")).to_have_text("100 %")
    shot(page, "03-completed")

    task_id = int(task.get_attribute("data-task-id") or 0)
    status, body, _ = api(server.url, server.local_token, "GET", f"api/tasks/{task_id}")
    assert status == 200
    cost = body["task"]["creditsCost"]
    expect(page.locator("#credits")).to_have_text(f"Credits: {1000 - cost}")
    expect(task.locator(".task-meta")).to_contain_text(f"{cost} credits")

    with page.expect_download() as download_info:
        task.locator("[data-action=download]").click()
    download = download_info.value
    saved = tmp_path / "downloaded"
    download.save_as(saved)
    status, _, served = api(server.url, server.local_token, "GET", f"api/tasks/{task_id}/result")
    assert status == 200
    assert saved.read_bytes() == served
    assert download.suggested_filename == body["task"]["resultName"]
    assert "[zh] Paragraph 149" in saved.read_text(encoding="utf-8")


def test_login_failed_then_paste_token_and_log_out(page: Page, server: ZhiyiServer) -> None:
    page.goto(f"{server.url}/?token=not-a-token")
    expect(page).to_have_url(re.compile(r"#?$"))
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-error")).to_contain_text("not valid")
    shot(page, "04-login-failed")
    page.fill("#token", "still-wrong")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("That token is not valid.")
    page.fill("#token", server.local_token)
    page.keyboard.press("Enter")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#user")).to_contain_text("local")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    page.reload()
    expect(page.locator("#login")).to_be_visible()


@pytest.mark.parametrize("crash", [True, False], ids=["kill", "stop"])
def test_restart_mid_task(page: Page, server: ZhiyiServer, tmp_path: Path, crash: bool) -> None:
    """Kill (or stop) the server by PID mid-task and start it again on the same port and
    data: the indicator goes to reconnecting and back to live, and the task ends."""
    log_in(page, server)
    upload(page, slow_document(tmp_path / "long.txt", 400))
    task = row(page, "long.txt")
    expect(task).to_have_attribute("data-status", "processing")
    expect(task.locator("[data-role=message]")).to_contain_text(re.compile(r"segment [1-9]"))
    server.kill() if crash else server.stop()
    expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting")
    shot(page, f"05-server-down-{'kill' if crash else 'stop'}")
    server.start()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    shot(page, f"06-reconnected-{'kill' if crash else 'stop'}")
    expect(task).to_have_attribute("data-status", "completed", timeout=60_000)
    expect(task.locator("[data-role=percent]")).to_have_text("100 %")
    shot(page, f"07-completed-after-restart-{'kill' if crash else 'stop'}")


def test_cancel_refunds_credits(page: Page, server: ZhiyiServer, tmp_path: Path) -> None:
    log_in(page, server)
    before = credits(page)
    upload(page, slow_document(tmp_path / "cancel-me.txt", 400))
    task = row(page, "cancel-me.txt")
    expect(task).to_have_attribute("data-status", "processing")
    expect(page.locator("#credits")).not_to_have_text(f"Credits: {before}")
    assert credits(page) < before
    shot(page, "08-before-cancel")
    task.locator("[data-action=cancel]").click()
    expect(task).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#credits")).to_have_text(f"Credits: {before}")
    expect(task.locator("[data-action=retry]")).to_be_visible()
    shot(page, "09-cancelled")
    # Deleting takes a second press; the row leaves this page (and every other tab).
    task.locator("[data-action=delete]").click()
    task.locator("[data-action=delete]").click()
    expect(task).to_have_count(0)


def test_unsupported_file_refused_before_upload(page: Page, server: ZhiyiServer,
                                                tmp_path: Path) -> None:
    """An unsupported file is refused by the page itself: nothing is sent, nothing charged."""
    log_in(page, server)
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url)
            if "api/tasks/" in request.url and request.method == "POST" else None)
    # The form says what it accepts and what each file becomes.
    expect(page.locator("#accepts")).to_contain_text(".pdf → .docx")
    expect(page.locator("#accepts")).to_contain_text(".xlsx")
    exe = tmp_path / "setup.exe"
    exe.write_bytes(b"MZ\x90\x00not a document")
    page.set_input_files("#file-input", str(exe))
    errors = page.locator("#upload-errors")
    expect(errors).to_contain_text("setup.exe: Translate does not take .exe files (accepted: .txt")
    expect(page.locator("#file-list li")).to_have_count(0)
    assert sent == []
    expect(page.locator("#credits")).to_have_text("Credits: 1000")
    expect(page.locator("#tasks-empty")).to_be_visible()
    shot(page, "10-unsupported-file")
    # The interface in Chinese keeps the server's message, and reads on a narrow window.
    page.click("#lang-switch")
    expect(page.locator("#upload-title")).to_have_text("新建任务")
    page.set_viewport_size({"width": 360, "height": 780})
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    shot(page, "11-chinese-narrow")


NO_WEB_LOCKS = "Object.defineProperty(Navigator.prototype, 'locks', {get: () => undefined});"


@pytest.mark.parametrize("web_locks", [True, False], ids=["web-locks", "broadcast-only"])
def test_tabs_share_one_stream(browser: Browser, server: ZhiyiServer, tmp_path: Path,
                               web_locks: bool) -> None:
    """Two tabs, one EventSource (the leader's); closing the leader hands the stream over.
    Without Web Locks, a heartbeat election over the BroadcastChannel does the same."""
    context = browser.new_context(locale="zh-CN")
    context.set_default_timeout(TIMEOUT_MS)
    if not web_locks:
        context.add_init_script(NO_WEB_LOCKS)
    try:
        first = context.new_page()
        log_in(first, server)
        assert first.evaluate("'locks' in navigator && !!navigator.locks") == web_locks
        second = context.new_page()
        second.goto(server.url + "/")
        expect(second.locator("#connection")).to_have_attribute("data-state", "live")
        expect(second.locator("#upload-title")).to_have_text("新建任务")
        first.wait_for_timeout(1500)  # long enough for a second leader to show up, if any
        assert _sse_connections(server) == 1
        task = create_task(server.url, server.local_token, slow_document(tmp_path / "a.txt", 30),
                           params={"targetLang": "fr", "engine": "openai"})
        for tab in (first, second):
            expect(row(tab, "a.txt")).to_have_attribute("data-status", "completed")
        first.close()
        expect(second.locator("#connection")).to_have_attribute("data-state", "live")
        create_task(server.url, server.local_token, slow_document(tmp_path / "b.txt", 30),
                    params={"targetLang": "fr", "engine": "pseudo"})
        expect(row(second, "b.txt")).to_have_attribute("data-status", "completed")
        # The closed tab's socket is noticed at the server's next write (a heartbeat).
        wait_until(lambda: _sse_connections(server) == 1, what="one stream left")
        api(server.url, server.local_token, "DELETE", f"api/tasks/{task['taskId']}")
        expect(row(second, "a.txt")).to_have_count(0)
        shot(second, f"12-second-tab-leads-{'locks' if web_locks else 'broadcast'}")
    finally:
        context.close()


def _sse_connections(server: ZhiyiServer) -> int:
    _, _, raw = api(server.url, server.local_token, "GET", "metrics")
    match = re.search(rb"^zhiyi_sse_connections\S* (\d+(?:\.\d+)?)$", raw, re.MULTILINE)
    assert match, raw[:2000]
    return int(float(match.group(1)))


MOUNT_SCRIPT = """\
import sys
from pathlib import Path
from aiohttp import web
from zhiyi_server import Config, create_app
root = web.Application()
root.add_subapp("/zhiyi/", create_app(Config.from_env(data_path=Path(sys.argv[2]))))
print(f"Open http://127.0.0.1:{sys.argv[1]}/zhiyi/", flush=True)
web.run_app(root, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


@pytest.fixture
def prefixed_server(tmp_path: Path) -> Iterator[ZhiyiServer]:
    """The app mounted under /zhiyi/ with ``add_subapp``, as an embedding app would."""
    data = tmp_path / "prefixed"
    data.mkdir()
    script = tmp_path / "mount.py"
    script.write_text(MOUNT_SCRIPT)
    zhiyi = ZhiyiServer(data, command=[sys.executable, str(script), "{port}", "{data}"],
                        token=add_user(data, "carol", 100)).start()
    yield zhiyi
    zhiyi.stop()


def test_works_under_a_prefix(page: Page, prefixed_server: ZhiyiServer, tmp_path: Path) -> None:
    """Relative URLs only: mounted at /zhiyi/, the page logs in, uploads and downloads."""
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    log_in(page, prefixed_server, base=f"{prefixed_server.url}/zhiyi/")
    page.set_input_files("#file-input", str(slow_document(tmp_path / "p.txt", 5)))
    page.select_option("#param-targetLang", "de")
    page.click("#upload-submit")
    task = row(page, "p.txt")
    expect(task).to_have_attribute("data-status", "completed")
    with page.expect_download() as download_info:
        task.locator("[data-action=download]").click()
    assert download_info.value.failure() is None
    outside = [u for u in requests if not u.startswith(f"{prefixed_server.url}/zhiyi/")
               and not u.startswith("data:")]
    assert not outside, f"requests outside the prefix: {outside}"
    shot(page, "13-under-prefix")


JS_DIR = Path(__file__).parent / "js"


def test_use_task_status_hook(page: Page, server: ZhiyiServer, tmp_path: Path) -> None:
    """The seed's useTaskStatus, as plain JS, follows a real task to completion.

    The server serves only ``static/``, so the test page is served by Playwright at
    the server's origin: the hook's relative URL then reaches the real server.
    """
    task = create_task(server.url, server.local_token, slow_document(tmp_path / "hook.txt", 150),
                       params={"targetLang": "ja", "engine": "openai"})
    page.goto(f"{server.url}/?token={server.local_token}")  # the session cookie

    def serve_test_file(route: Any) -> None:
        name = route.request.url.split("?", 1)[0].rsplit("/", 1)[-1]
        kind = "text/javascript" if name.endswith(".js") else "text/html"
        route.fulfill(body=(JS_DIR / name).read_text(encoding="utf-8"),
                      content_type=f"{kind}; charset=utf-8")

    page.route(f"{server.url}/use_task_status.*", serve_test_file)
    page.goto(f"{server.url}/use_task_status.html?task={task['taskId']}")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-status", "processing")
    shot(page, "14-use-task-status-processing")
    expect(status).to_have_attribute("data-status", "completed")
    expect(status).to_have_attribute("data-closed", "true")
    expect(page.locator("#progress")).to_have_attribute("value", "100")
    states = page.evaluate("window.taskStates")
    progress = [s["progress"] for s in states]
    assert progress == sorted(progress), progress
    assert any(s["status"] == "processing" and 0 < s["progress"] < 100 for s in states), states
    assert states[-1]["status"] == "completed" and states[-1]["error"] is None
    shot(page, "15-use-task-status-completed")


NOTIFICATION_STUB = """
window.shownNotifications = [];
window.permissionRequests = 0;
class FakeNotification {
  static permission = 'default';
  static requestPermission() {
    window.permissionRequests += 1;
    FakeNotification.permission = 'granted';
    return Promise.resolve('granted');
  }
  constructor(title, options) { window.shownNotifications.push({ title, ...options }); }
}
window.Notification = FakeNotification;
"""


def test_desktop_notice_when_hidden(page: Page, server: ZhiyiServer, tmp_path: Path) -> None:
    """Permission is asked on the first upload (not on load); a task that ends while the
    page is hidden shows a desktop notification."""
    page.add_init_script(NOTIFICATION_STUB)
    log_in(page, server)
    assert page.evaluate("window.permissionRequests") == 0
    upload(page, slow_document(tmp_path / "first.txt", 5), engine="pseudo")
    expect(row(page, "first.txt")).to_have_attribute("data-status", "completed")
    assert page.evaluate("window.permissionRequests") == 1
    assert page.evaluate("window.shownNotifications") == []  # visible: no notice
    page.evaluate("Object.defineProperty(document, 'hidden', {get: () => true})")
    create_task(server.url, server.local_token, slow_document(tmp_path / "later.txt", 50),
                params={"targetLang": "fr", "engine": "openai"})
    expect(row(page, "later.txt")).to_have_attribute("data-status", "completed")
    shown = page.evaluate("window.shownNotifications")
    assert [(n["title"], n["body"]) for n in shown] == [("Task completed", "later.txt")]
    assert shown[0]["tag"].startswith("zhiyi-task-")


ACTIVE_ELEMENT = "(e => e.id || e.dataset.action || e.tagName)(document.activeElement)"


def test_load_more_and_keyboard(page: Page, server: ZhiyiServer, tmp_path: Path) -> None:
    """Pages of 20 with "Load more"; every control is reachable with Tab and labelled."""
    doc = slow_document(tmp_path / "small.txt", 2)
    for _ in range(22):
        create_task(server.url, server.local_token, doc, "analyze")
    log_in(page, server)
    expect(page.locator(".task")).to_have_count(20)
    ids = [int(i) for i in page.locator(".task").evaluate_all(
        "rows => rows.map(r => r.dataset.taskId)")]
    assert ids == sorted(ids, reverse=True)  # newest first
    page.click("#load-more")
    expect(page.locator(".task")).to_have_count(22)
    expect(page.locator("#load-more")).to_be_hidden()

    unlabelled = page.evaluate("""() => [...document.querySelectorAll(
        'input:not([type=hidden]), select, button, progress')].filter(el => el.offsetParent !== null
        || el.type === 'file').filter(el => !(el.labels?.length || el.getAttribute('aria-label')
        || el.textContent.trim())).map(el => el.outerHTML)""")
    assert unlabelled == []
    reached = []
    page.locator("body").focus()
    for _ in range(15):
        page.keyboard.press("Tab")
        reached.append(page.evaluate(ACTIVE_ELEMENT))
    for control in ("lang-switch", "logout", "file-input", "task-type", "param-targetLang",
                    "upload-submit"):
        assert control in reached, reached
    page.keyboard.press("Shift+Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    shot(page, "16-keyboard-focus")


DROP_TWO_FILES = """() => {
  const data = new DataTransfer();
  data.items.add(new File(['First file.\\n\\nHello.'], 'one.txt', { type: 'text/plain' }));
  data.items.add(new File(['# Second\\n\\nWorld.'], 'two.md', { type: 'text/markdown' }));
  return data;
}"""


def test_drop_several_files(page: Page, server: ZhiyiServer) -> None:
    """Two files dropped at once become two tasks; unavailable engines say so, without
    the administrator's hint; the test engine says it makes fake text."""
    log_in(page, server)
    argos = page.locator("#param-engine option[value=argos]")
    expect(argos).to_be_disabled()
    expect(argos).to_have_text("argos (not set up on this server)")
    expect(page.locator("#param-engine option[value=pseudo]")).to_have_text(
        "pseudo — test engine, produces fake text")
    # The fake OpenAI engine is configured: it is the default, not pseudo.
    expect(page.locator("#param-engine")).to_have_value("openai")
    expect(page.locator("#param-engine option[value=pseudo]")).to_be_enabled()
    data = page.evaluate_handle(DROP_TWO_FILES)
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": data})
    expect(page.locator("#file-list li")).to_have_count(2)
    page.select_option("#task-type", "extract")
    expect(page.locator("#cost-rule")).to_have_text(
        "Cost: 1 credit per 10,000 characters, at least 1")
    page.click("#upload-submit")
    for name in ("one.txt", "two.md"):
        expect(row(page, name)).to_have_attribute("data-status", "completed")
    expect(page.locator("#file-list li")).to_have_count(0)
    expect(page.locator("#upload-status")).to_contain_text("Task #2 created for two.md")
    shot(page, "17-two-files-dropped")


def test_quote_shows_memory_hits_and_the_glossary_picker(page: Page, server: ZhiyiServer,
                                                         tmp_path: Path) -> None:
    """A document translated once is quoted from memory; glossaries are offered by name."""
    doc = slow_document(tmp_path / "memo.txt", 12)
    params = {"targetLang": "zh", "sourceLang": "en", "engine": "pseudo"}
    first = create_task(server.url, server.local_token, doc, params=params)
    wait_until(lambda: api(server.url, server.local_token, "GET",
                           f"api/tasks/{first['taskId']}")[1]["task"]["taskStatus"]
               == "completed")
    boundary = "glossaryboundary"
    body = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in (("name", "animals"), ("sourceLang", "en"), ("targetLang", "zh")))
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
             f'filename="animals.csv"\r\n\r\nfox,狐狸\r\n--{boundary}--\r\n')
    status, _, _ = api(server.url, server.local_token, "POST", "api/glossaries",
                       body.encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 201

    log_in(page, server)
    page.set_input_files("#file-input", str(doc))
    page.select_option("#task-type", "translate")
    page.select_option("#param-engine", "pseudo")
    page.select_option("#param-targetLang", "zh")
    page.select_option("#param-sourceLang", "en")
    expect(page.locator("#param-glossary option")).to_have_text(
        ["(no glossary)", "animals (en → zh, 1 term)"])
    page.click("#upload-quote")
    quoted = page.locator("#quote-list li")
    balance = credits(page)
    expect(quoted).to_have_text(re.compile(
        r"memo\.txt: [\d,]+ characters, 0 credits \(12 segments from memory\); "
        rf"language: English, balance after: {balance}$"))
    shot(page, "memory-quote")
    # With the glossary the memory does not apply (its translations are remembered apart):
    # the form quotes again by itself.
    page.select_option("#param-glossary", "animals")
    expect(quoted).to_have_attribute("data-from-memory", "0")
    page.click("#upload-submit")
    expect(page.locator("#upload-status")).to_contain_text(
        "Task #2 created for memo.txt: 1 credit.")
    task = row(page, "memo.txt").first
    expect(task).to_have_attribute("data-status", "completed")
    task_id = int(task.get_attribute("data-task-id") or 0)
    _, data, _ = api(server.url, server.local_token, "GET", f"api/tasks/{task_id}/result")
    assert data is None  # a text result
    _, _, raw = api(server.url, server.local_token, "GET", f"api/tasks/{task_id}/result")
    assert raw.decode().count("狐狸") == 12


# ------------------------------------------------ messages in the page's language
def _sample_params(pattern: str) -> dict[str, Any]:
    """Numbers for a code's parameters; a raw English error where one is carried."""
    names = re.findall(r"\(\?P<(\w+)>", pattern)
    params: dict[str, Any] = {n: ("connection refused" if n in ("error", "text") else 3)
                              for n in names if n != "summary"}
    if "(?P<summary>" in pattern:
        params.update(fromMemory=2, segments=9, terms=1, distinct=1)
    return params


def test_every_server_code_has_chinese(page: Page, server: ZhiyiServer) -> None:
    """Every code the server can send (messages.py) has a Chinese text with no English
    left in it but the parameters a person cannot translate (a raw error); en has all too."""
    import messages

    log_in(page, server)
    status = [[code, _sample_params(p)] for code, p in messages.STATUS_MESSAGES.items()]
    notices = [[code, {n: 3 for n in names}] for code, names in messages.NOTIFICATIONS.items()]
    found = page.evaluate("""async ({status, errors, stages, notices, apiErrors}) => {
      const i18n = await import('./static/i18n.js');
      const out = {};
      for (const lang of ['zh', 'en']) {
        i18n.setLang(lang);
        out[lang] = {
          status: status.map(([code, params]) =>
            [code, i18n.has(`msg.${code}`), i18n.say(code, params, '')]),
          errors: errors.map((code) =>
            [code, i18n.has(`failure.${code}`), i18n.t(`failure.${code}`)]),
          stages: stages.map((code) =>
            [code, i18n.has(`stage.${code}`), i18n.t(`stage.${code}`)]),
          api: apiErrors.map((code) =>
            [code, i18n.has(`error.${code}`), i18n.apiErrorText({code, message: 'ENGLISH'})]),
          notices: notices.map(([code, params]) => [code, i18n.has(`notify.${code}`),
            i18n.sayNotice({code, params, message: 'ENGLISH'})]),
        };
      }
      return out;
    }""", {"status": status, "errors": list(messages.ERROR_CODES),
           "stages": list(messages.STAGES), "notices": notices,
           "apiErrors": list(messages.API_ERRORS)})
    for lang in ("zh", "en"):
        for kind, rows in found[lang].items():
            missing = [code for code, has, _ in rows if not has]
            assert not missing, f"{lang} lacks {kind}: {missing}"
    for kind, rows in found["zh"].items():
        for code, _, text in rows:
            if code == messages.FREE_TEXT:
                continue  # the server's own text, shown as it came
            assert text and not re.search(r"[A-Za-z]{2,}", text), f"zh {kind} {code}: {text}"
    english = dict((code, text) for code, _, text in found["en"]["status"])
    assert english["segments"] == "segment 3 of 3"
    assert english["completed"] == ("completed (2 of 9 segments from memory; "
                                    "1 glossary term applied)")
    assert dict((c, t) for c, _, t in found["en"]["notices"])["credits_charged"] == (
        "3 credits charged for task #3")


def test_plural_dates_and_old_messages_follow_the_language(page: Page, server: ZhiyiServer,
                                                           tmp_path: Path) -> None:
    """"1 credit", dates in the browser's format, and rows said again after a switch."""
    log_in(page, server)
    doc = tmp_path / "hi.txt"
    doc.write_text("Hello.")
    task = create_task(server.url, server.local_token, doc,
                       params={"targetLang": "fr", "engine": "pseudo"})
    done = row(page, "hi.txt")
    expect(done).to_have_attribute("data-status", "completed")
    expect(done.locator("[data-role=meta]")).to_contain_text("1 credit ·")
    expect(done.locator("[data-role=meta]")).not_to_contain_text("1 credits")
    # The end time arrived with the event (no reload), in the browser's own date format.
    ended = api(server.url, server.local_token, "GET", f"api/tasks/{task['taskId']}")[1]
    expected = page.evaluate("""(iso) => new Intl.DateTimeFormat(navigator.language,
        {dateStyle: 'short', timeStyle: 'medium'}).format(new Date(iso))""",
                             ended["task"]["completedAt"])
    expect(done.locator("[data-role=meta]")).to_contain_text(f"Ended {expected}")
    expect(done.locator("[data-role=message]")).to_have_text("completed")
    page.click("#lang-switch")
    expect(done.locator("[data-role=message]")).to_have_text("已完成")
    expect(done.locator("[data-role=status]")).to_have_text("已完成")
    expect(done.locator("[data-role=meta]")).to_contain_text("1 积分")
    # A grant pushed by an administrator: the balance and a toast, in Chinese.
    store_grant(server, 5)
    expect(page.locator("#credits")).to_have_text(f"积分：{1000 - 1 + 5}")
    expect(page.locator(".toast").last).to_have_text("积分变动 +5")
    shot(page, "20-zh-completed-and-grant")
    page.click("#lang-switch")
    expect(page.locator(".toast").last).to_have_text("+5 credits")


def store_grant(server: ZhiyiServer, amount: int) -> None:
    """``zhiyi user credit local N``, as an administrator would, while the page is open."""
    import subprocess

    from page_helpers import PYTHON, base_env
    subprocess.run([PYTHON, "-m", "zhiyi_server", "user", "credit", "local", str(amount),
                    "--data", str(server.data_dir)], cwd=REPO, env=base_env(), check=True,
                   capture_output=True, timeout=30)


def test_failure_for_people_with_details_behind_a_toggle(page: Page, engine: FakeEngine,
                                                         tmp_path: Path) -> None:
    """The engine refuses the key: a sentence for people; the raw error behind a toggle."""
    server = ZhiyiServer(tmp_path / "data", env=engine.server_env("sk-wrong")).start()
    try:
        _failure_in_place(page, server, tmp_path)
    finally:
        server.stop()


def _failure_in_place(page: Page, server: ZhiyiServer, tmp_path: Path) -> None:
    log_in(page, server)
    doc = slow_document(tmp_path / "bad-key.txt", 3)
    create_task(server.url, server.local_token, doc,
                params={"targetLang": "zh", "engine": "openai", "sourceLang": "en"})
    failed = row(page, "bad-key.txt")
    expect(failed).to_have_attribute("data-status", "failed", timeout=60_000)
    details = failed.locator("details")
    expect(failed.locator("[data-role=task-error]")).to_be_visible()
    expect(failed.locator("[data-role=raw-error]")).not_to_be_visible()
    details.locator("summary").click()
    expect(failed.locator("[data-role=raw-error]")).to_be_visible()
    shot(page, "21-failure-details")


# ------------------------------------------------------------- the task list
def test_cancel_pressed_during_a_burst_of_progress_cancels(page: Page, server: ZhiyiServer,
                                                           tmp_path: Path) -> None:
    """A long press on Cancel while progress events re-draw the row still cancels:
    the row's controls are updated in place, never replaced under the pointer."""
    log_in(page, server)
    task = create_task(server.url, server.local_token, slow_document(tmp_path / "busy.txt", 400),
                       params={"targetLang": "zh", "engine": "openai"})
    busy = row(page, "busy.txt")
    message = busy.locator("[data-role=message]")
    expect(message).to_contain_text("segment")
    cancel = busy.locator("[data-action=cancel]")
    cancel.hover()
    before = message.text_content()
    handle = cancel.element_handle()
    page.mouse.down()
    # Hold the button until at least one progress event has re-drawn the row.
    expect(message).not_to_have_text(before or "")
    page.mouse.up()
    expect(busy).to_have_attribute("data-status", "cancelled")
    assert handle.evaluate("(button) => button.isConnected") is False  # gone once cancelled
    status, body, _ = api(server.url, server.local_token, "GET", f"api/tasks/{task['taskId']}")
    assert status == 200 and body["task"]["taskStatus"] == "cancelled"


def test_filter_search_and_clear_finished(page: Page, tmp_path: Path) -> None:
    """All / active / finished / failed, a search by name, and "clear finished"."""
    # An engine nobody answers: its tasks wait between retries (active) for a minute.
    server = ZhiyiServer(tmp_path / "data", env={
        "OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1", "OPENAI_API_KEY": "sk-x",
        "RETRY_BASE_SECONDS": "60"}).start()
    try:
        _filter_search_and_clear(page, server, tmp_path)
    finally:
        server.stop()


def _filter_search_and_clear(page: Page, server: ZhiyiServer, tmp_path: Path) -> None:
    log_in(page, server)
    ids = {}
    for name, engine in (("alpha.txt", "pseudo"), ("beta.txt", "pseudo"),
                         ("gamma.txt", "openai"), ("waiting.txt", "openai")):
        doc = tmp_path / name
        doc.write_text(f"{name} says hello.")
        ids[name] = create_task(server.url, server.local_token, doc,
                                params={"targetLang": "fr", "engine": engine})["taskId"]
    api(server.url, server.local_token, "POST", f"api/tasks/{ids['gamma.txt']}/cancel")
    for name, status in (("alpha.txt", "completed"), ("beta.txt", "completed"),
                         ("gamma.txt", "cancelled")):
        expect(row(page, name)).to_have_attribute("data-status", status)
    visible = page.locator(".task:visible .task-name")
    page.click("#task-filter [data-filter=active]")
    expect(visible).to_have_text(["waiting.txt"])
    page.click("#task-filter [data-filter=finished]")
    expect(visible).to_have_text(["gamma.txt", "beta.txt", "alpha.txt"])
    page.fill("#task-search", "ALP")
    expect(visible).to_have_text(["alpha.txt"])
    page.click("#task-filter [data-filter=failed]")
    expect(visible).to_have_count(0)
    expect(page.locator("#tasks-none-shown")).to_be_visible()
    page.fill("#task-search", "")
    page.click("#task-filter [data-filter=all]")
    expect(visible).to_have_count(4)
    # Finished rows are compact: no progress bar.
    expect(row(page, "alpha.txt").locator("progress")).to_be_hidden()
    expect(row(page, "waiting.txt").locator("progress")).to_be_visible()
    shot(page, "22-filter-and-compact-rows")
    clear = page.locator("#clear-finished")
    clear.click()
    expect(clear).to_have_text("Delete 3 finished tasks?")
    clear.click()
    expect(visible).to_have_text(["waiting.txt"])
    _, listed, _ = api(server.url, server.local_token, "GET", "api/tasks")
    assert [t["fileName"] for t in listed["tasks"]] == ["waiting.txt"]
    expect(clear).to_be_hidden()


def test_retrying_is_not_pending(page: Page, tmp_path: Path) -> None:
    """Between automatic retries the badge says Retrying, with the attempt to come."""
    unreachable = f"http://127.0.0.1:{free_port()}/v1"
    server = ZhiyiServer(tmp_path / "data", env={
        "OPENAI_BASE_URL": unreachable, "OPENAI_API_KEY": "sk-x", "RETRY_BASE_SECONDS": "60",
        "MAX_ATTEMPTS": "3"}).start()
    try:
        log_in(page, server)
        create_task(server.url, server.local_token, slow_document(tmp_path / "later.txt", 2),
                    params={"targetLang": "zh", "engine": "openai"})
        waiting = row(page, "later.txt")
        expect(waiting.locator("[data-role=status]")).to_have_text("Retrying", timeout=60_000)
        expect(waiting).to_have_attribute("data-status", "pending")
        expect(waiting.locator("[data-role=message]")).to_contain_text(
            "retrying, attempt 2 of 3")
        shot(page, "23-retrying")
        page.click("#lang-switch")
        expect(waiting.locator("[data-role=status]")).to_have_text("重试中")
        expect(waiting.locator("[data-role=message]")).to_contain_text("第 2 次，共 3 次")
    finally:
        server.stop()


# ---------------------------------------------------------------- the phone
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_phone_shows_the_list_first(browser: Browser, server: ZhiyiServer, tmp_path: Path,
                                    lang: str) -> None:
    context = browser.new_context(locale="zh-CN" if lang == "zh" else "en-US",
                                  viewport={"width": 390, "height": 844}, is_mobile=True,
                                  has_touch=True)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        doc = tmp_path / "phone.txt"
        doc.write_text("A short note.")
        create_task(server.url, server.local_token, doc,
                    params={"targetLang": "fr", "engine": "pseudo"})
        log_in(page, server)
        expect(row(page, "phone.txt")).to_have_attribute("data-status", "completed")
        expect(page.locator("#upload-card")).to_be_hidden()
        tasks_top = page.locator("#tasks-title").bounding_box()
        assert tasks_top is not None and tasks_top["y"] < 300, tasks_top
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(page, f"24-phone-list-{lang}")
        toggle = page.locator("#new-task")
        expect(toggle).to_have_attribute("aria-expanded", "false")
        toggle.click()
        expect(toggle).to_have_attribute("aria-expanded", "true")
        expect(page.locator("#upload-card")).to_be_visible()
        expect(page.locator("#drop-zone")).to_be_visible()
        shot(page, f"25-phone-form-{lang}")
    finally:
        context.close()


def test_quote_before_start_and_start_disabled_past_the_balance(page: Page, server: ZhiyiServer,
                                                                tmp_path: Path) -> None:
    """Choosing a file quotes it (characters, credits, balance after); past the balance
    Start is disabled and says why. The form remembers its choices after a reload."""
    store_grant(server, -995)  # 5 credits left
    log_in(page, server)
    expect(page.locator("#credits")).to_have_text("Credits: 5")
    page.select_option("#param-engine", "pseudo")
    page.select_option("#param-targetLang", "ja")
    expect(page.locator("#param-targetLang option:checked")).to_have_text("Japanese (ja)")
    small = tmp_path / "small.txt"
    small.write_text("Hello there. " * 10)
    page.set_input_files("#file-input", str(small))
    quoted = page.locator("#quote-list li")
    expect(quoted).to_have_text(re.compile(
        r"^small\.txt: 1\d\d characters, 1 credit(; language: \w+)?, balance after: 4$"))
    expect(page.locator("#upload-submit")).to_be_enabled()
    page.locator("#file-list button").click()
    big = tmp_path / "big.txt"
    big.write_text("word " * 2000)  # 10,000 characters: 10 credits
    page.set_input_files("#file-input", str(big))
    expect(quoted.last).to_have_text("Not enough credits: 10 needed, your balance is 5.")
    expect(page.locator("#upload-submit")).to_be_disabled()
    shot(page, "26-quote-past-the-balance")
    # A grant pushed by the server enables Start without a reload.
    store_grant(server, 10)
    expect(page.locator("#upload-submit")).to_be_enabled()
    expect(quoted).to_contain_text("balance after: 5")
    # The form remembers the engine and the languages.
    page.reload()
    expect(page.locator("#param-engine")).to_have_value("pseudo")
    expect(page.locator("#param-targetLang")).to_have_value("ja")
    page.click("#lang-switch")
    expect(page.locator("#param-targetLang option:checked")).to_have_text("日语 (ja)")


def test_task_numbers_are_the_users_own(page: Page, server: ZhiyiServer, tmp_path: Path) -> None:
    """Another user's tasks do not move this user's numbers; the API keeps global ids."""
    other = add_user(server.data_dir, "other", 100)
    doc = tmp_path / "theirs.txt"
    doc.write_text("Not yours.")
    for _ in range(3):
        create_task(server.url, other, doc, params={"targetLang": "fr", "engine": "pseudo"})
    log_in(page, server)
    mine = tmp_path / "mine.txt"
    mine.write_text("The committee met on Tuesday to discuss the budget for next year. "
                    "Everyone agreed that the library needs new windows before the winter.")
    task = create_task(server.url, server.local_token, mine,
                       params={"targetLang": "fr", "engine": "pseudo"})
    assert task["taskId"] == 4 and task["userTaskNo"] == 1
    # The number is the user's own; with sourceLang auto the language found is shown.
    expect(row(page, "mine.txt").locator("[data-role=kind]")).to_have_text(
        "#1 · Translate · English → French · pseudo")
    expect(page.locator(".toast").first).to_have_text("1 credit charged for task #1")


# ------------------------------------------------------------ accessibility
AXE = REPO / "tests" / "vendor" / "axe.min.js"  # axe-core 4.14.1 from npm (MPL-2.0), unchanged


def _axe_problems(page: Page) -> list[str]:
    """Serious and critical axe-core violations of the page as it is now."""
    page.evaluate(AXE.read_text(encoding="utf-8"))
    found = page.evaluate("""async () => {
      const result = await axe.run(document, {resultTypes: ['violations']});
      return result.violations.filter((v) => ['serious', 'critical'].includes(v.impact))
        .map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(' ')).join(', ')}`);
    }""")
    return list(found)


@pytest.mark.parametrize("lang,width", [("en", 1100), ("zh", 1100), ("en", 390)],
                         ids=["en", "zh", "phone"])
def test_no_serious_accessibility_violation(browser: Browser, server: ZhiyiServer,
                                            tmp_path: Path, lang: str, width: int) -> None:
    """axe-core over the login box, the list with a finished and a failed task, and the
    open form: no serious or critical violation (color contrast, names, labels...)."""
    context = browser.new_context(locale="zh-CN" if lang == "zh" else "en-US",
                                  viewport={"width": width, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(server.url + "/")
        expect(page.locator("#login")).to_be_visible()
        assert _axe_problems(page) == []
        doc = tmp_path / "ok.txt"
        doc.write_text("Fine.")
        create_task(server.url, server.local_token, doc,
                    params={"targetLang": "fr", "engine": "pseudo"})
        log_in(page, server)
        expect(row(page, "ok.txt")).to_have_attribute("data-status", "completed")
        if width < 900:
            page.click("#new-task")
        assert _axe_problems(page) == []
        # The language button's accessible name begins with its visible text.
        switch = page.locator("#lang-switch")
        name = switch.get_attribute("aria-label") or ""
        assert name.startswith(switch.inner_text())
        # The check can fail: a button without a name is reported.
        page.evaluate("document.querySelector('#task-list').append(document.createElement('button'))")
        assert any(p.startswith("button-name (critical)") for p in _axe_problems(page))
    finally:
        context.close()


def test_server_texts_of_the_form_in_chinese(page: Page, server: ZhiyiServer) -> None:
    """The task type's description, its cost rule, the parameters' hints and choices
    the server sends in English are said in Chinese on a Chinese page."""
    log_in(page, server)
    expect(page.locator("#type-description")).to_have_text(
        "Translates the document segment by segment, keeping its format")
    page.click("#lang-switch")
    expect(page.locator("#type-description")).to_have_text("逐段翻译文档，保留原有格式")
    expect(page.locator("#cost-rule")).to_have_text("费用：每 1,000 个字符 1 积分，至少 1 积分")
    form = page.locator("#upload-form")
    hints = " ".join(form.locator(".hint").all_inner_texts())
    choices = " ".join(form.locator("select:not(#param-targetLang):not(#param-sourceLang) "
                                    "option").all_inner_texts())
    assert not re.search(r"\b(the|of|to|or|use|ignore|source)\b", hints + " " + choices), (
        hints, choices)
    shot(page, "27-zh-form")
