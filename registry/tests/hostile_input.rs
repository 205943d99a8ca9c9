//! Hostile and malformed requests get the right 4xx with the OCI error envelope, never reach the
//! upstream, never touch the disk outside the store, and the process keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read as _, Write as _};

use axum::routing::get;
use cachalot_testkit::image::docker_image;
use common::{client, get_manifest, Cachalot, Rig, MIB};

/// Sends a raw request line (so nothing normalises the path) and returns status and body.
fn raw_request(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(format!("{request}\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("not an OCI error envelope ({e}): {body:?}"));
    v["errors"][0]["code"].as_str().unwrap_or("").to_owned()
}

#[tokio::test]
async fn hostile_paths_get_4xx_envelopes_and_never_reach_upstream() {
    let rig = Rig::start().await;
    let img = docker_image(101, &[MIB]).unwrap();
    rig.push("library/ok", "1", &img).await;
    rig.faults().reset_counts();
    let addr = rig.cachalot.addr;
    let good = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let cases: Vec<(String, u16, &str)> = vec![
        (
            "GET /v2/../../etc/passwd/manifests/latest HTTP/1.1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET /v2/library/../x/manifests/latest HTTP/1.1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET /v2/%2e%2e/%2e%2e/manifests/latest HTTP/1.1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET /v2/UPPER/manifests/latest HTTP/1.1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET /v2/a//b/manifests/latest HTTP/1.1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            format!("GET /v2/{}/manifests/latest HTTP/1.1", "a".repeat(300)),
            400,
            "NAME_INVALID",
        ),
        (
            "GET /v2/ok/blobs/md5:d41d8cd98f00b204e9800998ecf8427e HTTP/1.1".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET /v2/ok/blobs/sha256:abc HTTP/1.1".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            format!(
                "GET /v2/ok/blobs/{} HTTP/1.1",
                good.to_uppercase().replace("SHA256", "sha256")
            ),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET /v2/ok/blobs/sha256:../../../../etc/passwd HTTP/1.1".into(),
            404,
            "UNSUPPORTED",
        ),
        (
            "GET /v2/ok/blobs/sha256:..%2f..%2fetc%2fpasswd HTTP/1.1".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET /v2/ok/manifests/sha512:abcd HTTP/1.1".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET /v2/ok/manifests/-bad-tag HTTP/1.1".into(),
            400,
            "MANIFEST_INVALID",
        ),
        ("GET /v2/ok/nonsense HTTP/1.1".into(), 404, "UNSUPPORTED"),
        ("GET /etc/passwd HTTP/1.1".into(), 404, "UNSUPPORTED"),
        (
            "GET /v2/ok/manifests/1?ns=evil.example HTTP/1.1".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            "GET /v2/ok/manifests/1?ns=127.0.0.1:1 HTTP/1.1".into(),
            404,
            "NAME_UNKNOWN",
        ),
        ("PUT /v2/ok/manifests/1 HTTP/1.1".into(), 405, "UNSUPPORTED"),
        (
            "DELETE /v2/ok/manifests/1 HTTP/1.1".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            "POST /v2/ok/blobs/uploads/ HTTP/1.1".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            "PATCH /v2/ok/blobs/uploads/123 HTTP/1.1".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            format!("DELETE /v2/ok/blobs/{good} HTTP/1.1"),
            405,
            "UNSUPPORTED",
        ),
    ];
    for (request, status, code) in &cases {
        let sent = request.clone();
        let (got, body) = tokio::task::spawn_blocking(move || raw_request(addr, &sent))
            .await
            .unwrap();
        assert_eq!(got, *status, "{request}: {body}");
        assert_eq!(error_code(&body), *code, "body {body}");
    }
    let range = client()
        .get(format!(
            "{}/v2/ok/blobs/{}",
            rig.cachalot.url(),
            img.layers()[0].digest
        ))
        .header("range", "bytes=0-1,4-5")
        .send()
        .await
        .unwrap();
    assert_eq!(range.status(), 400);
    // Nothing hostile was forwarded, and the registry still serves real pulls.
    assert_eq!(rig.faults().counts().total(), 0);
    let m = get_manifest(&rig.cachalot.url(), "ok", "1").await;
    assert_eq!(m.status(), 200);
    // Nothing was written outside the store.
    let entries: Vec<_> = std::fs::read_dir(rig.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("cache")]);
}

#[tokio::test]
async fn manifests_over_4_mib_are_refused_and_the_registry_keeps_serving() {
    // A tiny upstream that serves an oversized manifest (distribution would refuse to store one).
    let huge = format!(
        "{{\"schemaVersion\":2,\"pad\":\"{}\"}}",
        "x".repeat(5 * 1024 * 1024)
    );
    let app = axum::Router::new()
        .route(
            "/v2/library/huge/manifests/latest",
            get(move || {
                let huge = huge.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/vnd.docker.distribution.manifest.v2+json",
                        )],
                        huge,
                    )
                }
            }),
        )
        .route("/v2/", get(|| async { "{}" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let cachalot = Cachalot::start(dir.path().join("c"), &upstream, |_| {}).await;
    let r = get_manifest(&cachalot.url(), "huge", "latest").await;
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert_eq!(error_code(&body), "UPSTREAM_INVALID");
    assert!(body.contains("larger than"), "{body}");
    let base = client()
        .get(format!("{}/v2/", cachalot.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(base.status(), 200);
    assert_eq!(
        base.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let cachalot = Cachalot::start(dir.path().join("c"), "http://127.0.0.1:1", |c| {
        c.server.header_read_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    let addr = cachalot.addr;
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").unwrap();
        let mut buf = Vec::new();
        // The server closes the connection (possibly after a 408) instead of waiting forever.
        s.read_to_end(&mut buf).is_ok()
    })
    .await
    .unwrap();
    assert!(
        closed,
        "connection was not closed by the header read timeout"
    );
}
