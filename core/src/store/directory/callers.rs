//! Caller attributes kept in the control plane (issue 16): lists of caller numbers whose
//! calls carry attributes (`vip`) that routing matches against agents' tags, as the carrier's
//! `X-Callfleet-Attributes` header does for the calls it marks.
//!
//! - **Numbers are normalised** before they are stored or looked up: the visual separators
//!   a CRM may keep (spaces, `-`, `.`, `(`, `)`) are dropped, leaving 1–20 digits with an
//!   optional leading `+`. Nothing else is rewritten: `+4930…`, `004930…` and `030…` are
//!   three numbers, because the store cannot know the country a national number belongs
//!   to. A number is looked up as the carrier presents it, so lists hold that form
//!   (usually E.164, `+4930…`).
//! - **Attributes follow the tags' rules** (at most 32, each 1–32 of `a-z`, `0-9`, `-`,
//!   `_`), since an attribute only does something when an agent carries it as a tag; they
//!   are kept sorted and without copies.
//! - **No attributes is no row:** setting an empty list removes the number, and a number
//!   that is not listed reads as listed with no attributes, so readers never tell the two
//!   apart. Removing a number that is not listed succeeds (its audit row says nothing was
//!   removed), so a CRM can retry a removal.
//! - **Each write has its audit row**, with the attributes before, in its transaction. The
//!   writes leave the directory version alone: routing's snapshot does not hold the lists
//!   (a list can be long, and the snapshot is re-read at every agent's state change), so
//!   readers read a number when they need it, by its primary key.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::SqlStr;

use super::{
    BUMP_VERSION, MAX_ATTEMPTS, MAX_TAGS, Pool, Store, StoreError, audit, bad_column, check_actor,
    invalid, is_deadlock, is_tag, q, shown, subject,
};

/// Most digits of a caller number.
pub const MAX_CALLER_NUMBER_DIGITS: usize = 20;
/// Most entries returned by one [`Store::list_callers`] call.
pub const MAX_CALLER_PAGE: u32 = 1000;

/// A caller number with the attributes its calls carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerEntry {
    /// The number, normalised: 1–20 digits with an optional leading `+`.
    pub number: String,
    /// Short lowercase words (`vip`) matched against agents' tags; empty when the number is
    /// not listed.
    pub attributes: BTreeSet<String>,
}

const GET_CALLER: &str = "SELECT attributes FROM caller_attributes WHERE number = ?";
const SET_CALLER: &str = "UPDATE caller_attributes SET attributes = ? WHERE number = ?";
const DELETE_CALLER: &str = "DELETE FROM caller_attributes WHERE number = ?";
/// Binds: the number to list after (`''` from the start), limit.
const LIST_CALLERS: &str = "SELECT number, attributes FROM caller_attributes \
     WHERE number > ? ORDER BY number LIMIT ?";

/// `raw` as the store keeps caller numbers: without spaces, `-`, `.`, `(` and `)`, then 1–20
/// digits with an optional leading `+`; an error naming the field `number` otherwise.
pub fn normalize_caller_number(raw: &str) -> Result<String, StoreError> {
    let kept: String = raw
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let digits = kept.strip_prefix('+').unwrap_or(&kept);
    if digits.is_empty()
        || digits.len() > MAX_CALLER_NUMBER_DIGITS
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(invalid(
            "number",
            format!(
                "{} must be 1–{MAX_CALLER_NUMBER_DIGITS} digits with an optional leading '+' \
                 (spaces, '-', '.', '(' and ')' are dropped), such as +4930123456",
                shown(raw)
            ),
        ));
    }
    Ok(kept)
}

/// A caller's attributes: at most [`MAX_TAGS`], each a valid tag.
pub fn check_caller_attributes(attributes: &BTreeSet<String>) -> Result<(), StoreError> {
    if attributes.len() > MAX_TAGS {
        return Err(invalid(
            "attributes",
            format!(
                "{} different attributes, at most {MAX_TAGS} are allowed (an agent carries at most {MAX_TAGS} tags)",
                attributes.len()
            ),
        ));
    }
    if let Some(bad) = attributes.iter().find(|a| !is_tag(a)) {
        return Err(invalid(
            "attributes",
            format!(
                "attribute {} must be 1–32 of a-z, 0-9, '-' and '_', starting with a letter or digit, as the agents' tags it is matched with (e.g. vip)",
                shown(bad)
            ),
        ));
    }
    Ok(())
}

/// The attributes column, as written by this module.
fn attributes_column(text: &str) -> Result<BTreeSet<String>, sqlx::Error> {
    serde_json::from_str(text).map_err(|err| bad_column(0, format!("attributes: {err}")))
}

impl Store {
    /// Replaces the attributes of the caller `number` (normalised first); an empty set
    /// removes the number. Returns the entry as stored. The audit row keeps the attributes
    /// the number had before.
    pub async fn set_caller_attributes(
        &self,
        number: &str,
        attributes: &BTreeSet<String>,
        actor: &str,
    ) -> Result<CallerEntry, StoreError> {
        let number = normalize_caller_number(number)?;
        check_caller_attributes(attributes)?;
        check_actor(actor)?;
        let text = serde_json::to_string(attributes).expect("attributes serialize");
        let sql = self.directory_sql();
        write_tx!(self, tx, unversioned => {
            sqlx::query(q(sql.ensure_caller))
                .bind(&number)
                .execute(&mut *tx)
                .await?;
            let previous: String = sqlx::query_scalar(q(sql.lock_caller))
                .bind(&number)
                .fetch_one(&mut *tx)
                .await?;
            let previous = attributes_column(&previous)?;
            if attributes.is_empty() {
                sqlx::query(q(DELETE_CALLER)).bind(&number).execute(&mut *tx).await?;
            } else {
                sqlx::query(q(SET_CALLER))
                    .bind(&text)
                    .bind(&number)
                    .execute(&mut *tx)
                    .await?;
            }
            let detail = json!({ "attributes": attributes, "previous": previous });
            audit(sql, actor, "caller.set_attributes", &subject("caller", &number), &detail)
                .execute(&mut *tx)
                .await?;
        })?;
        Ok(CallerEntry {
            number,
            attributes: attributes.clone(),
        })
    }

    /// Removes the caller `number` from the lists; returns the attributes it had, `None`
    /// when it was not listed (which is not an error: the audit row says so).
    pub async fn remove_caller(
        &self,
        number: &str,
        actor: &str,
    ) -> Result<Option<BTreeSet<String>>, StoreError> {
        let number = normalize_caller_number(number)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx, unversioned => {
            let previous: Option<String> = sqlx::query_scalar(q(sql.lock_caller))
                .bind(&number)
                .fetch_optional(&mut *tx)
                .await?;
            let previous = previous.as_deref().map(attributes_column).transpose()?;
            if previous.is_some() {
                sqlx::query(q(DELETE_CALLER)).bind(&number).execute(&mut *tx).await?;
            }
            let detail = json!({ "removed": previous });
            audit(sql, actor, "caller.remove", &subject("caller", &number), &detail)
                .execute(&mut *tx)
                .await?;
            previous
        })
    }

    /// The attributes of the caller `number` (normalised first); empty when it is not
    /// listed.
    pub async fn caller_attributes(&self, number: &str) -> Result<CallerEntry, StoreError> {
        let number = normalize_caller_number(number)?;
        let text: Option<String> = with_pool!(self, pool => {
            sqlx::query_scalar(q(GET_CALLER)).bind(&number).fetch_optional(pool).await?
        });
        let attributes = match text {
            Some(text) => attributes_column(&text)?,
            None => BTreeSet::new(),
        };
        Ok(CallerEntry { number, attributes })
    }

    /// Up to `limit` listed callers (at most [`MAX_CALLER_PAGE`]) ordered by number (as
    /// bytes: `+` before digits), after `after` when given: pass the last page's last
    /// number to get the next page.
    pub async fn list_callers(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<CallerEntry>, StoreError> {
        if limit == 0 {
            return Err(invalid("limit", "must be at least 1".into()));
        }
        let after = after.map(normalize_caller_number).transpose()?;
        let limit = i64::from(limit.min(MAX_CALLER_PAGE));
        with_pool!(self, pool => {
            let rows: Vec<(String, String)> = sqlx::query_as(q(LIST_CALLERS))
                .bind(after.as_deref().unwrap_or(""))
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.into_iter()
                .map(|(number, text)| {
                    Ok(CallerEntry {
                        number,
                        attributes: attributes_column(&text)?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_lose_their_separators_and_keep_a_leading_plus() {
        for (raw, normalised) in [
            ("+4930123456", "+4930123456"),
            ("+49 (30) 123-45.6", "+4930123456"),
            ("004930123456", "004930123456"),
            ("0", "0"),
            ("+12345678901234567890", "+12345678901234567890"),
        ] {
            assert_eq!(
                normalize_caller_number(raw).expect(raw),
                normalised,
                "{raw}"
            );
        }
        for raw in [
            "",
            "+",
            " - ",
            "anonymous",
            "49+30",
            "++4930",
            "+123456789012345678901",
            "4930\u{0661}",
            "49\t30",
        ] {
            let err = normalize_caller_number(raw).expect_err(raw).to_string();
            assert!(
                err.starts_with("invalid number: `")
                    && err.ends_with(
                        "` must be 1–20 digits with an optional leading '+' (spaces, '-', '.', '(' and ')' are dropped), such as +4930123456"
                    ),
                "{raw:?}: {err}"
            );
        }
    }

    #[test]
    fn attributes_follow_the_tags_rules() {
        let set = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        assert!(check_caller_attributes(&set(&[])).is_ok());
        assert!(check_caller_attributes(&set(&["vip", "fr", "gold-2", "9_a"])).is_ok());
        for bad in ["VIP", "", "-vip", "v ip", "vip,fr", &"a".repeat(33)] {
            let err = check_caller_attributes(&set(&[bad]))
                .expect_err(bad)
                .to_string();
            assert!(
                err.starts_with("invalid attributes: attribute `")
                    && err.contains("must be 1–32 of a-z, 0-9, '-' and '_'"),
                "{bad:?}: {err}"
            );
        }
        let many: BTreeSet<String> = (0..33).map(|n| format!("a{n}")).collect();
        assert_eq!(
            check_caller_attributes(&many)
                .expect_err("too many")
                .to_string(),
            "invalid attributes: 33 different attributes, at most 32 are allowed (an agent carries at most 32 tags)"
        );
    }
}
