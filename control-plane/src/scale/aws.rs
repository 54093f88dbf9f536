//! The `aws` executor: the extra nodes are the instances of one EC2 Auto Scaling group, and
//! an extra node's id is its instance id (the launch template's user-data sets it).
//!
//! The group owns *how* instances start; the autoscaler owns *how many* and *which one
//! ends*. So a launch only raises the desired capacity (never past the group's max size),
//! and an end is always of a named, drained instance with the capacity lowered in the same
//! call, never a plain lower desired capacity that would let AWS pick a victim carrying
//! calls. New instances are protected from scale-in ([`AwsExecutor::protect_new`] for those
//! that came without it) for the same reason.
//!
//! An end is safe to repeat: an instance already terminating only gets its lifecycle
//! action completed. A node id that is not an instance of the group is refused before any
//! call that changes anything, so a wrong id can never end something else.

use std::time::Duration;

use aws_config::{BehaviorVersion, ConfigLoader, Region};
use aws_sdk_autoscaling::Client;
use aws_sdk_autoscaling::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_autoscaling::types::AutoScalingGroup;
use callfleet_core::NodeId;
use tokio::time::{Instant, sleep};

use super::executor::{Action, AwsConfig, ExecutorError};

/// How long one AWS call may take, retries included.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one attempt of an AWS call may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a terminated instance may take to reach `Terminating:Wait`, where its lifecycle
/// action can be completed.
const HOOK_WAIT: Duration = Duration::from_secs(15);

/// How often its state is read meanwhile.
const HOOK_POLL: Duration = Duration::from_secs(1);

/// Most instances one `SetInstanceProtection` call takes.
const PROTECT_BATCH: usize = 50;

/// Drives one EC2 Auto Scaling group.
#[derive(Debug, Clone)]
pub struct AwsExecutor {
    client: Client,
    group: String,
    lifecycle_hook: Option<String>,
}

impl AwsExecutor {
    /// Makes the executor of `config` with the standard AWS configuration chain
    /// (environment, profile, instance metadata) for credentials and, unless configured,
    /// the region.
    pub async fn from_config(config: &AwsConfig) -> Result<Self, ExecutorError> {
        Self::with_loader(config, aws_config::defaults(BehaviorVersion::latest())).await
    }

    /// [`from_config`](Self::from_config) on the caller's `loader` (e.g. one with fixed
    /// credentials); the config's region and endpoint, when set, take precedence over the
    /// loader's.
    pub async fn with_loader(
        config: &AwsConfig,
        mut loader: ConfigLoader,
    ) -> Result<Self, ExecutorError> {
        if config.group.is_empty() {
            return Err(ExecutorError::Config(
                "aws executor: `group` is empty; give the Auto Scaling group's name".into(),
            ));
        }
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_timeout(OPERATION_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build();
        let sdk = loader.timeout_config(timeouts).load().await;
        if sdk.region().is_none() {
            return Err(ExecutorError::Config(format!(
                "aws executor: no region for Auto Scaling group `{}`; set the executor's `region` or AWS_REGION",
                config.group
            )));
        }
        Ok(Self {
            client: Client::new(&sdk),
            group: config.group.clone(),
            lifecycle_hook: config.lifecycle_hook.clone(),
        })
    }

    /// Raises the group's desired capacity by `count`, without waiting for its cooldown;
    /// refused when that would pass the group's max size.
    pub async fn launch(&self, count: u32, action: &Action) -> Result<(), ExecutorError> {
        if count == 0 {
            return Ok(());
        }
        let group = self.describe_group().await?;
        let desired = group.desired_capacity().unwrap_or(0);
        let max = group.max_size().unwrap_or(0);
        let wanted = i64::from(desired) + i64::from(count);
        let too_many = || ExecutorError::OverMax {
            group: self.group.clone(),
            count,
            wanted,
            max,
        };
        if wanted > i64::from(max) {
            return Err(too_many());
        }
        let wanted_capacity = i32::try_from(wanted).map_err(|_| too_many())?;
        self.client
            .set_desired_capacity()
            .auto_scaling_group_name(&self.group)
            .desired_capacity(wanted_capacity)
            .honor_cooldown(false)
            .send()
            .await
            .map_err(|err| self.failed("SetDesiredCapacity", err))?;
        tracing::info!(
            group = self.group,
            from = desired,
            to = wanted_capacity,
            token = action.token,
            reason = action.reason,
            "extra nodes launched: desired capacity raised"
        );
        Ok(())
    }

    /// Ends the instance `node` and lowers the desired capacity with it, then completes its
    /// termination lifecycle action (the node is drained: the hook's wait is over).
    pub async fn terminate(&self, node: &NodeId, action: &Action) -> Result<(), ExecutorError> {
        let group = self.describe_group().await?;
        let instance = group
            .instances()
            .iter()
            .find(|instance| instance.instance_id() == Some(node.as_str()))
            .ok_or_else(|| ExecutorError::NotInGroup {
                node: node.to_string(),
                group: self.group.clone(),
            })?;
        let state = instance
            .lifecycle_state()
            .map(|state| state.as_str().to_owned());
        let id = node.as_str();
        if state.as_deref().is_some_and(is_terminating) {
            tracing::info!(
                group = self.group,
                instance = id,
                state,
                token = action.token,
                "extra node already terminating"
            );
        } else {
            self.client
                .set_instance_protection()
                .auto_scaling_group_name(&self.group)
                .instance_ids(id)
                .protected_from_scale_in(false)
                .send()
                .await
                .map_err(|err| self.failed("SetInstanceProtection", err))?;
            self.client
                .terminate_instance_in_auto_scaling_group()
                .instance_id(id)
                .should_decrement_desired_capacity(true)
                .send()
                .await
                .map_err(|err| self.failed("TerminateInstanceInAutoScalingGroup", err))?;
            tracing::info!(
                group = self.group,
                instance = id,
                token = action.token,
                reason = action.reason,
                "extra node terminated: desired capacity lowered"
            );
        }
        if let Some(hook) = &self.lifecycle_hook {
            self.complete_lifecycle_action(hook, id, action).await?;
        }
        Ok(())
    }

    /// Protects the group's in-service instances that are not yet protected from scale-in,
    /// so that only the autoscaler chooses which node ends; returns their ids. Instances
    /// appear some time after a launch: the autoscaler calls this from its loop.
    pub async fn protect_new(&self) -> Result<Vec<String>, ExecutorError> {
        let group = self.describe_group().await?;
        let unprotected: Vec<String> = group
            .instances()
            .iter()
            .filter(|instance| {
                instance
                    .lifecycle_state()
                    .is_some_and(|state| state.as_str() == "InService")
                    && instance.protected_from_scale_in() != Some(true)
            })
            .filter_map(|instance| instance.instance_id().map(str::to_owned))
            .collect();
        for batch in unprotected.chunks(PROTECT_BATCH) {
            self.client
                .set_instance_protection()
                .auto_scaling_group_name(&self.group)
                .set_instance_ids(Some(batch.to_vec()))
                .protected_from_scale_in(true)
                .send()
                .await
                .map_err(|err| self.failed("SetInstanceProtection", err))?;
        }
        if !unprotected.is_empty() {
            tracing::info!(group = self.group, instances = ?unprotected, "new extra nodes protected from scale-in");
        }
        Ok(unprotected)
    }

    async fn describe_group(&self) -> Result<AutoScalingGroup, ExecutorError> {
        let out = self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.group)
            .send()
            .await
            .map_err(|err| self.failed("DescribeAutoScalingGroups", err))?;
        out.auto_scaling_groups
            .unwrap_or_default()
            .into_iter()
            .find(|group| group.auto_scaling_group_name() == Some(self.group.as_str()))
            .ok_or_else(|| ExecutorError::GroupNotFound {
                group: self.group.clone(),
            })
    }

    /// The instance's lifecycle state in the group; `None` once it has left it.
    async fn instance_state(&self, id: &str) -> Result<Option<String>, ExecutorError> {
        let out = self
            .client
            .describe_auto_scaling_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|err| self.failed("DescribeAutoScalingInstances", err))?;
        Ok(out
            .auto_scaling_instances()
            .iter()
            .find(|instance| {
                instance.instance_id() == Some(id)
                    && instance.auto_scaling_group_name() == Some(self.group.as_str())
            })
            .and_then(|instance| instance.lifecycle_state().map(str::to_owned)))
    }

    /// Completes the instance's termination lifecycle action with CONTINUE once it waits
    /// on the hook. Completing it before AWS has moved the instance to `Terminating:Wait`
    /// would be answered "no active lifecycle action" and leave the instance waiting out the
    /// hook's whole timeout, so the state is read first.
    async fn complete_lifecycle_action(
        &self,
        hook: &str,
        id: &str,
        action: &Action,
    ) -> Result<(), ExecutorError> {
        let deadline = Instant::now() + HOOK_WAIT;
        loop {
            let state = self.instance_state(id).await?;
            match state.as_deref() {
                None | Some("Terminating:Proceed" | "Terminated") => {
                    tracing::debug!(
                        group = self.group,
                        instance = id,
                        state,
                        "no lifecycle action left to complete"
                    );
                    return Ok(());
                }
                Some("Terminating:Wait") => break,
                Some(_) if Instant::now() >= deadline => break,
                Some(_) => sleep(HOOK_POLL).await,
            }
        }
        let completed = self
            .client
            .complete_lifecycle_action()
            .auto_scaling_group_name(&self.group)
            .lifecycle_hook_name(hook)
            .instance_id(id)
            .lifecycle_action_result("CONTINUE")
            .send()
            .await;
        match completed {
            Ok(_) => {
                tracing::info!(
                    group = self.group,
                    instance = id,
                    hook,
                    token = action.token,
                    "lifecycle action completed"
                );
                Ok(())
            }
            Err(err) if is_no_active_lifecycle_action(err.code(), err.message()) => {
                tracing::debug!(group = self.group, instance = id, hook, error = %DisplayErrorContext(&err), "no active lifecycle action to complete");
                Ok(())
            }
            Err(err) => Err(self.failed("CompleteLifecycleAction", err)),
        }
    }

    fn failed(
        &self,
        operation: &'static str,
        err: impl std::error::Error + 'static,
    ) -> ExecutorError {
        ExecutorError::Aws {
            operation,
            group: self.group.clone(),
            message: DisplayErrorContext(err).to_string(),
        }
    }
}

/// `Terminating`, `Terminating:Wait`, `Terminating:Proceed`, `Terminated`.
fn is_terminating(state: &str) -> bool {
    state.starts_with("Terminat")
}

/// AWS's answer to completing a lifecycle action that is not (or no longer) pending:
/// `ValidationError`, "No active Lifecycle Action found with instance ID i-…".
fn is_no_active_lifecycle_action(code: Option<&str>, message: Option<&str>) -> bool {
    code == Some("ValidationError")
        && message.is_some_and(|message| {
            message
                .to_ascii_lowercase()
                .contains("no active lifecycle action")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_validation_error_about_no_active_action_is_let_through() {
        assert!(is_no_active_lifecycle_action(
            Some("ValidationError"),
            Some("No active Lifecycle Action found with instance ID i-0123456789abcdef0")
        ));
        assert!(!is_no_active_lifecycle_action(
            Some("ValidationError"),
            Some("Lifecycle hook drain not found")
        ));
        assert!(!is_no_active_lifecycle_action(
            Some("AccessDenied"),
            Some("no active lifecycle action")
        ));
        assert!(!is_no_active_lifecycle_action(None, None));
    }

    #[test]
    fn terminating_states_are_recognised() {
        for state in [
            "Terminating",
            "Terminating:Wait",
            "Terminating:Proceed",
            "Terminated",
        ] {
            assert!(is_terminating(state), "{state}");
        }
        for state in [
            "InService",
            "Pending",
            "Pending:Wait",
            "Standby",
            "Detaching",
        ] {
            assert!(!is_terminating(state), "{state}");
        }
    }
}
