"""The ``zhiyi`` command: every subcommand, its parser and its messages, in one place.

The command-line layer sits above the others and only calls into them: the server's app
and settings (zhiyi_server.py, zhiyi_config.py), the store (storage.py), backups
(backup.py), engines (engines.py) and the HTTP client (client.py). Server-side commands (``serve``,
``worker``, ``user``, ``backup``, ``restore``) work on a data folder (``--data``, else
``DATA_STORAGE_PATH``, else ./data) and, but for ``serve`` and ``restore``, refuse one
without a database; client-side commands (``submit``, ``tasks``, ``login``, ``quote``,
``result``, ``watch``, ``cancel``, ``retry``, ``rm``) speak HTTP to a server. A failure is
one line on stderr that names the next step, with exit status 1 (2: bad usage).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import getpass
import logging
import os
import re
import sqlite3
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

import zhiyi_modules

zhiyi_modules.refuse_shadowed_modules("zhiyi_server", "client")

import backup
import engines
from client import (
    DEFAULT_SERVER,
    Settings,
    ZhiyiClient,
    ZhiyiError,
    config_path,
    resolve_settings,
    status_data,
    write_config,
)
from storage import (
    AmbiguousTokenPrefix,
    InsufficientCredits,
    StoreError,
    TaskStore,
    UserExists,
    UserNotFound,
    check_sqlite_version,
    isoformat,
    open_store,
)
from worker import make_private_dirs
from zhiyi_server import (
    LOCAL_TOKEN_FILE,
    LOCAL_USER,
    LOOPBACK_HOSTS,
    USER_NAME,
    CliError,
    Config,
    ConfigError,
    Setting,
    _worker_processes_ctx,
    create_app,
    create_worker_app,
    engine_statuses,
    parse_setting,
    run_worker_app,
    setting_kind,
    settings_table,
    shown_default,
)

__all__ = ["CliError", "build_parser", "main", "settings_markdown"]

logger = logging.getLogger("zhiyi_server")  # the server's log lines keep their logger name

#: the next step when a user has too few credits
MORE_CREDITS = ("ask the server's administrator to run "
                "'zhiyi user credit NAME AMOUNT' on the server")


# --------------------------------------------------------------- data folder
def _server_config(args: argparse.Namespace, **overrides: Any) -> Config:
    """The settings of a server-side command: ``--data`` wins over ``DATA_STORAGE_PATH``."""
    data = getattr(args, "data", None)
    config = Config.from_env(**{"data_path": Path(data) if data else None, **overrides})
    if config.data_path.exists() and not config.data_path.is_dir():
        raise CliError(f"{config.data_path} is a file, not a folder; give the data folder "
                       "(where `zhiyi serve` keeps zhiyi.db) with --data or DATA_STORAGE_PATH")
    return config


def _data_was_named(args: argparse.Namespace) -> bool:
    """Whether the data folder (or database) was chosen, not the ./data default."""
    return bool(getattr(args, "data", None) or os.environ.get("DATA_STORAGE_PATH")
                or os.environ.get("ZHIYI_DB"))


def _require_database(config: Config) -> None:
    """Refuse a data folder without a database: opening one would create it, empty."""
    if config.database_url:
        return  # PostgreSQL: the server made the tables; a wrong URL fails with its name
    check_sqlite_version()
    if not config.database.exists():
        raise CliError(
            f"no Zhiyi database in {config.database.parent.resolve()} (looked for "
            f"{config.database.name}); give the server's data folder with --data or "
            "DATA_STORAGE_PATH, or start a server there first with `zhiyi serve`")


async def _with_store(config: Config, action: Callable[[TaskStore], Awaitable[Any]]) -> Any:
    store = await open_store(config.database, config.database_url)
    try:
        return await action(store)
    finally:
        await store.close()


DATA_FOLDER_MARK = ".zhiyi-data-id"


async def _mark_data_folder(config: Config, *, create: bool) -> None:
    """The server writes the database's id into its data folder; a worker checks it.

    A worker on another host whose ``DATA_STORAGE_PATH`` is not the shared folder
    would fail every task on missing files: it refuses to start instead.
    """
    expected = await _with_store(config, lambda store: store.data_folder_id())
    mark = config.data_path / DATA_FOLDER_MARK
    found = mark.read_text().strip() if mark.is_file() else None
    if found is None and create:
        mark.write_text(expected + "\n")
        return
    if found != expected:
        raise CliError(f"{config.data_path} is not the data folder of this database "
                       f"({DATA_FOLDER_MARK} is {'missing' if found is None else 'different'});"
                       " every process needs the same DATA_STORAGE_PATH (a shared folder across "
                       "hosts)")


async def _user_add(store: TaskStore, name: str, credits: int, admin: bool = False) -> str:
    if not USER_NAME.fullmatch(name):
        raise CliError("user names are 1-64 letters, digits, '_', '.', '@' or '-'")
    try:
        await store.add_user(name, credits, admin=admin)
    except UserExists as e:
        raise CliError(f"user {name!r} already exists") from e
    return await store.issue_token(name)


async def _user_token(store: TaskStore, name: str, rotate: bool = False) -> str:
    try:
        return await store.issue_token(name, rotate=rotate)
    except UserNotFound as e:
        raise CliError(f"no user named {name!r}") from e


MIN_TOKEN_PREFIX = 6


async def _user_revoke(store: TaskStore, name: str, prefix: str | None) -> str:
    if prefix is not None and len(prefix) < MIN_TOKEN_PREFIX:
        raise CliError(f"give at least {MIN_TOKEN_PREFIX} characters of the token to revoke")
    try:
        count = await store.revoke_tokens(name, prefix)
    except UserNotFound as e:
        raise CliError(f"no user named {name!r}") from e
    except AmbiguousTokenPrefix as e:
        raise CliError(f"{e.matches} tokens of {name} start with {prefix!r}; "
                       "give more characters") from e
    if prefix is not None and count == 0:
        raise CliError(f"no token of {name} starts with {prefix!r}")
    return f"revoked {count} token(s) and session(s) of {name}"


async def _user_tokens(store: TaskStore, name: str) -> str:
    try:
        tokens = await store.list_tokens(name)
    except UserNotFound as e:
        raise CliError(f"no user named {name!r}") from e
    now = isoformat(store.now())
    lines = ["prefix\tkind\tcreated\tlast used\texpires"]
    for t in tokens:
        expires = t.expires_at or "never"
        if t.expires_at is not None and t.expires_at <= now:
            expires += " (expired)"
        lines.append(f"{t.token_prefix or '(older token)'}\t{t.kind}\t{t.created_at}\t"
                     f"{t.last_used_at or '-'}\t{expires}")
    return "\n".join(lines)


async def _user_disable(store: TaskStore, name: str, disabled: bool) -> str:
    try:
        await store.set_user_disabled(name, disabled)
    except UserNotFound as e:
        raise CliError(f"no user named {name!r}") from e
    if disabled:
        return f"disabled {name}: no token or session of theirs works until `zhiyi user enable`"
    return f"enabled {name}"


async def _user_admin(store: TaskStore, name: str, admin: bool) -> str:
    try:
        await store.set_user_admin(name, admin)
    except UserNotFound as e:
        raise CliError(f"no user named {name!r}") from e
    if admin:
        return f"{name} is an administrator: the admin page is /admin on the server"
    return f"{name} is no longer an administrator"


async def _user_list(store: TaskStore, usage: bool) -> str:
    users = await store.list_users()
    spent = await store.user_usage() if usage else {}
    lines = ["user\tcredits\ttasks\tcredits spent\trole"] if usage else []
    for user in users:
        flags = ("\tadmin" if user.is_admin else "") + ("\tdisabled" if user.disabled_at else "")
        if usage:
            tasks, credits_spent = spent.get(user.id, (0, 0))
            lines.append(f"{user.id}\t{user.credits}\t{tasks}\t{credits_spent}"
                         f"\t{'admin' if user.is_admin else 'user'}"
                         + ("\tdisabled" if user.disabled_at else ""))
        else:
            lines.append(f"{user.id}\t{user.credits}{flags}")
    return "\n".join(lines)


async def _user_credit(store: TaskStore, name: str, amount: int) -> int:
    try:
        return await store.grant_credits(name, amount)
    except UserNotFound as e:
        raise CliError(f"no user named {name!r}") from e
    except InsufficientCredits as e:
        raise CliError(f"{name} has only {e.balance} credits") from e


async def _local_login_token(config: Config) -> str | None:
    """For a loopback server: make the local user if there are no users; its token."""

    async def action(store: TaskStore) -> str | None:
        users = await store.list_users()
        if not users:
            await store.add_user(LOCAL_USER, config.starter_credits)
            logger.info("created the local user %r with %d credits",
                        LOCAL_USER, config.starter_credits)
        elif all(u.id != LOCAL_USER for u in users):
            return None
        token_file = config.data_path / LOCAL_TOKEN_FILE
        if token_file.exists():
            token = token_file.read_text().strip()
            if await store.user_for_token(token) == LOCAL_USER:
                return token
        token = await store.issue_token(LOCAL_USER)
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        return token

    return await _with_store(config, action)


def _serve_command(args: argparse.Namespace) -> int:
    """``zhiyi serve``: the one command that may make a new data folder and database."""
    flags = {f.name: getattr(args, f.name) for f in settings_table()
             if f.metadata["setting"].flag}
    config = _server_config(args, **flags)
    make_private_dirs(config.data_path)
    if config.data_path.stat().st_mode & 0o077:
        logger.warning("%s can be read by other users of this machine; "
                       "`chmod 700` it to keep documents private", config.data_path)
    processes = config.worker_process_count
    if processes:
        config = dataclasses.replace(config, run_workers=False)
    asyncio.run(_mark_data_folder(config, create=True))
    token = None
    if config.host in LOOPBACK_HOSTS:
        token = asyncio.run(_local_login_token(config))
    host_for_url = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{host_for_url}:{config.port}/"
    login = f"{url}?token={token}" if token else url

    def announce(_: str) -> None:
        print(f"Zhiyi is running. Open {login}", flush=True)
        if token is None:
            print(f"Log in with a token from `zhiyi user token NAME --data {config.data_path}` "
                  "(new users: `zhiyi user add NAME --credits N`).", flush=True)
        print(f"Data: {config.data_path.resolve()}  (Ctrl-C to stop)", flush=True)

    app = create_app(config)
    if processes:
        app.cleanup_ctx.append(_worker_processes_ctx(processes, config))
    try:
        web.run_app(app, host=config.host, port=config.port, print=announce,
                    access_log=None, shutdown_timeout=5)
    except OSError as e:
        raise CliError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}"
                       + _listen_hint(e, config)) from e
    return 0


def _listen_hint(error: OSError, config: Config) -> str:
    """The next step after a failed listen: another port, or another address."""
    if error.errno == errno.EADDRINUSE:
        return (f"; is Zhiyi already running there? Stop it, or choose another port with "
                f"--port {config.port + 1} (or ZHIYI_PORT)")
    if error.errno in (errno.EACCES, errno.EPERM):
        return "; ports below 1024 need privileges: choose one above with --port"
    if error.errno == errno.EADDRNOTAVAIL:
        return "; this machine has no such address: choose one with --host (or ZHIYI_HOST)"
    return "; choose another address with --host or port with --port"


def _worker_command(args: argparse.Namespace) -> int:
    config = _server_config(args)
    if not config.data_path.is_dir():
        raise CliError(f"no data folder {config.data_path.resolve()} here; a worker needs "
                       "the server's (--data or DATA_STORAGE_PATH; a shared folder across "
                       "hosts), and `zhiyi serve` makes it")
    _require_database(config)
    asyncio.run(_mark_data_folder(config, create=False))
    # Started by ``zhiyi serve``: tell it on stdout when the workers run.
    ready = (lambda: print("READY", flush=True)) if args.parent_pid is not None else None
    asyncio.run(run_worker_app(create_worker_app(config), parent_pid=args.parent_pid,
                               on_ready=ready))
    return 0


def _user_command(args: argparse.Namespace) -> int:
    config = _server_config(args)
    creating = (args.user_command == "add" and not config.database_url
                and not config.database.exists())
    # `user add` may start a database before the first `zhiyi serve`, but only in a folder
    # named on purpose: run from another folder, the ./data default would make an empty
    # one there and print a token the running server rejects.
    if not creating or not _data_was_named(args):
        _require_database(config)
    if args.user_command == "add":
        token = asyncio.run(_with_store(
            config, lambda s: _user_add(s, args.name, args.credits, args.admin)))
        if creating:
            print(f"zhiyi: made a new database in {config.data_path.resolve()}; start the "
                  f"server on it with `zhiyi serve --data {config.data_path}`",
                  file=sys.stderr)
        print(f"created user {args.name} with {args.credits} credits; API token:")
        print(token)
        if args.credits == 0:
            print(f"zhiyi: {args.name} has no credits yet: give some with "
                  f"`zhiyi user credit {args.name} N`", file=sys.stderr)
        return 0
    if args.user_command == "token":
        print(asyncio.run(_with_store(
            config, lambda s: _user_token(s, args.name, rotate=args.rotate))))
    elif args.user_command == "credit":
        balance = asyncio.run(_with_store(
            config, lambda s: _user_credit(s, args.name, args.amount)))
        print(f"{args.name}: {balance} credits")
    elif args.user_command == "admin":
        print(asyncio.run(_with_store(
            config, lambda s: _user_admin(s, args.name, not args.remove))))
    elif args.user_command == "tokens":
        print(asyncio.run(_with_store(config, lambda s: _user_tokens(s, args.name))))
    elif args.user_command == "revoke":
        print(asyncio.run(_with_store(config, lambda s: _user_revoke(s, args.name, args.token))))
    elif args.user_command in ("disable", "enable"):
        print(asyncio.run(_with_store(
            config, lambda s: _user_disable(s, args.name, args.user_command == "disable"))))
    else:
        listed = asyncio.run(_with_store(config, lambda s: _user_list(s, args.usage)))
        if listed:
            print(listed)
    return 0


def _backup_command(args: argparse.Namespace) -> int:
    config = _server_config(args)
    if config.database_url and not args.files_only:
        raise CliError("the database is PostgreSQL (ZHIYI_DATABASE_URL): back it up with "
                       "pg_dump, and the documents with `zhiyi backup DEST --files-only`")
    if not args.files_only:
        _require_database(config)
    database = None if args.files_only else config.database
    try:
        report = backup.backup(config.data_path, database, Path(args.dest))
    except (backup.BackupError, OSError, sqlite3.Error) as e:
        raise CliError(f"backup failed: {e}") from e
    print(f"backed up {report.tasks} tasks ({report.task_folders} folders, "
          f"{report.bytes / 1e6:.1f} MB) to {args.dest}")
    if report.missing:
        print(f"{len(report.missing)} task(s) were removed while the backup ran "
              "and are kept without their files")
    return 0


def _restore_command(args: argparse.Namespace) -> int:
    config = _server_config(args)
    if config.database_url:
        raise CliError("the database is PostgreSQL (ZHIYI_DATABASE_URL): restore it with "
                       "pg_restore or psql, and copy the documents of a --files-only "
                       "backup into DATA_STORAGE_PATH")
    try:
        report = backup.restore(Path(args.src), config.data_path, config.database)
    except (backup.BackupError, OSError, sqlite3.Error) as e:
        raise CliError(f"restore failed: {e}") from e
    print(f"restored {report.tasks} tasks into {config.data_path}; {report.requeued} "
          "unfinished task(s) resume when the server starts (zhiyi serve)")
    return 0


def _engine_command(args: argparse.Namespace) -> int:
    """``zhiyi engine install argos FROM TO [--file MODEL]``, ``zhiyi engine status``."""
    if args.engine_command == "status":
        for engine in engine_statuses(Config.from_env()):
            state = "available" if engine["available"] else f"not available: {engine['reason']}"
            print(f"{engine['name']}\t{state}")
        return 0
    try:
        print(engines.install_argos(args.source.strip().lower(), args.target.strip().lower(),
                                    Path(args.file) if args.file else None))
    except engines.EngineError as e:
        raise CliError(str(e)) from e
    return 0



class _UsageError(Exception):
    """Bad usage: exit status 2."""


def _fail(message: str) -> int:
    print(f"zhiyi: {message}", file=sys.stderr, flush=True)
    return 1


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the client's errors into one line on stderr and the contract's exit status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except _UsageError as e:
            print(f"zhiyi {args.command}: error: {e}", file=sys.stderr, flush=True)
            return 2
        except ZhiyiError as e:
            if e.status == 402:  # the server's sentence says how many; this says what next
                return _fail(f"{e.message} To get more, {MORE_CREDITS}.")
            if e.code == "network_error":
                return _fail(f"{e.message}; is `zhiyi serve` running there? (the server is "
                             "set with --server, ZHIYI_SERVER or `zhiyi login`)")
            return _fail(e.message)
        except OSError as e:
            return _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))

    run.__doc__ = fn.__doc__
    return run


def _settings(args: argparse.Namespace, *, need_token: bool = True) -> Settings:
    settings = resolve_settings(args.server, args.token)
    if not re.match(r"https?://[^/]", settings.server, re.IGNORECASE):
        source = ("--server" if args.server else "ZHIYI_SERVER"
                  if os.environ.get("ZHIYI_SERVER") else f"the server in {config_path()}")
        raise _UsageError(f"{source} must start with http:// or https://, e.g. "
                          f"http://{settings.server.split('://')[-1]} (not {settings.server!r})")
    if need_token and not settings.token:
        raise _UsageError("no token: pass --token, set ZHIYI_TOKEN, or run 'zhiyi login'")
    return settings


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None,
                        help=f"server URL (env ZHIYI_SERVER, the config file, {DEFAULT_SERVER})")
    parser.add_argument("--token", default=None,
                        help="API token (env ZHIYI_TOKEN, or the config file of 'zhiyi login')")


# -------------------------------------------------------------------- submit
@dataclass
class _Submission:
    """What is known so far, for the Ctrl-C handler."""

    idempotency_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    task_id: int | None = None


def run_submit(args: argparse.Namespace) -> int:
    """``zhiyi submit``: upload, follow with a progress bar, download; 1 if it did not complete."""
    settings = _settings(args)
    submission = _Submission()
    try:
        return asyncio.run(_submit(args, settings, submission))
    except KeyboardInterrupt:
        return _interrupted(settings, submission)


async def _submit(args: argparse.Namespace, settings: Settings, submission: _Submission) -> int:
    async with ZhiyiClient(settings.server, settings.token) as client:
        task = await client.create_task(args.file, args.task_type, dict(args.param),
                                        idempotency_key=submission.idempotency_key)
        task_id = submission.task_id = int(task["taskId"])
        _say(f"task {task_id} created ({task['creditsCost']} credits)")
        final = await _follow_with_progress(client, task)
        status = final.get("status")
        if status == "completed":
            out = Path(args.output) if args.output else Path.cwd()
            saved = await client.download_result(task_id, out)
            _say(f"saved {saved}")
            return 0
        if status == "failed":
            return _fail(f"task {task_id} failed: {final.get('error') or final.get('message')}")
        if status == "cancelled":
            return _fail(f"task {task_id} was cancelled")
        return _fail(f"task {task_id} was deleted")


def _say(text: str) -> None:
    print(text, flush=True)


async def _follow_with_progress(client: ZhiyiClient, task: dict[str, Any]) -> dict[str, Any]:
    """Follow the task's stream, showing progress; returns the final status data."""
    final: dict[str, Any] = status_data(task)
    with _progress_display(task["fileName"]) as show:
        show(final)
        events = client.follow(task["taskId"], on_reconnect=lambda reason, delay: show(
            {**final, "message": f"connection lost; reconnecting in {delay:.0f} s"}))
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                if event.type == "task_deleted":
                    return {"status": "deleted"}
                if event.type in ("status_update", "reset"):
                    final = event.data
                    show(final)
    return final


@contextlib.contextmanager
def _progress_display(name: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar on a terminal; plain lines (on change) otherwise."""
    if not sys.stdout.isatty():
        last: list[tuple[Any, ...]] = []

        def plain(data: dict[str, Any]) -> None:
            line = (data.get("status"), int(data.get("progress") or 0), data.get("message"))
            if not last or last[-1] != line:
                last[:] = [line]
                status, percent, message = line
                detail = f": {message}" if message and message != status else ""
                print(f"[{percent:3d}%] {status}{detail}", flush=True)

        yield plain
        return

    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task(name, total=100, status="")

        def fancy(data: dict[str, Any]) -> None:
            status, message = data.get("status") or "", data.get("message") or ""
            text = status if message in ("", status) else f"{status} · {message}"
            progress.update(bar, completed=float(data.get("progress") or 0), status=text)

        yield fancy


def _interrupted(settings: Settings, submission: _Submission) -> int:
    """Ctrl-C: offer to cancel the task on the server, or leave it running."""
    if submission.task_id is None:
        return _fail("interrupted before the task was created")
    try:
        answer = input("\nCancel the task on the server? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        print(f"task {submission.task_id} is still running on the server: follow it with "
              f"'zhiyi watch {submission.task_id}', fetch it later with "
              f"'zhiyi result {submission.task_id}'", flush=True)
        return 130

    async def cancel() -> None:
        async with ZhiyiClient(settings.server, settings.token) as client:
            await client.cancel(submission.task_id or 0)

    try:
        asyncio.run(cancel())
    except ZhiyiError as e:
        return _fail(f"could not cancel task {submission.task_id}: {e.message}")
    return _fail(f"task {submission.task_id} was cancelled")


# --------------------------------------------------------------------- tasks
def run_tasks(args: argparse.Namespace) -> int:
    """``zhiyi tasks``: the user's tasks, newest first (a table; tab-separated when piped)."""
    if args.limit < 1:
        raise _UsageError("--limit must be at least 1")
    settings = _settings(args)

    async def fetch() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        async with ZhiyiClient(settings.server, settings.token) as client:
            listed = client.iter_tasks(args.status, min(args.limit, 100),
                                       every_user=args.all)
            async with contextlib.aclosing(listed) as tasks:
                async for task in tasks:
                    found.append(task)
                    if len(found) >= args.limit:
                        break
        return found

    _print_tasks(asyncio.run(fetch()), every_user=args.all)
    return 0


TASK_COLUMNS = ("id", "status", "progress", "type", "file", "credits", "created", "message")


def _task_row(task: dict[str, Any]) -> tuple[str, ...]:
    message = task.get("errorMessage") or task.get("statusMessage") or ""
    return (str(task["taskId"]), task["taskStatus"], f"{task.get('progressPercent', 0)}%",
            task["taskType"], task["fileName"], str(task.get("creditsCost", "")),
            str(task.get("createdAt") or "")[:19].replace("T", " "), message)


def _print_tasks(tasks: list[dict[str, Any]], every_user: bool = False) -> None:
    columns = ("user", *TASK_COLUMNS) if every_user else TASK_COLUMNS

    def row(task: dict[str, Any]) -> tuple[str, ...]:
        return (str(task.get("userId", "")), *_task_row(task)) if every_user else _task_row(task)

    if not sys.stdout.isatty():
        print("\t".join(columns))
        for task in tasks:
            print("\t".join(c.replace("\t", " ") for c in row(task)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, title=f"{len(tasks)} tasks")
    for task in tasks:
        table.add_row(*row(task))
    Console().print(table)


# --------------------------------------------------------------------- login
def run_login(args: argparse.Namespace) -> int:
    """``zhiyi login``: check the token against the server, then save both in the config file."""
    settings = _settings(args, need_token=False)
    token = args.token or os.environ.get("ZHIYI_TOKEN")
    if not token and sys.stdin.isatty():
        token = getpass.getpass("API token: ").strip()
    if not token:
        raise _UsageError("pass --token (or set ZHIYI_TOKEN)")
    settings = Settings(settings.server, token)

    async def check() -> dict[str, Any]:
        async with ZhiyiClient(settings.server, token) as client:
            return await client.me()

    try:
        who = asyncio.run(check())
    except ZhiyiError as e:
        if e.status == 401:
            return _fail(f"that token is not valid on {settings.server}")
        raise
    path = config_path()
    write_config(path, settings)
    print(f"logged in to {settings.server} as {who.get('userId')} "
          f"({who.get('credits')} credits); saved {path}")
    return 0


# ------------------------------------------------- one task: quote, result, watch, actions
def _run(settings: Settings, action: Callable[[ZhiyiClient], Awaitable[int]]) -> int:
    async def go() -> int:
        async with ZhiyiClient(settings.server, settings.token) as client:
            return await action(client)

    return asyncio.run(go())


def _not_found(task_id: int) -> str:
    return f"there is no task {task_id} of yours on this server; 'zhiyi tasks' lists them"


def run_quote(args: argparse.Namespace) -> int:
    """``zhiyi quote FILE``: the cost, the memory hits and the balance after, nothing kept."""
    settings = _settings(args)

    async def action(client: ZhiyiClient) -> int:
        quote = await client.quote(args.file, args.task_type, dict(args.param))
        balance = (await client.me())["credits"]
        memory = quote.get("fromMemory") or 0
        parts = [f"{quote['characters']} characters" if quote.get("characters") is not None
                 else None,
                 f"{memory} segment(s) from translation memory (free)" if memory else None]
        detail = ", ".join(p for p in parts if p)
        print(f"{args.file.name}: {quote['credits']} credits"
              + (f" ({detail})" if detail else "")
              + f"; balance {balance}, after: {balance - quote['credits']}")
        if quote["credits"] > balance:
            return _fail(f"not enough credits: {quote['credits']} needed, {balance} left; "
                         "ask the server's administrator for more "
                         "('zhiyi user credit NAME AMOUNT' on the server)")
        return 0

    return _run(settings, action)


def run_result(args: argparse.Namespace) -> int:
    """``zhiyi result ID``: download a completed task's result."""
    settings = _settings(args)

    async def action(client: ZhiyiClient) -> int:
        try:
            saved = await client.download_result(args.task_id, Path(args.output or Path.cwd()))
        except ZhiyiError as e:
            if e.status == 404:
                return _fail(_not_found(args.task_id))
            if e.code == "not_completed" or e.status == 409:
                return _fail(f"task {args.task_id} has not completed ({e.message}); follow it "
                             f"with 'zhiyi watch {args.task_id}'")
            if e.status == 410:
                return _fail(f"the result of task {args.task_id} was deleted after the "
                             "retention period; submit the document again")
            raise
        _say(f"saved {saved}")
        return 0

    return _run(settings, action)


def run_watch(args: argparse.Namespace) -> int:
    """``zhiyi watch ID``: follow a task with a progress bar until it ends."""
    settings = _settings(args)

    async def action(client: ZhiyiClient) -> int:
        try:
            task = await client.get_task(args.task_id)
        except ZhiyiError as e:
            if e.status == 404:
                return _fail(_not_found(args.task_id))
            raise
        final = await _follow_with_progress(client, task)
        status = final.get("status")
        if status == "completed":
            _say(f"task {args.task_id} completed; download it with "
                 f"'zhiyi result {args.task_id}'")
            return 0
        if status == "failed":
            return _fail(f"task {args.task_id} failed: "
                         f"{final.get('error') or final.get('message')}; "
                         f"'zhiyi retry {args.task_id}' runs it again")
        return _fail(f"task {args.task_id} was {status or 'deleted'}")

    return _run(settings, action)


def run_task_action(args: argparse.Namespace) -> int:
    """``zhiyi cancel|retry|rm ID``."""
    settings = _settings(args)

    async def action(client: ZhiyiClient) -> int:
        try:
            if args.command == "rm":
                await client.delete(args.task_id)
                _say(f"task {args.task_id} deleted")
                return 0
            task = await (client.cancel if args.command == "cancel" else client.retry)(
                args.task_id)
        except ZhiyiError as e:
            if e.status == 404:
                return _fail(_not_found(args.task_id))
            if e.status == 409:
                return _fail(f"cannot {args.command} task {args.task_id}: {e.message}")
            if e.status == 402:
                return _fail(f"{e.message} Ask the server's administrator for credits "
                             "('zhiyi user credit NAME AMOUNT' on the server).")
            raise
        credits = ("refunded" if args.command == "cancel"
                   else f"{task.get('creditsCost')} credits charged")
        _say(f"task {args.task_id} is {task['taskStatus']} ({credits})"
             + (f"; follow it with 'zhiyi watch {args.task_id}'" if args.command == "retry"
                else ""))
        return 0

    return _run(settings, action)


# -------------------------------------------------------------------- config
SETTING_TYPES = {"int": "whole number", "float": "number", "str": "text", "Path": "path"}
README_TABLE_START = "<!-- settings table: generated by `zhiyi config --readme README.md` -->"
README_TABLE_END = "<!-- end of settings table -->"


def _setting_type(field: dataclasses.Field[Any]) -> str:
    row: Setting = field.metadata["setting"]
    kind = SETTING_TYPES[setting_kind(field)]
    if row.minimum is not None and row.minimum > 0:
        return f"{kind} ≥ {row.minimum:g}"
    return kind if kind in ("text", "path") else f"{kind} ≥ 0"


def settings_markdown() -> str:
    """The README's configuration table, made from :class:`zhiyi_server.Config`."""
    lines = ["| variable | `serve` flag | type | default | meaning |", "|---|---|---|---|---|"]
    for f in settings_table():
        row: Setting = f.metadata["setting"]
        default = shown_default(f)
        if default != "—" and not default.startswith("`") and " " not in default:
            default = f"`{default}`"
        flag = f"`{row.flag}`" if row.flag else ""
        lines.append(f"| `{row.env}` | {flag} | {_setting_type(f)} | {default} | {row.help} |")
    return "\n".join(lines) + "\n"


def _replace_readme_table(text: str) -> str:
    before, start, rest = text.partition(README_TABLE_START)
    _, end, after = rest.partition(README_TABLE_END)
    if not start or not end:
        raise CliError(f"the README has no settings table between {README_TABLE_START!r} "
                       f"and {README_TABLE_END!r}; add the two lines where it belongs")
    return f"{before}{start}\n{settings_markdown()}{end}{after}"


def _config_command(args: argparse.Namespace) -> int:
    """``zhiyi config``: the settings this process would use; ``--markdown``: the table."""
    if args.readme:
        path = Path(args.readme)
        path.write_text(_replace_readme_table(path.read_text(encoding="utf-8")),
                        encoding="utf-8")
        print(f"wrote the settings table into {path}")
        return 0
    if args.markdown:
        print(settings_markdown(), end="")
        return 0
    config = Config.from_env()
    for f in settings_table():
        env = f.metadata["setting"].env
        value = getattr(config, f.name)
        secret = env.endswith(("_KEY", "_SECRET")) and value is not None
        print(f"{env}={'(set)' if secret else '' if value is None else value}")
    return 0


# -------------------------------------------------------------------- parser
def _flag_type(field: dataclasses.Field[Any], flag: str) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            return parse_setting(field, raw, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return parse


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    """``zhiyi serve``'s flags, from the settings table."""
    for f in settings_table():
        row: Setting = f.metadata["setting"]
        if row.flag:
            parser.add_argument(row.flag, dest=f.name, default=None, type=_flag_type(f, row.flag),
                                metavar=row.flag.lstrip("-").upper(),
                                help=f"{row.help} ({row.env}; default {shown_default(f)})")


def _settings_epilog() -> str:
    lines = ["settings (environment variables; a flag above wins):"]
    for f in settings_table():
        row: Setting = f.metadata["setting"]
        lines.append(f"  {row.env} = {shown_default(f).strip('`')}")
    lines.append("`zhiyi config --markdown` explains each; `zhiyi config` shows the values "
                 "in use")
    return "\n".join(lines)


def _data_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None,
                        help="the data folder (DATA_STORAGE_PATH; default ./data)")


def _server_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the server",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=_settings_epilog())
    _setting_flags(serve)
    serve.set_defaults(run=_serve_command)
    worker = commands.add_parser("worker", help="run workers only (no HTTP), on the same data")
    _data_arg(worker)
    worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    worker.set_defaults(run=_worker_command)
    user = commands.add_parser("user", help="manage users")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    add = user_commands.add_parser("add", help="create a user and print a token")
    add.add_argument("name")
    add.add_argument("--credits", type=int, default=0)
    add.add_argument("--admin", action="store_true",
                     help="an administrator: the admin page (/admin) and API")
    admin = user_commands.add_parser("admin", help="make a user an administrator")
    admin.add_argument("name")
    admin.add_argument("--remove", action="store_true", help="no longer an administrator")
    token = user_commands.add_parser("token", help="issue another token")
    token.add_argument("name")
    token.add_argument("--rotate", action="store_true",
                       help="revoke every other token and session of the user")
    credit = user_commands.add_parser("credit", help="grant or take credits")
    credit.add_argument("name")
    credit.add_argument("amount", type=int)
    revoke = user_commands.add_parser(
        "revoke", help="revoke the user's tokens and sessions (all, or one with --token)")
    revoke.add_argument("name")
    revoke.add_argument("--token", metavar="PREFIX", default=None,
                        help="the first characters (at least 6) of the one token to revoke")
    tokens = user_commands.add_parser(
        "tokens", help="the user's tokens and sessions: first characters, kind, dates")
    tokens.add_argument("name")
    disable = user_commands.add_parser("disable", help="no token of the user works until enabled")
    disable.add_argument("name")
    enable = user_commands.add_parser("enable", help="undo `user disable`")
    enable.add_argument("name")
    listing = user_commands.add_parser("list", help="users and balances")
    listing.add_argument("--usage", action="store_true",
                         help="with tasks, credits spent and role (a header line first)")
    for sub in user_commands.choices.values():
        _data_arg(sub)
    user.set_defaults(run=_user_command)
    save = commands.add_parser("backup", help="copy the database and documents to DEST "
                               "(safe while the server runs)")
    save.add_argument("dest", help="a new or empty folder")
    save.add_argument("--files-only", action="store_true",
                      help="documents only (PostgreSQL: back the database up with pg_dump)")
    save.set_defaults(run=_backup_command)
    load = commands.add_parser("restore", help="put a backup into a new data folder")
    load.add_argument("src", help="a folder made by zhiyi backup")
    load.set_defaults(run=_restore_command)
    for sub in (save, load):
        _data_arg(sub)
    engine = commands.add_parser("engine", help="manage translation engines")
    engine_commands = engine.add_subparsers(dest="engine_command", required=True)
    install = engine_commands.add_parser(
        "install", help="install an offline model: zhiyi engine install argos FROM TO")
    install.add_argument("engine", choices=["argos"])
    install.add_argument("source", metavar="FROM", help="source language code, e.g. en")
    install.add_argument("target", metavar="TO", help="target language code, e.g. de")
    install.add_argument("--file", default=None, metavar="MODEL",
                         help="an .argosmodel file (else argostranslate's package index)")
    engine_commands.add_parser(
        "status", help="each engine: available with this server's settings, or why not")
    engine.set_defaults(run=_engine_command)
    config = commands.add_parser("config", help="the settings in use, or the table of all")
    shown = config.add_mutually_exclusive_group()
    shown.add_argument("--markdown", action="store_true",
                       help="every setting as the README's Markdown table")
    shown.add_argument("--readme", metavar="FILE", default=None,
                       help="rewrite the settings table in FILE (README.md)")
    config.set_defaults(run=_config_command)


def _client_commands(commands: Any) -> None:
    submit = commands.add_parser("submit", help="upload a document, follow it, download the result")
    submit.add_argument("file", type=_existing_file, help="the document")
    submit.add_argument("--type", dest="task_type", required=True,
                        help="task type: translate, analyze, extract, ...")
    submit.add_argument("--param", action="append", default=[], type=_param,
                        metavar="KEY=VALUE", help="a task parameter, e.g. targetLang=zh")
    _connection_args(submit)
    submit.add_argument("-o", "--output", default=None,
                        help="where to save the result (a file, or a directory)")
    submit.set_defaults(run=_command(run_submit))

    tasks = commands.add_parser("tasks", help="list your tasks")
    tasks.add_argument("--status", default=None,
                       choices=["pending", "processing", "completed", "failed", "cancelled"])
    tasks.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    tasks.add_argument("--all", action="store_true",
                       help="every user's tasks (administrators; a user column is added)")
    _connection_args(tasks)
    tasks.set_defaults(run=_command(run_tasks))

    login = commands.add_parser("login", help="check a token and save it with the server URL")
    _connection_args(login)
    login.set_defaults(run=_command(run_login))

    quote = commands.add_parser("quote", help="what a document would cost, without uploading "
                                "it as a task")
    quote.add_argument("file", type=_existing_file, help="the document")
    quote.add_argument("--type", dest="task_type", default="translate",
                       help="task type (default translate)")
    quote.add_argument("--param", action="append", default=[], type=_param,
                       metavar="KEY=VALUE", help="a task parameter, e.g. targetLang=zh")
    _connection_args(quote)
    quote.set_defaults(run=_command(run_quote))

    result = commands.add_parser("result", help="download a completed task's result")
    result.add_argument("task_id", type=int, metavar="ID")
    result.add_argument("-o", "--output", default=None,
                        help="where to save it (a file, or a directory; default here)")
    _connection_args(result)
    result.set_defaults(run=_command(run_result))

    watch = commands.add_parser("watch", help="follow a task live until it ends")
    watch.add_argument("task_id", type=int, metavar="ID")
    _connection_args(watch)
    watch.set_defaults(run=_command(run_watch))

    for name, help_text in (("cancel", "cancel a pending or running task (refunded)"),
                            ("retry", "run a failed or cancelled task again (charged again)"),
                            ("rm", "delete a task and its files (cancelled first if running)")):
        action = commands.add_parser(name, help=help_text)
        action.add_argument("task_id", type=int, metavar="ID")
        _connection_args(action)
        action.set_defaults(run=_command(run_task_action))


def build_parser() -> argparse.ArgumentParser:
    """The ``zhiyi`` command's parser: server-side commands, then the client's."""
    parser = argparse.ArgumentParser(prog="zhiyi", description="Zhiyi document server")
    commands = parser.add_subparsers(dest="command", required=True)
    _server_commands(commands)
    _client_commands(commands)
    return parser


#: commands that create server data (the client commands are not among them)
SERVER_COMMANDS = frozenset({"serve", "worker", "user", "backup", "restore"})


def main(argv: list[str] | None = None) -> int:
    """The ``zhiyi`` command."""
    logging.basicConfig(level=os.environ.get("ZHIYI_LOG_LEVEL") or Config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command in SERVER_COMMANDS:
            # Everything the server creates (uploads, results, also what a processor
            # writes) is its own user's only: folders 0700, files 0600. The database is
            # made 0600 by the store itself; client commands keep the user's umask.
            os.umask(0o077)
        return int(args.run(args) or 0)
    except (CliError, ConfigError, StoreError) as e:  # StoreError: also an unreachable database
        print(f"zhiyi: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if args.command not in SERVER_COMMANDS:
            raise
        # A data folder that cannot be made or read: one line, not a traceback.
        where = f" ({e.filename})" if e.filename else ""
        print(f"zhiyi: cannot use the data folder: {e.strerror or e}{where}; choose a "
              "folder you can write with --data or DATA_STORAGE_PATH", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
