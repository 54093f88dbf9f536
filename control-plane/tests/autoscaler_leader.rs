//! Two control planes' autoscalers (issue 12), each `scale::run` as the control plane runs
//! it, on one store beside a real lock service (memory backend) on loopback, with the
//! `command` executor's programs recording what they are asked: exactly one acts while it
//! holds the lease; when it dies without a word, the other takes over within the lease and
//! acts under a higher token. The negative control switches the lease off: both act.

#[allow(dead_code)] // This crate needs only the support's lock service.
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use callfleet_control_plane::scale;
use callfleet_core::config::{
    AutoscalerConfig, CommandConfig, ExecutorConfig, UnsafeScalerSwitches,
};
use callfleet_core::store::ScalerSteering;
use callfleet_core::{NodeRole, Store, testing};
use support::Locks;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_millis(1500);
/// The lock service's default guard: a lease's resource stays claimed this long after its
/// validity, so a successor waits for the lease and the guard.
const GUARD: Duration = Duration::from_secs(5);

/// `start` and `terminate` programs appending `launch COUNT TOKEN` and
/// `terminate NODE TOKEN` to `record`.
fn executor(dir: &Path, record: &Path) -> ExecutorConfig {
    let script = |name: &str, line: &str| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"{line}\" >> '{}'\n",
                record.display()
            ),
        )
        .expect("write script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        vec![path.display().to_string()]
    };
    ExecutorConfig::Command(CommandConfig {
        start: script(
            "start",
            "launch $CALLFLEET_SCALE_COUNT $CALLFLEET_SCALE_TOKEN",
        ),
        terminate: script(
            "terminate",
            "terminate $CALLFLEET_NODE_ID $CALLFLEET_SCALE_TOKEN",
        ),
        timeout: Duration::from_secs(10),
    })
}

fn lines(record: &Path) -> Vec<String> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn wait_for_lines(record: &Path, count: usize, within: Duration) -> Vec<String> {
    let start = Instant::now();
    loop {
        let now = lines(record);
        if now.len() >= count || start.elapsed() > within {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node heartbeating as long as the test needs (its interval outlasts the test).
async fn heartbeat(store: &Store, id: &str, role: NodeRole) {
    let beat = callfleet_core::Heartbeat {
        role,
        interval: Duration::from_secs(120),
        ..testing::heartbeat(id, 0)
    };
    store.heartbeat(&beat).await.expect("heartbeat");
}

struct Autoscaler {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

fn start(config: &AutoscalerConfig, store: &Store, locks: &Locks, holder: &str) -> Autoscaler {
    let shutdown = CancellationToken::new();
    let (config, store, url, holder, stop) = (
        config.clone(),
        store.clone(),
        locks.url(),
        holder.to_owned(),
        shutdown.clone(),
    );
    let task = tokio::spawn(async move {
        scale::run(config, store, &url, holder, stop)
            .await
            .expect("the autoscaler runs");
    });
    Autoscaler { shutdown, task }
}

async fn lease_holder(locks: &Locks) -> Option<(String, u64)> {
    let answer = locks
        .client()
        .await
        .get(callfleet_proto::lock::v1::GetRequest {
            resource: scale::LEASE.to_owned(),
        })
        .await
        .expect("get")
        .into_inner();
    answer.lease.map(|l| (l.holder, l.token))
}

struct Cluster {
    _dir: tempfile::TempDir,
    record: std::path::PathBuf,
    store: Store,
    locks: Locks,
    config: AutoscalerConfig,
}

async fn cluster(switches: UnsafeScalerSwitches) -> Cluster {
    let dir = tempfile::tempdir().expect("temp dir");
    let record = dir.path().join("record");
    let store = Store::connect(&testing::sqlite_config(dir.path()))
        .await
        .expect("store");
    heartbeat(&store, "core-1", NodeRole::Core).await;
    let locks = Locks::start().await;
    let config = AutoscalerConfig {
        enabled: true,
        executor: Some(executor(dir.path(), &record)),
        tick: Duration::from_millis(100),
        lease: LEASE,
        unsafe_for_tests: switches,
        ..AutoscalerConfig::default()
    };
    Cluster {
        _dir: dir,
        record,
        store,
        locks,
        config,
    }
}

/// Both started, then supervisors ask for one extra node: how many launches follow.
async fn both_asked_for_one_node(cluster: &Cluster) -> (Autoscaler, Autoscaler, Vec<String>) {
    let a = start(&cluster.config, &cluster.store, &cluster.locks, "cp-a");
    // A takes the lease first, so the roles are known.
    let start_wait = Instant::now();
    while !cluster.config.unsafe_for_tests.no_lease && lease_holder(&cluster.locks).await.is_none()
    {
        assert!(
            start_wait.elapsed() < Duration::from_secs(5),
            "nobody leads"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = start(&cluster.config, &cluster.store, &cluster.locks, "cp-b");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let one = ScalerSteering {
        min_extra: 1,
        ..ScalerSteering::default()
    };
    cluster
        .store
        .set_scaler_steering(&one, "ops")
        .await
        .expect("steer");
    wait_for_lines(&cluster.record, 1, Duration::from_secs(5)).await;
    // Ten ticks for a second actor to show itself.
    tokio::time::sleep(Duration::from_secs(1)).await;
    (a, b, lines(&cluster.record))
}

#[tokio::test]
async fn one_control_plane_acts_and_the_other_takes_over_when_it_dies() {
    let cluster = cluster(UnsafeScalerSwitches::default()).await;
    let (a, b, launched) = both_asked_for_one_node(&cluster).await;
    assert_eq!(launched.len(), 1, "{launched:?}");
    let (holder, first_token) = lease_holder(&cluster.locks).await.expect("a leader");
    assert!(holder.starts_with("cp-a"), "{holder}");
    assert_eq!(launched, [format!("launch 1 {first_token}")]);
    // The node it started comes up.
    heartbeat(&cluster.store, "extra-1", NodeRole::Extra).await;

    // A dies without releasing its lease: B leads once the lease runs out.
    a.task.abort();
    let died = Instant::now();
    loop {
        if let Some((holder, _)) = lease_holder(&cluster.locks).await
            && holder.starts_with("cp-b")
        {
            break;
        }
        assert!(
            died.elapsed() < LEASE + GUARD + Duration::from_secs(2),
            "B did not take over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took_over = died.elapsed();
    eprintln!("B leads {took_over:?} after A died (lease {LEASE:?} + guard {GUARD:?})");
    assert!(took_over >= LEASE, "B led while A's lease was still valid");
    let (_, second_token) = lease_holder(&cluster.locks).await.expect("B leads");
    assert!(second_token > first_token);

    // B adopts the running node (no launch of its own), and acts on the next ask.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(lines(&cluster.record).len(), 1);
    let two = ScalerSteering {
        min_extra: 2,
        ..ScalerSteering::default()
    };
    cluster
        .store
        .set_scaler_steering(&two, "ops")
        .await
        .expect("steer");
    let record = wait_for_lines(&cluster.record, 2, Duration::from_secs(5)).await;
    assert_eq!(
        record,
        [
            format!("launch 1 {first_token}"),
            format!("launch 1 {second_token}")
        ]
    );
    // Each action is in the audit log under the token it was taken with.
    let audited: Vec<(String, u64)> = cluster
        .store
        .list_scale_actions(10)
        .await
        .expect("audit")
        .into_iter()
        .filter(|r| r.actor == "autoscaler")
        .map(|r| (r.action, r.detail["token"].as_u64().expect("token")))
        .collect();
    assert_eq!(
        audited,
        [
            ("scale.launch".to_owned(), second_token),
            ("scale.launch".to_owned(), first_token)
        ]
    );
    // A superseded token is refused before anything is done.
    let late = cluster
        .store
        .record_scale_action(
            first_token,
            "scale.launch",
            "autoscaler",
            &serde_json::json!({}),
        )
        .await;
    assert!(late.is_err(), "{late:?}");

    b.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), b.task)
        .await
        .expect("B stops")
        .expect("B ends cleanly");
    assert_eq!(
        lease_holder(&cluster.locks).await,
        None,
        "B released the lease"
    );
    cluster.locks.stop().await;
}

#[tokio::test]
async fn without_the_lease_both_control_planes_act() {
    let cluster = cluster(UnsafeScalerSwitches { no_lease: true }).await;
    let (a, b, launched) = both_asked_for_one_node(&cluster).await;
    assert_eq!(
        launched
            .iter()
            .filter(|l| l.starts_with("launch 1 "))
            .count(),
        2,
        "two actors each started the one node asked for: {launched:?}"
    );
    a.shutdown.cancel();
    b.shutdown.cancel();
    let _ = tokio::join!(a.task, b.task);
    cluster.locks.stop().await;
}
