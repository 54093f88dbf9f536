-- The directory of the control plane: agents, devices, hot-desk sessions, queues and their
-- members, per-agent daily counters and the audit log.
--
-- Timestamps are unix milliseconds computed by the database from its own clock, never
-- sent by a client. Foreign keys are enforced: sqlx turns `PRAGMA foreign_keys` on for
-- every connection.

-- An agent is a person, known by their personal extension.
CREATE TABLE IF NOT EXISTS agents (
    id            TEXT    NOT NULL PRIMARY KEY,
    name          TEXT    NOT NULL,
    -- JSON array of short lowercase words, sorted, without duplicates.
    tags          TEXT    NOT NULL,
    -- After this many sales in a day the agent rings last; NULL means no cap.
    daily_cap     INTEGER NULL,
    enabled       INTEGER NOT NULL DEFAULT 1,
    -- available | paused (with reason) | on_call | wrap_up (until until_ms)
    state         TEXT    NOT NULL DEFAULT 'available'
                  CHECK (state IN ('available', 'paused', 'on_call', 'wrap_up')),
    reason        TEXT    NULL,
    until_ms      INTEGER NULL,
    -- When the agent last became (or, in wrap-up, will become) available.
    idle_since_ms INTEGER NOT NULL
);

-- A phone with its own extension, reached through a dial string such as PJSIP/2001.
CREATE TABLE IF NOT EXISTS devices (
    id       TEXT NOT NULL PRIMARY KEY,
    endpoint TEXT NOT NULL,
    name     TEXT NULL
);

-- Hot-desk sessions: one device per agent (primary key) and one agent per device (unique).
CREATE TABLE IF NOT EXISTS sessions (
    agent_id  TEXT    NOT NULL PRIMARY KEY REFERENCES agents (id) ON DELETE CASCADE,
    device_id TEXT    NOT NULL UNIQUE REFERENCES devices (id) ON DELETE CASCADE,
    since_ms  INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS queues (
    id   TEXT NOT NULL PRIMARY KEY,
    name TEXT NOT NULL
);

-- Lower priority rings first.
CREATE TABLE IF NOT EXISTS queue_members (
    queue_id TEXT    NOT NULL REFERENCES queues (id) ON DELETE CASCADE,
    agent_id TEXT    NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    priority INTEGER NOT NULL,
    PRIMARY KEY (queue_id, agent_id)
);
CREATE INDEX IF NOT EXISTS queue_members_by_agent ON queue_members (agent_id);

-- Calls and sales per agent and day; the day ('YYYY-MM-DD') is computed by the caller in
-- the configured time zone.
CREATE TABLE IF NOT EXISTS daily_counters (
    agent_id TEXT    NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    day      TEXT    NOT NULL,
    calls    INTEGER NOT NULL DEFAULT 0,
    sales    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, day)
);

-- Every change to the directory, written by the transaction that makes the change.
-- AUTOINCREMENT: ids are never reused, so a page boundary (`before_id`) stays valid.
CREATE TABLE IF NOT EXISTS audit_log (
    id      INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    at_ms   INTEGER NOT NULL,
    -- The name of the API token (or component) that made the change, never a secret.
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    subject TEXT    NOT NULL,
    -- JSON object.
    detail  TEXT    NOT NULL
);
