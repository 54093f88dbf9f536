-- Per-queue figures (issue 16). Each queue's service-level threshold: a call answered
-- after waiting at most this long counts as answered within the service level.
ALTER TABLE queues ADD COLUMN service_level_ms INT NOT NULL DEFAULT 20000;

-- What became of each queue's calls per day, as the node that held each call reports it;
-- the day ('YYYY-MM-DD') is computed by the caller in the configured time zone, as for the
-- agents' counters. Read whole for a day by every control plane about once a second, hence
-- the index on the day.
CREATE TABLE IF NOT EXISTS queue_daily_counters (
    queue_id           VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    day                CHAR(10)    CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    answered           BIGINT      NOT NULL DEFAULT 0,
    abandoned          BIGINT      NOT NULL DEFAULT 0,
    overflowed         BIGINT      NOT NULL DEFAULT 0,
    answered_within_sl BIGINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (queue_id, day),
    KEY queue_daily_counters_by_day (day),
    CONSTRAINT queue_daily_counters_queue FOREIGN KEY (queue_id) REFERENCES queues (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
