//! Connections served each on one thread, dealt in turn to one runtime per CPU.
//!
//! On tokio's work-stealing runtime a connection's task, and the task hyper spawns for each
//! HTTP/2 stream, run on whichever worker is free: every request then crosses threads, a
//! futex wake and a context switch, and for HTTP/2 both threads contend for the
//! connection's stream table (one mutex in h2). The lock service spent 16-18 µs of CPU
//! per gRPC call that way, and 9.4 µs with each connection on a thread of its own
//! (`./scripts/bench-locks`, memory backend, 50 clients on one connection).
//!
//! So a listener hands each accepted connection to [`ConnectionThreads::spawn`]: the
//! connection and everything it spawns run on one of `count` runtimes of one worker
//! thread each, and connections spread over the CPUs. A runtime of one worker rather than
//! a current-thread one: the latter spent less CPU per call (8.1 µs) but served a third
//! fewer calls per second (67k against 105k); the one difference we know of is that a
//! one-worker runtime runs a task just spawned next (its LIFO slot), a current-thread
//! runtime after every task already queued.
//!
//! A socket that a connection's task opens is polled by that task's runtime: a database
//! connection opened there and kept in a pool fails once the runtimes are dropped, and the
//! pool's check before handing it out again (sqlx pings it) replaces it.

use std::future::Future;
use std::io;

use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// Runtimes of one worker thread each, which accepted connections are dealt to in turn.
/// Dropped, they stop at once: a connection still served is dropped (closed) with them.
#[derive(Debug)]
pub struct ConnectionThreads {
    runtimes: Vec<Runtime>,
    next: usize,
}

impl ConnectionThreads {
    /// `count` runtimes (at least one), their threads named `name`.
    pub fn new(name: &str, count: usize) -> io::Result<Self> {
        let runtimes = (0..count.max(1))
            .map(|_| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name(name)
                    .enable_all()
                    .build()
            })
            .collect::<io::Result<_>>()?;
        Ok(Self { runtimes, next: 0 })
    }

    /// One runtime per CPU the process may use.
    pub fn per_cpu(name: &str) -> io::Result<Self> {
        Self::new(
            name,
            std::thread::available_parallelism().map_or(2, usize::from),
        )
    }

    /// How many runtimes there are.
    pub fn count(&self) -> usize {
        self.runtimes.len()
    }

    /// Runs `serve(stream)` on the next runtime. The stream leaves the caller's runtime
    /// for that one's (its I/O is then polled there), so it must not be in use elsewhere.
    pub fn spawn<F, Fut>(&mut self, stream: TcpStream, serve: F) -> io::Result<JoinHandle<()>>
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stream = stream.into_std()?;
        let runtime = &self.runtimes[self.next];
        self.next = (self.next + 1) % self.runtimes.len();
        Ok(runtime.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(err) => tracing::warn!(error = %err, "cannot serve a connection"),
            }
        }))
    }
}

impl Drop for ConnectionThreads {
    /// Without waiting: a runtime dropped the usual way blocks until its tasks end, which
    /// an async caller must not.
    fn drop(&mut self) {
        for runtime in self.runtimes.drain(..) {
            runtime.shutdown_background();
        }
    }
}

/// Whether a failed accept concerned one connection only (the peer gave up between its
/// SYN and the accept), so the loop goes on at once; any other error (out of file
/// descriptors) calls for a pause before the next accept.
pub fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Each connection is served on the next runtime's one thread, in turn.
    #[tokio::test]
    async fn connections_go_to_each_runtime_in_turn_and_stay_on_its_thread() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let mut threads = ConnectionThreads::new("test-conn", 3).expect("runtimes");
        assert_eq!(threads.count(), 3);
        let mut served = Vec::new();
        for _ in 0..6 {
            let mut client = TcpStream::connect(address).await.expect("connect");
            let (stream, _) = listener.accept().await.expect("accept");
            let handle = threads
                .spawn(stream, |mut stream| async move {
                    let mut byte = [0];
                    stream.read_exact(&mut byte).await.expect("read");
                    let first = std::thread::current().id();
                    // A task of the connection's, spawned as hyper spawns a stream's.
                    let spawned = tokio::spawn(async { std::thread::current().id() })
                        .await
                        .expect("spawned task");
                    assert_eq!(first, spawned, "the spawned task ran on the same thread");
                    let name = std::thread::current().name().map(str::to_owned);
                    assert_eq!(name.as_deref(), Some("test-conn"));
                    stream
                        .write_all(format!("{first:?}").as_bytes())
                        .await
                        .expect("write");
                })
                .expect("spawned");
            client.write_all(b"x").await.expect("write");
            let mut thread = String::new();
            client.read_to_string(&mut thread).await.expect("read");
            handle.await.expect("served");
            served.push(thread);
        }
        assert_ne!(served[0], served[1]);
        assert_ne!(served[1], served[2]);
        assert_ne!(served[0], served[2]);
        assert_eq!(
            served[3..],
            served[..3],
            "the fourth goes to the first again"
        );
    }
}
