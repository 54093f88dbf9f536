-- The directory's version: bumped by the last statement of every directory write, so it
-- moves only at commit, in the order of commits.
CREATE TABLE IF NOT EXISTS directory_version (
    id      INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO directory_version (id, version)
    SELECT 1, COALESCE(MAX(id), 0) FROM audit_log;
