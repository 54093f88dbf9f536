-- The autoscaler (issue 12): one row. What supervisors set (paused, a minimum and maximum
-- of extra nodes; NULL maximum: the configured one) and the fence: the highest lease token
-- any leader has acted under. An action is recorded only under a token at least as high,
-- so a superseded leader's late action is refused before it reaches the cloud.
CREATE TABLE IF NOT EXISTS autoscaler (
    id        INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    paused    INTEGER NOT NULL DEFAULT 0,
    min_extra INTEGER NOT NULL DEFAULT 0,
    max_extra INTEGER NULL,
    fence     INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO autoscaler (id) VALUES (1);
-- `callfleet scale status` and the API read the autoscaler's rows of the audit log by
-- action, newest first.
CREATE INDEX IF NOT EXISTS audit_log_action ON audit_log (action, id);
