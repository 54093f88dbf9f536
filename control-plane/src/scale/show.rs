//! The autoscaler's status as `callfleet scale status` prints it: what supervisors set,
//! the fleet by the policy's measure against its thresholds, the leader, and the latest
//! decisions with why each was taken.

use std::fmt::Write as _;

use callfleet_core::store::ScalerSteering;

use crate::service::AutoscalerView;

/// Renders `view` as a few labelled lines and a table of the latest decisions.
pub fn render(view: &AutoscalerView) -> String {
    let mut out = String::new();
    let f = &view.figures;
    let percent = |share: f64| format!("{:.0} %", share * 100.0);
    let _ = writeln!(
        out,
        "autoscaler   {}{}",
        if view.steering.paused {
            "PAUSED by supervisors"
        } else {
            "running"
        },
        if view.enabled {
            ""
        } else {
            " (not enabled in this configuration)"
        }
    );
    let _ = writeln!(
        out,
        "steering     {}",
        steering(&view.steering, f.max_extra)
    );
    let _ = writeln!(
        out,
        "extra nodes  {} active, {} booting, {} draining (min {}, max {})",
        f.extra_active, f.extra_booting, f.extra_draining, f.min_extra, f.max_extra
    );
    let _ = writeln!(
        out,
        "load         {} calls / {} capacity = {} (add above {}, remove below {})",
        f.calls,
        f.capacity,
        f.utilisation.map_or_else(|| "–".to_owned(), percent),
        percent(view.scale_out_above),
        percent(view.scale_in_below)
    );
    let _ = match &view.leader {
        Some(leader) => writeln!(
            out,
            "leader       {} (token {})",
            leader.holder, leader.token
        ),
        None => writeln!(
            out,
            "leader       none (nobody holds the lease, or the lock service did not answer)"
        ),
    };
    if view.recent.is_empty() {
        let _ = writeln!(out, "\nno decisions or steering yet");
        return out;
    }
    let _ = writeln!(
        out,
        "\n{:<19}  {:<16} {:<16} {:<16} WHY",
        "WHEN (UTC)", "WHO", "ACTION", "SUBJECT"
    );
    for row in &view.recent {
        let when = jiff::Timestamp::from_millisecond(row.at_ms)
            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|_| row.at_ms.to_string());
        // A decision says why; a change of steering, what it was set to.
        let why = match (row.detail.get("why"), row.detail.get("now")) {
            (Some(why), _) => why.as_str().map_or_else(|| why.to_string(), str::to_owned),
            (None, Some(now)) => serde_json::from_value::<ScalerSteering>(now.clone())
                .map(|now| format!("set: {}", steering(&now, f.max_extra)))
                .unwrap_or_else(|_| now.to_string()),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            out,
            "{when:<19}  {:<16} {:<16} {:<16} {why}",
            row.actor, row.action, row.subject
        );
    }
    out
}

/// `running, min 1, max 3` (`max configured (N)` when supervisors set none).
fn steering(steering: &ScalerSteering, configured: u32) -> String {
    format!(
        "{}, min {}, max {}",
        if steering.paused { "paused" } else { "running" },
        steering.min_extra,
        steering.max_extra.map_or_else(
            || format!("configured ({configured})"),
            |max| max.to_string()
        )
    )
}
