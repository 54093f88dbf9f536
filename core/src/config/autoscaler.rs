//! The autoscaler's settings (`[control_plane.autoscaler]`): when extra nodes are added and
//! removed, and what starts and ends them.
//!
//! The defaults are on the safe side: off until an executor is configured; scale out only
//! after the load has stayed high for a minute, scale in only after it would have stayed
//! low *with one node fewer* for ten minutes, with cooldowns after each action, and never
//! past `max_extra`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The autoscaler in the control plane. Exactly one control plane acts at a time: the one
/// holding the lease `autoscaler` in the lock service (`control_plane.lock_service`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscalerConfig {
    /// Whether this control plane takes part (it still acts only while it leads).
    pub enabled: bool,
    /// What starts and ends extra nodes; required when `enabled`.
    pub executor: Option<ExecutorConfig>,
    /// Add extra nodes when the fleet's calls stay above this share of its capacity...
    pub scale_out_above: f64,
    /// ...for this long.
    #[serde(with = "humantime_serde")]
    pub scale_out_for: Duration,
    /// Remove an extra node when the calls would stay below this share of the capacity
    /// left without it...
    pub scale_in_below: f64,
    /// ...for this long.
    #[serde(with = "humantime_serde")]
    pub scale_in_for: Duration,
    /// The most extra nodes at once (supervisors may set a lower maximum, not a higher one).
    pub max_extra: u32,
    /// Calls a node that has not reported yet is counted to carry (its `node.max_calls`),
    /// so nodes that are booting are not started twice.
    pub extra_node_calls: u32,
    /// After adding nodes, no further action for this long (the new nodes boot and take
    /// calls).
    #[serde(with = "humantime_serde")]
    pub cooldown_out: Duration,
    /// After removing a node, no further removal for this long.
    #[serde(with = "humantime_serde")]
    pub cooldown_in: Duration,
    /// A draining node still carrying calls after this long is terminated anyway, with an
    /// error in the log; keep it at or below the cloud's termination hook timeout.
    #[serde(with = "humantime_serde")]
    pub max_drain: Duration,
    /// A node started but not heartbeating within this long is given up and replaced.
    #[serde(with = "humantime_serde")]
    pub boot_timeout: Duration,
    /// How often the leader looks at the fleet.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// The leader's lease: a dead leader's successor takes over within about this long.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Protections switched off; only tests set them, never a file.
    #[serde(skip)]
    pub unsafe_for_tests: UnsafeScalerSwitches,
}

/// The autoscaler's protections that only tests switch off, so that a test can show each
/// one is what keeps its scenario safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnsafeScalerSwitches {
    /// Act without holding the lease: every enabled control plane leads.
    pub no_lease: bool,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            executor: None,
            scale_out_above: 0.7,
            scale_out_for: Duration::from_secs(60),
            scale_in_below: 0.5,
            scale_in_for: Duration::from_secs(600),
            max_extra: 10,
            extra_node_calls: 100,
            cooldown_out: Duration::from_secs(180),
            cooldown_in: Duration::from_secs(600),
            max_drain: Duration::from_secs(900),
            boot_timeout: Duration::from_secs(600),
            tick: Duration::from_secs(5),
            lease: Duration::from_secs(15),
            unsafe_for_tests: UnsafeScalerSwitches::default(),
        }
    }
}

impl AutoscalerConfig {
    /// What is wrong, as (key under `control_plane.autoscaler`, reason).
    pub(crate) fn check(&self, lock_service: &str) -> Result<(), (&'static str, String)> {
        if self.enabled && self.executor.is_none() {
            return Err((
                "executor",
                "is required when enabled: kind = \"command\" (start/terminate programs) or \"aws\" (an Auto Scaling group)".into(),
            ));
        }
        if self.enabled && lock_service.is_empty() {
            return Err((
                "enabled",
                "needs control_plane.lock_service: the leader holds a lease there, so two control planes never both act".into(),
            ));
        }
        let share = |x: f64| x.is_finite() && x > 0.0 && x <= 1.0;
        if !share(self.scale_out_above) || !share(self.scale_in_below) {
            return Err((
                "scale_out_above",
                format!(
                    "scale_out_above ({}) and scale_in_below ({}) must be shares of the capacity above 0 and at most 1, e.g. 0.7 and 0.5",
                    self.scale_out_above, self.scale_in_below
                ),
            ));
        }
        if self.scale_in_below >= self.scale_out_above {
            return Err((
                "scale_in_below",
                format!(
                    "must be below scale_out_above ({}), or the fleet flaps between the two, e.g. 0.5",
                    self.scale_out_above
                ),
            ));
        }
        if self.extra_node_calls == 0 {
            return Err(("extra_node_calls", "must be at least 1, e.g. 100".into()));
        }
        for (key, value) in [
            ("scale_out_for", self.scale_out_for),
            ("scale_in_for", self.scale_in_for),
            ("max_drain", self.max_drain),
            ("boot_timeout", self.boot_timeout),
            ("tick", self.tick),
            ("lease", self.lease),
        ] {
            if value.is_zero() {
                return Err((key, "must be above zero".into()));
            }
        }
        if self.lease <= self.tick * 2 {
            return Err((
                "lease",
                format!(
                    "must be more than two ticks ({:?}), so a leader renews it in time, e.g. 15s",
                    self.tick * 2
                ),
            ));
        }
        if let Some(ExecutorConfig::Command(command)) = &self.executor
            && (command.start.is_empty() || command.terminate.is_empty())
        {
            return Err((
                "executor",
                "the command executor needs both start and terminate programs, e.g. start = [\"/usr/local/bin/start-node\"]".into(),
            ));
        }
        if let Some(ExecutorConfig::Aws(aws)) = &self.executor
            && aws.group.trim().is_empty()
        {
            return Err((
                "executor",
                "the aws executor needs the Auto Scaling group's name (group = \"…\")".into(),
            ));
        }
        Ok(())
    }
}

/// Which executor carries out the autoscaler's decisions, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExecutorConfig {
    /// Configured programs start and end extra nodes.
    Command(CommandConfig),
    /// An EC2 Auto Scaling group holds the extra nodes.
    Aws(AwsConfig),
}

/// The programs of the `command` executor. Each is an argv run without a shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Starts `CALLFLEET_SCALE_COUNT` more extra nodes, e.g.
    /// `["/usr/local/bin/start-nodes"]`. It may return before they boot: the autoscaler
    /// waits for their heartbeats.
    pub start: Vec<String>,
    /// Ends the extra node `CALLFLEET_NODE_ID`, which has no calls left.
    pub terminate: Vec<String>,
    /// How long one run may take before its whole process group is killed and the action
    /// fails.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(5 * 60)
}

/// The EC2 Auto Scaling group of the `aws` executor. Credentials come from the standard AWS
/// chain (environment, profile, instance profile).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// The Auto Scaling group's name (Terraform's `extra` module outputs it).
    pub group: String,
    /// The group's region; unset: the standard chain's (`AWS_REGION`, profile, instance
    /// metadata).
    #[serde(default)]
    pub region: Option<String>,
    /// Another endpoint than AWS's, e.g. an emulator's `http://127.0.0.1:5000`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The group's termination lifecycle hook, completed once a drained node is
    /// terminated so the instance does not wait out the hook's timeout.
    #[serde(default)]
    pub lifecycle_hook: Option<String>,
}
