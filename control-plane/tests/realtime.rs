//! Realtime provisioning as the node-agent asks for it (the bytes of res_config_curl, with
//! a node token), on SQLite and MariaDB.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use callfleet_control_plane::{Control, router};
use callfleet_core::config::{ApiToken, ControlPlaneConfig, Role, Secret, StoreConfig};
use callfleet_core::{Store, testing};
use tower::ServiceExt;

const NODE: &str = "node-a-secret-0123456789";
const CRM: &str = "crm-main-secret-0123456789";

async fn app(store: Store) -> Router {
    let token = |name: &str, secret: &str, role| ApiToken {
        name: name.to_owned(),
        token: Secret::new(secret),
        role,
    };
    let config = ControlPlaneConfig {
        tokens: vec![
            token("node-a", NODE, Role::Node),
            token("crm-main", CRM, Role::Write),
        ],
        ..ControlPlaneConfig::default()
    };
    router(Arc::new(
        Control::start(store, &config).await.expect("control plane"),
    ))
}

async fn send(
    app: &Router,
    method: Method,
    uri: &str,
    token: &str,
    body: &str,
) -> (StatusCode, String) {
    let content_type = if uri.starts_with("/api") {
        "application/json"
    } else {
        "application/x-www-form-urlencoded"
    };
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body.to_owned()))
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("answer");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, String::from_utf8(bytes.to_vec()).expect("utf-8"))
}

async fn realtime(app: &Router, path: &str, body: &str) -> String {
    let (status, text) = send(
        app,
        Method::POST,
        &format!("/asterisk/realtime/{path}"),
        NODE,
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{path} {body}: {text}");
    text
}

async fn on_both<F, Fut>(scenario: F)
where
    F: Fn(Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temp dir");
    let configs = [
        StoreConfig {
            url: format!("sqlite://{}/fleet.db", dir.path().display()),
            ..StoreConfig::default()
        },
        testing::fresh_mysql_config().await,
    ];
    for config in configs {
        scenario(Store::connect(&config).await.expect("store")).await;
    }
}

#[tokio::test]
async fn devices_are_served_as_pjsip_objects_to_node_tokens_only() {
    on_both(|store| async move {
        let app = app(store).await;
        let (status, text) = send(
            &app,
            Method::PUT,
            "/api/v1/devices/2001",
            CRM,
            r#"{"endpoint": "PJSIP/2001", "name": "Desk 12", "password": "s3cret"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(text.contains(r#""registers":true"#), "{text}");
        assert!(!text.contains("s3cret") && !text.contains("1b6eda9c"), "{text}");
        let (status, _) = send(
            &app,
            Method::PUT,
            "/api/v1/devices/2002",
            CRM,
            r#"{"endpoint": "PJSIP/2002", "contact": "sip:2002@127.0.0.1:5072"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);

        assert_eq!(
            realtime(&app, "ps_endpoints/single", "id=2001").await,
            "id=2001&aors=2001&auth=2001&context=callfleet-from-device&disallow=all&allow=ulaw%2Calaw\
&direct_media=no&rtp_symmetric=yes&force_rport=yes&rewrite_contact=yes&callerid=%22Desk%2012%22%20%3C2001%3E\n"
        );
        // echo -n '2001:callfleet:s3cret' | md5sum → 1b6eda9c46f8ae98d6c7de02921d0716
        assert_eq!(
            realtime(&app, "ps_auths/single", "id=2001").await,
            "id=2001&auth_type=digest&username=2001&realm=callfleet&password_digest=MD5%3A1b6eda9c46f8ae98d6c7de02921d0716\n"
        );
        assert_eq!(realtime(&app, "ps_auths/single", "id=2002").await, "");
        assert_eq!(
            realtime(&app, "ps_aors/single", "id=2002").await,
            "id=2002&max_contacts=1&remove_existing=yes&contact=sip%3A2002%40127.0.0.1%3A5072\n"
        );
        assert_eq!(realtime(&app, "ps_endpoints/single", "id=9999").await, "");
        let all = realtime(&app, "ps_aors/multi", "id%20LIKE=%25").await;
        assert_eq!(all.lines().count(), 2, "{all}");
        assert_eq!(realtime(&app, "ps_endpoints/require", "id=char%3A40").await, "0\n");

        // A CRM's token reads no credentials; nobody reads an unknown family.
        let (status, text) = send(&app, Method::POST, "/asterisk/realtime/ps_auths/single", CRM, "id=2001").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
        assert!(!text.contains("1b6eda9c"));
        let (status, _) = send(&app, Method::POST, "/asterisk/realtime/sippeers/single", NODE, "name=2001").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // Nodes write registrations only.
        assert_eq!(
            realtime(&app, "ps_endpoints/store", "id=2003&context=default").await,
            "-1\n"
        );
    })
    .await;
}

#[tokio::test]
async fn registrations_written_by_one_node_are_read_by_any() {
    on_both(|store| async move {
        let app = app(store.clone()).await;
        let contact = "id=2001%3B%40a1b2&uri=sip%3A2001%40127.0.0.1%3A5071%3Bob&expiration_time=1764000000\
&qualify_frequency=0&endpoint=2001&reg_server=&via_addr=127.0.0.1&via_port=5071";
        assert_eq!(realtime(&app, "ps_contacts/store", contact).await, "1\n");
        let of_aor = realtime(&app, "ps_contacts/multi", "id%20LIKE=2001%3B%40%25").await;
        assert_eq!(of_aor, format!("{contact}\n"));
        assert_eq!(realtime(&app, "ps_contacts/multi", "id%20LIKE=2002%3B%40%25").await, "");
        assert_eq!(
            realtime(&app, "ps_contacts/update?id=2001%3B%40a1b2", "expiration_time=1764000060").await,
            "1\n"
        );
        assert_eq!(
            realtime(&app, "ps_contacts/update?id=2001%3B%40zzzz", "expiration_time=1").await,
            "0\n"
        );
        // The registrar's sweep of expired registrations.
        assert_eq!(
            realtime(&app, "ps_contacts/multi", "expiration_time%20%3C%3D=1764000059").await,
            ""
        );
        let expired = realtime(&app, "ps_contacts/multi", "expiration_time%20%3C%3D=1764000060").await;
        assert!(expired.contains("expiration_time=1764000060"), "{expired}");
        assert_eq!(realtime(&app, "ps_contacts/destroy", "id=2001%3B%40a1b2&").await, "1\n");
        assert_eq!(realtime(&app, "ps_contacts/multi", "id%20LIKE=%25").await, "");

        // A store that cannot answer is a 503, never "not found": the node-agent then
        // answers from its cache.
        store.close().await;
        let (status, _) = send(&app, Method::POST, "/asterisk/realtime/ps_endpoints/single", NODE, "id=2001").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    })
    .await;
}
