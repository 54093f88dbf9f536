//! Serving connections with each one kept on one thread.
//!
//! Under `axum::serve` on tokio's work-stealing runtime, an HTTP/2 connection's task and
//! the task hyper spawns for each of its streams run on whichever worker is free. Every
//! gRPC call then crossed threads: the stream task woke a parked worker (a futex wake, a
//! context switch) and both threads fought over the connection's stream table, which h2
//! keeps behind one mutex. The lock service spent 16-18 µs of CPU per call that way
//! (memory backend, one HTTP/2 connection of 50 clients, `./scripts/bench-locks`).
//!
//! So connections are dealt in turn to `workers` runtimes of one worker thread each: a
//! connection and its streams share a thread, and connections (a node's lock clients
//! share one) spread over the CPUs. Measured the same way: 9.4 µs per call. A
//! current-thread runtime per worker spent less CPU (8.1 µs) but served a third fewer
//! calls per second (67k against 105k). The difference between the two that we know of:
//! a one-worker runtime runs a task just spawned next (its LIFO slot), a current-thread
//! runtime after every task already queued.

use std::io;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
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
    workers: usize,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut runtimes = Runtimes(Vec::new());
    let mut queues = Vec::new();
    let mut workers_done = Vec::new();
    for index in 0..workers.max(1) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("lock-conn-{index}"))
            .enable_all()
            .build()?;
        let (queue, connections) = mpsc::unbounded_channel();
        workers_done.push(runtime.spawn(worker(connections, router.clone(), shutdown.clone())));
        runtimes.0.push(runtime);
        queues.push(queue);
    }
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
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
        // The socket leaves this runtime's reactor and joins the worker's.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "cannot hand a connection to a worker");
                continue;
            }
        };
        // A worker only stops on shutdown, so its queue is open here.
        let _ = queues[next].send(stream);
        next = (next + 1) % queues.len();
    }
    // The port closes now, not after the connections have finished.
    drop(listener);
    drop(queues);
    for done in workers_done {
        let _ = done.await;
    }
    Ok(())
}

/// The workers' runtimes, shut down without waiting when dropped: dropping a runtime
/// the usual way blocks, which an async caller must not.
struct Runtimes(Vec<tokio::runtime::Runtime>);

impl Drop for Runtimes {
    fn drop(&mut self) {
        for runtime in self.0.drain(..) {
            runtime.shutdown_background();
        }
    }
}

/// Serves the connections dealt to this thread until shutdown, then waits for them.
async fn worker(
    mut connections: mpsc::UnboundedReceiver<std::net::TcpStream>,
    router: Router,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    while let Some(stream) = connections.recv().await {
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "cannot serve a connection");
                continue;
            }
        };
        tracker.spawn(connection(stream, router.clone(), shutdown.clone()));
    }
    tracker.close();
    tracker.wait().await;
}

/// One connection, HTTP/1 or HTTP/2 as its first bytes say.
async fn connection(stream: tokio::net::TcpStream, router: Router, shutdown: CancellationToken) {
    let service = TowerToHyperService::new(router);
    let builder = auto::Builder::new(TokioExecutor::new());
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
