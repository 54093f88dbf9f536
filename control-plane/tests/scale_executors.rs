//! The autoscaler's executors against what they drive for real: the `command` executor runs
//! recording scripts that the tests write, the `aws` executor talks to moto, an AWS API
//! emulator in server mode (`scripts/lib/moto.sh` starts it and exports
//! `CALLFLEET_TEST_AWS_ENDPOINT`), with groups the tests create through the SDK.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_config::{BehaviorVersion, ConfigLoader, Region};
use aws_sdk_autoscaling::Client;
use aws_sdk_autoscaling::config::Credentials;
use aws_sdk_autoscaling::types::AutoScalingGroup;
use callfleet_control_plane::scale::executor::{
    Action, AwsConfig, CommandConfig, Executor, ExecutorConfig, ExecutorError,
};
use callfleet_core::NodeId;
use tempfile::TempDir;
use tokio::time::Instant;

fn action() -> Action {
    Action {
        token: 42,
        // Quotes, `$(…)` and a newline: a shell would make something else of them.
        reason: "load 0.82 > 0.70 for 60s; `$(touch /tmp/pwned)` 'quoted'\nsecond line".into(),
    }
}

fn node(id: &str) -> NodeId {
    NodeId::new(id).expect("valid node id")
}

// --- command -----------------------------------------------------------------------------

/// A temp folder with scripts run as `/bin/sh <script> <args…>` (not exec'd directly: a
/// file just written cannot be exec'd while another thread's fork still holds it open).
struct Scripts {
    dir: TempDir,
}

impl Scripts {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `body` as the script `name`; returns its argv with `args` after it.
    fn script(&self, name: &str, body: &str, args: &[&Path]) -> Vec<String> {
        let path = self.path(name);
        std::fs::write(&path, body).expect("write script");
        let mut argv = vec!["/bin/sh".to_owned(), path.display().to_string()];
        argv.extend(args.iter().map(|arg| arg.display().to_string()));
        argv
    }

    async fn executor(
        &self,
        start: Vec<String>,
        terminate: Vec<String>,
        timeout: Duration,
    ) -> Executor {
        Executor::from_config(&ExecutorConfig::Command(CommandConfig {
            start,
            terminate,
            timeout,
        }))
        .await
        .expect("valid command config")
    }
}

/// Writes what the executor put in the environment, one variable after the other, each
/// ended by a line `--`, so that the reason's own newline is kept.
const RECORDER: &str = r#"{
for name in CALLFLEET_SCALE_COUNT CALLFLEET_NODE_ID CALLFLEET_SCALE_TOKEN CALLFLEET_SCALE_REASON; do
    eval "set=\${$name+x}"
    if [ "$set" = x ]; then eval "printf '%s=%s\n' $name \"\$$name\""; else printf '%s unset\n' "$name"; fi
    printf '%s\n' --
done
printf 'args=%s\n' "$#"
read -r line && printf 'stdin=%s\n' "$line" || printf 'stdin closed\n'
} >"$1"
"#;

#[tokio::test]
async fn launch_runs_start_with_the_count_token_and_reason_in_its_environment() {
    let scripts = Scripts::new();
    let record = scripts.path("start.out");
    let start = scripts.script("start.sh", RECORDER, &[&record]);
    let terminate = scripts.script("terminate.sh", "exit 99\n", &[]);
    let executor = scripts
        .executor(start, terminate, Duration::from_secs(10))
        .await;

    executor.launch(3, &action()).await.expect("start succeeds");

    assert_eq!(
        std::fs::read_to_string(&record).expect("recorded"),
        "CALLFLEET_SCALE_COUNT=3\n--\n\
         CALLFLEET_NODE_ID unset\n--\n\
         CALLFLEET_SCALE_TOKEN=42\n--\n\
         CALLFLEET_SCALE_REASON=load 0.82 > 0.70 for 60s; `$(touch /tmp/pwned)` 'quoted'\nsecond line\n--\n\
         args=1\n\
         stdin closed\n"
    );
}

#[tokio::test]
async fn terminate_runs_terminate_with_the_node_id_token_and_reason_in_its_environment() {
    let scripts = Scripts::new();
    let record = scripts.path("terminate.out");
    let start = scripts.script("start.sh", "exit 99\n", &[]);
    let terminate = scripts.script("terminate.sh", RECORDER, &[&record]);
    let executor = scripts
        .executor(start, terminate, Duration::from_secs(10))
        .await;
    let action = Action {
        token: 7,
        reason: "drained".into(),
    };

    executor
        .terminate(&node("i-0abc123def4567890"), &action)
        .await
        .expect("terminate succeeds");

    assert_eq!(
        std::fs::read_to_string(&record).expect("recorded"),
        "CALLFLEET_SCALE_COUNT unset\n--\n\
         CALLFLEET_NODE_ID=i-0abc123def4567890\n--\n\
         CALLFLEET_SCALE_TOKEN=7\n--\n\
         CALLFLEET_SCALE_REASON=drained\n--\n\
         args=1\n\
         stdin closed\n"
    );
}

#[tokio::test]
async fn a_failing_command_is_an_error_with_its_status_and_stderr_tail() {
    let scripts = Scripts::new();
    let start = scripts.script(
        "start.sh",
        "echo 'progress on stdout'\necho 'quota exceeded for instance type c6i.xlarge' >&2\nexit 3\n",
        &[],
    );
    let terminate = scripts.script("terminate.sh", "exit 0\n", &[]);
    let command = start.join(" ");
    let executor = scripts
        .executor(start, terminate, Duration::from_secs(10))
        .await;

    let err = executor
        .launch(1, &action())
        .await
        .expect_err("exit 3 fails");

    let ExecutorError::Failed {
        which,
        status,
        stderr,
        ..
    } = &err
    else {
        panic!("not a failure of the command: {err:?}");
    };
    assert_eq!(*which, "start");
    assert_eq!(status.code(), Some(3));
    assert_eq!(stderr, "quota exceeded for instance type c6i.xlarge");
    assert_eq!(
        err.to_string(),
        format!(
            "start command `{command}` exited with exit status: 3: quota exceeded for instance type c6i.xlarge; check the script"
        )
    );
}

#[tokio::test]
async fn a_missing_program_is_an_error_that_names_it() {
    let scripts = Scripts::new();
    let missing = scripts.path("no-such-program");
    let executor = scripts
        .executor(
            vec![missing.display().to_string()],
            vec!["/bin/true".into()],
            Duration::from_secs(10),
        )
        .await;

    let err = executor.launch(1, &action()).await.expect_err("no program");

    assert!(
        matches!(&err, ExecutorError::Spawn { which: "start", .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot run start command `{}`: ",
            missing.display()
        )),
        "{text}"
    );
    assert!(
        text.ends_with("; check that the program exists and is executable"),
        "{text}"
    );
}

/// Whether `pid` is gone: no such process, or a zombie (killed, waiting for a parent that
/// may never reap it).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) S …`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if gone(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gone(pid)
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .expect("pid recorded")
        .trim()
        .parse()
        .expect("a pid")
}

#[tokio::test]
async fn a_command_past_its_timeout_is_killed_with_its_whole_process_group() {
    let scripts = Scripts::new();
    let pid_file = scripts.path("child.pid");
    let start = scripts.script(
        "start.sh",
        "sleep 300 &\necho $! >\"$1\"\necho 'waiting for the hypervisor' >&2\nsleep 300\n",
        &[&pid_file],
    );
    let terminate = scripts.script("terminate.sh", "exit 0\n", &[]);
    let command = start.join(" ");
    let executor = scripts
        .executor(start, terminate, Duration::from_millis(500))
        .await;

    let started = Instant::now();
    let err = executor.launch(1, &action()).await.expect_err("times out");
    let took = started.elapsed();

    assert_eq!(
        err.to_string(),
        format!(
            "start command `{command}` still running after 500ms; its process group was killed (stderr: waiting for the hypervisor); check the script or raise the executor's `timeout`"
        )
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let child = read_pid(&pid_file);
    assert!(
        wait_gone(child, Duration::from_secs(2)).await,
        "the backgrounded child {child} survived its group's kill"
    );
}

#[tokio::test]
async fn a_daemon_left_behind_by_a_successful_command_does_not_hold_the_action() {
    let scripts = Scripts::new();
    let pid_file = scripts.path("daemon.pid");
    // The daemon keeps the command's stdout and stderr open.
    let start = scripts.script(
        "start.sh",
        "sleep 300 &\necho $! >\"$1\"\nexit 0\n",
        &[&pid_file],
    );
    let terminate = scripts.script("terminate.sh", "exit 0\n", &[]);
    let executor = scripts
        .executor(start, terminate, Duration::from_secs(30))
        .await;

    let started = Instant::now();
    let result = executor.launch(1, &action()).await;
    let took = started.elapsed();
    let daemon = read_pid(&pid_file);
    let alive = !gone(daemon);
    let _ = std::process::Command::new("kill")
        .arg(daemon.to_string())
        .status();

    result.expect("start succeeds");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        alive,
        "the daemon {daemon} the command meant to leave was killed"
    );
}

// --- aws (moto) ----------------------------------------------------------------------------

/// moto's endpoint, or a failure that says how to get one: a test of the `aws` executor
/// never passes without having talked to the emulator.
fn moto_endpoint() -> String {
    std::env::var("CALLFLEET_TEST_AWS_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "CALLFLEET_TEST_AWS_ENDPOINT is not set: this test needs moto, which ./scripts/test \
             starts (scripts/lib/moto.sh, cf_start_moto); run ./scripts/test, or start moto_server \
             and export its http://127.0.0.1:PORT"
        )
    })
}

/// Dummy credentials on the loader itself: the process environment is left alone.
fn loader() -> ConfigLoader {
    aws_config::defaults(BehaviorVersion::latest())
        .credentials_provider(Credentials::new(
            "testing",
            "testing",
            None,
            None,
            "scale-executors-test",
        ))
        .region(Region::new("us-east-1"))
}

/// A group of moto's, made for one test, with the executor that drives it.
struct Group {
    admin: Client,
    name: String,
    executor: Executor,
}

const MAX_SIZE: i32 = 3;
const HOOK: &str = "callfleet-drain";

impl Group {
    /// An Auto Scaling group `callfleet-extra-<test>-<pid>` (moto's state is shared by the
    /// test processes) of min 0 and max [`MAX_SIZE`], with a termination lifecycle hook.
    /// New instances come *un*protected from scale-in, unlike Terraform's group, so that
    /// [`Executor::protect_new`] has work to show.
    async fn create(endpoint: &str, test: &str) -> Self {
        let admin = Client::new(&loader().endpoint_url(endpoint).load().await);
        let name = format!("callfleet-extra-{test}-{}", std::process::id());
        admin
            .create_launch_configuration()
            .launch_configuration_name(&name)
            // One of the AMI ids moto knows.
            .image_id("ami-12c6146b")
            .instance_type("t3.micro")
            .send()
            .await
            .expect("create launch configuration");
        admin
            .create_auto_scaling_group()
            .auto_scaling_group_name(&name)
            .launch_configuration_name(&name)
            .min_size(0)
            .max_size(MAX_SIZE)
            .desired_capacity(0)
            .availability_zones("us-east-1a")
            .new_instances_protected_from_scale_in(false)
            .send()
            .await
            .expect("create auto scaling group");
        admin
            .put_lifecycle_hook()
            .auto_scaling_group_name(&name)
            .lifecycle_hook_name(HOOK)
            .lifecycle_transition("autoscaling:EC2_INSTANCE_TERMINATING")
            .heartbeat_timeout(3600)
            .default_result("CONTINUE")
            .send()
            .await
            .expect("put lifecycle hook");
        let config = AwsConfig {
            group: name.clone(),
            region: Some("us-east-1".into()),
            endpoint: Some(endpoint.to_owned()),
            lifecycle_hook: Some(HOOK.into()),
        };
        let executor = Executor::Aws(
            callfleet_control_plane::scale::aws::AwsExecutor::with_loader(&config, loader())
                .await
                .expect("aws executor"),
        );
        Self {
            admin,
            name,
            executor,
        }
    }

    async fn describe(&self) -> AutoScalingGroup {
        self.admin
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.name)
            .send()
            .await
            .expect("describe group")
            .auto_scaling_groups()
            .first()
            .cloned()
            .expect("the group exists")
    }

    async fn desired(&self) -> i32 {
        self.describe().await.desired_capacity().expect("desired")
    }

    /// The group's instances as (id, state, protected), sorted by id.
    async fn instances(&self) -> Vec<(String, String, bool)> {
        let mut instances: Vec<_> = self
            .describe()
            .await
            .instances()
            .iter()
            .map(|instance| {
                (
                    instance.instance_id().expect("id").to_owned(),
                    instance
                        .lifecycle_state()
                        .expect("state")
                        .as_str()
                        .to_owned(),
                    instance.protected_from_scale_in().expect("protection"),
                )
            })
            .collect();
        instances.sort();
        instances
    }

    async fn ids(&self) -> Vec<String> {
        self.instances()
            .await
            .into_iter()
            .map(|(id, _, _)| id)
            .collect()
    }
}

#[tokio::test]
async fn aws_launch_raises_desired_capacity_and_protect_new_protects_the_new_instances() {
    let endpoint = moto_endpoint();
    let group = Group::create(&endpoint, "launch").await;

    group.executor.launch(2, &action()).await.expect("launch 2");

    assert_eq!(group.desired().await, 2);
    let instances = group.instances().await;
    assert_eq!(instances.len(), 2, "{instances:?}");
    assert!(
        instances
            .iter()
            .all(|(id, state, protected)| id.starts_with("i-")
                && state == "InService"
                && !protected),
        "{instances:?}"
    );

    let mut protected = group.executor.protect_new().await.expect("protect new");
    protected.sort();
    assert_eq!(protected, group.ids().await);
    assert!(
        group
            .instances()
            .await
            .iter()
            .all(|(_, _, protected)| *protected),
        "{:?}",
        group.instances().await
    );
    assert_eq!(
        group.executor.protect_new().await.expect("protect again"),
        Vec::<String>::new()
    );
    assert_eq!(group.desired().await, 2);
}

#[tokio::test]
async fn aws_terminate_ends_that_instance_and_lowers_desired_capacity_by_one() {
    let endpoint = moto_endpoint();
    let group = Group::create(&endpoint, "terminate").await;
    group.executor.launch(2, &action()).await.expect("launch 2");
    group.executor.protect_new().await.expect("protect new");
    let ids = group.ids().await;
    assert_eq!(ids.len(), 2, "{ids:?}");
    let (victim, survivor) = (&ids[0], &ids[1]);

    group
        .executor
        .terminate(&node(victim), &action())
        .await
        .expect("terminate a protected, drained instance");

    assert_eq!(group.desired().await, 1);
    assert_eq!(
        group.instances().await,
        vec![(survivor.clone(), "InService".to_owned(), true)]
    );
    let left = group
        .admin
        .describe_auto_scaling_instances()
        .instance_ids(victim)
        .send()
        .await
        .expect("describe instances");
    assert!(
        left.auto_scaling_instances().iter().all(|instance| instance
            .lifecycle_state()
            .is_some_and(|state| state.starts_with("Terminat"))),
        "{left:?}"
    );
}

#[tokio::test]
async fn aws_terminate_of_an_instance_outside_the_group_is_refused_and_changes_nothing() {
    let endpoint = moto_endpoint();
    let group = Group::create(&endpoint, "outside").await;
    let other = Group::create(&endpoint, "outside-other").await;
    group.executor.launch(1, &action()).await.expect("launch 1");
    other
        .executor
        .launch(1, &action())
        .await
        .expect("launch 1 in the other group");
    let before = (group.instances().await, other.instances().await);
    let others_instance = other.ids().await.remove(0);

    for id in ["i-0123456789abcdef0", others_instance.as_str()] {
        let err = group
            .executor
            .terminate(&node(id), &action())
            .await
            .expect_err("not in the group");
        assert!(matches!(&err, ExecutorError::NotInGroup { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "refusing to terminate node `{id}`: Auto Scaling group `{}` has no instance with that id; an extra node's id must be its EC2 instance id (the launch template's user-data sets it)",
                group.name
            )
        );
    }

    assert_eq!((group.instances().await, other.instances().await), before);
    assert_eq!((group.desired().await, other.desired().await), (1, 1));
}

#[tokio::test]
async fn aws_launch_past_the_max_size_is_refused_with_desired_capacity_unchanged() {
    let endpoint = moto_endpoint();
    let group = Group::create(&endpoint, "max").await;
    group.executor.launch(2, &action()).await.expect("launch 2");

    let err = group
        .executor
        .launch(2, &action())
        .await
        .expect_err("4 > max 3");

    assert_eq!(
        err.to_string(),
        format!(
            "cannot start 2 more extra node(s): Auto Scaling group `{}` would need a desired capacity of 4, above its max size 3; raise the group's max size or lower the autoscaler's max_extra",
            group.name
        )
    );
    assert_eq!(group.desired().await, 2);
    assert_eq!(group.ids().await.len(), 2);
    group
        .executor
        .launch(1, &action())
        .await
        .expect("up to the max is fine");
    assert_eq!(group.desired().await, MAX_SIZE);
}

#[tokio::test]
async fn aws_a_group_that_does_not_exist_is_named_in_the_error() {
    let endpoint = moto_endpoint();
    let config = AwsConfig {
        group: "callfleet-no-such-group".into(),
        region: Some("us-east-1".into()),
        endpoint: Some(endpoint),
        lifecycle_hook: None,
    };
    let executor = callfleet_control_plane::scale::aws::AwsExecutor::with_loader(&config, loader())
        .await
        .expect("aws executor");

    let err = executor
        .launch(1, &action())
        .await
        .expect_err("no such group");

    assert_eq!(
        err.to_string(),
        "Auto Scaling group `callfleet-no-such-group` not found; check the scale executor's `group` and `region`"
    );
}
