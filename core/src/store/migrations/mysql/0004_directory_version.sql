-- The directory's version: bumped by the last statement of every directory write, so it
-- moves only at commit and in the order of commits (the row lock serialises the bumps).
-- `MAX(audit_log.id)` did not: InnoDB hands out ids at insert, so a transaction that
-- inserted first and committed last left the version where a reader had already seen it.
CREATE TABLE IF NOT EXISTS directory_version (
    id      INT    NOT NULL PRIMARY KEY,
    version BIGINT NOT NULL,
    CONSTRAINT directory_version_one_row CHECK (id = 1)
) ENGINE = InnoDB;
INSERT INTO directory_version (id, version)
    SELECT 1, COALESCE(MAX(id), 0) FROM audit_log
    ON DUPLICATE KEY UPDATE version = version;
