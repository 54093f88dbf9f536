//! The autoscaler's row (issue 12): what supervisors steer (pause, a minimum and maximum of
//! extra nodes) and the fence that keeps a superseded leader from acting.
//!
//! - **Steering is audited** like any change (`autoscaler.set`, with the values before).
//! - **Every action is recorded before it is done**, in one transaction with the fence:
//!   the token of the leader's lease must be at least the highest token recorded so far,
//!   and becomes it. A leader that lost its lease while a decision was on its way (a long
//!   pause, a partition) finds a higher token there and is refused before it calls the
//!   cloud, and the audit row says which token every action was taken under.
//! - Neither moves the directory version: routing does not read this row.

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::SqlStr;

use super::{
    AuditEntry, BUMP_VERSION, MAX_ATTEMPTS, Pool, Store, StoreError, audit, audit_from_row,
    check_actor, invalid, is_deadlock, q,
};

/// The most extra nodes a supervisor may ask for as a minimum or maximum.
pub const MAX_EXTRA_NODES: u32 = 1000;

/// What supervisors set for the autoscaler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalerSteering {
    /// No action at all while paused (a drain in progress stays as it is).
    #[serde(default)]
    pub paused: bool,
    /// Keep at least this many extra nodes, whatever the load (e.g. before a campaign).
    #[serde(default)]
    pub min_extra: u32,
    /// Keep at most this many; `None`: the configured `max_extra`.
    #[serde(default)]
    pub max_extra: Option<u32>,
}

const GET_STEERING: &str = "SELECT paused, min_extra, max_extra FROM autoscaler WHERE id = 1";
const SET_STEERING: &str =
    "UPDATE autoscaler SET paused = ?, min_extra = ?, max_extra = ? WHERE id = 1";
/// Raises the fence to the token; leaves a higher one alone (read back to tell).
const RAISE_FENCE: &str = "UPDATE autoscaler SET fence = ? WHERE id = 1 AND fence < ?";
const GET_FENCE: &str = "SELECT fence FROM autoscaler WHERE id = 1";
/// Binds: limit. The autoscaler's own rows and supervisors' steering, newest first (by the
/// index on `action`).
const LIST_SCALE_ACTIONS: &str = "SELECT id, at_ms, actor, action, subject, detail \
     FROM audit_log WHERE (action >= 'scale.' AND action < 'scale/') \
     OR action = 'autoscaler.set' ORDER BY id DESC LIMIT ?";

impl Store {
    /// What supervisors set for the autoscaler.
    pub async fn scaler_steering(&self) -> Result<ScalerSteering, StoreError> {
        with_pool!(self, pool => {
            let row: (i64, i64, Option<i64>) = sqlx::query_as(q(GET_STEERING))
                .fetch_one(pool)
                .await?;
            Ok(steering_from_row(row))
        })
    }

    /// Sets what supervisors steer, with its audit row; returns the values before.
    pub async fn set_scaler_steering(
        &self,
        steering: &ScalerSteering,
        actor: &str,
    ) -> Result<ScalerSteering, StoreError> {
        check_actor(actor)?;
        if steering.min_extra > MAX_EXTRA_NODES {
            return Err(invalid(
                "min_extra",
                format!("{} is above {MAX_EXTRA_NODES}", steering.min_extra),
            ));
        }
        if let Some(max) = steering.max_extra
            && max < steering.min_extra
        {
            return Err(invalid(
                "max_extra",
                format!("{max} is below min_extra ({})", steering.min_extra),
            ));
        }
        let sql = self.directory_sql();
        write_tx!(self, tx, unversioned => {
            let row: (i64, i64, Option<i64>) = sqlx::query_as(q(GET_STEERING))
                .fetch_one(&mut *tx)
                .await?;
            let before = steering_from_row(row);
            sqlx::query(q(SET_STEERING))
                .bind(i32::from(steering.paused))
                .bind(i64::from(steering.min_extra))
                .bind(steering.max_extra.map(i64::from))
                .execute(&mut *tx)
                .await?;
            let detail = json!({ "now": steering, "before": before });
            audit(sql, actor, "autoscaler.set", "autoscaler", &detail)
                .execute(&mut *tx)
                .await?;
            before
        })
    }

    /// The autoscaler's latest actions and supervisors' steering, newest first.
    pub async fn list_scale_actions(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = i64::from(limit.clamp(1, super::MAX_AUDIT_PAGE));
        with_pool!(self, pool => {
            let rows = sqlx::query(q(LIST_SCALE_ACTIONS))
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(audit_from_row)
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// Records an autoscaler action (`scale.launch`, `scale.drain`, …) under the lease
    /// `token`, before it is carried out: refused with [`StoreError::Superseded`] when a
    /// higher token has acted, in which case the action must not be carried out.
    pub async fn record_scale_action(
        &self,
        token: u64,
        action: &'static str,
        subject: &str,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let sql = self.directory_sql();
        let signed = i64::try_from(token)
            .map_err(|_| invalid("token", format!("{token} is out of range")))?;
        write_tx!(self, tx, unversioned => {
            sqlx::query(q(RAISE_FENCE))
                .bind(signed)
                .bind(signed)
                .execute(&mut *tx)
                .await?;
            let fence: i64 = sqlx::query_scalar(q(GET_FENCE)).fetch_one(&mut *tx).await?;
            if fence != signed {
                return Err(StoreError::Superseded {
                    token,
                    fence: u64::try_from(fence).unwrap_or(0),
                });
            }
            let mut detail = detail.clone();
            detail["token"] = json!(token);
            audit(sql, "autoscaler", action, subject, &detail)
                .execute(&mut *tx)
                .await?;
        })
    }
}

fn steering_from_row((paused, min_extra, max_extra): (i64, i64, Option<i64>)) -> ScalerSteering {
    ScalerSteering {
        paused: paused != 0,
        min_extra: u32::try_from(min_extra).unwrap_or(0),
        max_extra: max_extra.map(|max| u32::try_from(max).unwrap_or(0)),
    }
}
