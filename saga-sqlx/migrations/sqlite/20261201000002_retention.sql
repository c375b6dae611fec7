-- Retention deletes finished sagas and old choreography log entries, oldest first.
CREATE INDEX saga_instances_finished ON saga_instances (updated_at)
    WHERE state IN ('COMPLETED', 'COMPENSATED');
CREATE INDEX saga_log_at ON saga_log (at);
