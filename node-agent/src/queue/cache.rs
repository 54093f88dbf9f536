//! What the queue's cached control-plane lookups ([`super::callers`], [`super::candidates`])
//! share: how an answer that is no answer is put into words, and which entry a full cache
//! drops. Their fresh, stale and quiet-period rules stay with each, as their keys, answers
//! and errors differ.

use std::collections::HashMap;
use std::hash::Hash;

use axum::http::StatusCode;
use serde::Deserialize;

use crate::provisioning::upstream::Failure;

/// Why an answer with `status` (none a lookup understands) gives nothing to use: a refused
/// token says which token it needs; any other status is a failure of the control plane.
pub(super) fn unusable(status: StatusCode, body: &[u8]) -> String {
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        format!(
            "{}: {}; provisioning.token needs a control-plane token with role \"node\"",
            Failure::Refused(status),
            error_text(body)
        )
    } else {
        Failure::Status(status).to_string()
    }
}

/// The `error` of the control plane's JSON error body, or the body itself.
pub(super) fn error_text(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Error {
        error: String,
    }
    serde_json::from_slice::<Error>(body).map_or_else(
        |_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        |e| e.error,
    )
}

/// Drops the least recently asked of `entries`, `used` giving when each was last asked.
pub(super) fn evict_least_recent<K, V>(entries: &mut HashMap<K, V>, used: impl Fn(&V) -> u64)
where
    K: Clone + Eq + Hash,
{
    let oldest = entries
        .iter()
        .min_by_key(|(_, entry)| used(entry))
        .map(|(key, _)| key.clone());
    if let Some(key) = oldest {
        entries.remove(&key);
    }
}
