//! The accept loop: each connection, with its HTTP/2 streams, served on one thread (see
//! [`ConnectionThreads`] for why and what it saved).

use std::io;
use std::time::Duration;

use axum::Router;
use callfleet_core::connection_threads::{self, ConnectionThreads};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The pause after a failed accept (out of file descriptors, most often), so a full
/// descriptor table does not spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(250);

/// Serves `router` on `listener` until `shutdown`, then lets every connection finish what
/// it has in progress (HTTP/2 gets a GOAWAY, HTTP/1 closes after the answer in progress)
/// and returns when all are closed, as `axum::serve`'s graceful shutdown does.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut threads = ConnectionThreads::per_cpu("lock-conn")?;
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) if connection_threads::is_connection_error(&err) => continue,
            Err(err) => {
                tracing::warn!(error = %err, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Without TCP_NODELAY a reply written while an earlier one is unacknowledged
        // waits for the peer's delayed ACK (up to 40 ms on Linux): Nagle's algorithm.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let (router, shutdown, token) = (router.clone(), shutdown.clone(), tracker.token());
        let spawned = threads.spawn(stream, move |stream| async move {
            connection(stream, router, shutdown).await;
            drop(token);
        });
        if let Err(err) = spawned {
            tracing::warn!(error = %err, "cannot hand a connection to its thread");
        }
    }
    // The port closes now, not after the connections have finished.
    drop(listener);
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// One connection, HTTP/1 or HTTP/2 as its first bytes say.
async fn connection(stream: TcpStream, router: Router, shutdown: CancellationToken) {
    let service = TowerToHyperService::new(router);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No `date` on gRPC answers: no client reads it, and encoding it was hpack work on
    // every call.
    builder.http2().auto_date_header(false);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = served {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}
