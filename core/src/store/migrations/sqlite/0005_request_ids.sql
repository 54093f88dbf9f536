-- Counting writes a CRM may retry (a sale): the request id it sent, with the answer given,
-- so a retry after a lost answer is answered again instead of counted twice. Scoped to the
-- API token's name; kept a week.
CREATE TABLE IF NOT EXISTS request_ids (
    actor      TEXT    NOT NULL,
    request_id TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    result     INTEGER NOT NULL,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (actor, request_id)
);
