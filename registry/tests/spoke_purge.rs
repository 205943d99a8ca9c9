//! A purge on a hub reaches its spokes, with real processes: a real distribution upstream
//! behind the counting proxy, a hub `cachalot-registry`, spokes whose `parent` is the hub, and a
//! spoke of a spoke. The hub cannot reach its spokes; each spoke learns the hub's purge log
//! position from the `X-Cachalot-Purge-Seq` of the hub's answers and pulls the entries from
//! `/v2/_cachalot/purges`:
//! - a tag and a digest purged on the hub are gone from both spokes' disks after one more pull
//!   of any image from each, and from the disk of a spoke of a spoke (the spoke's own log passes
//!   them on); the next pull reaches the upstream again, once for the fleet;
//! - a hub restarted on its storage keeps its log (no reset on the spokes); a hub on new storage
//!   has a new log epoch, and the spoke expires its cached tags (kept on disk) and revalidates
//!   them;
//! - the purge log endpoint refuses a bad `after` with a 400 OCI error envelope and lists the
//!   purged references only;
//! - a failed fetch of the log (a 503, an unreadable page) never fails the pull that carried the
//!   header, is counted, and is retried on the hub's next answer;
//! - on a spoke of two `cluster` replicas on S3 storage (a real Garage), the replica that applies
//!   a purge forwards it to the other (skipped without `scripts/s3-server`'s Garage).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cachalot_registry::config::{Config, ParentConfig};
use cachalot_registry::purge_sync::ParentPurgeStats;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::FaultProxy;
use cachalot_testkit::image::{docker_image, TestImage};
use common::{
    cli, client, committed, eventually, fresh_for, garage_s3, pull_tag_verified, Process, MIB,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// Tags trusted for an hour everywhere: nothing is revalidated unless a purge or a reset says so.
fn window(c: &mut Config) {
    c.registries.get_mut("docker.io").unwrap().freshness =
        vec![fresh_for("*", Duration::from_secs(3600))];
}

async fn start_spoke(storage: &Path, parent_url: &str, id: &str) -> Process {
    let (parent_url, id) = (parent_url.to_owned(), id.to_owned());
    Process::start(storage, "http://127.0.0.1:1", move |c: &mut Config| {
        window(c);
        c.parent = Some(ParentConfig {
            url: parent_url.clone(),
            ca_file: None,
            insecure_skip_verify: false,
            spoke_id: Some(id.clone()),
            client_cert_file: None,
            client_key_file: None,
            bearer_token_file: None,
        });
    })
    .await
}

fn tag_file(storage: &Path, repo: &str, tag: &str) -> PathBuf {
    storage
        .join("repositories/docker.io")
        .join(repo)
        .join("_tags")
        .join(format!("{tag}.json"))
}

fn manifest_file(storage: &Path, digest: &str) -> PathBuf {
    storage
        .join("manifests/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

fn checked_at(storage: &Path, repo: &str, tag: &str) -> u64 {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tag_file(storage, repo, tag)).unwrap()).unwrap();
    record["checkedAt"].as_u64().unwrap()
}

/// A mirror's own purge log position (`/stats` `purgeLog`).
async fn log_position(p: &Process) -> (String, u64) {
    let log = p
        .stats()
        .await
        .purge_log
        .expect("every mirror has a purge log");
    (log.epoch, log.seq)
}

async fn parent_purges(p: &Process) -> ParentPurgeStats {
    p.stats().await.parent_purges.unwrap_or_default()
}

/// Waits until `spoke` has applied `parent`'s log up to its current position.
async fn caught_up(spoke: &Process, parent: &Process, what: &str) -> ParentPurgeStats {
    let (epoch, seq) = log_position(parent).await;
    eventually(DEADLINE, what, || async {
        let s = parent_purges(spoke).await;
        s.epoch.as_deref() == Some(epoch.as_str()) && s.applied_seq >= seq
    })
    .await;
    parent_purges(spoke).await
}

/// Images pulled only to carry the parent's header to a spoke (each pull is a miss there).
fn carrier(n: u64) -> TestImage {
    docker_image(3100 + n, &[1024]).unwrap()
}

async fn push(upstream: &Distribution, repo: &str, tag: &str, img: &TestImage) {
    cachalot_testkit::image::push(&upstream.url(), repo, tag, img)
        .await
        .unwrap();
}

fn manifest_requests(fault: &FaultProxy, needle: &str) -> usize {
    fault
        .handle()
        .requests()
        .iter()
        .filter(|r| r.path.contains("/manifests/") && r.path.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_and_a_digest_purged_on_the_hub_leave_every_spoke_and_a_spoke_of_a_spoke() {
    let upstream = Distribution::start().await.unwrap();
    let fault = FaultProxy::start(&upstream.url()).await.unwrap();
    let (app, dig) = (
        docker_image(3001, &[MIB / 4]).unwrap(),
        docker_image(3002, &[MIB / 4, 2048]).unwrap(),
    );
    push(&upstream, "library/app", "1", &app).await;
    push(&upstream, "library/dig", "1", &dig).await;
    for n in 0..3 {
        push(&upstream, &format!("library/carrier{n}"), "1", &carrier(n)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let hub = Process::start(&dir.path().join("hub"), &fault.url(), window).await;
    let spoke1 = start_spoke(&dir.path().join("spoke1"), &hub.url(), "cluster-1/s").await;
    let spoke2 = start_spoke(&dir.path().join("spoke2"), &hub.url(), "cluster-2/s").await;
    let spoke3 = start_spoke(&dir.path().join("spoke3"), &spoke1.url(), "cluster-3/s").await;

    for spoke in [&spoke1, &spoke2] {
        pull_tag_verified(&spoke.url(), "library/app", "1", &app).await;
        pull_tag_verified(&spoke.url(), "library/dig", "1", &dig).await;
        committed(&spoke.storage, &dig).await;
        // The first answer introduced the hub's log: the spoke knows it from here on.
        caught_up(spoke, &hub, "the spoke knows the hub's log").await;
    }
    pull_tag_verified(&spoke3.url(), "library/app", "1", &app).await;
    pull_tag_verified(&spoke3.url(), "library/dig", "1", &dig).await;
    committed(&spoke3.storage, &dig).await;
    caught_up(
        &spoke3,
        &spoke1,
        "the spoke of a spoke knows its parent's log",
    )
    .await;
    let resets_before = parent_purges(&spoke1).await.resets;

    // A tag and a digest purged on the hub (its admin listener), as an operator would.
    let admin = format!("http://{}", hub.admin_addr);
    let tag_purge = cli(&["purge", "--server", &admin, "app:1"]).await;
    assert_eq!(
        tag_purge.code, 0,
        "{}{}",
        tag_purge.stdout, tag_purge.stderr
    );
    assert!(
        tag_purge
            .stdout
            .contains("spokes: drop it on their next request to this mirror (purge log "),
        "{}",
        tag_purge.stdout
    );
    let digest_ref = format!("dig@{}", dig.manifest_digest);
    let digest_purge = cli(&["purge", "--server", &admin, &digest_ref]).await;
    assert_eq!(
        digest_purge.code, 0,
        "{}{}",
        digest_purge.stdout, digest_purge.stderr
    );
    let (hub_epoch, hub_seq) = log_position(&hub).await;
    assert_eq!(hub_seq, 2);

    // The spokes still have it all until they next talk to the hub; one more pull of any image
    // carries the hub's position, and each spoke purges in the background.
    let own_blob = dig.all_blobs()[1].digest.clone();
    for spoke in [&spoke1, &spoke2] {
        assert!(tag_file(&spoke.storage, "library/app", "1").exists());
        pull_tag_verified(&spoke.url(), "library/carrier0", "1", &carrier(0)).await;
        let s = caught_up(spoke, &hub, "the spoke applied the hub's purges").await;
        assert_eq!(s.epoch.as_deref(), Some(hub_epoch.as_str()));
        assert_eq!(s.failures, 0, "{s:?}");
        assert!(!tag_file(&spoke.storage, "library/app", "1").exists());
        assert!(!manifest_file(&spoke.storage, &dig.manifest_digest).exists());
        assert!(!common::blob_file(&spoke.storage, &own_blob).exists());
        // The app's manifest and blobs stay: a tag purge drops the tag record only.
        assert!(manifest_file(&spoke.storage, &app.manifest_digest).exists());
    }
    assert_eq!(parent_purges(&spoke1).await.resets, resets_before, "no gap");

    // The spoke of a spoke gets them from the spoke's own log.
    let (spoke1_epoch, spoke1_seq) = log_position(&spoke1).await;
    assert!(spoke1_seq >= 2, "the spoke logged what it applied");
    assert!(tag_file(&spoke3.storage, "library/app", "1").exists());
    pull_tag_verified(&spoke3.url(), "library/carrier1", "1", &carrier(1)).await;
    let s = caught_up(&spoke3, &spoke1, "the spoke of a spoke applied them").await;
    assert_eq!(s.epoch.as_deref(), Some(spoke1_epoch.as_str()));
    assert!(!tag_file(&spoke3.storage, "library/app", "1").exists());
    assert!(!manifest_file(&spoke3.storage, &dig.manifest_digest).exists());

    // The next pulls reach the upstream again, once for the whole fleet.
    let (app_before, dig_before) = (
        manifest_requests(&fault, "library/app/manifests/1"),
        manifest_requests(&fault, &dig.manifest_digest),
    );
    for spoke in [&spoke2, &spoke1, &spoke3] {
        pull_tag_verified(&spoke.url(), "library/app", "1", &app).await;
        let r = common::get_manifest(&spoke.url(), "library/dig", &dig.manifest_digest).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        manifest_requests(&fault, "library/app/manifests/1"),
        app_before + 1,
        "the purged tag is fetched again, by the hub, once"
    );
    assert_eq!(
        manifest_requests(&fault, &dig.manifest_digest),
        dig_before + 1,
        "the purged manifest is fetched again, by the hub, once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_on_new_storage_makes_its_spokes_expire_their_tags_and_a_restart_on_the_same_does_not(
) {
    let upstream = Distribution::start().await.unwrap();
    let fault = FaultProxy::start(&upstream.url()).await.unwrap();
    let app = docker_image(3201, &[MIB / 4]).unwrap();
    push(&upstream, "library/app", "1", &app).await;
    push(&upstream, "library/gone", "1", &carrier(9)).await;
    for n in 0..4 {
        push(&upstream, &format!("library/carrier{n}"), "1", &carrier(n)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let hub_storage = dir.path().join("hub");
    let hub = Process::start(&hub_storage, &fault.url(), window).await;
    let hub_addr = hub.addr;
    let spoke = start_spoke(&dir.path().join("spoke"), &hub.url(), "cluster-1/s").await;
    pull_tag_verified(&spoke.url(), "library/app", "1", &app).await;
    pull_tag_verified(&spoke.url(), "library/gone", "1", &carrier(9)).await;
    let first = caught_up(&spoke, &hub, "first contact").await;
    assert_eq!(first.resets, 1, "a log the spoke never saw counts as a gap");

    let admin = format!("http://{}", hub.admin_addr);
    assert_eq!(cli(&["purge", "--server", &admin, "gone:1"]).await.code, 0);
    pull_tag_verified(&spoke.url(), "library/carrier0", "1", &carrier(0)).await;
    caught_up(&spoke, &hub, "the purge applied").await;
    let (epoch, seq) = log_position(&hub).await;
    assert_eq!(seq, 1);

    // Restarted on its storage, the hub keeps its log: the spoke goes on without a gap.
    hub.terminate().await;
    let hub = Process::start_at(hub_addr, &hub_storage, &fault.url(), window)
        .await
        .unwrap();
    assert_eq!(log_position(&hub).await, (epoch.clone(), 1));
    let admin = format!("http://{}", hub.admin_addr);
    let not_cached = cli(&["purge", "--server", &admin, "gone:1"]).await;
    assert_eq!(not_cached.code, 1, "not cached on the hub any more");
    assert!(
        not_cached
            .stderr
            .contains("spokes drop it on their next request"),
        "{}",
        not_cached.stderr
    );
    pull_tag_verified(&spoke.url(), "library/carrier1", "1", &carrier(1)).await;
    let s = caught_up(&spoke, &hub, "the purge after the restart applied").await;
    assert_eq!(
        (s.epoch.as_deref(), s.applied_seq),
        (Some(epoch.as_str()), 2)
    );
    assert_eq!(s.resets, 1, "same log, no gap");
    let before = checked_at(&spoke.storage, "library/app", "1");
    assert!(before > 0);

    // On new storage (an emptyDir pod replaced) the hub starts a new log: the spoke cannot know
    // what it missed, so it expires its cached tags, keeping their content.
    let (spoke_epoch, _) = log_position(&spoke).await;
    hub.terminate().await;
    let hub = Process::start_at(hub_addr, &dir.path().join("hub-new"), &fault.url(), window)
        .await
        .unwrap();
    let (new_epoch, _) = log_position(&hub).await;
    assert_ne!(new_epoch, epoch);
    pull_tag_verified(&spoke.url(), "library/carrier2", "1", &carrier(2)).await;
    let s = caught_up(&spoke, &hub, "the spoke met the new log").await;
    assert_eq!(s.resets, 2, "{s:?}");
    assert_eq!(checked_at(&spoke.storage, "library/app", "1"), 0);
    assert!(manifest_file(&spoke.storage, &app.manifest_digest).exists());
    // The spoke's own log starts a new epoch too, so its own spokes expire theirs.
    assert_ne!(log_position(&spoke).await.0, spoke_epoch);

    // The next pull of the tag revalidates it through the hub (which asks the upstream).
    let before = manifest_requests(&fault, "library/app/manifests/1");
    pull_tag_verified(&spoke.url(), "library/app", "1", &app).await;
    assert!(manifest_requests(&fault, "library/app/manifests/1") > before);
    assert!(checked_at(&spoke.storage, "library/app", "1") > 0);
}

#[tokio::test]
async fn the_purge_log_endpoint_refuses_a_bad_after_and_lists_only_purged_references() {
    let upstream = Distribution::start().await.unwrap();
    let fault = FaultProxy::start(&upstream.url()).await.unwrap();
    let app = docker_image(3301, &[2048]).unwrap();
    push(&upstream, "library/app", "1", &app).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = Process::start(&dir.path().join("hub"), &fault.url(), window).await;
    pull_tag_verified(&hub.url(), "library/app", "1", &app).await;
    let admin = format!("http://{}", hub.admin_addr);
    assert_eq!(cli(&["purge", "--server", &admin, "app:1"]).await.code, 0);

    for bad in ["after=abc", "after=-1", "after=1&epoch=nothex"] {
        let r = client()
            .get(format!("{}/v2/_cachalot/purges?{bad}", hub.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            body["errors"][0]["code"], "PAGINATION_NUMBER_INVALID",
            "{bad}"
        );
    }
    let r = client()
        .post(format!("{}/v2/_cachalot/purges", hub.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);

    let r = client()
        .get(format!("{}/v2/_cachalot/purges?after=0", hub.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let position = r.headers()["x-cachalot-purge-seq"]
        .to_str()
        .unwrap()
        .to_owned();
    let page: serde_json::Value = r.json().await.unwrap();
    assert_eq!(position, format!("{}:1", page["epoch"].as_str().unwrap()));
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    let keys: Vec<&String> = entries[0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["at", "ref", "seq"]);
    assert_eq!(entries[0]["ref"], "docker.io/library/app:1");
    assert_eq!(page["gap"], false);
    // Answers to clients that are not spokes do not carry the position.
    let r = common::get_manifest(&hub.url(), "library/app", "1").await;
    assert!(!r.headers().contains_key("x-cachalot-purge-seq"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_purge_log_fetch_is_counted_and_retried_on_the_next_answer_of_the_hub() {
    use cachalot_testkit::fault::{Fault, FaultRule};
    let upstream = Distribution::start().await.unwrap();
    let fault = FaultProxy::start(&upstream.url()).await.unwrap();
    let app = docker_image(3401, &[2048]).unwrap();
    push(&upstream, "library/app", "1", &app).await;
    for n in 0..2 {
        push(&upstream, &format!("library/carrier{n}"), "1", &carrier(n)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let hub = Process::start(&dir.path().join("hub"), &fault.url(), window).await;
    // The spoke reaches the hub through a proxy that fails its first two purge log fetches:
    // a 503, then a body that is no page.
    let to_hub = FaultProxy::start(&hub.url()).await.unwrap();
    to_hub.handle().add_fault(
        FaultRule::new(Fault::Status(503))
            .path_contains("/_cachalot/purges")
            .times(1),
    );
    to_hub.handle().add_fault(
        FaultRule::new(Fault::Respond {
            status: 200,
            content_type: "application/json".into(),
            body: r#"{"entries": "nope"}"#.into(),
        })
        .path_contains("/_cachalot/purges")
        .times(1),
    );
    let spoke = start_spoke(&dir.path().join("spoke"), &to_hub.url(), "cluster-1/s").await;

    // The pull is served although the fetch its answer started fails.
    pull_tag_verified(&spoke.url(), "library/app", "1", &app).await;
    eventually(
        DEADLINE,
        "the first fetch failed and was counted",
        || async { parent_purges(&spoke).await.failures >= 1 },
    )
    .await;
    let s = parent_purges(&spoke).await;
    assert!(
        s.last_error.as_deref().unwrap_or("").contains("503"),
        "{s:?}"
    );
    assert_eq!(s.epoch, None, "nothing applied yet");

    // The next answer of the hub retries (after the retry pause): an unreadable page fails too.
    pull_tag_verified(&spoke.url(), "library/carrier0", "1", &carrier(0)).await;
    eventually(DEADLINE, "the second fetch failed", || async {
        parent_purges(&spoke).await.failures >= 2
    })
    .await;
    let s = parent_purges(&spoke).await;
    assert!(
        s.last_error.as_deref().unwrap_or("").contains("unreadable"),
        "{s:?}"
    );

    // A purge meanwhile, and one more answer: the spoke catches up.
    let admin = format!("http://{}", hub.admin_addr);
    assert_eq!(cli(&["purge", "--server", &admin, "app:1"]).await.code, 0);
    pull_tag_verified(&spoke.url(), "library/carrier1", "1", &carrier(1)).await;
    let s = caught_up(&spoke, &hub, "the spoke caught up after the failures").await;
    assert_eq!(s.failures, 2, "{s:?}");
    assert!(!tag_file(&spoke.storage, "library/app", "1").exists());
    eventually(
        DEADLINE,
        "the round that succeeded cleared the error",
        || async { parent_purges(&spoke).await.last_error.is_none() },
    )
    .await;
    let metrics = reqwest::get(format!("http://{}/metrics", spoke.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cachalot_registry_parent_purge_sync_failures_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cachalot_registry_parent_purges_applied_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_spoke_of_s3_replicas_a_hub_purge_leaves_every_replica_through_one_that_applies_it() {
    use cachalot_registry::config::ClusterConfig;
    use cachalot_testkit::s3::{garage_binary, Garage};
    use std::net::{Ipv4Addr, SocketAddr};
    if !cachalot_testkit::prerequisites::run_or_skip(
        "on_a_spoke_of_s3_replicas_a_hub_purge_leaves_every_replica_through_one_that_applies_it",
        garage_binary().err().map(|e| e.to_string()),
    ) {
        return;
    }
    let garage = Garage::start().await.unwrap();
    let upstream = Distribution::start().await.unwrap();
    let fault = FaultProxy::start(&upstream.url()).await.unwrap();
    let app = docker_image(3501, &[MIB / 4]).unwrap();
    push(&upstream, "library/app", "1", &app).await;
    for n in 0..2 {
        push(&upstream, &format!("library/carrier{n}"), "1", &carrier(n)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let hub = Process::start(&dir.path().join("hub"), &fault.url(), window).await;
    let s3 = garage_s3(&garage, dir.path(), "mirrors/spoke/", "test/spoke");
    // Two replicas of one spoke on 127.0.0.1 and 127.0.0.2, one public and one admin port for
    // both (the purge fan-out reaches a peer's admin listener on this replica's admin port).
    let (port, admin_port) = (
        cachalot_testkit::wait::free_port().unwrap(),
        cachalot_testkit::wait::free_port().unwrap(),
    );
    let ips = [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)];
    let urls: Vec<String> = ips.iter().map(|ip| format!("http://{ip}:{port}")).collect();
    let mut replicas = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let (self_url, peers, s3, hub_url) = (urls[i].clone(), urls.clone(), s3.clone(), hub.url());
        let tweak = move |c: &mut Config| {
            window(c);
            c.admin_listen = SocketAddr::from((*ip, admin_port));
            c.storage.s3 = Some(s3.clone());
            c.cluster = Some(ClusterConfig {
                self_url: self_url.clone(),
                peers: peers.clone(),
                peer_timeout: Duration::from_secs(1),
            });
            c.parent = Some(ParentConfig {
                url: hub_url.clone(),
                ca_file: None,
                insecure_skip_verify: false,
                spoke_id: Some("cluster-s3/s".into()),
                client_cert_file: None,
                client_key_file: None,
                bearer_token_file: None,
            });
        };
        let storage = dir.path().join(format!("spoke-{i}"));
        replicas.push(
            Process::start_at(
                SocketAddr::from((*ip, port)),
                &storage,
                "http://127.0.0.1:1",
                tweak,
            )
            .await
            .unwrap_or_else(|log| panic!("replica {i} did not start:\n{log}")),
        );
    }
    for r in &replicas {
        pull_tag_verified(&r.url(), "library/app", "1", &app).await;
        assert!(
            tag_file(&r.storage, "library/app", "1").exists(),
            "{}",
            r.url()
        );
    }
    // Let the replicas that talked to the hub settle their first contact.
    eventually(DEADLINE, "a replica knows the hub's log", || async {
        let mut known = false;
        for r in &replicas {
            known |= parent_purges(r).await.epoch.is_some();
        }
        known
    })
    .await;

    let admin = format!("http://{}", hub.admin_addr);
    assert_eq!(cli(&["purge", "--server", &admin, "app:1"]).await.code, 0);
    // One pull through the first replica reaches the hub (through whichever replica owns the
    // carrier); the replica that applies the purge forwards it to the other.
    pull_tag_verified(&replicas[0].url(), "library/carrier0", "1", &carrier(0)).await;
    eventually(DEADLINE, "both replicas dropped the tag", || async {
        replicas
            .iter()
            .all(|r| !tag_file(&r.storage, "library/app", "1").exists())
    })
    .await;
    // And the next pull through either goes to the hub, which fetches the tag anew.
    let before = manifest_requests(&fault, "library/app/manifests/1");
    pull_tag_verified(&replicas[1].url(), "library/app", "1", &app).await;
    assert_eq!(
        manifest_requests(&fault, "library/app/manifests/1"),
        before + 1
    );
}
