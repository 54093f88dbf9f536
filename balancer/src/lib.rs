//! The carrier-facing SIP front door of a core node.
//!
//! For every new INVITE the balancer picks a node from an in-memory fleet view: the local
//! node (the INVITE is proxied statelessly to the local PBX, or redirected to it), another
//! node (`302 Moved Temporarily`), or none (`503` with `Retry-After`, so the carrier's
//! failover list moves on at once). The view is re-read from the store in the background;
//! no request ever waits on the store.
//!
//! Layout: [`sip`] parses and prints messages (no I/O), [`route`] chooses nodes,
//! [`transaction`] keeps INVITE server transactions, [`engine`] decides what to do with a
//! message, [`transport`] moves bytes, [`metrics`] tells Prometheus what it all did.

pub mod engine;
pub mod metrics;
pub mod route;
pub mod sip;
pub mod transaction;
pub mod transport;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use callfleet_core::config::BalancerConfig;
use callfleet_core::{Config, ConfigError, Store};
use socket2::{Domain, Protocol, Socket, Type};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::engine::Engine;
use crate::route::FleetView;
use crate::transport::TcpRoutes;

/// How often the local PBX is probed with OPTIONS.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Why the balancer cannot run.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address cannot be bound.
    #[error(
        "cannot listen for SIP on {protocol} {address}: {source}; free the port or set balancer.listen (CALLFLEET_BALANCER__LISTEN)"
    )]
    Bind {
        /// UDP or TCP.
        protocol: &'static str,
        /// The address.
        address: SocketAddr,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The `/metrics` listener cannot be bound.
    #[error(transparent)]
    Metrics(#[from] callfleet_core::metrics::ListenError),
    /// Threads or sockets could not be set up.
    #[error("cannot start the balancer's workers: {0}")]
    Io(#[from] std::io::Error),
}

/// The balancer's bound sockets: UDP and TCP on the same address.
#[derive(Debug)]
pub struct Listeners {
    /// The UDP socket.
    pub udp: UdpSocket,
    /// The TCP listener.
    pub tcp: TcpListener,
}

impl Listeners {
    /// Binds `config.listen` for UDP (with the configured receive buffer) and TCP, once
    /// the addresses we would give carriers are ones they can reach and `metrics_listen`
    /// is usable (refused before a port is taken).
    pub fn bind(config: &BalancerConfig) -> Result<Self, BalancerError> {
        config.validate_for_serving()?;
        config.metrics_address()?;
        let address: SocketAddr = config.listen.parse().map_err(|_| ConfigError::Value {
            key: "balancer.listen".into(),
            reason: format!("`{}` must be ip:port", config.listen),
        })?;
        let bind_error = |protocol| {
            move |source| BalancerError::Bind {
                protocol,
                address,
                source,
            }
        };
        let udp = Socket::new(
            Domain::for_address(address),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        udp.set_reuse_address(true)?;
        udp.set_recv_buffer_size(config.recv_buffer)?;
        udp.bind(&address.into()).map_err(bind_error("UDP"))?;
        // Linux reports twice what it grants (the other half is its bookkeeping).
        let granted = udp.recv_buffer_size()? / 2;
        if granted < config.recv_buffer {
            warn!(
                requested = config.recv_buffer,
                granted,
                "the kernel caps the UDP receive buffer; raise net.core.rmem_max so bursts are not dropped"
            );
        }
        let udp: UdpSocket = udp.into();
        let bound = udp.local_addr()?;
        let tcp = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        tcp.set_reuse_address(true)?;
        tcp.bind(&bound.into()).map_err(bind_error("TCP"))?;
        tcp.listen(1024).map_err(bind_error("TCP"))?;
        tcp.set_nonblocking(true)?;
        Ok(Self {
            udp,
            tcp: tcp.into(),
        })
    }

    /// The bound address (the port is real even when `listen` asked for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

/// The `balancer.advertise` a single box can use when none is set and `listen` is a
/// wildcard (what `callfleet up` runs with): the address this host sends from towards the
/// rest of the network (its default route), or loopback on a host without one, with the
/// port of `listen`. `None` when `advertise` is set, or `listen` names an address or
/// port 0.
pub fn default_advertise(config: &BalancerConfig) -> Option<String> {
    let listen: SocketAddr = config.listen.parse().ok()?;
    if !config.advertise.is_empty() || !listen.ip().is_unspecified() || listen.port() == 0 {
        return None;
    }
    // Connecting a UDP socket sends nothing: the kernel only picks the route and with it
    // the source address (TEST-NET addresses, never used by anyone).
    let (wildcard, probe): (SocketAddr, SocketAddr) = if listen.is_ipv4() {
        ("0.0.0.0:0".parse().ok()?, "192.0.2.1:5060".parse().ok()?)
    } else {
        ("[::]:0".parse().ok()?, "[2001:db8::1]:5060".parse().ok()?)
    };
    let ip = UdpSocket::bind(wildcard)
        .and_then(|socket| {
            socket.connect(probe)?;
            socket.local_addr()
        })
        .map(|local| local.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(if listen.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    Some(SocketAddr::new(ip, listen.port()).to_string())
}

/// Runs the balancer on `listeners` until `shutdown` is cancelled.
pub async fn run(
    config: &Config,
    store: Store,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), BalancerError> {
    let balancer = &config.balancer;
    let local = config.node.resolved_id()?;
    let metrics_address = balancer.metrics_address()?;
    // Before the engine, which takes its histogram from the recorder. Recorded even
    // without a listener of our own: under `callfleet up` the control plane's /metrics
    // shows them.
    callfleet_core::metrics::install();
    let engine = Arc::new(Engine::new(balancer, local)?);
    if let Some(address) = metrics_address {
        let bound = callfleet_core::metrics::serve(address, shutdown.clone()).await?;
        info!(address = %bound, "serving /metrics");
    }
    let address = listeners.local_addr()?;
    // Half the cores: all workers read one socket, and the other half is the PBX's (and
    // the kernel's, which does a large share of the per-call work). On the 2-core bench
    // box one worker stayed clean at 35k calls/s where two lost the race with SIPp at 27k.
    let workers = if balancer.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
    } else {
        balancer.workers
    };
    let udp = Arc::new(listeners.udp);
    let routes = Arc::new(TcpRoutes::default());
    let stop = Arc::new(AtomicBool::new(false));
    let threads = transport::udp::spawn(&engine, &udp, &routes, workers, &stop)?;
    let tcp = tokio::net::TcpListener::from_std(listeners.tcp)?;
    let tcp_task = tokio::spawn(transport::tcp::serve_with(
        tcp,
        engine.clone(),
        udp.clone(),
        routes,
        transport::tcp::Limits::from_config(balancer)?,
        shutdown.clone(),
    ));
    let refresh_task = tokio::spawn(refresh(
        engine.clone(),
        store,
        balancer.clone(),
        udp.clone(),
        shutdown.clone(),
    ));
    let metrics_task = tokio::spawn(metrics::publish(engine.clone(), shutdown.clone()));
    if balancer.allow.is_empty() {
        warn!(
            "balancer.allow is empty: answering SIP from any address; list the carriers' networks"
        );
    }
    info!(%address, workers, local_node = %engine.local_node(), "balancer ready");
    shutdown.cancelled().await;
    stop.store(true, Ordering::Relaxed);
    let _ = tcp_task.await;
    let _ = refresh_task.await;
    let _ = metrics_task.await;
    let _ = tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    })
    .await;
    log_counters(&engine);
    Ok(())
}

fn log_counters(engine: &Engine) {
    let [
        (_, invites),
        (_, redirected),
        (_, local),
        (_, unavailable),
        (_, busy),
        (_, retransmissions),
        (_, resent),
        (_, acks),
        (_, cancels),
        (_, options),
        (_, forwarded),
        (_, malformed),
        (_, denied),
        (_, overload),
        (_, table_full),
    ] = engine.counters.snapshot();
    let per_node = engine.view().map_or_else(String::new, |view| {
        view.nodes
            .iter()
            .map(|node| format!("{}={}", node.id, node.routed.load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(",")
    });
    info!(
        invites,
        redirected,
        local,
        unavailable,
        busy,
        retransmissions,
        resent,
        acks,
        cancels,
        options,
        forwarded,
        malformed,
        denied,
        overload,
        table_full,
        transactions = engine.transactions.len(),
        routed = %per_node,
        "balancer stopped"
    );
}

/// Re-reads the fleet view every `refresh` and probes the local PBX, until `shutdown`.
async fn refresh(
    engine: Arc<Engine>,
    store: Store,
    config: BalancerConfig,
    udp: Arc<UdpSocket>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(config.refresh);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = config.refresh.max(Duration::from_secs(1));
    let mut store_down = false;
    let mut last_probe: Option<Instant> = None;
    let mut probes = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let asked_at = Instant::now();
        match tokio::time::timeout(deadline, store.list_nodes()).await {
            Ok(Ok(nodes)) => {
                let previous = engine.view();
                let view = FleetView::from_nodes(
                    nodes,
                    engine.local_node(),
                    previous.as_deref(),
                    asked_at,
                );
                engine.set_view(view);
                engine.set_store_down(false);
                if store_down {
                    store_down = false;
                    info!("store back; fleet view current again");
                }
            }
            Ok(Err(err)) if !store_down => {
                store_down = true;
                engine.set_store_down(true);
                warn!(error = %err, grace = ?config.stale_grace, "store unreachable; routing on the last fleet view");
            }
            Err(_) if !store_down => {
                store_down = true;
                engine.set_store_down(true);
                warn!(deadline = ?deadline, grace = ?config.stale_grace, "store did not answer; routing on the last fleet view");
            }
            _ => {}
        }
        if last_probe.is_none_or(|at| at.elapsed() >= PROBE_EVERY) {
            last_probe = Some(Instant::now());
            probes += 1;
            let _ = udp.send_to(&engine.probe(probes), engine.local_pbx());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_gets_this_host_s_address_for_up() {
        let config = BalancerConfig::default();
        assert!(config.validate_for_serving().is_err());
        let advertise = default_advertise(&config).expect("an address");
        let address: SocketAddr = advertise.parse().expect("ip:port");
        assert!(!address.ip().is_unspecified(), "{advertise}");
        assert_eq!(address.port(), 5060);
        let usable = BalancerConfig {
            advertise,
            ..config.clone()
        };
        assert!(usable.validate_for_serving().is_ok());
        // Nothing to do when an address is set or listened on.
        assert_eq!(default_advertise(&usable), None);
        let named = BalancerConfig {
            listen: "192.0.2.10:5060".into(),
            ..config
        };
        assert_eq!(default_advertise(&named), None);
    }

    #[test]
    fn a_metrics_listen_that_is_not_ip_port_is_refused_before_any_port_is_taken() {
        let config = BalancerConfig {
            listen: "127.0.0.1:0".into(),
            metrics_listen: "localhost:9464".into(),
            ..BalancerConfig::default()
        };
        let err = Listeners::bind(&config).expect_err("refused");
        assert!(matches!(err, BalancerError::Config(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "invalid configuration: `balancer.metrics_listen` `localhost:9464` must be ip:port, e.g. 127.0.0.1:9464, or empty for no /metrics"
        );
    }
}
