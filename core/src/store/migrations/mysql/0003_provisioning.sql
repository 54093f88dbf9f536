-- What a node's Asterisk needs to know about devices (PJSIP realtime), and the phones'
-- registrations, shared by every node so a phone registered on one is rung from any.

-- A desk phone's fixed address (rung without registering), and the digest credentials a
-- phone registers with: the HA1 (MD5 of `user:realm:password`), never the password.
ALTER TABLE devices ADD COLUMN contact VARCHAR(512) NULL;
ALTER TABLE devices ADD COLUMN digest_realm VARCHAR(128) NULL;
ALTER TABLE devices ADD COLUMN digest_ha1 CHAR(32) CHARACTER SET ascii NULL;

-- One PJSIP contact (registration) as Asterisk wrote it through res_config_curl. The row is
-- kept as Asterisk's own fields (a form-encoded line), so whatever fields a later Asterisk
-- adds come back to it unchanged; `aor` and `expiration_time` are copied out for lookups
-- and the sweep of expired registrations.
CREATE TABLE IF NOT EXISTS sip_contacts (
    id              VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    aor             VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    fields          TEXT         NOT NULL,
    expiration_time BIGINT       NOT NULL DEFAULT 0,
    -- The node token's name that last wrote it.
    written_by      VARCHAR(64)  NOT NULL,
    updated_ms      BIGINT       NOT NULL,
    KEY sip_contacts_by_aor (aor)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
