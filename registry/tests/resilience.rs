//! Freshness, stale-if-error, rate limits, pull budget and hub-and-spoke chaining: the behaviour
//! that keeps pulls working when the upstream says 429 or goes away, while spending as few
//! counted upstream requests as possible.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use cachalot_registry::config::{Config, FreshnessRule, ParentConfig};
use cachalot_testkit::fault::{FaultProxy, Kind, RateLimit};
use cachalot_testkit::image::{self, docker_image, fetch_blob};
use common::{client, fresh_for, get_manifest, Cachalot, Rig, MIB};

/// Makes a cached tag look as if it was last checked long ago (what passing time would do),
/// so freshness tests need no sleeping.
fn age_tag(cachalot: &Cachalot, repo: &str, tag: &str) {
    let path = cachalot
        .storage
        .join("repositories/docker.io")
        .join(repo)
        .join("_tags")
        .join(format!("{tag}.json"));
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    record["checkedAt"] = serde_json::json!(0);
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
}

async fn pull(base: &str, repo: &str, tag: &str) -> Result<String, String> {
    let m = get_manifest(base, repo, tag).await;
    let status = m.status();
    let cache = m
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = m.bytes().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut digests = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
    for l in manifest["layers"].as_array().unwrap() {
        digests.push(l["digest"].as_str().unwrap().to_owned());
    }
    for d in digests {
        let b = fetch_blob(&client(), base, repo, &d)
            .await
            .map_err(|e| e.to_string())?;
        if b.status != 200 || b.digest != d {
            return Err(format!("blob {d}: {} {}", b.status, b.digest));
        }
    }
    Ok(cache)
}

#[tokio::test]
async fn unchanged_tag_is_revalidated_with_one_head_and_no_get() {
    let rig = Rig::start().await;
    let img = docker_image(201, &[MIB]).unwrap();
    rig.push("library/fresh", "latest", &img).await;
    rig.faults().reset_counts();
    let url = rig.cachalot.url();
    assert_eq!(pull(&url, "library/fresh", "latest").await.unwrap(), "MISS");
    assert_eq!(pull(&url, "library/fresh", "latest").await.unwrap(), "HIT");
    let before = rig.faults().counts();
    assert_eq!(
        (
            before.get("GET", Kind::Manifest),
            before.get("HEAD", Kind::Manifest)
        ),
        (1, 0)
    );
    age_tag(&rig.cachalot, "library/fresh", "latest");
    // Many clients at once after maxAge: one coalesced HEAD.
    let pulls: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { pull(&url, "library/fresh", "latest").await })
        })
        .collect();
    for p in pulls {
        assert_eq!(p.await.unwrap().unwrap(), "HIT");
    }
    let after = rig.faults().counts();
    assert_eq!(
        after.get("GET", Kind::Manifest),
        1,
        "no GET for an unchanged digest"
    );
    assert_eq!(after.get("HEAD", Kind::Manifest), 1, "one coalesced HEAD");
}

#[tokio::test]
async fn moved_tag_is_served_fresh_once_max_age_has_passed() {
    let rig = Rig::start_with(|c| {
        c.registries.get_mut("docker.io").unwrap().freshness =
            vec![fresh_for("stable", Duration::from_secs(3600))];
    })
    .await;
    let old = docker_image(211, &[MIB]).unwrap();
    let new = docker_image(212, &[MIB]).unwrap();
    rig.push("library/moving", "stable", &old).await;
    let url = rig.cachalot.url();
    pull(&url, "library/moving", "stable").await.unwrap();
    rig.push("library/moving", "stable", &new).await;
    rig.faults().reset_counts();
    // Within maxAge the cached answer stands and upstream is not asked.
    let m = get_manifest(&url, "library/moving", "stable").await;
    assert_eq!(
        m.headers()["docker-content-digest"],
        old.manifest_digest.as_str()
    );
    assert_eq!(rig.faults().counts().total(), 0);
    age_tag(&rig.cachalot, "library/moving", "stable");
    let m = get_manifest(&url, "library/moving", "stable").await;
    assert_eq!(
        m.headers()["docker-content-digest"],
        new.manifest_digest.as_str()
    );
    assert_eq!(m.headers()["x-cache"], "MISS");
    let c = rig.faults().counts();
    assert_eq!(
        (c.get("HEAD", Kind::Manifest), c.get("GET", Kind::Manifest)),
        (1, 1)
    );
}

#[tokio::test]
async fn immutable_tags_and_digests_never_go_upstream_once_cached() {
    let rig = Rig::start_with(|c| {
        c.registries.get_mut("docker.io").unwrap().freshness = vec![FreshnessRule {
            pattern: "v*".into(),
            repository: None,
            max_age: None,
            immutable: true,
            not_found_max_age: None,
        }];
    })
    .await;
    let img = docker_image(215, &[MIB]).unwrap();
    rig.push("library/pinned", "v1", &img).await;
    let url = rig.cachalot.url();
    pull(&url, "library/pinned", "v1").await.unwrap();
    get_manifest(&url, "library/pinned", &img.manifest_digest).await;
    rig.faults().reset_counts();
    age_tag(&rig.cachalot, "library/pinned", "v1");
    assert_eq!(pull(&url, "library/pinned", "v1").await.unwrap(), "HIT");
    let m = get_manifest(&url, "library/pinned", &img.manifest_digest).await;
    assert_eq!(m.headers()["x-cache"], "HIT");
    assert_eq!(rig.faults().counts().total(), 0);
}

#[tokio::test]
async fn upstream_down_serves_cached_tags_stale_and_fails_uncached_ones_fast() {
    let rig = Rig::start().await;
    let img = docker_image(221, &[MIB, MIB]).unwrap();
    rig.push("library/cached", "latest", &img).await;
    rig.push("library/uncached", "latest", &img).await;
    let url = rig.cachalot.url();
    pull(&url, "library/cached", "latest").await.unwrap();
    age_tag(&rig.cachalot, "library/cached", "latest");
    rig.faults().set_down(true);

    let m = get_manifest(&url, "library/cached", "latest").await;
    assert_eq!(m.status(), 200);
    assert_eq!(m.headers()["x-cache"], "STALE");
    assert!(m.headers()["warning"].to_str().unwrap().starts_with("110"));

    let started = Instant::now();
    let m = get_manifest(&url, "library/uncached", "latest").await;
    let elapsed = started.elapsed();
    assert!(matches!(m.status().as_u16(), 502..=504), "{}", m.status());
    let body: serde_json::Value = m.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UPSTREAM_UNAVAILABLE");
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("docker.io"));
    // Well under a container runtime's pull timeout (the test config's response timeout is 5 s).
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");

    // A real client pulls the cached image with the upstream down.
    let dest = rig.dir.path().join("oci");
    let out = tokio::process::Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--retry-times=0"])
        .arg(format!(
            "docker://{}/library/cached:latest",
            rig.cachalot.host()
        ))
        .arg(format!("oci:{}:x", dest.display()))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = rig.cachalot.stats().await;
    assert!(stats.stale >= 2, "{stats:?}");
}

#[tokio::test]
async fn repeated_failures_open_the_circuit_so_the_upstream_is_not_hammered() {
    let rig = Rig::start_with(|c| {
        c.upstream.circuit_failure_threshold = 2;
        c.upstream.retries = 0;
    })
    .await;
    rig.faults()
        .add_fault(cachalot_testkit::fault::FaultRule::new(
            cachalot_testkit::fault::Fault::Status(503),
        ));
    let url = rig.cachalot.url();
    for _ in 0..2 {
        assert_eq!(get_manifest(&url, "library/x", "1").await.status(), 502);
    }
    let sent = rig.faults().counts().total();
    for _ in 0..5 {
        let m = get_manifest(&url, "library/x", "1").await;
        assert_eq!(m.status(), 503);
        assert!(m.headers().contains_key("retry-after"));
    }
    assert_eq!(
        rig.faults().counts().total(),
        sent,
        "an open circuit sends nothing"
    );
    assert!(rig.cachalot.stats().await.registries["docker.io"].circuit_open);
}

#[tokio::test]
async fn abuse_rate_limit_still_serves_cached_pulls_and_passes_429_for_uncached() {
    let rig = Rig::start().await;
    let img = docker_image(231, &[MIB]).unwrap();
    rig.push("library/busy", "latest", &img).await;
    rig.push("library/other", "latest", &img).await;
    let url = rig.cachalot.url();
    pull(&url, "library/busy", "latest").await.unwrap();
    age_tag(&rig.cachalot, "library/busy", "latest");
    // Docker Hub's abuse limit: a bare 429 on everything, HEAD included.
    rig.faults().set_abuse_limit(true);
    assert_eq!(pull(&url, "library/busy", "latest").await.unwrap(), "STALE");
    let m = get_manifest(&url, "library/other", "latest").await;
    assert_eq!(m.status(), 429);
    let body: serde_json::Value = m.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
}

#[tokio::test]
async fn exhausted_pull_limit_passes_429_with_retry_after_and_is_honoured_locally() {
    let rig = Rig::start().await;
    let img = docker_image(232, &[MIB]).unwrap();
    rig.push("library/other", "latest", &img).await;
    let url = rig.cachalot.url();
    // Docker Hub's pull limit: counted GETs exhausted, with Retry-After.
    rig.faults().set_rate_limit(Some(RateLimit {
        limit: 0,
        retry_after_secs: 120,
    }));
    let m = get_manifest(&url, "library/other", "latest").await;
    assert_eq!(m.status(), 429);
    assert_eq!(m.headers()["retry-after"], "120");
    let body: serde_json::Value = m.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("pull rate limit"));
    // The next request honours Retry-After locally instead of asking again.
    let sent = rig.faults().counts().counted_manifest_gets();
    let m = get_manifest(&url, "library/other", "latest").await;
    assert_eq!(m.status(), 429);
    assert!(m.headers().contains_key("retry-after"));
    assert_eq!(rig.faults().counts().counted_manifest_gets(), sent);
}

#[tokio::test]
async fn budget_reserve_prefers_a_stale_tag_to_a_counted_get_and_budget_is_reported() {
    let rig =
        Rig::start_with(|c| c.registries.get_mut("docker.io").unwrap().budget_reserve = 5).await;
    let old = docker_image(241, &[MIB]).unwrap();
    let new = docker_image(242, &[MIB]).unwrap();
    rig.push("library/thrifty", "latest", &old).await;
    rig.faults().set_rate_limit(Some(RateLimit {
        limit: 6,
        retry_after_secs: 60,
    }));
    let url = rig.cachalot.url();
    pull(&url, "library/thrifty", "latest").await.unwrap();
    let stats = rig.cachalot.stats().await;
    let budget = stats.registries["docker.io"].budget.clone().unwrap();
    assert_eq!(
        (budget.limit, budget.remaining, budget.window_seconds),
        (Some(6), 5, Some(21600))
    );
    assert!(rig
        .cachalot
        .metrics()
        .await
        .contains(r#"cachalot_registry_ratelimit_remaining{registry="docker.io"} 5"#));

    rig.push("library/thrifty", "latest", &new).await;
    age_tag(&rig.cachalot, "library/thrifty", "latest");
    let gets = rig.faults().counts().counted_manifest_gets();
    let m = get_manifest(&url, "library/thrifty", "latest").await;
    assert_eq!(m.status(), 200);
    assert_eq!(m.headers()["x-cache"], "STALE");
    assert_eq!(
        m.headers()["docker-content-digest"],
        old.manifest_digest.as_str()
    );
    assert_eq!(
        rig.faults().counts().counted_manifest_gets(),
        gets,
        "no GET spent at the reserve"
    );
}

#[tokio::test]
async fn seed_scenario_108_pulls_under_a_100_get_limit_all_succeed_with_minimal_gets() {
    let rig = Rig::start().await;
    let tags = ["nginx", "redis", "busybox"];
    for (i, name) in tags.iter().enumerate() {
        let img = docker_image(300 + i as u64, &[MIB, 2 * MIB]).unwrap();
        rig.push(&format!("library/{name}"), "stable", &img).await;
    }
    rig.faults().reset_counts();
    rig.faults().set_rate_limit(Some(RateLimit {
        limit: 100,
        retry_after_secs: 3600,
    }));
    let url = rig.cachalot.url();
    // 6 clusters × 6 pods, each pulling three mutable tags with imagePullPolicy: Always.
    let mut pulls = Vec::new();
    for _pod in 0..36 {
        for name in tags {
            let url = url.clone();
            pulls.push(tokio::spawn(async move {
                pull(&url, &format!("library/{name}"), "stable").await
            }));
        }
    }
    let mut failures = Vec::new();
    for p in pulls {
        if let Err(e) = p.await.unwrap() {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed pulls: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    let counts = rig.faults().counts();
    assert!(
        counts.counted_manifest_gets() <= 3,
        "counted GETs: {}",
        counts.counted_manifest_gets()
    );
    assert_eq!(rig.faults().rate_limit_remaining(), Some(97));
}

#[tokio::test]
async fn hub_and_spoke_spokes_share_one_upstream_fetch_per_manifest_and_blob() {
    let upstream = cachalot_testkit::distribution::Distribution::start()
        .await
        .unwrap();
    let to_upstream = FaultProxy::start(&upstream.url()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hub = Cachalot::start(dir.path().join("hub"), &to_upstream.url(), |_| {}).await;
    let to_hub = FaultProxy::start(&hub.url()).await.unwrap();
    let img = docker_image(401, &[MIB, 3 * MIB]).unwrap();
    image::push(&upstream.url(), "library/shared", "1.0", &img)
        .await
        .unwrap();
    let parent_url = to_hub.url();
    let mut spokes = Vec::new();
    for i in 0..3 {
        let parent_url = parent_url.clone();
        let spoke = Cachalot::start(
            dir.path().join(format!("spoke{i}")),
            "http://127.0.0.1:1",
            move |c: &mut Config| {
                c.parent = Some(ParentConfig {
                    url: parent_url,
                    ca_file: None,
                    insecure_skip_verify: false,
                    spoke_id: None,
                    client_cert_file: None,
                    client_key_file: None,
                    bearer_token_file: None,
                });
            },
        )
        .await;
        spokes.push(spoke);
    }
    // A spoke asks the hub about a blob the hub does not hold yet: answered, not 404 (#4747).
    let layer = &img.layers()[0];
    let head = client()
        .head(format!(
            "{}/v2/library/shared/blobs/{}",
            spokes[0].url(),
            layer.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        layer.size.to_string().as_str()
    );
    to_upstream.handle().reset_counts();
    let pulls: Vec<_> = spokes
        .iter()
        .map(|s| {
            let url = s.url();
            tokio::spawn(async move { pull(&url, "library/shared", "1.0").await })
        })
        .collect();
    for p in pulls {
        p.await.unwrap().unwrap();
    }
    let counts = to_upstream.handle().counts();
    assert_eq!(counts.counted_manifest_gets(), 1);
    assert_eq!(counts.get("GET", Kind::Blob), img.all_blobs().len() as u64);
    // The spokes told the hub which registry they mean.
    let ns = to_hub.handle().ns_seen();
    assert!(ns.get("docker.io").copied().unwrap_or(0) >= 3, "{ns:?}");
    assert_eq!(ns.len(), 1, "{ns:?}");
}
