//! Start-up behaviour against a mocked API: the CRD check and the Lease elector's calls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use cachalot_operator::controller::{ensure_crd_installed, RunError};
use cachalot_operator::leader::{Elector, LeaderConfig};
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

async fn answer(
    handle: &mut Handle,
    method: Method,
    path: &str,
    status: StatusCode,
    body: Value,
) -> Value {
    let (request, send) = handle.next_request().await.expect("expected a call");
    assert_eq!(request.method(), method);
    assert_eq!(request.uri().path(), path);
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let sent = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
    sent
}

fn status_body(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})
}

const CRD_PATH: &str =
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/registrymirrors.cachalot.dev";
const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/cachalot-system/leases/cachalot-operator";

#[tokio::test]
async fn missing_crd_is_reported_with_how_to_install_it() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(async move {
        answer(
            &mut handle,
            Method::GET,
            CRD_PATH,
            StatusCode::NOT_FOUND,
            status_body(404, "NotFound"),
        )
        .await;
    });
    let result = tokio::time::timeout(Duration::from_secs(5), ensure_crd_installed(&client))
        .await
        .unwrap();
    server.await.unwrap();
    let error = result.unwrap_err();
    assert!(matches!(error, RunError::CrdMissing));
    let text = error.to_string();
    assert!(
        text.contains("registrymirrors.cachalot.dev is not installed"),
        "{text}"
    );
    assert!(text.contains("never installs CRDs"), "{text}");
}

#[tokio::test]
async fn installed_crd_passes_the_startup_check() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(async move {
        let crd: Value =
            serde_yaml::from_str(&cachalot_operator::crd::render_crd_yaml().unwrap()).unwrap();
        answer(&mut handle, Method::GET, CRD_PATH, StatusCode::OK, crd).await;
    });
    tokio::time::timeout(Duration::from_secs(5), ensure_crd_installed(&client))
        .await
        .unwrap()
        .unwrap();
    server.await.unwrap();
}

fn elector(client: Client, identity: &str) -> Elector {
    Elector::new(
        client,
        LeaderConfig::new("cachalot-system", "cachalot-operator", identity),
    )
}

#[tokio::test]
async fn first_candidate_creates_the_lease_and_holds_it() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(async move {
        answer(
            &mut handle,
            Method::GET,
            LEASE_PATH,
            StatusCode::NOT_FOUND,
            status_body(404, "NotFound"),
        )
        .await;
        let (request, send) = handle.next_request().await.unwrap();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(
            request.uri().path(),
            "/apis/coordination.k8s.io/v1/namespaces/cachalot-system/leases"
        );
        let body: Value =
            serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!(body["spec"]["holderIdentity"], "pod-a");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        send.send_response(
            Response::builder()
                .status(StatusCode::CREATED)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    });
    let held = tokio::time::timeout(
        Duration::from_secs(5),
        elector(client, "pod-a").try_acquire_or_renew(),
    )
    .await
    .unwrap()
    .unwrap();
    server.await.unwrap();
    assert!(held);
}

#[tokio::test]
async fn a_fresh_lease_of_another_replica_is_not_taken_and_a_lost_race_is_not_leadership() {
    let now = k8s_openapi::jiff::Timestamp::now();
    let lease = |holder: &str, renewed: k8s_openapi::jiff::Timestamp| {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "cachalot-operator", "namespace": "cachalot-system", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()}
        })
    };
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let fresh = lease("pod-b", now);
    let expired = lease(
        "pod-b",
        now - k8s_openapi::jiff::SignedDuration::from_secs(60),
    );
    let server = tokio::spawn(async move {
        // A fresh lease of pod-b: no write at all.
        answer(&mut handle, Method::GET, LEASE_PATH, StatusCode::OK, fresh).await;
        // An expired one: a replace carrying the read resourceVersion, which loses a race (409).
        answer(
            &mut handle,
            Method::GET,
            LEASE_PATH,
            StatusCode::OK,
            expired,
        )
        .await;
        let sent = answer(
            &mut handle,
            Method::PUT,
            LEASE_PATH,
            StatusCode::CONFLICT,
            status_body(409, "Conflict"),
        )
        .await;
        assert_eq!(sent["metadata"]["resourceVersion"], "7");
        assert_eq!(sent["spec"]["holderIdentity"], "pod-a");
        assert_eq!(sent["spec"]["leaseTransitions"], 1);
        handle
    });
    let e = elector(client, "pod-a");
    let first = tokio::time::timeout(Duration::from_secs(5), e.try_acquire_or_renew())
        .await
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), e.try_acquire_or_renew())
        .await
        .unwrap()
        .unwrap();
    let _handle = server.await.unwrap();
    assert!(!first, "a valid lease of another replica must be respected");
    assert!(!second, "losing the replace race is not leadership");
}
