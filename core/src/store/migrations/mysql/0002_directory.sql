-- The directory of the control plane: agents, devices, hot-desk sessions, queues and their
-- members, per-agent daily counters and the audit log.
--
-- Identifiers are ASCII and compared byte for byte (ascii_bin), as SQLite compares them, so
-- `Sales` and `sales` are two queues on both drivers. Timestamps are unix milliseconds
-- computed by the database from its own clock (UTC), never sent by a client.

-- An agent is a person, known by their personal extension.
CREATE TABLE IF NOT EXISTS agents (
    id            VARCHAR(32)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    name          VARCHAR(200) NOT NULL,
    -- JSON array of short lowercase words, sorted, without duplicates.
    tags          TEXT         NOT NULL,
    -- After this many sales in a day the agent rings last; NULL means no cap.
    daily_cap     BIGINT       NULL,
    enabled       INT          NOT NULL DEFAULT 1,
    -- available | paused (with reason) | on_call | wrap_up (until until_ms)
    state         VARCHAR(16)  CHARACTER SET ascii NOT NULL DEFAULT 'available',
    reason        VARCHAR(200) NULL,
    until_ms      BIGINT       NULL,
    -- When the agent last became (or, in wrap-up, will become) available.
    idle_since_ms BIGINT       NOT NULL,
    CONSTRAINT agents_state CHECK (state IN ('available', 'paused', 'on_call', 'wrap_up'))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- A phone with its own extension, reached through a dial string such as PJSIP/2001.
CREATE TABLE IF NOT EXISTS devices (
    id       VARCHAR(32)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    endpoint VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    name     VARCHAR(200) NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Hot-desk sessions: one device per agent (primary key) and one agent per device (unique).
CREATE TABLE IF NOT EXISTS sessions (
    agent_id  VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    device_id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    since_ms  BIGINT      NOT NULL,
    CONSTRAINT sessions_one_agent_per_device UNIQUE (device_id),
    CONSTRAINT sessions_agent FOREIGN KEY (agent_id) REFERENCES agents (id) ON DELETE CASCADE,
    CONSTRAINT sessions_device FOREIGN KEY (device_id) REFERENCES devices (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS queues (
    id   VARCHAR(32)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    name VARCHAR(200) NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Lower priority rings first.
CREATE TABLE IF NOT EXISTS queue_members (
    queue_id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    agent_id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    priority INT         NOT NULL,
    PRIMARY KEY (queue_id, agent_id),
    KEY queue_members_by_agent (agent_id),
    CONSTRAINT queue_members_queue FOREIGN KEY (queue_id) REFERENCES queues (id) ON DELETE CASCADE,
    CONSTRAINT queue_members_agent FOREIGN KEY (agent_id) REFERENCES agents (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Calls and sales per agent and day; the day ('YYYY-MM-DD') is computed by the caller in
-- the configured time zone.
CREATE TABLE IF NOT EXISTS daily_counters (
    agent_id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    day      CHAR(10)    CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    calls    BIGINT      NOT NULL DEFAULT 0,
    sales    BIGINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, day),
    CONSTRAINT daily_counters_agent FOREIGN KEY (agent_id) REFERENCES agents (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Every change to the directory, written by the transaction that makes the change.
CREATE TABLE IF NOT EXISTS audit_log (
    id      BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    at_ms   BIGINT       NOT NULL,
    -- The name of the API token (or component) that made the change, never a secret.
    actor   VARCHAR(64)  NOT NULL,
    action  VARCHAR(64)  CHARACTER SET ascii NOT NULL,
    subject VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    -- JSON object.
    detail  TEXT         NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
