//! Warm, purge and stats: the real `cachalot-registry` binary's admin commands against a mirror
//! whose upstream is a real distribution behind the counting fault proxy. Warming goes through
//! the pull paths (a pull afterwards is all hits, no upstream request), a failing item fails the
//! command but not the other items, warming refuses to spend the budget reserve, and a purge
//! makes the next pull fetch again while blobs another cached manifest uses stay.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use cachalot_registry::api::admin::WarmEvent;
use cachalot_testkit::fault::{Kind, RateLimit};
use cachalot_testkit::image::{docker_image, oci_index, TestImage};
use common::{blob_file, cli, client, fresh_for, garage_s3, get_manifest, pull_verified, Rig, MIB};

/// A mirror whose tags stay fresh for an hour: a pull of a warmed tag needs no HEAD.
async fn rig() -> Rig {
    Rig::start_with(|c| {
        c.registries.get_mut("docker.io").unwrap().freshness =
            vec![fresh_for("*", Duration::from_secs(3600))];
    })
    .await
}

fn manifest_file(storage: &Path, digest: &str) -> std::path::PathBuf {
    storage
        .join("manifests/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// GETs every child manifest of an index by digest; returns their `X-Cache`.
async fn pull_children(base: &str, repo: &str, img: &TestImage) -> Vec<String> {
    let mut caches = Vec::new();
    for child in &img.children {
        let r = get_manifest(base, repo, &child.manifest_digest).await;
        assert_eq!(r.status(), 200);
        caches.push(r.headers()["x-cache"].to_str().unwrap().to_owned());
    }
    caches
}

#[tokio::test]
async fn a_warmed_multi_platform_index_is_pulled_all_hits_with_no_upstream_request() {
    let rig = rig().await;
    let img = oci_index(1401, &[MIB, MIB / 2]).unwrap();
    rig.push("library/multi", "1", &img).await;
    let url = rig.cachalot.url();
    let admin = rig.cachalot.admin_url();

    let run = cli(&["warm", "--server", &admin, "multi:1"]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("ok      docker.io/library/multi:1: 3 manifest(s), 6 blob(s)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("warmed 1 of 1 image(s), 0 failed"),
        "{}",
        run.stdout
    );

    rig.faults().reset_counts();
    let mut caches = pull_verified(&url, "library/multi", &img).await;
    caches.extend(pull_children(&url, "library/multi", &img).await);
    assert!(caches.iter().all(|c| c == "HIT"), "{caches:?}");
    assert_eq!(rig.faults().counts().total(), 0, "no upstream request");
}

#[tokio::test]
async fn warming_one_platform_caches_that_platform_only() {
    let rig = rig().await;
    let img = oci_index(1402, &[MIB]).unwrap();
    rig.push("library/multi", "1", &img).await;
    let admin = rig.cachalot.admin_url();

    let run = cli(&[
        "warm",
        "--server",
        &admin,
        "--platform",
        "linux/arm64",
        "multi:1",
    ])
    .await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let storage = &rig.cachalot.storage;
    let (amd, arm) = (
        img.child_for("amd64").unwrap(),
        img.child_for("arm64").unwrap(),
    );
    assert!(manifest_file(storage, &arm.manifest_digest).exists());
    assert!(!manifest_file(storage, &amd.manifest_digest).exists());
    for blob in arm.all_blobs() {
        assert!(
            blob_file(storage, &blob.digest).exists(),
            "arm64 {}",
            blob.digest
        );
    }
    for blob in amd.all_blobs() {
        assert!(
            !blob_file(storage, &blob.digest).exists(),
            "amd64 {}",
            blob.digest
        );
    }

    // A platform the index does not have fails the item, naming what it has.
    let run = cli(&[
        "warm",
        "--server",
        &admin,
        "--platform",
        "linux/s390x",
        "multi:1",
    ])
    .await;
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains("no manifest for platform linux/s390x in the index (it has: linux/amd64, linux/arm64/v8)"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn a_failing_item_exits_non_zero_and_the_others_still_warm() {
    let rig = rig().await;
    let (a, b) = (
        docker_image(1403, &[MIB]).unwrap(),
        docker_image(1404, &[MIB]).unwrap(),
    );
    rig.push("library/a", "1", &a).await;
    rig.push("library/b", "1", &b).await;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(&list, "# rollout\na:1\nmissing:1\n\nb:1\n").unwrap();

    let run = cli(&[
        "warm",
        "--server",
        &rig.cachalot.admin_url(),
        "--file",
        list.to_str().unwrap(),
    ])
    .await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", run.stdout);
    assert!(
        lines[0].starts_with("ok      docker.io/library/a:1"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("FAILED  docker.io/library/missing:1: "),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with("ok      docker.io/library/b:1"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].starts_with("warmed 2 of 3 image(s), 1 failed"),
        "{}",
        lines[3]
    );
    for blob in a.all_blobs().into_iter().chain(b.all_blobs()) {
        assert!(blob_file(&rig.cachalot.storage, &blob.digest).exists());
    }

    // Bad input is refused before anything is sent, with exit status 2.
    let run = cli(&["warm", "--server", &rig.cachalot.admin_url(), "Bad:Ref"]).await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("is not an image reference"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn the_warm_endpoint_streams_start_bytes_done_and_a_summary_and_refuses_bad_bodies() {
    let rig = rig().await;
    let img = docker_image(1405, &[2 * MIB]).unwrap();
    rig.push("library/streamed", "1", &img).await;
    let admin = rig.cachalot.admin_url();

    let r = client()
        .post(format!("{admin}/admin/warm"))
        .header("content-type", "application/json")
        .body(r#"{"refs":["streamed:1"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    let events: Vec<WarmEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        matches!(&events[0], WarmEvent::Start { item: 0, reference } if reference == "docker.io/library/streamed:1")
    );
    let last_bytes = events
        .iter()
        .filter_map(|e| match e {
            WarmEvent::Bytes { bytes, .. } => Some(*bytes),
            _ => None,
        })
        .max()
        .expect("progress lines");
    match &events[events.len() - 2] {
        WarmEvent::Done {
            bytes,
            fetched_bytes,
            blobs,
            ..
        } => {
            assert_eq!(*blobs, 2);
            assert_eq!(*bytes, img.total_bytes());
            assert_eq!(
                *fetched_bytes,
                img.total_bytes() - img.manifest_bytes.len() as u64
            );
            assert_eq!(last_bytes, *bytes);
        }
        other => panic!("expected done, got {other:?}"),
    }
    assert!(matches!(
        events.last(),
        Some(WarmEvent::Summary {
            items: 1,
            ok: 1,
            failed: 0,
            ..
        })
    ));

    for body in [
        r#"{"refs":[]}"#,
        r#"{"refs":["UPPER"]}"#,
        "not json",
        r#"{"refs":["a"],"platform":"x"}"#,
    ] {
        let r = client()
            .post(format!("{admin}/admin/warm"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let envelope: serde_json::Value = r.json().await.unwrap();
        assert!(
            envelope["errors"][0]["code"].is_string(),
            "{body}: {envelope}"
        );
    }
    let r = client()
        .get(format!("{admin}/admin/warm"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn warming_stops_at_the_budget_reserve_which_pulls_may_still_spend() {
    let rig = Rig::start_with(|c| {
        let docker = c.registries.get_mut("docker.io").unwrap();
        docker.budget_reserve = 3;
        docker.freshness = vec![fresh_for("*", Duration::from_secs(3600))];
    })
    .await;
    let images: Vec<TestImage> = (0..4)
        .map(|i| docker_image(1410 + i, &[MIB / 4]).unwrap())
        .collect();
    for (i, img) in images.iter().enumerate() {
        rig.push(&format!("library/budget{i}"), "1", img).await;
    }
    // Five counted GETs: the first two warms leave 3, the reserve.
    rig.faults().set_rate_limit(Some(RateLimit {
        limit: 5,
        retry_after_secs: 60,
    }));
    let url = rig.cachalot.url();
    let admin = rig.cachalot.admin_url();

    let run = cli(&[
        "warm",
        "--server",
        &admin,
        "budget0:1",
        "budget1:1",
        "budget2:1",
        "budget3:1",
    ])
    .await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("ok "), "{}", run.stdout);
    assert!(lines[1].starts_with("ok "), "{}", run.stdout);
    for line in &lines[2..4] {
        assert!(
            line.contains(
                "budget at its reserve (3 pulls left, reserve 3); warming never spends the reserve"
            ),
            "{line}"
        );
    }
    assert_eq!(rig.faults().counts().counted_manifest_gets(), 2);
    assert_eq!(rig.faults().rate_limit_remaining(), Some(3));

    // A warmed image is still warm (cached content costs no budget), and a pull may spend the
    // reserve that warming kept.
    let run = cli(&["warm", "--server", &admin, "budget0:1"]).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(
        get_manifest(&url, "library/budget2", "1").await.status(),
        200
    );
    assert_eq!(rig.faults().rate_limit_remaining(), Some(2));
}

#[tokio::test]
async fn purging_a_tag_makes_the_next_pull_ask_the_upstream_again() {
    let rig = rig().await;
    let img = docker_image(1420, &[MIB]).unwrap();
    rig.push("library/purged", "1", &img).await;
    let url = rig.cachalot.url();
    let admin = rig.cachalot.admin_url();
    pull_verified(&url, "library/purged", &img).await;

    let run = cli(&["purge", "--server", &admin, "purged:1"]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .starts_with("purged docker.io/library/purged:1: 1 tag(s), 0 manifest(s)"),
        "{}",
        run.stdout
    );

    rig.faults().reset_counts();
    let r = get_manifest(&url, "library/purged", "1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(rig.faults().counts().counted_manifest_gets(), 1);
}

#[tokio::test]
async fn purging_a_digest_drops_its_own_blobs_keeps_shared_ones_and_the_next_pull_fetches_again() {
    let rig = rig().await;
    // The same seed and first layer size: both images have that layer.
    let a = docker_image(1430, &[MIB, MIB / 2]).unwrap();
    let b = docker_image(1430, &[MIB]).unwrap();
    let shared = a.layers()[0].digest.clone();
    assert_eq!(b.layers()[0].digest, shared, "the images share a layer");
    rig.push("library/a", "1", &a).await;
    rig.push("library/b", "1", &b).await;
    let url = rig.cachalot.url();
    let admin = rig.cachalot.admin_url();
    pull_verified(&url, "library/a", &a).await;
    pull_verified(&url, "library/b", &b).await;
    let storage = &rig.cachalot.storage;

    let reference = format!("a@{}", a.manifest_digest);
    let run = cli(&["purge", "--server", &admin, &reference]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("0 tag(s), 1 manifest(s), 2 blob(s) (1 kept: still used)"),
        "{}",
        run.stdout
    );
    assert!(!manifest_file(storage, &a.manifest_digest).exists());
    assert!(!blob_file(storage, &a.config().unwrap().digest).exists());
    assert!(!blob_file(storage, &a.layers()[1].digest).exists());
    assert!(
        blob_file(storage, &shared).exists(),
        "the shared layer stays"
    );
    for blob in b.all_blobs() {
        assert!(blob_file(storage, &blob.digest).exists());
    }
    let stats = rig.cachalot.stats().await;
    let on_disk: u64 = common::files_under(storage)
        .iter()
        .filter(|(p, _)| {
            p.starts_with("blobs") || (p.starts_with("manifests") && p.extension().is_none())
        })
        .map(|(_, size)| size)
        .sum();
    assert_eq!(
        stats.cache_size_bytes, on_disk,
        "the size gauge follows the purge"
    );

    // The next pull fetches what went, and only that.
    rig.faults().reset_counts();
    let caches = pull_verified(&url, "library/a", &a).await;
    let counts = rig.faults().counts();
    assert_eq!(
        counts.get("GET", Kind::Manifest),
        1,
        "the manifest by digest"
    );
    assert_eq!(counts.get("GET", Kind::Blob), 2, "config and own layer");
    assert_eq!(
        caches,
        ["MISS", "MISS", "HIT", "MISS"],
        "manifest, config, shared, own layer"
    );
}

#[tokio::test]
async fn purging_what_is_not_cached_is_a_404_envelope_and_the_cli_exits_non_zero() {
    let rig = rig().await;
    let admin = rig.cachalot.admin_url();
    let r = client()
        .delete(format!("{admin}/admin/purge?ref=nothing:here"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let envelope: serde_json::Value = r.json().await.unwrap();
    assert_eq!(envelope["errors"][0]["code"], "MANIFEST_UNKNOWN");

    let run = cli(&["purge", "--server", &admin, "nothing:here"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("answered 404: docker.io/library/nothing:here is not cached here"),
        "{}",
        run.stderr
    );
    let run = cli(&["purge", "--server", &admin, "quay.io/org/app:1"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("registry `quay.io` is not mirrored here"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn stats_prints_a_summary_of_the_running_mirror() {
    let rig = rig().await;
    let img = docker_image(1440, &[MIB]).unwrap();
    rig.push("library/counted", "1", &img).await;
    let url = rig.cachalot.url();
    let admin = rig.cachalot.admin_url();
    pull_verified(&url, "library/counted", &img).await;
    pull_verified(&url, "library/counted", &img).await;

    let run = cli(&["stats", "--server", &admin]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .contains(&format!("cachalot-registry at {admin}")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("requests   3 hits, 3 misses, 0 stale, 0 errors (hit ratio 50.0%)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("docker.io: 3 hits, 3 misses"),
        "{}",
        run.stdout
    );

    // Nothing listening: one clear line and a non-zero exit.
    let port = cachalot_testkit::wait::free_port().unwrap();
    let run = cli(&["stats", "--server", &format!("http://127.0.0.1:{port}")]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("cannot reach http://127.0.0.1:"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn with_a_shared_tier_a_purge_removes_the_bucket_objects_too_and_keeps_shared_blobs() {
    use cachalot_registry::store::shared::SharedStore;
    use cachalot_testkit::s3::{garage_binary, Garage};

    let skip = garage_binary().err().map(|e| e.to_string());
    if !cachalot_testkit::prerequisites::run_or_skip(
        "with_a_shared_tier_a_purge_removes_the_bucket_objects_too_and_keeps_shared_blobs",
        skip,
    ) {
        return;
    }
    let garage = Garage::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s3 = garage_s3(&garage, keys.path(), "mirrors/purge/", "test/purge");
    let config_s3 = s3.clone();
    let rig = Rig::start_with(move |c| {
        c.storage.s3 = Some(config_s3);
        c.registries.get_mut("docker.io").unwrap().freshness =
            vec![fresh_for("*", Duration::from_secs(3600))];
    })
    .await;
    let a = docker_image(1450, &[MIB, MIB / 2]).unwrap();
    let b = docker_image(1450, &[MIB]).unwrap();
    let shared = a.layers()[0].digest.clone();
    assert_eq!(b.layers()[0].digest, shared, "the images share a layer");
    rig.push("library/a", "1", &a).await;
    rig.push("library/b", "1", &b).await;
    let url = rig.cachalot.url();
    let admin = rig.cachalot.admin_url();
    pull_verified(&url, "library/a", &a).await;
    pull_verified(&url, "library/b", &b).await;

    let bucket = SharedStore::from_config(&s3).unwrap();
    let repo_b: cachalot_registry::oci::RepositoryName = "library/b".parse().unwrap();
    let tag: cachalot_registry::oci::Tag = "1".parse().unwrap();
    common::eventually(Duration::from_secs(30), "both images in the bucket", || {
        let (bucket, a, b, repo_b, tag) = (&bucket, &a, &b, &repo_b, &tag);
        async move {
            let mut all = bucket
                .read_tag("docker.io", repo_b, tag)
                .await
                .unwrap()
                .is_some();
            for img in [a, b] {
                let digest = img.manifest_digest.parse().unwrap();
                all &= bucket.read_manifest(&digest).await.unwrap().is_some();
                for blob in img.all_blobs() {
                    let digest = blob.digest.parse().unwrap();
                    all &= bucket.blob_size(&digest).await.unwrap() == Some(blob.size);
                }
            }
            all
        }
    })
    .await;

    let run = cli(&[
        "purge",
        "--server",
        &admin,
        &format!("a@{}", a.manifest_digest),
    ])
    .await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let digest = |d: &str| d.parse::<cachalot_registry::oci::Digest>().unwrap();
    assert!(bucket
        .read_manifest(&digest(&a.manifest_digest))
        .await
        .unwrap()
        .is_none());
    for own in [&a.config().unwrap().digest, &a.layers()[1].digest] {
        assert_eq!(bucket.blob_size(&digest(own)).await.unwrap(), None, "{own}");
    }
    assert!(bucket.blob_size(&digest(&shared)).await.unwrap().is_some());
    assert!(bucket
        .read_manifest(&digest(&b.manifest_digest))
        .await
        .unwrap()
        .is_some());

    let run = cli(&["purge", "--server", &admin, "b:1"]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(bucket
        .read_tag("docker.io", &repo_b, &tag)
        .await
        .unwrap()
        .is_none());

    // Neither the disk nor the bucket has them now: the upstream is asked again.
    rig.faults().reset_counts();
    pull_verified(&url, "library/a", &a).await;
    assert_eq!(rig.faults().counts().get("GET", Kind::Manifest), 1);
    assert_eq!(rig.faults().counts().get("GET", Kind::Blob), 2);
    let r = get_manifest(&url, "library/b", "1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(rig.faults().counts().get("GET", Kind::Manifest), 2);
}
