//! The pull API through cachalot against a real distribution upstream: accounting, content
//! fidelity, verification, single-flight, ranges, restart, auth and hostile input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cachalot_testkit::fault::{Fault, FaultRule, Kind, TokenAuth};
use cachalot_testkit::image::{docker_image, docker_manifest_list, fetch_blob, oci_index};
use common::{client, eventually, get_manifest, Cachalot, Rig, MIB};

#[tokio::test]
async fn second_pull_is_served_from_cache_and_counted_as_hits() {
    let rig = Rig::start().await;
    let img = docker_image(11, &[MIB, 2 * MIB, 3 * MIB]).unwrap();
    rig.push("library/alpha", "1.0", &img).await;
    rig.faults().reset_counts();
    let url = rig.cachalot.url();
    for round in 0..2 {
        // One-segment names get `library/` on docker.io.
        let m = get_manifest(&url, "alpha", "1.0").await;
        assert_eq!(m.status(), 200);
        let expected_cache = if round == 0 { "MISS" } else { "HIT" };
        assert_eq!(m.headers()["x-cache"], expected_cache);
        assert_eq!(m.headers()["content-type"], img.media_type.as_str());
        assert_eq!(
            m.headers()["docker-content-digest"],
            img.manifest_digest.as_str()
        );
        assert_eq!(
            m.headers()["docker-distribution-api-version"],
            "registry/2.0"
        );
        assert_eq!(m.bytes().await.unwrap(), img.manifest_bytes);
        for blob in img.all_blobs() {
            let b = fetch_blob(&client(), &url, "library/alpha", &blob.digest)
                .await
                .unwrap();
            assert_eq!(
                (b.status, b.digest.as_str(), b.size),
                (200, blob.digest.as_str(), blob.size)
            );
        }
    }
    let counts = rig.faults().counts();
    assert_eq!(counts.counted_manifest_gets(), 1);
    assert_eq!(counts.get("GET", Kind::Blob), img.all_blobs().len() as u64);
    let stats = rig.cachalot.stats().await;
    let n = 1 + img.all_blobs().len() as u64;
    assert_eq!(
        (stats.misses, stats.hits, stats.stale, stats.errors),
        (n, n, 0, 0)
    );
    assert!(stats.served_bytes >= 2 * img.total_bytes());
    let metrics = rig.cachalot.metrics().await;
    assert!(
        metrics.contains(
            r#"cachalot_registry_requests_total{registry="docker.io",kind="blob",result="hit"} 4"#
        ),
        "{metrics}"
    );
    // Clients get the last byte once the digest is verified; the commit into the store (and so
    // the cache size) may follow a moment later.
    let cachalot = &rig.cachalot;
    eventually(Duration::from_secs(10), "every blob committed", || async {
        cachalot.stats().await.cache_size_bytes >= img.total_bytes()
    })
    .await;
}

#[tokio::test]
async fn index_and_manifest_list_pass_through_byte_for_byte_and_only_requested_children_are_fetched(
) {
    let rig = Rig::start().await;
    let index = oci_index(21, &[MIB]).unwrap();
    let list = docker_manifest_list(22, &[MIB]).unwrap();
    rig.push("library/multi", "oci", &index).await;
    rig.push("library/multi", "docker", &list).await;
    rig.faults().reset_counts();
    let url = rig.cachalot.url();
    for (tag, img) in [("oci", &index), ("docker", &list)] {
        let m = get_manifest(&url, "library/multi", tag).await;
        assert_eq!(m.headers()["content-type"], img.media_type.as_str());
        assert_eq!(
            m.headers()["docker-content-digest"],
            img.manifest_digest.as_str()
        );
        assert_eq!(m.bytes().await.unwrap(), img.manifest_bytes);
        let arm = img.child_for("arm64").unwrap();
        let c = get_manifest(&url, "library/multi", &arm.manifest_digest).await;
        assert_eq!(c.status(), 200);
        assert_eq!(c.headers()["content-type"], arm.media_type.as_str());
        assert_eq!(c.bytes().await.unwrap(), arm.manifest_bytes);
    }
    // Two index GETs and one child each: the amd64 children were never asked for.
    assert_eq!(rig.faults().counts().counted_manifest_gets(), 4);
}

#[tokio::test]
async fn skopeo_copies_through_the_proxy_with_verified_digests() {
    let rig = Rig::start().await;
    let img = docker_image(31, &[MIB, 2 * MIB]).unwrap();
    rig.push("library/skopeo-test", "v1", &img).await;
    let dest = rig.dir.path().join("oci");
    let out = tokio::process::Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--retry-times=0"])
        .arg(format!(
            "docker://{}/library/skopeo-test:v1",
            rig.cachalot.host()
        ))
        .arg(format!("oci:{}:v1", dest.display()))
        .output()
        .await
        .expect("skopeo runs (scripts/install-test-deps installs it)");
    assert!(
        out.status.success(),
        "skopeo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = rig.cachalot.stats().await;
    assert!(stats.misses >= 3, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    // Every layer landed in the layout under its digest (skopeo verified them on the way).
    for layer in img.layers() {
        let hex = layer.digest.strip_prefix("sha256:").unwrap();
        assert!(dest.join("blobs/sha256").join(hex).exists());
    }
}

#[tokio::test]
async fn concurrent_cold_clients_cause_one_upstream_fetch_per_blob() {
    let rig = Rig::start().await;
    let img = docker_image(41, &[24 * MIB]).unwrap();
    rig.push("library/crowd", "1", &img).await;
    rig.faults().reset_counts();
    // Slow the upstream blob down so the clients really overlap with the fetch.
    rig.faults()
        .add_fault(FaultRule::new(Fault::Delay(Duration::from_millis(300))).kind(Kind::Blob));
    let layer = img.layers()[0].clone();
    let url = rig.cachalot.url();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (url, digest) = (url.clone(), layer.digest.clone());
        clients.push(tokio::spawn(async move {
            fetch_blob(&client(), &url, "library/crowd", &digest)
                .await
                .unwrap()
        }));
    }
    for c in clients {
        let got = c.await.unwrap();
        assert_eq!((got.status, got.size), (200, layer.size));
        assert_eq!(got.digest, layer.digest);
    }
    assert_eq!(rig.faults().counts().get("GET", Kind::Blob), 1);
    let stats = rig.cachalot.stats().await;
    assert_eq!((stats.misses, stats.hits), (1, 7));
    assert_eq!(stats.upstream_bytes, layer.size);
}

#[tokio::test]
async fn concurrent_cold_manifest_requests_cause_one_upstream_get() {
    let rig = Rig::start().await;
    let img = docker_image(42, &[MIB]).unwrap();
    rig.push("library/crowd", "m", &img).await;
    rig.faults().reset_counts();
    rig.faults()
        .add_fault(FaultRule::new(Fault::Delay(Duration::from_millis(200))).kind(Kind::Manifest));
    let url = rig.cachalot.url();
    let gets: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get_manifest(&url, "library/crowd", "m").await.status() })
        })
        .collect();
    for g in gets {
        assert_eq!(g.await.unwrap(), 200);
    }
    assert_eq!(rig.faults().counts().counted_manifest_gets(), 1);
}

async fn blob_is_cached(cachalot: &Cachalot, repo: &str, digest: &str) -> bool {
    let r = client()
        .head(format!("{}/v2/{repo}/blobs/{digest}", cachalot.url()))
        .send()
        .await
        .unwrap();
    r.headers().get("x-cache").is_some_and(|v| v == "HIT")
}

async fn read_fully(response: reqwest::Response) -> Result<u64, reqwest::Error> {
    let mut response = response;
    let mut n = 0;
    while let Some(chunk) = response.chunk().await? {
        n += chunk.len() as u64;
    }
    Ok(n)
}

#[tokio::test]
async fn corrupt_upstream_blob_fails_the_client_and_is_not_committed() {
    let rig = Rig::start().await;
    let img = docker_image(51, &[2 * MIB]).unwrap();
    rig.push("library/bad", "1", &img).await;
    let layer = &img.layers()[0];
    let rule = rig
        .faults()
        .add_fault(FaultRule::new(Fault::Corrupt { at: 1000 }).kind(Kind::Blob));
    let url = format!(
        "{}/v2/library/bad/blobs/{}",
        rig.cachalot.url(),
        layer.digest
    );
    let response = client().get(&url).send().await.unwrap();
    // Headers may already say 200; the body must never complete.
    let body = read_fully(response).await;
    assert!(body.is_err(), "a corrupt blob completed as {body:?} bytes");
    assert!(!blob_is_cached(&rig.cachalot, "library/bad", &layer.digest).await);
    let blob_dir = rig.cachalot.storage.join("blobs/sha256");
    let hex = layer.digest.strip_prefix("sha256:").unwrap();
    assert!(!blob_dir.join(hex).exists());
    // Once the upstream is healthy again the blob is fetched and served correctly.
    rig.faults().remove_fault(rule);
    let ok = fetch_blob(&client(), &rig.cachalot.url(), "library/bad", &layer.digest)
        .await
        .unwrap();
    assert_eq!(
        (ok.status, ok.digest.as_str()),
        (200, layer.digest.as_str())
    );
    // Two GETs upstream: the corrupt one and the good one; the HEAD checks asked upstream too.
    assert_eq!(rig.faults().counts().get("GET", Kind::Blob), 2);
    assert!(
        rig.cachalot.stats().await.errors == 0,
        "a failed stream is not a refused request"
    );
}

#[tokio::test]
async fn truncated_upstream_body_fails_the_client_and_is_not_committed() {
    let rig = Rig::start().await;
    let img = docker_image(52, &[2 * MIB]).unwrap();
    rig.push("library/short", "1", &img).await;
    let layer = &img.layers()[0];
    rig.faults().add_fault(
        FaultRule::new(Fault::Truncate { after: 100_000 })
            .kind(Kind::Blob)
            .times(1),
    );
    let url = format!(
        "{}/v2/library/short/blobs/{}",
        rig.cachalot.url(),
        layer.digest
    );
    let body = read_fully(client().get(&url).send().await.unwrap()).await;
    assert!(
        body.is_err(),
        "a truncated blob completed as {body:?} bytes"
    );
    assert!(!blob_is_cached(&rig.cachalot, "library/short", &layer.digest).await);
    let again = fetch_blob(
        &client(),
        &rig.cachalot.url(),
        "library/short",
        &layer.digest,
    )
    .await
    .unwrap();
    assert_eq!((again.status, again.size), (200, layer.size));
}

#[tokio::test]
async fn corrupt_manifest_is_refused_and_not_cached() {
    let rig = Rig::start().await;
    let img = docker_image(53, &[MIB]).unwrap();
    rig.push("library/badm", "1", &img).await;
    let rule = rig
        .faults()
        .add_fault(FaultRule::new(Fault::Corrupt { at: 10 }).kind(Kind::Manifest));
    let r = get_manifest(&rig.cachalot.url(), "library/badm", &img.manifest_digest).await;
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UPSTREAM_INVALID");
    rig.faults().remove_fault(rule);
    let r = get_manifest(&rig.cachalot.url(), "library/badm", &img.manifest_digest).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "MISS");
}

#[tokio::test]
async fn client_disconnect_mid_blob_still_commits_the_cache_write() {
    let rig = Rig::start().await;
    let img = docker_image(61, &[16 * MIB]).unwrap();
    rig.push("library/quit", "1", &img).await;
    rig.faults().reset_counts();
    let layer = img.layers()[0].clone();
    let url = format!(
        "{}/v2/library/quit/blobs/{}",
        rig.cachalot.url(),
        layer.digest
    );
    {
        let mut response = client().get(&url).send().await.unwrap();
        let first = response.chunk().await.unwrap();
        assert!(first.is_some());
        // Dropping the response closes the connection mid-body.
    }
    eventually(
        Duration::from_secs(30),
        "the abandoned blob to be committed",
        || async { blob_is_cached(&rig.cachalot, "library/quit", &layer.digest).await },
    )
    .await;
    let got = fetch_blob(
        &client(),
        &rig.cachalot.url(),
        "library/quit",
        &layer.digest,
    )
    .await
    .unwrap();
    assert_eq!(got.digest, layer.digest);
    assert_eq!(rig.faults().counts().get("GET", Kind::Blob), 1);
}

async fn range_get(url: &str, range: &str) -> reqwest::Response {
    client()
        .get(url)
        .header("range", range)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn ranges_are_served_from_cache_and_from_an_in_flight_fetch() {
    let rig = Rig::start().await;
    let img = docker_image(71, &[3 * MIB]).unwrap();
    rig.push("library/range", "1", &img).await;
    let layer = &img.layers()[0];
    let full = layer.read_all().unwrap();
    let size = full.len() as u64;
    let url = format!(
        "{}/v2/library/range/blobs/{}",
        rig.cachalot.url(),
        layer.digest
    );

    // Cold: a range request joins (or starts) the fetch and gets exactly its bytes.
    let r = range_get(&url, "bytes=100-199").await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 100-199/{size}").as_str()
    );
    assert_eq!(r.bytes().await.unwrap(), full.slice(100..200));

    // Warm.
    let r = range_get(&url, "bytes=-10").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), full.slice(full.len() - 10..));
    let r = range_get(&url, &format!("bytes={}-", size - 5)).await;
    assert_eq!(r.bytes().await.unwrap(), full.slice(full.len() - 5..));

    let r = range_get(&url, &format!("bytes={size}-")).await;
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{size}").as_str()
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "RANGE_INVALID");

    let r = range_get(&url, "bytes=zz-").await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "RANGE_INVALID");
}

#[tokio::test]
async fn restart_keeps_the_cache_even_with_the_upstream_gone() {
    let rig = Rig::start().await;
    let img = docker_image(81, &[MIB]).unwrap();
    rig.push("library/keep", "1", &img).await;
    let url = rig.cachalot.url();
    assert_eq!(
        get_manifest(&url, "library/keep", &img.manifest_digest)
            .await
            .status(),
        200
    );
    for blob in img.all_blobs() {
        fetch_blob(&client(), &url, "library/keep", &blob.digest)
            .await
            .unwrap();
    }
    let Rig {
        cachalot,
        fault,
        dir,
        upstream,
    } = rig;
    let storage = cachalot.storage.clone();
    cachalot.stop().await;
    fault.handle().set_down(true);
    let again = Cachalot::start(storage, &fault.url(), |_| {}).await;
    let m = get_manifest(&again.url(), "library/keep", &img.manifest_digest).await;
    assert_eq!(m.status(), 200);
    assert_eq!(m.bytes().await.unwrap(), img.manifest_bytes);
    for blob in img.all_blobs() {
        let b = fetch_blob(&client(), &again.url(), "library/keep", &blob.digest)
            .await
            .unwrap();
        assert_eq!((b.status, b.digest.as_str()), (200, blob.digest.as_str()));
    }
    let catalog: serde_json::Value = client()
        .get(format!("{}/v2/_catalog", again.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["library/keep"]));
    drop((dir, upstream));
}

#[tokio::test]
async fn bearer_token_upstream_is_pulled_with_tokens_cached_per_scope() {
    let rig = Rig::start().await;
    let img = docker_image(91, &[MIB, MIB]).unwrap();
    rig.push("library/secret", "1", &img).await;
    rig.faults().enable_token_auth(TokenAuth::default());
    let url = rig.cachalot.url();
    let m = get_manifest(&url, "library/secret", "1").await;
    assert_eq!(m.status(), 200);
    for blob in img.all_blobs() {
        let b = fetch_blob(&client(), &url, "library/secret", &blob.digest)
            .await
            .unwrap();
        assert_eq!(b.status, 200);
    }
    let tokens = rig.faults().token_requests();
    assert_eq!(
        tokens.values().sum::<u64>(),
        1,
        "one token for the one scope: {tokens:?}"
    );
}

/// Writes `value` to `path` the way the kubelet updates a mounted Secret: a new file renamed
/// over the old one, so a reader never sees a half-written file.
fn rotate_file(path: &std::path::Path, value: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, value).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn rotated_credentials_files_are_used_for_the_next_token_without_a_restart() {
    let secrets = tempfile::tempdir().unwrap();
    let (user_file, password_file) = (
        secrets.path().join("username"),
        secrets.path().join("password"),
    );
    std::fs::write(&user_file, "puller\n").unwrap();
    std::fs::write(&password_file, "first-password\n").unwrap();
    let (u, p) = (user_file.clone(), password_file.clone());
    let rig = Rig::start_with(move |config| {
        let registry = config.registries.get_mut("docker.io").unwrap();
        registry.credentials = Some(cachalot_registry::config::Credentials {
            username_file: Some(u),
            password_file: Some(p),
            docker_config_file: None,
        });
    })
    .await;
    let img = docker_image(93, &[MIB]).unwrap();
    rig.push("library/before", "1", &img).await;
    rig.push("library/after", "1", &img).await;
    let auth = |password: &str| TokenAuth {
        credentials: Some(("puller".to_owned(), password.to_owned())),
        ..TokenAuth::default()
    };
    rig.faults().enable_token_auth(auth("first-password"));
    let url = rig.cachalot.url();
    assert_eq!(
        get_manifest(&url, "library/before", "1").await.status(),
        200
    );

    // The token service now wants the new password; the old one is refused.
    rig.faults().enable_token_auth(auth("second-password"));
    rotate_file(&password_file, "second-password\n");
    let m = get_manifest(&url, "library/after", "1").await;
    assert_eq!(m.status(), 200, "{:?}", m.text().await);
}

#[tokio::test]
async fn tags_list_is_fetched_whole_and_paged_here_with_the_clients_parameters() {
    let rig = Rig::start().await;
    let img = docker_image(92, &[MIB]).unwrap();
    for tag in ["a", "b", "c"] {
        rig.push("library/tagged", tag, &img).await;
    }
    let r = client()
        .get(format!(
            "{}/v2/tagged/tags/list?n=2&last=a",
            rig.cachalot.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"name": "library/tagged", "tags": ["b", "c"]})
    );
    // The upstream is asked for the whole list once; pages are cut from it here.
    let seen = rig.faults().requests();
    let tags_request = seen
        .iter()
        .find(|r| r.path.ends_with("/tags/list"))
        .unwrap();
    assert_eq!(tags_request.query, None);
    let missing = client()
        .get(format!("{}/v2/library/nope/tags/list", rig.cachalot.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN");
}

#[tokio::test]
async fn head_of_an_uncached_tag_spends_no_get_and_reports_the_real_size() {
    let rig = Rig::start().await;
    let img = docker_image(93, &[MIB]).unwrap();
    rig.push("library/peek", "1", &img).await;
    rig.faults().reset_counts();
    let r = client()
        .head(format!("{}/v2/peek/manifests/1", rig.cachalot.url()))
        .header("accept", cachalot_registry::oci::media::MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-content-digest"],
        img.manifest_digest.as_str()
    );
    assert_eq!(r.headers()["content-type"], img.media_type.as_str());
    assert_eq!(
        r.headers()["content-length"],
        img.manifest_bytes.len().to_string().as_str()
    );
    let c = rig.faults().counts();
    assert_eq!(
        (c.get("HEAD", Kind::Manifest), c.counted_manifest_gets()),
        (1, 0)
    );
    // The following GET by digest (what containerd does next) is the only counted request.
    let m = get_manifest(&rig.cachalot.url(), "library/peek", &img.manifest_digest).await;
    assert_eq!(m.bytes().await.unwrap(), img.manifest_bytes);
    assert_eq!(rig.faults().counts().counted_manifest_gets(), 1);
}
