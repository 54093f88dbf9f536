//! Prometheus metrics: one recorder per process, behind the `metrics` facade, rendered in
//! the Prometheus text format at `GET /metrics`.
//!
//! Every component records through the `metrics` macros and calls [`install`] when it
//! starts; the control plane and the lock service add [`router`] to their HTTP listeners,
//! the balancer and the node-agent, which have none, [`serve`] it on a listener of their
//! own (`metrics_listen`). `callfleet up` runs every component in one process, so each of
//! its `/metrics` shows them all.
//!
//! Names follow Prometheus's conventions: the `callfleet_` prefix, base units (`_seconds`),
//! counters ending in `_total`, and labels whose values are bounded (a method, an outcome,
//! a queue or node id from the configuration; never a call id or a phone number).
//! Histograms whose name ends in `_seconds` share [`LATENCY_BUCKETS`].

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Buckets of every `_seconds` histogram: from 50 µs (a lock operation in memory, a SIP
/// decision) to 10 s (a store write through an outage).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// The content type of the text format Prometheus scrapes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How often histograms are drained and idle series dropped when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder the first time and returns its handle; later calls
/// (several components in one process, or tests) return the same one.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &LATENCY_BUCKETS)
            .expect("LATENCY_BUCKETS is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed: /metrics shows nothing");
        }
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".to_owned())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                }
            })
            .expect("spawn the metrics upkeep thread");
        handle
    })
}

/// Every metric recorded so far, in the Prometheus text format.
pub fn render() -> String {
    install().render()
}

/// `GET /metrics`, to merge into a component's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/metrics", get(scrape))
}

async fn scrape() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render())
}

/// Why the metrics listener did not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen for /metrics on {address}: {source}; set metrics_listen to a free ip:port, or empty to serve no metrics"
)]
pub struct ListenError {
    address: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Serves [`router`] alone on `address` until `shutdown`: for components without an HTTP
/// listener of their own. Returns the bound address (`:0` picks a free port).
pub async fn serve(
    address: SocketAddr,
    shutdown: CancellationToken,
) -> Result<SocketAddr, ListenError> {
    install();
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| ListenError { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ListenError { address, source })?;
    tokio::spawn(async move {
        let served = axum::serve(listener, router::<()>())
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::warn!(error = %err, "the /metrics listener stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_counter_and_a_histogram_are_scraped_in_the_text_format() {
        install();
        metrics::counter!("callfleet_test_events_total", "kind" => "a").increment(3);
        metrics::histogram!("callfleet_test_wait_seconds").record(0.003);
        let shutdown = CancellationToken::new();
        let address = serve("127.0.0.1:0".parse().expect("address"), shutdown.clone())
            .await
            .expect("listen");
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        shutdown.cancel();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains(&format!("content-type: {CONTENT_TYPE}\r\n")));
        assert!(answer.contains("callfleet_test_events_total{kind=\"a\"} 3\n"));
        // 3 ms falls in the 5 ms bucket and every one above it, not in 2.5 ms.
        assert!(answer.contains("callfleet_test_wait_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(answer.contains("callfleet_test_wait_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(answer.contains("callfleet_test_wait_seconds_count 1\n"));
    }
}
