//! Asterisk realtime over `res_config_curl`, for nodes' node-agents: devices as PJSIP
//! endpoints, AORs and auths, and registrations (contacts) that every node reads and
//! writes, under `/asterisk/realtime/<family>/<operation>`.
//!
//! Only `node` tokens (and `admin`) may ask: the answers carry digest credentials. The
//! answer follows res_config_curl's rules (200; rows, nothing, or a count) with one
//! deliberate exception: when the store cannot answer, the status is 503. Asterisk would
//! read that as "not found", but Asterisk never asks here directly; the node-agent asks,
//! and must tell "the device does not exist" from "the source is down", which it answers
//! from its cache.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use callfleet_core::asterisk::{self, family};
use callfleet_core::config::Role;
use callfleet_core::realtime::{self, Field, Operation, Request, Row};
use callfleet_core::store::{StoreError, aor_of};

use crate::error::ControlError;
use crate::service::Control;

/// The routes, merged at the root.
pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route(
            "/asterisk/realtime/{family}/{operation}",
            post(serve).get(serve),
        )
        .with_state(control)
}

async fn serve(
    State(control): State<Arc<Control>>,
    Path((family, operation)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let caller = match control.authorize(
        headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
        Role::Node,
    ) {
        Ok(caller) => caller,
        Err(err) => return text(err.status(), &err.to_string()),
    };
    let target = match query {
        Some(query) => format!("{family}/{operation}?{query}"),
        None => format!("{family}/{operation}"),
    };
    let request = match realtime::parse_request(&target, &body) {
        Ok(request) => request,
        Err(err) => return text(StatusCode::BAD_REQUEST, &err.to_string()),
    };
    if !family::ALL.contains(&request.family.as_str()) {
        return text(
            StatusCode::NOT_FOUND,
            &format!(
                "no realtime family `{}`; served: {}",
                request.family,
                family::ALL.join(", ")
            ),
        );
    }
    match answer(&control, &request, &caller.name).await {
        Ok(body) => (StatusCode::OK, body).into_response(),
        Err(err) => {
            tracing::warn!(family = %request.family, operation = ?request.operation, error = %err, "realtime request failed");
            text(err.status(), &err.to_string())
        }
    }
}

fn text(status: StatusCode, message: &str) -> Response {
    (status, format!("{message}\n")).into_response()
}

/// The body res_config_curl expects, or an error when the store cannot answer.
async fn answer(
    control: &Control,
    request: &Request,
    writer: &str,
) -> Result<String, ControlError> {
    let conditions = &request.fields;
    match request.operation {
        Operation::Single | Operation::Multi => {
            let rows = read(control, &request.family, conditions).await?;
            let rows = rows.iter().filter(|row| realtime::matches(row, conditions));
            Ok(if request.operation == Operation::Single {
                rows.take(1).map(print).collect()
            } else {
                rows.map(print).collect()
            })
        }
        // The tables have every column PJSIP asks for.
        Operation::Require => Ok("0\n".to_owned()),
        Operation::Static => Ok(String::new()),
        Operation::Store | Operation::Update | Operation::Update2 | Operation::Destroy => {
            write(control, request, writer).await
        }
    }
}

fn print(row: &Row) -> String {
    realtime::print_row(row.iter().map(|(n, v)| (n.as_str(), v.as_str())))
}

/// The rows of `family` that may match `conditions`: narrowed by the id when the
/// conditions name one (every lookup of a call does), everything otherwise.
async fn read(
    control: &Control,
    family: &str,
    conditions: &[Field],
) -> Result<Vec<Row>, ControlError> {
    let store = control.store();
    if family == family::CONTACTS {
        let aor = wanted_aor(conditions);
        return store
            .sip_contacts(aor.as_deref())
            .await
            .map_err(unavailable);
    }
    let id = conditions
        .iter()
        .find(|field| field.name == "id" && field.operator.is_none())
        .map(|field| field.value.as_str());
    let devices = store.sip_devices(id).await.map_err(unavailable)?;
    Ok(devices
        .iter()
        .filter_map(|device| match family {
            family::ENDPOINTS => Some(asterisk::endpoint_row(device)),
            family::AORS => Some(asterisk::aor_row(device)),
            _ => asterisk::auth_row(device),
        })
        .collect())
}

/// The AOR a contact lookup is confined to: `id = aor;@hash` or `id LIKE aor;@%` (how
/// sorcery asks for one AOR's contacts).
fn wanted_aor(conditions: &[Field]) -> Option<String> {
    conditions.iter().find_map(|field| {
        if field.name != "id" {
            return None;
        }
        match field.operator.as_deref() {
            None => Some(aor_of(&field.value).to_owned()),
            Some(op) if op.eq_ignore_ascii_case("LIKE") => {
                let aor = field.value.strip_suffix(";@%")?;
                (!aor.contains(['%', '_'])).then(|| aor.to_owned())
            }
            _ => None,
        }
    })
}

/// Registrations are the only rows nodes write; a write elsewhere is refused with `-1`.
async fn write(control: &Control, request: &Request, writer: &str) -> Result<String, ControlError> {
    if request.family != family::CONTACTS {
        tracing::warn!(family = %request.family, operation = ?request.operation, "refused a realtime write to a read-only family");
        return Ok(realtime::print_count(None));
    }
    let store = control.store();
    let fields: Row = request
        .fields
        .iter()
        .map(|field| (field.name.clone(), field.value.clone()))
        .collect();
    let changed = match request.operation {
        Operation::Store => store.store_sip_contact(&fields, writer).await,
        Operation::Update => {
            let Some(id) = request.query.iter().find(|field| field.name == "id") else {
                return Ok(realtime::print_count(None));
            };
            store.update_sip_contact(&id.value, &fields, writer).await
        }
        Operation::Destroy => {
            let rows = read(control, family::CONTACTS, &request.fields).await?;
            let ids: Vec<String> = rows
                .iter()
                .filter(|row| realtime::matches(row, &request.fields))
                .filter_map(|row| realtime::value(row, "id").map(str::to_owned))
                .collect();
            store.delete_sip_contacts(&ids).await
        }
        // Sorcery never sends it for contacts.
        _ => return Ok(realtime::print_count(None)),
    };
    match changed {
        Ok(rows) => Ok(realtime::print_count(Some(rows))),
        Err(StoreError::Invalid { field, reason }) => {
            tracing::warn!(field, %reason, "refused a registration");
            Ok(realtime::print_count(None))
        }
        Err(err) => Err(unavailable(err)),
    }
}

fn unavailable(err: StoreError) -> ControlError {
    ControlError::Unavailable(err.to_string())
}
