-- One row per node: its latest heartbeat. Timestamps come from the database clock only.
CREATE TABLE IF NOT EXISTS nodes (
    id              VARCHAR(64)  NOT NULL PRIMARY KEY,
    pool            VARCHAR(64)  NOT NULL,
    role            VARCHAR(16)  NOT NULL,
    sip_uri         VARCHAR(255) NOT NULL,
    state           VARCHAR(16)  NOT NULL,
    drain_requested INT          NOT NULL DEFAULT 0,
    refusing_calls  INT          NOT NULL DEFAULT 0,
    pbx_up          INT          NOT NULL DEFAULT 0,
    calls           INT          NOT NULL,
    max_calls       INT          NOT NULL,
    load1           DOUBLE       NOT NULL,
    cpu_pct         DOUBLE       NOT NULL,
    mem_pct         DOUBLE       NOT NULL,
    cores           INT          NOT NULL,
    services        TEXT         NOT NULL,
    interval_ms     BIGINT       NOT NULL,
    seq             BIGINT       NOT NULL,
    started_at      DATETIME(6)  NOT NULL,
    updated_at      DATETIME(6)  NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Bounded history of samples per node, for charts; pruned by age.
CREATE TABLE IF NOT EXISTS node_samples (
    node_id VARCHAR(64) NOT NULL,
    at      DATETIME(6) NOT NULL,
    calls   INT         NOT NULL,
    load1   DOUBLE      NOT NULL,
    cpu_pct DOUBLE      NOT NULL,
    mem_pct DOUBLE      NOT NULL,
    PRIMARY KEY (node_id, at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
