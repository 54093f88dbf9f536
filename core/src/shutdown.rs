//! Graceful shutdown: the first SIGTERM or SIGINT cancels a token every component watches;
//! a second one exits at once for an operator who does not want to wait for the drain.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long components get to finish in-flight work after the first signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Returns a token cancelled on the first SIGTERM/SIGINT; the second signal exits with 130.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        if wait_for_signal().await.is_err() {
            return;
        }
        tracing::info!("shutting down; signal again to exit at once");
        cancel.cancel();
        if wait_for_signal().await.is_ok() {
            tracing::warn!("second signal: exiting without waiting");
            std::process::exit(130);
        }
    });
    token
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Waits for `work` to finish, but at most [`DRAIN_TIMEOUT`]; returns false on timeout.
pub async fn bounded<F: Future>(what: &str, work: F) -> bool {
    match tokio::time::timeout(DRAIN_TIMEOUT, work).await {
        Ok(_) => true,
        Err(_) => {
            tracing::warn!(component = what, timeout = ?DRAIN_TIMEOUT, "did not stop in time; exiting anyway");
            false
        }
    }
}
