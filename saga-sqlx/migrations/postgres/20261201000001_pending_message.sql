-- The orchestrator asks whether a command still waits in the outbox (its
-- deadline counts from publication): find a pending row by its message id.
CREATE INDEX saga_outbox_pending_message ON saga_outbox (message_id)
    WHERE published_at IS NULL AND dead_at IS NULL;
