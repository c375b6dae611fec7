-- The latest cut-off of a step-mark purge: a compensation of a saga older
-- than this finds no mark when the mark was purged, and must not read that
-- as "the action never ran here".
CREATE TABLE saga_marks_purged (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    before INTEGER NOT NULL
);
