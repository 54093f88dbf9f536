-- What a node's Asterisk needs to know about devices (PJSIP realtime), and the phones'
-- registrations, shared by every node so a phone registered on one is rung from any.

-- A desk phone's fixed address (rung without registering), and the digest credentials a
-- phone registers with: the HA1 (MD5 of `user:realm:password`), never the password.
ALTER TABLE devices ADD COLUMN contact TEXT NULL;
ALTER TABLE devices ADD COLUMN digest_realm TEXT NULL;
ALTER TABLE devices ADD COLUMN digest_ha1 TEXT NULL;

-- One PJSIP contact (registration) as Asterisk wrote it through res_config_curl, kept as
-- Asterisk's own fields (a form-encoded line); `aor` and `expiration_time` are copied out
-- for lookups and the sweep of expired registrations.
CREATE TABLE IF NOT EXISTS sip_contacts (
    id              TEXT    NOT NULL PRIMARY KEY,
    aor             TEXT    NOT NULL,
    fields          TEXT    NOT NULL,
    expiration_time INTEGER NOT NULL DEFAULT 0,
    written_by      TEXT    NOT NULL,
    updated_ms      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sip_contacts_by_aor ON sip_contacts (aor);
