//! Start-up behaviour against a mocked API: the CRD check and the Lease elector's calls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cachalot_operator::controller::{ensure_crd_installed, RunError};
use cachalot_operator::leader::{Elector, LeaderConfig};
use common::mock_api::{expect, failure, not_found, play, respond, Handle};
use http::{Method, StatusCode};
use kube::Client;
use serde_json::{json, Value};

const NS: &str = "default";
const CRD_PATH: &str =
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/registrymirrors.cachalot.dev";
const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/cachalot-system/leases";
const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/cachalot-system/leases/cachalot-operator";

/// Expects a call with this method and path, answers `body` with `status`, and returns what the
/// operator sent.
async fn answer(
    handle: &mut Handle,
    method: Method,
    path: &str,
    status: StatusCode,
    body: Value,
) -> Value {
    let (call, send) = expect(handle, method, path).await;
    respond(send, status, &body);
    call.body
}

/// Expects a GET of `path` and answers that it does not exist.
async fn answer_not_found(handle: &mut Handle, path: &str) {
    let (_, send) = expect(handle, Method::GET, path).await;
    not_found(send);
}

fn elector(client: Client, identity: &str) -> Elector {
    Elector::new(
        client,
        LeaderConfig::new("cachalot-system", "cachalot-operator", identity),
    )
}

#[tokio::test]
async fn missing_crd_is_reported_with_how_to_install_it() {
    let result = play(
        NS,
        |mut handle| async move {
            answer_not_found(&mut handle, CRD_PATH).await;
            handle
        },
        |client| async move { ensure_crd_installed(&client).await },
    )
    .await;
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
    play(
        NS,
        |mut handle| async move {
            let crd: Value =
                serde_yaml::from_str(&cachalot_operator::crd::render_crd_yaml().unwrap()).unwrap();
            answer(&mut handle, Method::GET, CRD_PATH, StatusCode::OK, crd).await;
            handle
        },
        |client| async move { ensure_crd_installed(&client).await },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn first_candidate_creates_the_lease_and_holds_it() {
    let held = play(
        NS,
        |mut handle| async move {
            answer_not_found(&mut handle, LEASE_PATH).await;
            let (call, send) = expect(&mut handle, Method::POST, LEASES_PATH).await;
            assert_eq!(call.body["spec"]["holderIdentity"], "pod-a");
            assert_eq!(call.body["spec"]["leaseDurationSeconds"], 15);
            respond(send, StatusCode::CREATED, &call.body);
            handle
        },
        |client| async move { elector(client, "pod-a").try_acquire_or_renew().await },
    )
    .await
    .unwrap();
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
    let fresh = lease("pod-b", now);
    let expired = lease(
        "pod-b",
        now - k8s_openapi::jiff::SignedDuration::from_secs(60),
    );
    let (first, second) = play(
        NS,
        |mut handle| async move {
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
            let conflict = failure(StatusCode::CONFLICT, "Conflict", "Conflict");
            let sent = answer(
                &mut handle,
                Method::PUT,
                LEASE_PATH,
                StatusCode::CONFLICT,
                conflict,
            )
            .await;
            assert_eq!(sent["metadata"]["resourceVersion"], "7");
            assert_eq!(sent["spec"]["holderIdentity"], "pod-a");
            assert_eq!(sent["spec"]["leaseTransitions"], 1);
            handle
        },
        |client| async move {
            let e = elector(client, "pod-a");
            let first = e.try_acquire_or_renew().await.unwrap();
            let second = e.try_acquire_or_renew().await.unwrap();
            (first, second)
        },
    )
    .await;
    assert!(!first, "a valid lease of another replica must be respected");
    assert!(!second, "losing the replace race is not leadership");
}
