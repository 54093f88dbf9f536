-- Counting writes a CRM may retry (a sale): the request id it sent, with the answer given,
-- so a retry after a lost answer is answered again instead of counted twice. Scoped to the
-- API token's name; kept a week.
CREATE TABLE IF NOT EXISTS request_ids (
    actor      VARCHAR(64)  NOT NULL,
    request_id VARCHAR(64)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    action     VARCHAR(64)  CHARACTER SET ascii NOT NULL,
    subject    VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    result     BIGINT       NOT NULL,
    at_ms      BIGINT       NOT NULL,
    PRIMARY KEY (actor, request_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
