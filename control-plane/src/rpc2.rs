//! `/RPC2`: the XML-RPC methods CRMs call, on top of the sans-IO codec in [`crate::xmlrpc`].
//!
//! Every answer is HTTP 200 with a `<methodResponse>`: a call that fails is a fault, never
//! an HTTP error, because XML-RPC clients only read faults. The service's own errors keep
//! the HTTP status as `faultCode` (401, 403, 404, 409, 400, 429, 503) so a CRM can branch on
//! them; the codec's codes (-32xxx) mean the call itself was malformed. The token is read
//! from the HTTP `Authorization` header, as for REST.
//!
//! The autoscaler is read with `autoscaler.status()` (`read`) and steered with
//! `autoscaler.set({paused, min_extra, max_extra})` (`admin`), as over REST.
//!
//! `queue.status` is public, as over REST, and takes from the same per-address bucket
//! ([`crate::ratelimit`]): each call counts, also inside a `system.multicall` (whose limited
//! entries get fault 429 while the earlier ones are answered), so a batch of status probes
//! costs what the same probes sent one by one would.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use callfleet_core::config::Role;
use callfleet_core::store::ScalerSteering;
use serde_json::json;

use crate::auth::Caller;
use crate::error::ControlError;
use crate::ratelimit::RateLimit;
use crate::service::Control;
use crate::xmlrpc::{self, Call, Fault, Value};

/// Largest body accepted; a CRM's multicall of a few hundred priority changes fits.
const MAX_BODY: usize = 1024 * 1024;
/// Bodies above this are decoded, and answers above it encoded, off the async workers.
const DECODE_INLINE: usize = 64 * 1024;
/// About the largest answer to one `system.multicall`: once the answers reach it, the
/// remaining calls are not run (each gets a fault saying so).
const MAX_MULTICALL_RESPONSE: usize = 8 * 1024 * 1024;

/// The methods served, for `system.listMethods`.
pub const METHODS: &[&str] = &[
    "agent.setPriority",
    "agent.setTags",
    "agent.setDailyCap",
    "agent.recordSale",
    "agent.login",
    "agent.logout",
    "agent.pause",
    "agent.unpause",
    "queue.status",
    "queue.candidates",
    "caller.setAttributes",
    "caller.remove",
    "caller.attributes",
    "caller.list",
    "node.drain",
    "node.undrain",
    "autoscaler.status",
    "autoscaler.set",
    xmlrpc::LIST_METHODS,
    xmlrpc::MULTICALL,
];

/// The `/RPC2` route; `status_limit` limits `queue.status`.
pub fn router(control: Arc<Control>, status_limit: Arc<RateLimit>) -> Router {
    Router::new()
        .route("/RPC2", post(handle))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Rpc2 {
            control,
            status_limit,
        })
}

/// What `/RPC2` answers from.
#[derive(Debug, Clone)]
struct Rpc2 {
    control: Arc<Control>,
    status_limit: Arc<RateLimit>,
}

/// Who is calling: what each call of a request is authorized and counted by.
#[derive(Debug, Clone, Copy)]
struct Origin<'a> {
    authorization: Option<&'a [u8]>,
    /// The TCP peer, absent when the router is called in-process.
    peer: Option<&'a ConnectInfo<SocketAddr>>,
}

async fn handle(
    State(Rpc2 {
        control,
        status_limit,
    }): State<Rpc2>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // A body over the limit is a fault like any other bad call: an XML-RPC client reads
    // faults, not HTTP error pages.
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return xml(unreadable(&rejection)),
    };
    let decoded = if body.len() > DECODE_INLINE {
        tokio::task::spawn_blocking(move || xmlrpc::decode_call(&body))
            .await
            .unwrap_or_else(|_| {
                Err(Fault::new(
                    xmlrpc::fault_code::INTERNAL_ERROR,
                    "internal error while decoding the call".to_owned(),
                ))
            })
    } else {
        xmlrpc::decode_call(&body)
    };
    let origin = Origin {
        authorization: headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
        peer: peer.as_ref().map(|Extension(peer)| peer),
    };
    let bytes = match decoded {
        Err(fault) => xmlrpc::encode_fault(fault.code(), fault.string()),
        Ok(call) if call.method == xmlrpc::MULTICALL => match xmlrpc::decode_multicall(call) {
            Err(fault) => xmlrpc::encode_fault(fault.code(), fault.string()),
            Ok(calls) => {
                // One directory refresh for the whole batch, not one per write.
                let (results, size) = control
                    .batch(async {
                        let mut results = Vec::with_capacity(calls.len());
                        let mut size = 0;
                        for call in calls {
                            // Past the bound, the rest is not run at all: each call says
                            // so, and a CRM can resend exactly those.
                            if size > MAX_MULTICALL_RESPONSE {
                                results.push(Err(Fault::new(
                                    xmlrpc::fault_code::INTERNAL_ERROR,
                                    format!(
                                        "not run: the answers before it already fill {MAX_MULTICALL_RESPONSE} bytes; send this call again in another request"
                                    ),
                                )));
                                continue;
                            }
                            let result = match call {
                                Ok(call) => dispatch(&control, &status_limit, origin, &call).await,
                                Err(fault) => Err(fault),
                            };
                            size += result.as_ref().map_or(200, xmlrpc::encoded_size);
                            results.push(result);
                        }
                        (results, size)
                    })
                    .await;
                if size > DECODE_INLINE {
                    tokio::task::spawn_blocking(move || xmlrpc::encode_multicall_response(results))
                        .await
                        .unwrap_or_else(|_| {
                            xmlrpc::encode_fault(
                                xmlrpc::fault_code::INTERNAL_ERROR,
                                "internal error while encoding the answer",
                            )
                        })
                } else {
                    xmlrpc::encode_multicall_response(results)
                }
            }
        },
        Ok(call) => xmlrpc::encode_result(dispatch(&control, &status_limit, origin, &call).await),
    };
    xml(bytes)
}

fn xml(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], bytes).into_response()
}

/// The fault for a body that could not be read: too large, or cut off.
fn unreadable(rejection: &BytesRejection) -> Vec<u8> {
    let message = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "the request body is larger than {MAX_BODY} bytes; send the calls in several \
             smaller requests"
        )
    } else {
        format!(
            "the request body could not be read: {}",
            rejection.body_text()
        )
    };
    xmlrpc::encode_fault(xmlrpc::fault_code::INVALID_REQUEST, &message)
}

fn fault(err: ControlError) -> Fault {
    Fault::new(i32::from(err.status().as_u16()), err.to_string())
}

fn reply(value: impl serde::Serialize) -> Result<Value, Fault> {
    xmlrpc::value_from_serialize(&value)
}

async fn dispatch(
    control: &Control,
    status_limit: &RateLimit,
    origin: Origin<'_>,
    call: &Call,
) -> Result<Value, Fault> {
    let args = call.args();
    let authorize = |role: Role| -> Result<Caller, Fault> {
        control.authorize(origin.authorization, role).map_err(fault)
    };
    // The token is checked before the arguments, as REST answers 401/403 before reading a
    // body: a caller without the right learns nothing of a method's parameters.
    match call.method.as_str() {
        "agent.setPriority" => {
            let caller = authorize(Role::Write)?;
            args.arity(&["agent", "queue", "priority"])?;
            let (agent, queue) = (args.string(0, "agent")?, args.string(1, "queue")?);
            let priority = args.int(2, "priority")?;
            control
                .set_priority(&caller, &agent, &queue, priority)
                .await
                .map_err(fault)?;
            reply(true)
        }
        "agent.setTags" => {
            let caller = authorize(Role::Write)?;
            args.arity(&["agent", "tags"])?;
            let (agent, tags) = (args.string(0, "agent")?, args.string_list(1, "tags")?);
            reply(
                control
                    .set_tags(&caller, &agent, tags)
                    .await
                    .map_err(fault)?,
            )
        }
        "agent.setDailyCap" => {
            let caller = authorize(Role::Write)?;
            args.arity(&["agent", "cap"])?;
            let agent = args.string(0, "agent")?;
            // XML-RPC has no portable null: a negative cap removes the cap.
            let cap = u32::try_from(args.int(1, "cap")?).ok();
            reply(
                control
                    .set_daily_cap(&caller, &agent, cap)
                    .await
                    .map_err(fault)?,
            )
        }
        "agent.recordSale" => {
            let caller = authorize(Role::Write)?;
            // The request id is optional: with it, a retry counts once.
            if args.len() != 1 {
                args.arity(&["agent", "request_id"])?;
            }
            let agent = args.string(0, "agent")?;
            let request_id = if args.len() == 2 {
                Some(args.string(1, "request_id")?)
            } else {
                None
            };
            let sales = control
                .record_sale(&caller, &agent, request_id.as_deref())
                .await
                .map_err(fault)?;
            reply(sales)
        }
        "agent.login" => {
            let caller = authorize(Role::Write)?;
            args.arity(&["agent", "device"])?;
            let (agent, device) = (args.string(0, "agent")?, args.string(1, "device")?);
            let (_, session) = control
                .login(&caller, &agent, &device)
                .await
                .map_err(fault)?;
            reply(json!({
                "agent": session.agent,
                "device": session.device,
                "endpoint": session.endpoint,
            }))
        }
        "agent.logout" => {
            let caller = authorize(Role::Write)?;
            args.arity(&["agent"])?;
            let agent = args.string(0, "agent")?;
            control.logout(&caller, &agent).await.map_err(fault)?;
            reply(true)
        }
        "agent.pause" => {
            let caller = authorize(Role::Write)?;
            args.arity(&["agent", "reason"])?;
            let (agent, reason) = (args.string(0, "agent")?, args.string(1, "reason")?);
            control
                .pause(&caller, &agent, &reason)
                .await
                .map_err(fault)?;
            reply(true)
        }
        "agent.unpause" => {
            let caller = authorize(Role::Write)?;
            args.arity(&["agent"])?;
            let agent = args.string(0, "agent")?;
            control.unpause(&caller, &agent).await.map_err(fault)?;
            reply(true)
        }
        "queue.status" => {
            // Every call counts, with a token or without and before its arguments are
            // read, as a REST request to the status route does.
            status_limit.admit(origin.peer)?;
            args.arity(&["queue"])?;
            let queue = args.string(0, "queue")?;
            control.settle().await;
            reply(control.queue_status(&queue).map_err(fault)?)
        }
        "queue.candidates" => {
            control
                .authorize_candidates(origin.authorization)
                .map_err(fault)?;
            // The attributes are optional: a call without them is an ordinary caller.
            if args.len() != 1 {
                args.arity(&["queue", "attributes"])?;
            }
            let queue = args.string(0, "queue")?;
            let attributes: Vec<String> = if args.len() == 2 {
                args.attributes(1, "attributes")?
                    .into_iter()
                    .filter_map(|(name, set)| set.then_some(name))
                    .collect()
            } else {
                Vec::new()
            };
            control.settle().await;
            reply(control.candidates(&queue, &attributes).map_err(fault)?)
        }
        "caller.setAttributes" => {
            let caller = authorize(Role::Write)?;
            args.arity(&["number", "attributes"])?;
            let number = args.string(0, "number")?;
            let attributes = args.string_list(1, "attributes")?;
            reply(
                control
                    .set_caller_attributes(&caller, &number, attributes)
                    .await
                    .map_err(fault)?,
            )
        }
        "caller.remove" => {
            let caller = authorize(Role::Write)?;
            args.arity(&["number"])?;
            let number = args.string(0, "number")?;
            control
                .remove_caller(&caller, &number)
                .await
                .map_err(fault)?;
            reply(true)
        }
        "caller.attributes" => {
            control
                .authorize_caller_lookup(origin.authorization)
                .map_err(fault)?;
            args.arity(&["number"])?;
            let number = args.string(0, "number")?;
            reply(control.caller_attributes(&number).await.map_err(fault)?)
        }
        "caller.list" => {
            authorize(Role::Read)?;
            // Both or neither: `after` is "" for the first page.
            if !args.is_empty() {
                args.arity(&["after", "limit"])?;
            }
            let (after, limit) = if args.is_empty() {
                (None, 100)
            } else {
                let after = Some(args.string(0, "after")?).filter(|after| !after.is_empty());
                let limit = args.int_in(1, "limit", 1..=1000)?;
                (after, u32::try_from(limit).unwrap_or(1))
            };
            reply(
                control
                    .list_callers(after.as_deref(), limit)
                    .await
                    .map_err(fault)?,
            )
        }
        "node.drain" | "node.undrain" => {
            let caller = authorize(Role::Admin)?;
            args.arity(&["node"])?;
            let node = args.string(0, "node")?;
            let drain = call.method == "node.drain";
            reply(
                control
                    .set_drain(&caller, &node, drain)
                    .await
                    .map_err(fault)?,
            )
        }
        "autoscaler.status" => {
            authorize(Role::Read)?;
            args.arity(&[])?;
            reply(control.autoscaler_status().await.map_err(fault)?)
        }
        "autoscaler.set" => {
            let caller = authorize(Role::Admin)?;
            args.arity(&["steering"])?;
            // A struct, as REST's body: a member left out (or nil, where XML-RPC has no
            // null) takes its default: not paused, no minimum, the configured maximum.
            let steering = args.members(0, "steering", &["paused", "min_extra", "max_extra"])?;
            let count = |member| {
                steering
                    .int_in(member, 0..=i32::MAX)
                    .map(|n| n.map(|n| n.unsigned_abs()))
            };
            let steering = ScalerSteering {
                paused: steering.flag("paused")?.unwrap_or(false),
                min_extra: count("min_extra")?.unwrap_or(0),
                max_extra: count("max_extra")?,
            };
            reply(
                control
                    .set_autoscaler(&caller, &steering)
                    .await
                    .map_err(fault)?,
            )
        }
        xmlrpc::LIST_METHODS => {
            args.arity(&[])?;
            Ok(xmlrpc::list_methods_value(METHODS))
        }
        other => Err(xmlrpc::method_not_found(other)),
    }
}
