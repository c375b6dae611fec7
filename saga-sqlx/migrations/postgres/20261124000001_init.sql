-- saga-sqlx schema, version 1. Runs with search_path set to the store's schema.

CREATE TABLE saga_outbox (
    seq          BIGSERIAL PRIMARY KEY,
    channel      TEXT NOT NULL,
    message_id   UUID NOT NULL,
    ordering_key TEXT,
    headers      JSONB NOT NULL,
    payload      BYTEA NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    created_at   TIMESTAMPTZ NOT NULL,
    retry_at     TIMESTAMPTZ NOT NULL,
    lease_owner  TEXT,
    lease_until  TIMESTAMPTZ,
    published_at TIMESTAMPTZ,
    dead_at      TIMESTAMPTZ
);
-- The claim scans pending rows in order, and checks each key's head.
CREATE INDEX saga_outbox_pending ON saga_outbox (seq)
    WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX saga_outbox_pending_key ON saga_outbox (ordering_key, seq)
    WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX saga_outbox_published ON saga_outbox (published_at)
    WHERE published_at IS NOT NULL;
CREATE INDEX saga_outbox_dead ON saga_outbox (seq)
    WHERE dead_at IS NOT NULL;

CREATE TABLE saga_inbox (
    consumer      TEXT NOT NULL,
    message_id    UUID NOT NULL,
    reply_channel TEXT,
    reply_headers JSONB,
    reply_payload BYTEA,
    created_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX saga_inbox_created ON saga_inbox (created_at);

CREATE TABLE saga_step_marks (
    consumer      TEXT NOT NULL,
    saga_id       UUID NOT NULL,
    step          INTEGER NOT NULL,
    mark          TEXT NOT NULL,
    reply_channel TEXT,
    reply_headers JSONB,
    reply_payload BYTEA,
    created_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, saga_id, step)
);
CREATE INDEX saga_step_marks_created ON saga_step_marks (created_at);

CREATE TABLE saga_instances (
    id             UUID PRIMARY KEY,
    saga_type      TEXT NOT NULL,
    state          TEXT NOT NULL,
    step           INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    data           JSONB NOT NULL,
    awaiting       UUID,
    wake_at        TIMESTAMPTZ,
    lease_owner    TEXT,
    lease_until    TIMESTAMPTZ,
    error          TEXT,
    correlation_id TEXT NOT NULL,
    history        JSONB NOT NULL,
    version        BIGINT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL
);
-- Due sagas (retries, deadlines, recovery) and operator listings.
CREATE INDEX saga_instances_due ON saga_instances (wake_at)
    WHERE state IN ('RUNNING', 'COMPENSATING');
CREATE INDEX saga_instances_state ON saga_instances (state, created_at);

CREATE TABLE saga_log (
    seq            BIGSERIAL PRIMARY KEY,
    correlation_id TEXT NOT NULL,
    consumer       TEXT NOT NULL,
    message_id     UUID NOT NULL,
    message_type   TEXT NOT NULL,
    status         TEXT NOT NULL,
    emitted        JSONB NOT NULL,
    error          TEXT,
    at             TIMESTAMPTZ NOT NULL
);
CREATE INDEX saga_log_correlation ON saga_log (correlation_id, seq);
