//! Hub and spoke as a fleet, with real processes: one hub `cachalot-registry` in front of a real
//! distribution upstream (behind the counting fault proxy with a Docker Hub-style pull limit),
//! and spoke `cachalot-registry` processes whose `parent` is the hub:
//! - six spokes pull the seed's three mutable tags, the tags move, they pull again: the upstream
//!   sees at most one counted GET per distinct digest, the hub's `/stats` lists the six spokes
//!   by their `spokeId`, and each spoke's `/stats` shows the hub's upstream budget;
//! - a spoke dates a tag by the hub's `Age`, so the hub's and the spoke's freshness windows do
//!   not add up.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cachalot_registry::config::{Config, ParentConfig};
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{FaultProxy, RateLimit};
use cachalot_testkit::image::{docker_image, TestImage};
use common::{eventually, fresh_for, get_manifest, pull_tag_verified, Process, MIB};

const IMAGES: [&str; 3] = ["library/nginx", "library/redis", "library/postgres"];

fn parent(url: &str, spoke_id: Option<String>) -> ParentConfig {
    ParentConfig {
        url: url.to_owned(),
        ca_file: None,
        insecure_skip_verify: false,
        spoke_id,
        client_cert_file: None,
        client_key_file: None,
        bearer_token_file: None,
    }
}

/// Three images of one small layer each, distinct per `round`.
fn images(round: u64) -> Vec<TestImage> {
    (0..3u64)
        .map(|i| docker_image(1000 + 10 * round + i, &[MIB / 4]).unwrap())
        .collect()
}

/// The digest a registry serves for `repo:stable` now.
async fn served_digest(base: &str, repo: &str) -> Option<String> {
    let r = get_manifest(base, repo, "stable").await;
    (r.status() == 200).then(|| {
        r.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_owned()
    })
}

#[tokio::test]
async fn six_spokes_share_the_hubs_budget_and_the_hub_lists_them() {
    let upstream = Distribution::start().await.unwrap();
    let to_upstream = FaultProxy::start(&upstream.url()).await.unwrap();
    to_upstream.handle().set_rate_limit(Some(RateLimit {
        limit: 100,
        retry_after_secs: 3600,
    }));
    let push = |round: u64| {
        let url = upstream.url();
        async move {
            let imgs = images(round);
            for (repo, img) in IMAGES.iter().zip(&imgs) {
                cachalot_testkit::image::push(&url, repo, "stable", img)
                    .await
                    .unwrap();
            }
            imgs
        }
    };
    let first = push(1).await;
    let dir = tempfile::tempdir().unwrap();
    // Tags are fresh for 1 s on the hub and on the spokes, so moved tags are seen quickly.
    let fresh = |c: &mut Config| {
        c.registries.get_mut("docker.io").unwrap().freshness =
            vec![fresh_for("*", Duration::from_secs(1))];
    };
    let hub = Process::start(&dir.path().join("hub"), &to_upstream.url(), fresh).await;
    let mut spokes = Vec::new();
    for i in 0..6 {
        let hub_url = hub.url();
        spokes.push(
            Process::start(
                &dir.path().join(format!("spoke{i}")),
                "http://127.0.0.1:1",
                move |c: &mut Config| {
                    fresh(c);
                    c.parent = Some(parent(
                        &hub_url,
                        Some(format!("cluster-{i}/cachalot/spoke")),
                    ));
                },
            )
            .await,
        );
    }

    // Six pods per spoke pull the three tags at once.
    let round = |imgs: Vec<TestImage>| {
        let urls: Vec<String> = spokes.iter().map(Process::url).collect();
        async move {
            let mut pulls = Vec::new();
            for url in &urls {
                for _pod in 0..6 {
                    for (repo, img) in IMAGES.iter().zip(&imgs) {
                        let (url, img) = (url.clone(), img.clone());
                        pulls.push(tokio::spawn(async move {
                            pull_tag_verified(&url, repo, "stable", &img).await
                        }));
                    }
                }
            }
            for p in pulls {
                p.await.unwrap();
            }
        }
    };
    round(first.clone()).await;

    // The tags move upstream; every spoke sees the new digests once its window (and the hub's)
    // has passed, and the pods pull them.
    let second = push(2).await;
    for spoke in &spokes {
        for (repo, img) in IMAGES.iter().zip(&second) {
            let url = spoke.url();
            eventually(
                Duration::from_secs(30),
                "the spoke serves the moved tag",
                || {
                    let url = url.clone();
                    let want = img.manifest_digest.clone();
                    async move { served_digest(&url, repo).await == Some(want) }
                },
            )
            .await;
        }
    }
    round(second.clone()).await;

    let counts = to_upstream.handle().counts();
    assert!(
        counts.counted_manifest_gets() <= 6,
        "one counted GET per distinct digest (6), got {}",
        counts.counted_manifest_gets()
    );
    let hub_stats = hub.stats().await;
    let ids: Vec<&String> = hub_stats.spokes.keys().collect();
    assert_eq!(ids.len(), 6, "{ids:?}");
    for i in 0..6 {
        let s = &hub_stats.spokes[&format!("cluster-{i}/cachalot/spoke")];
        assert!(s.requests >= 6, "{i}: {s:?}");
        assert!(s.last_seen > 0, "{i}: {s:?}");
        assert_eq!(s.errors, 0, "{i}: {s:?}");
    }
    // Each spoke shows the hub's budget: the fleet's, which only the hub spends.
    let hub_budget = hub_stats.registries["docker.io"].budget.clone().unwrap();
    assert_eq!(
        hub_budget.remaining,
        100 - counts.counted_manifest_gets(),
        "{hub_budget:?}"
    );
    assert!(
        hub_budget.source.is_some(),
        "the hub sees its source address"
    );
    for spoke in &spokes {
        let budget = spoke.stats().await.registries["docker.io"].budget.clone();
        let budget = budget.expect("the spoke learnt the hub's budget");
        assert!(budget.remaining >= hub_budget.remaining, "{budget:?}");
        assert_eq!(budget.limit, Some(100));
        assert_eq!(budget.source, None, "the NAT address is not relayed");
        // Dated when the hub observed it (by the hub's `X-Cachalot-Budget-Age`), not when the
        // spoke received it; a second of rounding either way.
        assert!(
            budget.observed_at <= hub_budget.observed_at + 1,
            "{budget:?}"
        );
    }
}

#[tokio::test]
async fn a_spoke_dates_a_tag_by_the_hubs_age_so_windows_do_not_add_up() {
    let upstream = Distribution::start().await.unwrap();
    let to_upstream = FaultProxy::start(&upstream.url()).await.unwrap();
    let img = docker_image(2001, &[MIB / 4]).unwrap();
    cachalot_testkit::image::push(&upstream.url(), "library/app", "stable", &img)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let window = |c: &mut Config| {
        c.registries.get_mut("docker.io").unwrap().freshness =
            vec![fresh_for("*", Duration::from_secs(3600))];
    };
    let hub = Process::start(&dir.path().join("hub"), &to_upstream.url(), window).await;
    // The hub learns the tag now.
    pull_tag_verified(&hub.url(), "library/app", "stable", &img).await;
    let age =
        |r: &reqwest::Response| -> u64 { r.headers()["age"].to_str().unwrap().parse().unwrap() };
    // Wait until the hub's confirmation is at least 2 s old.
    let hub_url = hub.url();
    eventually(Duration::from_secs(10), "the hub's copy is 2 s old", || {
        let hub_url = hub_url.clone();
        async move { age(&get_manifest(&hub_url, "library/app", "stable").await) >= 2 }
    })
    .await;
    let hub_url = hub.url();
    let spoke = Process::start(
        &dir.path().join("spoke"),
        "http://127.0.0.1:1",
        move |c: &mut Config| {
            window(c);
            c.parent = Some(parent(&hub_url, Some("b/cachalot/spoke".into())));
        },
    )
    .await;
    let first = get_manifest(&spoke.url(), "library/app", "stable").await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-cache"], "MISS");
    // The spoke's copy is as old as the hub's, not new: its window ends when the hub's does.
    assert!(age(&first) >= 2, "spoke's Age {}", age(&first));
    let again = get_manifest(&spoke.url(), "library/app", "stable").await;
    assert_eq!(again.headers()["x-cache"], "HIT");
    assert!(age(&again) >= 2);
    // The hub counted the spoke by name; the spoke's `Age` never exceeds what time explains.
    let stats = hub.stats().await;
    assert!(stats.spokes["b/cachalot/spoke"].requests >= 1, "{stats:?}");
    assert_eq!(to_upstream.handle().counts().counted_manifest_gets(), 1);
}
