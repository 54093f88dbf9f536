//! `callfleet scale status` and `callfleet scale set` against a store, without a control
//! plane: what the CLI sets is what the status (and every API face) shows, audited under
//! `cli:<user>`, and a maximum above the configured one is refused naming the field.

mod support;

use std::process::Output;

use serde_json::{Value, json};
use support::*;

/// `callfleet scale ARGS` on the SQLite store in `dir`, as the user `alice`, with a
/// configured ceiling of 5 extra nodes.
fn scale(dir: &std::path::Path, args: &[&str]) -> Output {
    callfleet()
        .arg("scale")
        .args(args)
        .env(
            "CALLFLEET_STORE__URL",
            format!("sqlite://{}/fleet.db", dir.display()),
        )
        .env("CALLFLEET_CONTROL_PLANE__AUTOSCALER__MAX_EXTRA", "5")
        .env("USER", "alice")
        .output()
        .expect("run callfleet scale")
}

fn status_json(dir: &std::path::Path) -> Value {
    let output = scale(dir, &["status", "--json"]);
    assert_success(&output);
    serde_json::from_slice(&output.stdout).expect("scale status --json prints JSON")
}

/// The view without the ids and times of its recent rows.
fn without_ids(mut view: Value) -> Value {
    for row in view["recent"].as_array_mut().expect("recent") {
        let row = row.as_object_mut().expect("a row");
        assert!(row.remove("id").is_some_and(|id| id.is_i64()));
        assert!(row.remove("at_ms").is_some_and(|at| at.is_i64()));
    }
    view
}

#[test]
fn scale_set_then_status_shows_exactly_what_was_set() {
    let dir = tempfile::tempdir().expect("temp dir");
    let set = scale(dir.path(), &["set", "--min", "1", "--max", "3"]);
    assert_success(&set);

    let steering = json!({ "paused": false, "min_extra": 1, "max_extra": 3 });
    let expected = json!({
        "enabled": false,
        "steering": steering,
        "figures": {
            "calls": 0,
            "capacity": 0,
            "utilisation": null,
            "extra_active": 0,
            "extra_booting": 0,
            "extra_draining": 0,
            "min_extra": 1,
            "max_extra": 3,
            "paused": false,
        },
        "scale_out_above": 0.7,
        "scale_in_below": 0.5,
        "leader": null,
        "recent": [{
            "actor": "cli:alice",
            "action": "autoscaler.set",
            "subject": "autoscaler",
            "detail": {
                "now": steering,
                "before": { "paused": false, "min_extra": 0, "max_extra": null },
            },
        }],
    });
    assert_eq!(without_ids(status_json(dir.path())), expected);

    // Above the configured maximum: refused in one line naming the field; nothing written.
    let refused = scale(dir.path(), &["set", "--max", "6"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(
        stderr.trim().lines().last(),
        Some(
            "error: invalid max_extra: 6 is above the configured max_extra (5); raise control_plane.autoscaler.max_extra first"
        ),
        "{stderr}"
    );
    assert_eq!(without_ids(status_json(dir.path())), expected);

    // What is not given stays: pausing keeps the minimum and maximum.
    let pause = scale(dir.path(), &["set", "--pause"]);
    assert_success(&pause);
    let view = status_json(dir.path());
    assert_eq!(
        view["steering"],
        json!({ "paused": true, "min_extra": 1, "max_extra": 3 })
    );
    assert_eq!(view["recent"].as_array().map(Vec::len), Some(2));

    // The table says the same, with why each row was written.
    let table = scale(dir.path(), &["status"]);
    assert_success(&table);
    let table = String::from_utf8_lossy(&table.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[..3],
        [
            "autoscaler   PAUSED by supervisors (not enabled in this configuration)",
            "steering     paused, min 1, max 3",
            "extra nodes  0 active, 0 booting, 0 draining (min 1, max 3)",
        ],
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("cli:alice") && l.ends_with("set: paused, min 1, max 3")),
        "{table}"
    );

    // Resume and back to the configured maximum.
    assert_success(&scale(dir.path(), &["set", "--resume", "--no-max"]));
    assert_eq!(
        status_json(dir.path())["steering"],
        json!({ "paused": false, "min_extra": 1, "max_extra": null })
    );
    // Contradicting flags are a usage error.
    let both = scale(dir.path(), &["set", "--pause", "--resume"]);
    assert_eq!(both.status.code(), Some(2), "{both:?}");
}
