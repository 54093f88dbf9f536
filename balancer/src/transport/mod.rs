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
        let Some(to) = reconnect else {
            return Err(bytes);
        };
        // A connection from the peer's own address (a trunk that calls from its listening
        // port) was tried above already.
        let bytes = if to == peer {
            bytes
        } else {
            match self.send(to, bytes) {
                Ok(()) => return Ok(()),
                Err(bytes) => bytes,
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A request to a carrier URI with `transport=tcp` names no connection: the peer and
    /// the address to connect to are one, and it must still be dialled, not sent over UDP.
    #[test]
    fn a_peer_without_a_connection_is_dialled_at_its_own_address_or_the_one_given() {
        let routes = TcpRoutes::default();
        let carrier: SocketAddr = "127.0.0.1:5070".parse().expect("addr");
        let ephemeral: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        assert_eq!(
            routes.deliver(carrier, Some(carrier), b"a".to_vec()),
            Err(b"a".to_vec())
        );

        let (dialer, mut dials) = mpsc::channel(4);
        routes.set_dialer(Some(dialer));
        assert_eq!(
            routes.deliver(carrier, None, b"b".to_vec()),
            Err(b"b".to_vec())
        );
        assert_eq!(
            routes.deliver(carrier, Some(carrier), b"c".to_vec()),
            Ok(())
        );
        assert_eq!(
            routes.deliver(ephemeral, Some(carrier), b"d".to_vec()),
            Ok(())
        );
        let mut dialled = Vec::new();
        while let Ok(dial) = dials.try_recv() {
            dialled.push((dial.to, dial.bytes));
        }
        assert_eq!(
            dialled,
            [(carrier, b"c".to_vec()), (carrier, b"d".to_vec())]
        );
    }
}
