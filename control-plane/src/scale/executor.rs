//! What carries out the autoscaler's decisions: start more extra nodes, end one.
//!
//! The autoscaler decides *whether* and *which*; an [`Executor`] only does what it is told,
//! and says in its error what failed and what the operator can do about it. Two kinds exist,
//! chosen by the config's `kind`:
//!
//! - `command` ([`CommandExecutor`]): the operator's own programs, for clouds or
//!   hypervisors callfleet does not speak to directly;
//! - `aws` ([`AwsExecutor`]): an EC2 Auto Scaling group whose instances are the extra nodes
//!   (the node id of an extra node is its instance id).
//!
//! Every action carries the autoscaler's lease token ([`Action`]): the commands see it in
//! their environment and the AWS calls log it, so an action of a leader that lost its lease
//! can be told apart from its successor's.

use std::time::Duration;

use callfleet_core::NodeId;

pub use callfleet_core::config::{AwsConfig, CommandConfig, ExecutorConfig};

pub use super::aws::AwsExecutor;
pub use super::command::CommandExecutor;

/// What an action is done under: the autoscaler's lease token, recorded so a superseded
/// leader's late action can be recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// The fencing token of the lease the autoscaler held when it decided.
    pub token: u64,
    /// Why, in words with the numbers behind it (it ends up in the audit log and the
    /// commands' environment).
    pub reason: String,
}

/// Why an executor could not carry out an action, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The executor's configuration cannot work.
    #[error("scale executor: {0}")]
    Config(String),
    /// A command could not be started at all.
    #[error(
        "cannot run {which} command `{command}`: {source}; check that the program exists and is executable"
    )]
    Spawn {
        /// `start` or `terminate`.
        which: &'static str,
        /// The argv, joined.
        command: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A command ran and exited with a failure status (or a signal).
    #[error("{which} command `{command}` exited with {status}: {stderr}; check the script")]
    Failed {
        /// `start` or `terminate`.
        which: &'static str,
        /// The argv, joined.
        command: String,
        /// How it ended.
        status: std::process::ExitStatus,
        /// The last lines it wrote to stderr.
        stderr: String,
    },
    /// A command ran past its timeout; its whole process group was killed.
    #[error(
        "{which} command `{command}` still running after {}; its process group was killed (stderr: {stderr}); check the script or raise the executor's `timeout`",
        humantime_serde::re::humantime::format_duration(*timeout)
    )]
    TimedOut {
        /// `start` or `terminate`.
        which: &'static str,
        /// The argv, joined.
        command: String,
        /// The configured timeout.
        timeout: Duration,
        /// The last lines it wrote to stderr.
        stderr: String,
    },
    /// Waiting for a command failed.
    #[error("cannot wait for {which} command `{command}`: {source}")]
    Wait {
        /// `start` or `terminate`.
        which: &'static str,
        /// The argv, joined.
        command: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// An AWS API call failed.
    #[error(
        "AWS {operation} on Auto Scaling group `{group}` failed: {message}; check the credentials, the region, the group and the autoscaler's IAM policy"
    )]
    Aws {
        /// The API operation, e.g. `SetDesiredCapacity`.
        operation: &'static str,
        /// The group's name.
        group: String,
        /// The SDK's error with its whole chain of causes.
        message: String,
    },
    /// The configured Auto Scaling group does not exist.
    #[error(
        "Auto Scaling group `{group}` not found; check the scale executor's `group` and `region`"
    )]
    GroupNotFound {
        /// The group's name.
        group: String,
    },
    /// A launch would take the group past its max size.
    #[error(
        "cannot start {count} more extra node(s): Auto Scaling group `{group}` would need a desired capacity of {wanted}, above its max size {max}; raise the group's max size or lower the autoscaler's max_extra"
    )]
    OverMax {
        /// The group's name.
        group: String,
        /// How many more nodes were asked for.
        count: u32,
        /// The desired capacity that would have needed.
        wanted: i64,
        /// The group's max size.
        max: i32,
    },
    /// The node to end is not an instance of the group; nothing was called.
    #[error(
        "refusing to terminate node `{node}`: Auto Scaling group `{group}` has no instance with that id; an extra node's id must be its EC2 instance id (the launch template's user-data sets it)"
    )]
    NotInGroup {
        /// The node id given.
        node: String,
        /// The group's name.
        group: String,
    },
}

/// Carries out the autoscaler's decisions with the configured executor.
#[derive(Debug)]
pub enum Executor {
    /// Configured programs.
    Command(CommandExecutor),
    /// An EC2 Auto Scaling group.
    Aws(AwsExecutor),
}

impl Executor {
    /// Checks `config` and makes its executor (for `aws`, loads the SDK's configuration and
    /// credentials chain).
    pub async fn from_config(config: &ExecutorConfig) -> Result<Self, ExecutorError> {
        Ok(match config {
            ExecutorConfig::Command(config) => Self::Command(CommandExecutor::new(config.clone())?),
            ExecutorConfig::Aws(config) => Self::Aws(AwsExecutor::from_config(config).await?),
        })
    }

    /// Starts `count` more extra nodes.
    pub async fn launch(&self, count: u32, action: &Action) -> Result<(), ExecutorError> {
        match self {
            Self::Command(executor) => executor.launch(count, action).await,
            Self::Aws(executor) => executor.launch(count, action).await,
        }
    }

    /// Ends the extra node `node` (already drained, or drained past max_drain): its calls are gone.
    pub async fn terminate(&self, node: &NodeId, action: &Action) -> Result<(), ExecutorError> {
        match self {
            Self::Command(executor) => executor.terminate(node, action).await,
            Self::Aws(executor) => executor.terminate(node, action).await,
        }
    }

    /// Protects the new in-service instances from scale-in, so that only the autoscaler
    /// chooses which node ends (`aws`; nothing to do for `command`). Returns the instances
    /// it protected.
    pub async fn protect_new(&self) -> Result<Vec<String>, ExecutorError> {
        match self {
            Self::Command(_) => Ok(Vec::new()),
            Self::Aws(executor) => executor.protect_new().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_config_reads_with_its_default_timeout() {
        let config: ExecutorConfig = serde_json::from_value(serde_json::json!({
            "kind": "command",
            "start": ["/bin/start", "--fast"],
            "terminate": ["/bin/stop"],
        }))
        .expect("valid");
        assert_eq!(
            config,
            ExecutorConfig::Command(CommandConfig {
                start: vec!["/bin/start".into(), "--fast".into()],
                terminate: vec!["/bin/stop".into()],
                timeout: Duration::from_secs(300),
            })
        );
    }

    #[test]
    fn an_aws_config_reads_with_humantime_and_options() {
        let config: ExecutorConfig = serde_json::from_value(serde_json::json!({
            "kind": "aws",
            "group": "callfleet-extra",
            "lifecycle_hook": "drain",
        }))
        .expect("valid");
        assert_eq!(
            config,
            ExecutorConfig::Aws(AwsConfig {
                group: "callfleet-extra".into(),
                region: None,
                endpoint: None,
                lifecycle_hook: Some("drain".into()),
            })
        );
        let config: ExecutorConfig = serde_json::from_value(serde_json::json!({
            "kind": "command", "start": ["a"], "terminate": ["b"], "timeout": "90s",
        }))
        .expect("valid");
        let ExecutorConfig::Command(command) = config else {
            panic!("not a command config: {config:?}");
        };
        assert_eq!(command.timeout, Duration::from_secs(90));
    }

    #[test]
    fn unknown_keys_and_kinds_are_refused_by_name() {
        let err = serde_json::from_value::<ExecutorConfig>(serde_json::json!({
            "kind": "aws", "group": "g", "regoin": "us-east-1",
        }))
        .expect_err("typo")
        .to_string();
        assert!(err.contains("unknown field `regoin`"), "{err}");
        let err = serde_json::from_value::<ExecutorConfig>(serde_json::json!({
            "kind": "gcp", "group": "g",
        }))
        .expect_err("unknown kind")
        .to_string();
        assert!(err.contains("unknown variant `gcp`"), "{err}");
    }
}
