-- saga-sqlx schema for SQLite, version 1. Times are microseconds since the Unix epoch.

CREATE TABLE saga_outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    channel      TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    ordering_key TEXT,
    headers      TEXT NOT NULL,
    payload      BLOB NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    created_at   INTEGER NOT NULL,
    retry_at     INTEGER NOT NULL,
    lease_owner  TEXT,
    lease_until  INTEGER,
    published_at INTEGER,
    dead_at      INTEGER
);
CREATE INDEX saga_outbox_pending ON saga_outbox (seq)
    WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX saga_outbox_pending_key ON saga_outbox (ordering_key, seq)
    WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX saga_outbox_published ON saga_outbox (published_at)
    WHERE published_at IS NOT NULL;

CREATE TABLE saga_inbox (
    consumer      TEXT NOT NULL,
    message_id    TEXT NOT NULL,
    reply_channel TEXT,
    reply_headers TEXT,
    reply_payload BLOB,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX saga_inbox_created ON saga_inbox (created_at);

CREATE TABLE saga_step_marks (
    consumer      TEXT NOT NULL,
    saga_id       TEXT NOT NULL,
    step          INTEGER NOT NULL,
    mark          TEXT NOT NULL,
    reply_channel TEXT,
    reply_headers TEXT,
    reply_payload BLOB,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (consumer, saga_id, step)
);
CREATE INDEX saga_step_marks_created ON saga_step_marks (created_at);

CREATE TABLE saga_instances (
    id             TEXT PRIMARY KEY,
    saga_type      TEXT NOT NULL,
    state          TEXT NOT NULL,
    step           INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    data           TEXT NOT NULL,
    awaiting       TEXT,
    wake_at        INTEGER,
    lease_owner    TEXT,
    lease_until    INTEGER,
    error          TEXT,
    correlation_id TEXT NOT NULL,
    history        TEXT NOT NULL,
    version        INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX saga_instances_due ON saga_instances (wake_at)
    WHERE state IN ('RUNNING', 'COMPENSATING');
CREATE INDEX saga_instances_state ON saga_instances (state, created_at);

CREATE TABLE saga_log (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    correlation_id TEXT NOT NULL,
    consumer       TEXT NOT NULL,
    message_id     TEXT NOT NULL,
    message_type   TEXT NOT NULL,
    status         TEXT NOT NULL,
    emitted        TEXT NOT NULL,
    error          TEXT,
    at             INTEGER NOT NULL
);
CREATE INDEX saga_log_correlation ON saga_log (correlation_id, seq);
