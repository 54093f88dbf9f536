//! TCP: one task per connection, messages framed by Content-Length.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::TcpRoutes;
use crate::engine::{Action, Engine};
use crate::sip::{self, Framing, Transport};

/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 4096;
/// Responses queued per connection before new ones are dropped (the peer is not reading).
const QUEUE: usize = 256;

/// Accepts connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    udp: Arc<std::net::UdpSocket>,
    routes: Arc<TcpRoutes>,
    max_message: usize,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "tcp accept failed");
                    continue;
                }
            },
        };
        let (engine, udp, routes, shutdown) = (
            engine.clone(),
            udp.clone(),
            routes.clone(),
            shutdown.clone(),
        );
        tracker.spawn(async move {
            let _permit = permit;
            connection(stream, peer, &engine, &udp, &routes, max_message, shutdown).await;
            routes.remove(peer);
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    engine: &Engine,
    udp: &std::net::UdpSocket,
    routes: &TcpRoutes,
    max_message: usize,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let (sender, mut outgoing) = mpsc::channel::<Vec<u8>>(QUEUE);
    routes.insert(peer, sender.clone());
    let write_task = tokio::spawn(async move {
        while let Some(bytes) = outgoing.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut buffer = Vec::with_capacity(8192);
    let mut actions = Vec::new();
    'read: loop {
        let read = tokio::select! {
            _ = shutdown.cancelled() => break,
            read = reader.read_buf(&mut buffer) => read,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        loop {
            let framed = match sip::parse(&buffer, Framing::Stream) {
                Ok(Some(message)) if message.defect.is_some() => message.head_len,
                Ok(Some(message)) => message.len,
                Ok(None) if buffer.len() > max_message + 65_536 => {
                    debug!(%peer, "tcp message never ends; closing");
                    break 'read;
                }
                Ok(None) => break,
                Err(_) => {
                    engine
                        .counters
                        .malformed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    break 'read;
                }
            };
            engine.handle(
                &buffer[..framed],
                peer,
                Transport::Tcp,
                Instant::now(),
                Duration::ZERO,
                &mut actions,
            );
            buffer.drain(..framed);
            let mut close = false;
            for action in actions.drain(..) {
                match action {
                    Action::Reply { bytes, .. } => {
                        if sender.try_send(bytes).is_err() {
                            close = true;
                        }
                    }
                    Action::Close => close = true,
                    forward => super::udp::perform(udp, routes, forward),
                }
            }
            if close {
                break 'read;
            }
        }
    }
    routes.remove(peer);
    drop(sender);
    let _ = write_task.await;
}
