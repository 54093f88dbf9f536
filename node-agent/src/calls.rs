//! The PBX's active call count, from a fixed number or from Asterisk's manager interface.
//!
//! An unreachable PBX never stops the heartbeat: the node keeps reporting its host figures
//! with the last known call count and `pbx_up = false`, and the AMI connection is retried
//! with backoff. Only a refused login at start is fatal, because retrying a wrong secret
//! forever would hide a configuration error behind a node that looks alive.

use std::time::Duration;

use callfleet_core::config::{CallSourceKind, CallsConfig};
use tokio::time::Instant;

use crate::ami::{AmiClient, AmiError};

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where the call count comes from.
#[derive(Debug)]
pub enum CallCounter {
    /// A configured number.
    Static(u32),
    /// Asterisk over AMI.
    Ami(Box<AmiSource>),
}

/// A persistent AMI connection with reconnect backoff.
#[derive(Debug)]
pub struct AmiSource {
    config: CallsConfig,
    client: Option<AmiClient>,
    last_calls: u32,
    up: bool,
    min_backoff: Duration,
    backoff: Duration,
    retry_at: Option<Instant>,
}

impl CallCounter {
    /// Builds the configured source. For AMI it connects once: a refused login is returned
    /// as an error; an unreachable PBX is logged and retried in the background of sampling.
    pub async fn start(config: &CallsConfig, min_backoff: Duration) -> Result<Self, AmiError> {
        match config.source {
            CallSourceKind::Static => Ok(Self::Static(config.count)),
            CallSourceKind::Ami => {
                let mut source = AmiSource {
                    config: config.clone(),
                    client: None,
                    last_calls: 0,
                    up: false,
                    min_backoff,
                    backoff: min_backoff,
                    retry_at: None,
                };
                // A first count proves the user may run what it must: a refused login or a
                // refused command is a configuration error that no retry fixes.
                let first = match source.connect().await {
                    Ok(mut client) => client.active_calls().await.map(|calls| (client, calls)),
                    Err(err) => Err(err),
                };
                match first {
                    Ok((client, calls)) => {
                        tracing::info!(address = %config.address, calls, "connected to the asterisk manager");
                        source.client = Some(client);
                        source.up = true;
                        source.last_calls = calls;
                    }
                    Err(
                        err @ (AmiError::AuthFailed { .. } | AmiError::PermissionDenied { .. }),
                    ) => {
                        return Err(err);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "pbx unreachable; reporting pbx_up=false and retrying");
                        source.retry_at = Some(Instant::now() + source.backoff);
                    }
                }
                Ok(Self::Ami(Box::new(source)))
            }
        }
    }

    /// The current call count and whether the PBX answered.
    pub async fn sample(&mut self) -> (u32, bool) {
        match self {
            Self::Static(count) => (*count, true),
            Self::Ami(source) => source.sample().await,
        }
    }
}

impl AmiSource {
    async fn connect(&self) -> Result<AmiClient, AmiError> {
        AmiClient::connect(
            &self.config.address,
            &self.config.username,
            self.config.secret.expose(),
            self.config.timeout,
        )
        .await
    }

    async fn sample(&mut self) -> (u32, bool) {
        if self.client.is_none() && self.retry_at.is_none_or(|at| Instant::now() >= at) {
            match self.connect().await {
                Ok(client) => self.client = Some(client),
                Err(err) => self.failed(err),
            }
        }
        if let Some(client) = &mut self.client {
            match client.active_calls().await {
                Ok(calls) => {
                    if !self.up {
                        tracing::info!(address = %self.config.address, calls, "pbx back");
                    }
                    self.up = true;
                    self.backoff = self.min_backoff;
                    self.retry_at = None;
                    self.last_calls = calls;
                }
                Err(err @ AmiError::PermissionDenied { .. }) => {
                    // Taken away while running: said loudly, and retried (an operator may
                    // give it back without restarting the agent).
                    tracing::error!(error = %err, "pbx refuses the call count");
                    self.client = None;
                    self.failed(err);
                }
                Err(err) => {
                    self.client = None;
                    self.failed(err);
                }
            }
        }
        (self.last_calls, self.up)
    }

    fn failed(&mut self, err: AmiError) {
        if self.up || self.retry_at.is_none() {
            tracing::warn!(error = %err, "pbx unreachable; reporting pbx_up=false and retrying");
        }
        self.up = false;
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}
