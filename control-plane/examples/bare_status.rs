//! The ceiling for the public queue status on this machine: a bare axum handler answering
//! fixed bytes, with the same headers as the real route, on a runtime built as `callfleet`
//! builds its own, served by plain `axum::serve`. `./scripts/bench-control` starts it with
//! the bytes the real route answered and runs the same wrk load against both in one run.
//!
//!     cargo run --release -p callfleet-control-plane --example bare_status -- ADDR BODY_FILE

use std::net::SocketAddr;
use std::process::ExitCode;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(body_file), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: bare_status ADDR BODY_FILE (e.g. 127.0.0.1:8081 status.json)");
        return ExitCode::from(64);
    };
    let Ok(listen) = listen.parse::<SocketAddr>() else {
        eprintln!("bare_status: `{listen}` is not ip:port");
        return ExitCode::from(64);
    };
    let body = match std::fs::read(&body_file) {
        Ok(body) => body,
        Err(err) => {
            eprintln!("bare_status: cannot read {body_file}: {err}");
            return ExitCode::from(66);
        }
    };
    let body: &'static [u8] = body.leak();
    let answer = move || async move {
        (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "public, max-age=1"),
            ],
            body,
        )
            .into_response()
    };
    let app = Router::new().route("/api/v1/queues/{queue}/status", get(answer));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("bare_status: cannot listen on {listen}: {err}");
                return ExitCode::from(69);
            }
        };
        match axum::serve(listener, app).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("bare_status: {err}");
                ExitCode::FAILURE
            }
        }
    })
}
