-- Zhiyi's database, current version. A new file gets these statements one by one
-- inside one transaction (storage._migrate; executescript would commit first);
-- an older file is moved forward by the numbered steps in storage.MIGRATIONS.
-- The version is kept in PRAGMA user_version (set by storage.py, not here).

CREATE TABLE IF NOT EXISTS users (
    id          TEXT PRIMARY KEY,              -- the user name, e.g. "alice"
    credits     INTEGER NOT NULL DEFAULT 0 CHECK (credits >= 0),
    created_at  TEXT NOT NULL,
    disabled_at TEXT,                          -- set by `zhiyi user disable`: no token works
    tasks_made  INTEGER NOT NULL DEFAULT 0,   -- tasks ever created: the next one's user_task_no
    is_admin    INTEGER NOT NULL DEFAULT 0,    -- `zhiyi user add NAME --admin`: the admin API
    -- bytes of the files the user's tasks keep (file_size + result_size while
    -- files_expired = 0), kept in the transactions that change them: the quota
    -- check must not sum the user's whole history on every upload
    storage_bytes INTEGER NOT NULL DEFAULT 0
);

-- API tokens and browser sessions; only a SHA-256 of the secret is stored.
-- Revoking deletes the row: every request looks its token up here (no cache).
CREATE TABLE IF NOT EXISTS api_tokens (
    token_hash    TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind          TEXT NOT NULL DEFAULT 'api' CHECK (kind IN ('api', 'session')),
    created_at    TEXT NOT NULL,
    token_prefix  TEXT,                        -- first characters, for `user revoke --token`
    expires_at    TEXT,                        -- sessions: SESSION_DAYS after last use
    last_used_at  TEXT                         -- sessions: when expires_at last slid
);
CREATE INDEX IF NOT EXISTS idx_tokens_user ON api_tokens (user_id);

CREATE TABLE IF NOT EXISTS processing_tasks (
    -- AUTOINCREMENT: ids of deleted tasks are never reused, so event ids and
    -- task ids seen by clients stay unambiguous.
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id            TEXT NOT NULL REFERENCES users(id),
    task_type          TEXT NOT NULL,
    status             TEXT NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    progress           INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    status_message     TEXT NOT NULL DEFAULT '',
    stage              TEXT,
    eta_seconds        REAL,
    params             TEXT NOT NULL DEFAULT '{}',          -- JSON object
    file_name          TEXT NOT NULL,                       -- cleaned upload name
    file_size          INTEGER NOT NULL,
    file_path          TEXT NOT NULL,                       -- "<user>/<uuid>", made by the server
    result_name        TEXT,                                -- file under <file_path>/result/
    result_size        INTEGER NOT NULL DEFAULT 0,          -- bytes, for the storage quota
    credits_cost       INTEGER NOT NULL CHECK (credits_cost >= 0),
    credits_held       INTEGER NOT NULL DEFAULT 0,          -- charged and not yet refunded
    attempts           INTEGER NOT NULL DEFAULT 0,          -- attempts in the current run
    external_task_id   TEXT UNIQUE,
    external_deadline  TEXT,
    error_message      TEXT,
    error_code         TEXT,
    idempotency_key    TEXT,
    checkpoint         TEXT,                                -- processor's JSON checkpoint
    run_after          TEXT,                                -- a pending task waits until then
    lease_owner        TEXT,
    lease_until        TEXT,
    files_expired      INTEGER NOT NULL DEFAULT 0,
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL,
    started_at         TEXT,
    completed_at       TEXT,
    -- the task's number among its user's tasks (1, 2, 3...; never reused after a delete)
    user_task_no       INTEGER,
    detected_lang      TEXT,                                -- the document's language at create
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS idx_tasks_user ON processing_tasks (user_id, id);
CREATE INDEX IF NOT EXISTS idx_tasks_queue ON processing_tasks (status, id);
-- the active-task limit counts a user's pending and processing tasks on every create
CREATE INDEX IF NOT EXISTS idx_tasks_user_status ON processing_tasks (user_id, status);

-- The durable event log and outbox: every state change appends here in its
-- own transaction; the id is the SSE `id:`. No foreign key to the task, so a
-- deleted task's last event survives for the streams that follow it.
CREATE TABLE IF NOT EXISTS task_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     INTEGER,
    user_id     TEXT NOT NULL,
    type        TEXT NOT NULL,
    data        TEXT NOT NULL,                              -- JSON object
    created_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_events_task ON task_events (task_id, id);
CREATE INDEX IF NOT EXISTS idx_events_user ON task_events (user_id, id);

CREATE TABLE IF NOT EXISTS credit_ledger (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id        TEXT NOT NULL REFERENCES users(id),
    amount         INTEGER NOT NULL,                        -- signed
    reason         TEXT NOT NULL CHECK (reason IN ('grant', 'charge', 'refund')),
    task_id        INTEGER,
    balance_after  INTEGER NOT NULL,
    created_at     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_ledger_user ON credit_ledger (user_id, id);

-- Small key/value facts about the store itself (e.g. how far events were pruned).
CREATE TABLE IF NOT EXISTS meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- Each user's translation memory: segments already translated are not sent or charged
-- again (issue 11).
CREATE TABLE IF NOT EXISTS translation_memory (
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    source_lang  TEXT NOT NULL,                             -- detected when the task said auto
    target_lang  TEXT NOT NULL,
    engine       TEXT NOT NULL,
    source_key   TEXT NOT NULL,                             -- SHA-256 of the normalised source
    source_text  TEXT NOT NULL,
    target_text  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (user_id, source_lang, target_lang, engine, source_key)
);

-- Glossaries: term pairs a translation keeps as given (issue 11).
CREATE TABLE IF NOT EXISTS glossaries (
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    source_lang  TEXT NOT NULL,
    target_lang  TEXT NOT NULL,
    terms        TEXT NOT NULL,                             -- JSON [[source, target], ...]
    created_at   TEXT NOT NULL,
    PRIMARY KEY (user_id, name)
);
