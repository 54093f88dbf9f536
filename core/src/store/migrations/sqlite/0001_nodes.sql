-- One row per node: its latest heartbeat. Timestamps come from the database clock only,
-- stored as UTC text with milliseconds ('YYYY-MM-DD HH:MM:SS.SSS').
CREATE TABLE IF NOT EXISTS nodes (
    id              TEXT    NOT NULL PRIMARY KEY,
    pool            TEXT    NOT NULL,
    role            TEXT    NOT NULL,
    sip_uri         TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    drain_requested INTEGER NOT NULL DEFAULT 0,
    refusing_calls  INTEGER NOT NULL DEFAULT 0,
    pbx_up          INTEGER NOT NULL DEFAULT 0,
    calls           INTEGER NOT NULL,
    max_calls       INTEGER NOT NULL,
    load1           REAL    NOT NULL,
    cpu_pct         REAL    NOT NULL,
    mem_pct         REAL    NOT NULL,
    cores           INTEGER NOT NULL,
    services        TEXT    NOT NULL,
    interval_ms     INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    started_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL
);

-- Bounded history of samples per node, for charts; pruned by age.
CREATE TABLE IF NOT EXISTS node_samples (
    node_id TEXT    NOT NULL,
    at      TEXT    NOT NULL,
    calls   INTEGER NOT NULL,
    load1   REAL    NOT NULL,
    cpu_pct REAL    NOT NULL,
    mem_pct REAL    NOT NULL,
    PRIMARY KEY (node_id, at)
);
