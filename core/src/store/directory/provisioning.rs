//! What nodes' Asterisks read through realtime provisioning: devices as PJSIP sees them
//! (with their credentials, which only this path reads), and phones' registrations, which
//! every node writes and reads so a phone registered on one node is rung from any.
//!
//! Registrations are not directory changes: they write no audit row and do not move the
//! directory's version (phones re-register every minute or so; routing does not depend on
//! them).

use sqlx::Row as _;

use super::{DigestCredentials, MAX_ACTOR_CHARS, Pool, Store, StoreError, check_id, invalid, q};
use crate::realtime::{self, Row};

/// Longest contact id Asterisk writes (`aor;@hash`, a few dozen characters in practice).
pub const MAX_CONTACT_ID_LEN: usize = 255;
/// Longest contact row kept, as printed.
pub const MAX_CONTACT_BYTES: usize = 16 * 1024;

/// A device as a node's Asterisk provisions it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipDevice {
    /// The device id: the PJSIP endpoint, AOR and auth name.
    pub id: String,
    /// The label, shown as the caller name of the device's own calls.
    pub name: Option<String>,
    /// A desk phone's fixed address.
    pub contact: Option<String>,
    /// What the phone registers with.
    pub credentials: Option<DigestCredentials>,
}

const SIP_DEVICES: &str =
    "SELECT id, name, contact, digest_realm, digest_ha1 FROM devices ORDER BY id";
const SIP_DEVICE: &str =
    "SELECT id, name, contact, digest_realm, digest_ha1 FROM devices WHERE id = ?";
const CONTACTS: &str = "SELECT fields FROM sip_contacts ORDER BY id";
const CONTACTS_OF_AOR: &str = "SELECT fields FROM sip_contacts WHERE aor = ? ORDER BY id";
const CONTACT_FOR_UPDATE_MYSQL: &str = "SELECT fields FROM sip_contacts WHERE id = ? FOR UPDATE";
const CONTACT_FOR_UPDATE_SQLITE: &str = "SELECT fields FROM sip_contacts WHERE id = ?";
const DELETE_CONTACT: &str = "DELETE FROM sip_contacts WHERE id = ?";
const UPSERT_CONTACT_MYSQL: &str = "INSERT INTO sip_contacts \
     (id, aor, fields, expiration_time, written_by, updated_ms) VALUES (?, ?, ?, ?, ?, \
     (TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000)) \
     ON DUPLICATE KEY UPDATE aor = VALUES(aor), fields = VALUES(fields), \
     expiration_time = VALUES(expiration_time), written_by = VALUES(written_by), \
     updated_ms = VALUES(updated_ms)";
const UPSERT_CONTACT_SQLITE: &str = "INSERT INTO sip_contacts \
     (id, aor, fields, expiration_time, written_by, updated_ms) VALUES (?, ?, ?, ?, ?, \
     CAST(ROUND(unixepoch('now', 'subsec') * 1000) AS INTEGER)) \
     ON CONFLICT DO UPDATE SET aor = excluded.aor, fields = excluded.fields, \
     expiration_time = excluded.expiration_time, written_by = excluded.written_by, \
     updated_ms = excluded.updated_ms";

impl Store {
    /// Every device (or the one named `id`) with what PJSIP needs, credentials included.
    pub async fn sip_devices(&self, id: Option<&str>) -> Result<Vec<SipDevice>, StoreError> {
        if let Some(id) = id {
            // An id that cannot exist is simply not found: Asterisk asks for whatever a
            // phone put in its From header.
            if check_id("device id", id).is_err() {
                return Ok(Vec::new());
            }
        }
        with_pool!(self, pool => {
            let rows = match id {
                Some(id) => sqlx::query(q(SIP_DEVICE)).bind(id).fetch_all(pool).await?,
                None => sqlx::query(q(SIP_DEVICES)).fetch_all(pool).await?,
            };
            let mut devices = Vec::with_capacity(rows.len());
            for row in &rows {
                let realm: Option<String> = row.try_get(3)?;
                let ha1: Option<String> = row.try_get(4)?;
                devices.push(SipDevice {
                    id: row.try_get(0)?,
                    name: row.try_get(1)?,
                    contact: row.try_get(2)?,
                    // Written together by `put_device`; checked on the way in.
                    credentials: match (realm, ha1) {
                        (Some(realm), Some(ha1)) => DigestCredentials::from_ha1(&realm, &ha1).ok(),
                        _ => None,
                    },
                });
            }
            Ok(devices)
        })
    }

    /// The registrations of one AOR (device), or all of them, as Asterisk wrote them.
    pub async fn sip_contacts(&self, aor: Option<&str>) -> Result<Vec<Row>, StoreError> {
        with_pool!(self, pool => {
            let rows: Vec<String> = match aor {
                Some(aor) => sqlx::query_scalar(q(CONTACTS_OF_AOR)).bind(aor).fetch_all(pool).await?,
                None => sqlx::query_scalar(q(CONTACTS)).fetch_all(pool).await?,
            };
            Ok(rows.iter().filter_map(|fields| decode(fields)).collect())
        })
    }

    /// Writes a registration (a whole contact row with its `id`), replacing one with the
    /// same id. Returns the rows written: 1.
    pub async fn store_sip_contact(
        &self,
        row: &[(String, String)],
        actor: &str,
    ) -> Result<u64, StoreError> {
        let id = realtime::value(row, "id").unwrap_or_default().to_owned();
        check_contact_id(&id)?;
        check_writer(actor)?;
        let fields = encode(row)?;
        let upsert = match self.pool {
            Pool::MySql(_) => UPSERT_CONTACT_MYSQL,
            Pool::Sqlite(_) => UPSERT_CONTACT_SQLITE,
        };
        with_pool!(self, pool => {
            sqlx::query(q(upsert))
                .bind(&id)
                .bind(aor_of(&id))
                .bind(&fields)
                .bind(expiration_of(row))
                .bind(actor)
                .execute(pool)
                .await?;
        });
        Ok(1)
    }

    /// Changes fields of the registration `id` (others stay). Returns the rows changed: 0
    /// when there is no such registration.
    pub async fn update_sip_contact(
        &self,
        id: &str,
        changes: &[(String, String)],
        actor: &str,
    ) -> Result<u64, StoreError> {
        check_contact_id(id)?;
        check_writer(actor)?;
        let (begin, lock, upsert) = match self.pool {
            Pool::MySql(_) => ("BEGIN", CONTACT_FOR_UPDATE_MYSQL, UPSERT_CONTACT_MYSQL),
            Pool::Sqlite(_) => (
                "BEGIN IMMEDIATE",
                CONTACT_FOR_UPDATE_SQLITE,
                UPSERT_CONTACT_SQLITE,
            ),
        };
        with_pool!(self, pool => {
            let mut tx = pool.begin_with(q(begin)).await?;
            let current: Option<String> =
                sqlx::query_scalar(q(lock)).bind(id).fetch_optional(&mut *tx).await?;
            let Some(mut row) = current.as_deref().and_then(decode) else {
                return Ok(0);
            };
            for (name, value) in changes {
                if name == "id" {
                    continue;
                }
                match row.iter_mut().find(|(have, _)| have == name) {
                    Some(field) => field.1.clone_from(value),
                    None => row.push((name.clone(), value.clone())),
                }
            }
            sqlx::query(q(upsert))
                .bind(id)
                .bind(aor_of(id))
                .bind(encode(&row)?)
                .bind(expiration_of(&row))
                .bind(actor)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(1)
        })
    }

    /// Deletes registrations by id. Returns how many there were.
    pub async fn delete_sip_contacts(&self, ids: &[String]) -> Result<u64, StoreError> {
        let mut deleted = 0;
        with_pool!(self, pool => {
            for id in ids {
                deleted += sqlx::query(q(DELETE_CONTACT))
                    .bind(id)
                    .execute(pool)
                    .await?
                    .rows_affected();
            }
        });
        Ok(deleted)
    }
}

/// The AOR a contact id belongs to: PJSIP names contacts `aor;@hash`.
pub fn aor_of(contact_id: &str) -> &str {
    contact_id
        .split_once(";@")
        .map_or(contact_id, |(aor, _)| aor)
}

fn expiration_of(row: &[(String, String)]) -> i64 {
    realtime::value(row, "expiration_time")
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

fn encode(row: &[(String, String)]) -> Result<String, StoreError> {
    let printed = realtime::print_row(row.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    let printed = printed.trim_end_matches('\n').to_owned();
    if printed.len() > MAX_CONTACT_BYTES {
        return Err(invalid(
            "contact",
            format!(
                "is {} bytes, at most {MAX_CONTACT_BYTES} are kept",
                printed.len()
            ),
        ));
    }
    Ok(printed)
}

fn decode(fields: &str) -> Option<Row> {
    realtime::parse_rows(fields).ok()?.into_iter().next()
}

fn check_contact_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty() || id.len() > MAX_CONTACT_ID_LEN || id.bytes().any(|b| b.is_ascii_control()) {
        return Err(invalid(
            "id",
            format!(
                "a contact needs an id of 1–{MAX_CONTACT_ID_LEN} bytes without control characters"
            ),
        ));
    }
    Ok(())
}

fn check_writer(actor: &str) -> Result<(), StoreError> {
    if actor.is_empty() || actor.chars().count() > MAX_ACTOR_CHARS {
        return Err(invalid(
            "actor",
            format!("must be 1–{MAX_ACTOR_CHARS} characters"),
        ));
    }
    Ok(())
}
