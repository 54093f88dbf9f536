//! The sockets: UDP workers on blocking threads, TCP connections on tokio.
//!
//! UDP runs on plain threads because the work per datagram is a few microseconds: an async
//! wake-up would cost as much as the request itself. TCP connections are few and long-lived
//! (carrier trunks), so they live on the runtime; [`frame`] finds the messages in their
//! byte streams without I/O, [`tcp`] bounds what each connection may hold.

pub mod frame;
pub mod tcp;
pub mod udp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use tokio::sync::mpsc;

/// Open TCP connections by peer address, so responses forwarded from the PBX can reach a
/// carrier that sent its INVITE over TCP, and the way to open new ones while the TCP
/// listener serves.
#[derive(Debug, Default)]
pub struct TcpRoutes {
    connections: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    dialer: Mutex<Option<mpsc::Sender<Dial>>>,
}

/// A message for a peer no open connection leads to: the listener's task connects to
/// `to` and sends it.
#[derive(Debug)]
pub struct Dial {
    /// The peer's listening address.
    pub to: SocketAddr,
    /// The message.
    pub bytes: Vec<u8>,
}

impl TcpRoutes {
    /// Queues `bytes` on the connection from `peer`; gives them back if there is none or
    /// it is full.
    pub fn send(&self, peer: SocketAddr, bytes: Vec<u8>) -> Result<(), Vec<u8>> {
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(sender) = connections.get(&peer) else {
            return Err(bytes);
        };
        sender.try_send(bytes).map_err(|err| match err {
            mpsc::error::TrySendError::Full(bytes) | mpsc::error::TrySendError::Closed(bytes) => {
                bytes
            }
        })
    }

    /// Queues `bytes` on the connection from `peer`, or else on one to `reconnect`, opened
    /// for it when none is; gives them back when neither can take them.
    pub fn deliver(
        &self,
        peer: SocketAddr,
        reconnect: Option<SocketAddr>,
        bytes: Vec<u8>,
    ) -> Result<(), Vec<u8>> {
        let bytes = match self.send(peer, bytes) {
            Ok(()) => return Ok(()),
            Err(bytes) => bytes,
        };
        let Some(to) = reconnect.filter(|to| *to != peer) else {
            return Err(bytes);
        };
        let bytes = match self.send(to, bytes) {
            Ok(()) => return Ok(()),
            Err(bytes) => bytes,
        };
        let dialer = self.dialer.lock().unwrap_or_else(PoisonError::into_inner);
        match dialer.as_ref() {
            Some(dialer) => dialer
                .try_send(Dial { to, bytes })
                .map_err(|err| match err {
                    mpsc::error::TrySendError::Full(dial)
                    | mpsc::error::TrySendError::Closed(dial) => dial.bytes,
                }),
            None => Err(bytes),
        }
    }

    fn set_dialer(&self, dialer: Option<mpsc::Sender<Dial>>) {
        *self.dialer.lock().unwrap_or_else(PoisonError::into_inner) = dialer;
    }

    fn insert(&self, peer: SocketAddr, sender: mpsc::Sender<Vec<u8>>) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer, sender);
    }

    fn remove(&self, peer: SocketAddr) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer);
    }
}
