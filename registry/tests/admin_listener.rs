//! The two listeners: the public one serves the pull API and health only, the admin one serves
//! metrics, stats, health and `/admin/` only; each answers what it does not serve with a 404 OCI
//! error envelope. Also the binary's refusal of an admin address that collides with the public one
//! or cannot be bound.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cachalot_testkit::image::docker_image;
use common::{client, pull_verified, Rig};

/// Asserts a 404 whose body is an OCI error envelope with code `UNSUPPORTED` naming `path`.
async fn assert_not_served(response: reqwest::Response, path: &str) {
    assert_eq!(response.status(), 404, "{path}");
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "{path}"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    let errors = body["errors"].as_array().expect("an OCI error envelope");
    assert_eq!(errors.len(), 1, "{body}");
    assert_eq!(errors[0]["code"], "UNSUPPORTED", "{body}");
    // The path is named, cut at 64 characters.
    let shown: String = path.chars().take(64).collect();
    assert!(
        errors[0]["message"].as_str().unwrap().contains(&shown),
        "{body}"
    );
}

#[tokio::test]
async fn public_port_refuses_metrics_stats_and_admin_paths_with_an_oci_404() {
    let rig = Rig::start().await;
    let base = rig.cachalot.url();
    for path in ["/metrics", "/stats", "/admin/x", "/admin/warm", "/admin"] {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let response = client()
                .request(method.clone(), format!("{base}{path}"))
                .send()
                .await
                .unwrap();
            assert_not_served(response, path).await;
        }
    }
    // What the public port does serve is unchanged.
    for path in ["/healthz", "/readyz"] {
        let response = client().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let v2 = client().get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(v2.status(), 200);
    // None of the refusals reached the upstream.
    assert_eq!(rig.faults().counts().total(), 0);
}

#[tokio::test]
async fn admin_port_serves_metrics_stats_and_health_counting_pulls_on_the_public_port() {
    let rig = Rig::start().await;
    let img = docker_image(21, &[1024, 2048]).unwrap();
    rig.push("library/admin", "1", &img).await;
    pull_verified(&rig.cachalot.url(), "library/admin", &img).await;

    let admin = rig.cachalot.admin_url();
    let stats: serde_json::Value = client()
        .get(format!("{admin}/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(stats["misses"].as_u64().unwrap() >= 1, "{stats}");
    let metrics = client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = metrics.text().await.unwrap();
    assert!(text.contains("cachalot_registry_requests_total"), "{text}");
    for path in ["/healthz", "/readyz"] {
        let response = client().get(format!("{admin}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    // An admin path nobody routes is an OCI 404 too, not a bare one.
    assert_not_served(
        client()
            .get(format!("{admin}/admin/unknown"))
            .send()
            .await
            .unwrap(),
        "/admin/unknown",
    )
    .await;
}

#[tokio::test]
async fn admin_port_does_not_serve_the_pull_api() {
    let rig = Rig::start().await;
    let img = docker_image(22, &[1024]).unwrap();
    rig.push("library/pullapi", "1", &img).await;
    let admin = rig.cachalot.admin_url();
    for path in [
        "/v2/".to_owned(),
        "/v2/library/pullapi/manifests/1".to_owned(),
        format!("/v2/library/pullapi/blobs/{}", img.all_blobs()[0].digest),
        "/v2/_catalog".to_owned(),
    ] {
        let response = client().get(format!("{admin}{path}")).send().await.unwrap();
        assert_not_served(response, &path).await;
    }
    // Nothing was fetched on the admin port's behalf.
    assert_eq!(rig.faults().counts().total(), 0);
    assert_eq!(rig.cachalot.stats().await.misses, 0);
}

/// Runs the binary with `args` (after `serve`), expecting it to exit on its own quickly;
/// returns its exit code and standard error.
fn run_registry(args: &[&str]) -> (Option<i32>, String) {
    let storage = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cachalot-registry"))
        .arg("serve")
        .args(args)
        .arg("--storage")
        .arg(storage.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("cachalot-registry {args:?} still runs after 20s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

#[test]
fn admin_listener_on_the_public_address_is_refused_at_startup() {
    let port = cachalot_testkit::wait::free_port().unwrap().to_string();
    let addr = format!("127.0.0.1:{port}");
    let (code, stderr) = run_registry(&["--listen", &addr, "--admin-listen", &addr]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear message: {stderr}");
    assert!(
        stderr.contains("invalid configuration: adminListen: ")
            && stderr.contains(&addr)
            && stderr.contains("own port"),
        "{stderr}"
    );
    // The default admin port is the public port given on the command line.
    let (code, stderr) = run_registry(&["--listen", "0.0.0.0:5001"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("adminListen"), "{stderr}");
}

#[test]
fn an_admin_address_that_cannot_be_bound_is_named_at_startup() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_registry(&["--listen", "127.0.0.1:0", "--admin-listen", &addr]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}"))
            && stderr.contains("`adminListen`, the admin listener"),
        "{stderr}"
    );
    drop(taken);
}
