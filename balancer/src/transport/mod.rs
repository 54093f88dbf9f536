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
/// carrier that sent its INVITE over TCP.
#[derive(Debug, Default)]
pub struct TcpRoutes {
    connections: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
}

impl TcpRoutes {
    /// Queues `bytes` on the connection from `peer`; false if there is none or it is full.
    pub fn send(&self, peer: SocketAddr, bytes: Vec<u8>) -> bool {
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        connections
            .get(&peer)
            .is_some_and(|sender| sender.try_send(bytes).is_ok())
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
