//! The upstream budget with time: each figure keeps when it was observed, is reported expired
//! once older than its window (and then renewed by one free HEAD when a client asks for a tag),
//! and a 429, Docker Hub's bare abuse 429 included, is reported with its `Retry-After`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cachalot_registry::telemetry::Budget;
use cachalot_testkit::fault::{Kind, RateLimit};
use cachalot_testkit::image::docker_image;
use common::{eventually, fresh_for, get_manifest, Rig, MIB};

fn now_secs() -> u64 {
    cachalot_registry::store::now_secs()
}

async fn budget(rig: &Rig) -> Option<Budget> {
    rig.cachalot.stats().await.registries["docker.io"]
        .budget
        .clone()
}

#[tokio::test]
async fn an_expired_budget_figure_is_reported_expired_and_one_free_head_renews_it() {
    // Tags stay fresh for an hour: the second pull is served from the cache without a HEAD of
    // its own, so the only upstream request it can cause is the budget refresh.
    let rig = Rig::start_with(|c| {
        c.registries.get_mut("docker.io").unwrap().freshness =
            vec![fresh_for("*", Duration::from_secs(3600))];
    })
    .await;
    let img = docker_image(971, &[MIB]).unwrap();
    rig.push("library/budget", "1", &img).await;
    rig.faults().set_rate_limit(Some(RateLimit {
        limit: 100,
        retry_after_secs: 3600,
    }));
    rig.faults().set_rate_limit_window(Some(1));
    let url = rig.cachalot.url();

    let before = now_secs();
    assert_eq!(
        get_manifest(&url, "library/budget", "1").await.status(),
        200
    );
    let first = budget(&rig).await.expect("a budget figure");
    assert_eq!(
        (first.limit, first.remaining, first.window_seconds),
        (Some(100), 99, Some(1))
    );
    assert!(
        (before..=now_secs()).contains(&first.observed_at),
        "observedAt {} is when the figure arrived",
        first.observed_at
    );

    // One second later the figure says nothing any more: /stats marks it expired (keeping
    // when it was observed) and the metric series are gone.
    eventually(Duration::from_secs(10), "the figure to expire", || async {
        budget(&rig).await.is_some_and(|b| b.expired)
    })
    .await;
    assert_eq!(budget(&rig).await.unwrap().observed_at, first.observed_at);
    let metrics = rig.cachalot.metrics().await;
    assert!(
        !metrics.contains("cachalot_registry_ratelimit_remaining{"),
        "{metrics}"
    );

    // A client asks for the tag: served from the cache, and one HEAD (not counted against the
    // pull limit) renews the figure.
    rig.faults().reset_counts();
    let hit = get_manifest(&url, "library/budget", "1").await;
    assert_eq!(hit.headers()["x-cache"], "HIT");
    eventually(
        Duration::from_secs(10),
        "the budget refresh HEAD",
        || async { rig.faults().counts().get("HEAD", Kind::Manifest) == 1 },
    )
    .await;
    eventually(Duration::from_secs(10), "a renewed figure", || async {
        budget(&rig)
            .await
            .is_some_and(|b| b.observed_at > first.observed_at)
    })
    .await;
    let renewed = budget(&rig).await.unwrap();
    assert_eq!(renewed.remaining, 99, "the HEAD spent nothing");
    assert_eq!(rig.faults().counts().get("GET", Kind::Manifest), 0);
}

#[tokio::test]
async fn the_abuse_429_is_reported_rate_limited_until_its_retry_after() {
    let rig = Rig::start().await;
    let img = docker_image(972, &[MIB]).unwrap();
    rig.push("library/abused", "1", &img).await;
    assert!(rig.cachalot.stats().await.registries["docker.io"]
        .rate_limited
        .is_none());
    // Docker Hub's abuse limit: a bare 429 with `Retry-After: 60` and no ratelimit-* headers.
    rig.faults().set_abuse_limit(true);
    let before = now_secs();
    let refused = get_manifest(&rig.cachalot.url(), "library/abused", "1").await;
    assert_eq!(refused.status(), 429);
    let stats = rig.cachalot.stats().await;
    let docker = &stats.registries["docker.io"];
    let limited = docker.rate_limited.expect("rateLimited in /stats");
    assert!((before..=now_secs()).contains(&limited.observed_at));
    assert_eq!(limited.until, limited.observed_at + 60);
    assert!(docker.budget.is_none(), "no figure came with it");
}
