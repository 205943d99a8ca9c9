//! Replicas of one mirror on shared S3 storage (a real Garage), as the `cachalot-registry`
//! binary behind a round-robin TCP proxy (the Service), pulling from a real distribution
//! upstream behind the counting fault proxy:
//! - 8 concurrent cold clients through 3 replicas: every pull verified, each blob and the tag's
//!   manifest fetched from the upstream once (upstream blob bytes = 1.00x the image);
//! - an expired tag requested concurrently on every replica: one revalidation HEAD for the set;
//! - a replica that learnt a tag from its owner keeps the owner's freshness, not a new window;
//! - a blob cached through one replica is served by another with no upstream request;
//! - a peer answering garbage is treated as down (the pull goes to the upstream);
//! - every replica restarted with empty local disks: the cache is still there;
//! - corrupt upstream bytes never land in the bucket, and rotten copies in it are removed;
//! - the bucket over its bound: the least recently used image goes, pinned and recent ones stay;
//! - the owner replica killed with SIGKILL mid-fetch: clients on the others still get verified
//!   blobs, and nothing partial is visible in the bucket;
//! - the S3 engine stopped: hot blobs still serve from the local read cache, everything else is
//!   a 503 with an OCI error body, and no replica crashes;
//! - bad S3 settings (wrong keys, missing bucket, a prefix another mirror claimed) stop the start
//!   with one clear line.
//!
//! Skips (`SKIPPED <test>: <reason>`) without `scripts/s3-server`'s Garage, and fails instead
//! under `CACHALOT_E2E_LOCAL=required`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use cachalot_registry::config::{ClusterConfig, Config, FreshnessRule, S3Config};
use cachalot_registry::store::shared::SharedStore;
use cachalot_registry::upstream::peers::rendezvous_order;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{Fault, FaultProxy, FaultRule, Kind};
use cachalot_testkit::image::{docker_image, sha256_digest, TestImage};
use cachalot_testkit::prerequisites;
use cachalot_testkit::round_robin::RoundRobin;
use cachalot_testkit::s3::{garage_binary, Garage};
use common::{
    client, eventually, fresh_for, garage_s3, get_manifest, pull_verified, tags_never_revalidate,
    Process, MIB,
};

/// Whether Garage is there; otherwise skip, or fail when the suite is required.
fn prerequisites_or_skip(test: &str) -> bool {
    prerequisites::run_or_skip(test, garage_binary().err().map(|e| e.to_string()))
}

/// Garage, the upstream behind the fault proxy, and the settings every replica shares.
struct Scene {
    garage: Garage,
    upstream: Distribution,
    fault: FaultProxy,
    dir: tempfile::TempDir,
    s3: S3Config,
    /// Each replica's listen address (fixed, so the peers list is known before any starts).
    listens: Vec<SocketAddr>,
    /// Bumped at every restart so each generation starts on empty local disks.
    generation: u32,
    /// Tag freshness of every replica (default: never revalidated, so upstream requests are
    /// content fetches only).
    freshness: Vec<FreshnessRule>,
    /// Peers that are not replicas started here (a fake that answers garbage).
    extra_peers: Vec<String>,
}

impl Scene {
    async fn start(replicas: usize) -> Scene {
        let garage = Garage::start().await.unwrap();
        let upstream = Distribution::start().await.unwrap();
        let fault = FaultProxy::start(&upstream.url()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let s3 = garage_s3(&garage, dir.path(), "mirrors/test/", "test/mirror");
        let listens = (0..replicas)
            .map(|_| {
                let port = cachalot_testkit::wait::free_port().unwrap();
                SocketAddr::from(([127, 0, 0, 1], port))
            })
            .collect();
        Scene {
            garage,
            upstream,
            fault,
            dir,
            s3,
            listens,
            generation: 0,
            freshness: tags_never_revalidate(),
            extra_peers: Vec::new(),
        }
    }

    fn peers(&self) -> Vec<String> {
        let started = self.listens.iter().map(|a| format!("http://{a}"));
        started.chain(self.extra_peers.iter().cloned()).collect()
    }

    /// The config of replica `i`: shared S3 storage, the cluster, the scene's freshness.
    fn tweak(&self, i: usize) -> impl Fn(&mut Config) + '_ {
        move |config: &mut Config| {
            config.storage.s3 = Some(self.s3.clone());
            config.cluster = Some(ClusterConfig {
                self_url: format!("http://{}", self.listens[i]),
                peers: self.peers(),
                peer_timeout: Duration::from_secs(1),
            });
            config.registries.get_mut("docker.io").unwrap().freshness = self.freshness.clone();
            config.upstream.circuit_open_for = Duration::from_secs(5);
        }
    }

    async fn start_replica(&self, i: usize) -> Process {
        let storage = self
            .dir
            .path()
            .join(format!("replica-{i}-gen-{}", self.generation));
        Process::start_at(self.listens[i], &storage, &self.fault.url(), self.tweak(i))
            .await
            .unwrap_or_else(|log| panic!("replica {i} did not start:\n{log}"))
    }

    async fn start_replicas(&mut self) -> Vec<Process> {
        self.generation += 1;
        let mut replicas = Vec::new();
        for i in 0..self.listens.len() {
            replicas.push(self.start_replica(i).await);
        }
        replicas
    }

    async fn push(&self, repo: &str, img: &TestImage) {
        cachalot_testkit::image::push(&self.upstream.url(), repo, "1", img)
            .await
            .unwrap();
    }

    /// A client of the bucket prefix, to look at what the replicas left there.
    fn bucket(&self) -> SharedStore {
        SharedStore::from_config(&self.s3).unwrap()
    }

    /// Waits until the bucket holds every blob of `img`, whole.
    async fn published(&self, img: &TestImage) {
        let bucket = self.bucket();
        eventually(Duration::from_secs(30), "every blob in the bucket", || {
            let bucket = bucket.clone();
            async move {
                let mut all = true;
                for blob in img.all_blobs() {
                    let digest = blob.digest.parse().unwrap();
                    all &= bucket.blob_size(&digest).await.unwrap() == Some(blob.size);
                }
                all
            }
        })
        .await;
    }
}

/// Every blob object in the bucket is whole: its bytes hash to its name.
async fn bucket_holds_only_verified_blobs(bucket: &SharedStore) -> usize {
    let objects = bucket.list("blobs/").await.unwrap();
    for object in &objects {
        let hex = object.key.rsplit('/').next().unwrap();
        let digest = format!("sha256:{hex}").parse().unwrap();
        let mut blob = bucket.get_blob(&digest, None).await.unwrap().unwrap();
        let mut bytes = Vec::new();
        while let Some(chunk) = futures::StreamExt::next(&mut blob.body).await {
            bytes.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(
            sha256_digest(&bytes),
            format!("sha256:{hex}"),
            "{} in the bucket is not what its name says",
            object.key
        );
    }
    objects.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_fetch_each_object_once_and_keep_the_cache_across_restarts() {
    if !prerequisites_or_skip(
        "three_replicas_fetch_each_object_once_and_keep_the_cache_across_restarts",
    ) {
        return;
    }
    let mut scene = Scene::start(3).await;
    // One layer past the multipart threshold (8 MiB), so both upload paths run.
    let img = docker_image(41, &[12 * MIB, 3 * MIB, MIB, 256 * 1024]).unwrap();
    scene.push("library/app", &img).await;
    let replicas = scene.start_replicas().await;
    let service = RoundRobin::start(replicas.iter().map(|r| r.addr).collect())
        .await
        .unwrap();

    let pulls: Vec<_> = (0..8)
        .map(|_| {
            let (url, img) = (service.url(), img.clone());
            tokio::spawn(async move { pull_verified(&url, "library/app", &img).await })
        })
        .collect();
    for pull in pulls {
        pull.await.unwrap();
    }
    let counts = scene.fault.handle().counts();
    let blob_bytes = scene.fault.handle().body_bytes()[&Kind::Blob];
    let image_bytes: u64 = img.all_blobs().iter().map(|b| b.size).sum();
    eprintln!(
        "8 clients x 3 replicas: {} blob GETs for {} blobs, upstream blob bytes {:.2}x the image, {} manifest GETs, connections per replica {:?}",
        counts.get("GET", Kind::Blob),
        img.all_blobs().len(),
        blob_bytes as f64 / image_bytes as f64,
        counts.get("GET", Kind::Manifest),
        service.accepted()
    );
    assert_eq!(counts.get("GET", Kind::Blob), img.all_blobs().len() as u64);
    assert_eq!(
        blob_bytes, image_bytes,
        "upstream blob bytes = 1.00x the image"
    );
    assert_eq!(
        counts.get("GET", Kind::Manifest),
        1,
        "one tag GET for the set"
    );
    assert!(
        service.accepted().iter().all(|n| *n > 0),
        "every replica took clients: {:?}",
        service.accepted()
    );

    // Every replica restarted, on empty local disks: the bucket still has everything.
    scene.published(&img).await;
    for replica in replicas {
        replica.terminate().await;
    }
    scene.fault.handle().reset_counts();
    let replicas = scene.start_replicas().await;
    // A replica that has served nothing yet lists the bucket's repositories.
    let catalog: serde_json::Value = client()
        .get(format!("{}/v2/_catalog", replicas[0].url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["library/app"]));
    for replica in &replicas {
        let caches = pull_verified(&replica.url(), "library/app", &img).await;
        assert!(caches.iter().all(|c| c == "HIT"), "{caches:?}");
    }
    assert_eq!(
        scene.fault.handle().counts().total(),
        0,
        "nothing asked upstream after the restart"
    );
    assert_eq!(
        bucket_holds_only_verified_blobs(&scene.bucket()).await,
        img.all_blobs().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_tag_is_revalidated_once_for_the_whole_replica_set() {
    if !prerequisites_or_skip("an_expired_tag_is_revalidated_once_for_the_whole_replica_set") {
        return;
    }
    let mut scene = Scene::start(3).await;
    scene.freshness = vec![fresh_for("*", Duration::from_secs(3600))];
    let img = docker_image(47, &[256 * 1024]).unwrap();
    scene.push("library/tagged", &img).await;
    let replicas = scene.start_replicas().await;
    for replica in &replicas {
        pull_verified(&replica.url(), "library/tagged", &img).await;
    }
    // Every copy of the tag record (each replica's and the bucket's) last checked long ago.
    let bucket = scene.bucket();
    let (name, tag) = ("library/tagged".parse().unwrap(), "1".parse().unwrap());
    eventually(
        Duration::from_secs(10),
        "the tag record in the bucket",
        || async {
            bucket
                .read_tag("docker.io", &name, &tag)
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;
    let mut record = bucket
        .read_tag("docker.io", &name, &tag)
        .await
        .unwrap()
        .unwrap();
    record.checked_at = 0;
    bucket
        .write_tag("docker.io", &name, &tag, &record)
        .await
        .unwrap();
    for replica in &replicas {
        let file = replica
            .storage
            .join("repositories/docker.io/library/tagged/_tags/1.json");
        std::fs::write(&file, serde_json::to_vec(&record).unwrap()).unwrap();
    }
    scene.fault.handle().reset_counts();

    // 4 concurrent requests on each replica.
    let requests: Vec<_> = replicas
        .iter()
        .flat_map(|r| std::iter::repeat_n(r.url(), 4))
        .map(|url| tokio::spawn(async move { get_manifest(&url, "library/tagged", "1").await }))
        .collect();
    for request in requests {
        let response = request.await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["docker-content-digest"],
            img.manifest_digest.as_str()
        );
    }
    let counts = scene.fault.handle().counts();
    assert_eq!(
        counts.get("HEAD", Kind::Manifest),
        1,
        "one revalidation HEAD for 12 requests on 3 replicas\n{}",
        replicas
            .iter()
            .map(|r| format!("--- {}\n{}", r.url(), r.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(counts.get("GET", Kind::Manifest), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_asked_the_owner_keeps_the_owners_freshness() {
    if !prerequisites_or_skip("a_replica_that_asked_the_owner_keeps_the_owners_freshness") {
        return;
    }
    let mut scene = Scene::start(3).await;
    scene.freshness = vec![fresh_for("*", Duration::from_secs(3600))];
    let img = docker_image(49, &[256 * 1024]).unwrap();
    scene.push("library/fresh", &img).await;
    let replicas = scene.start_replicas().await;
    let peers = scene.peers();
    let owner_url = rendezvous_order("docker.io/library/fresh:1", &peers)[0];
    let owner = peers.iter().position(|p| p == owner_url).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    pull_verified(&replicas[owner].url(), "library/fresh", &img).await;

    // The owner confirmed the tag half an hour ago; the bucket has no record of it, so the
    // other replicas can learn it only from the owner.
    let bucket = scene.bucket();
    let (name, tag) = ("library/fresh".parse().unwrap(), "1".parse().unwrap());
    eventually(
        Duration::from_secs(10),
        "the owner's tag record published",
        || async {
            bucket
                .read_tag("docker.io", &name, &tag)
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;
    bucket
        .delete("repositories/docker.io/library/fresh/_tags/1.json")
        .await
        .unwrap();
    let tag_file = |i: usize| {
        replicas[i]
            .storage
            .join("repositories/docker.io/library/fresh/_tags/1.json")
    };
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tag_file(owner)).unwrap()).unwrap();
    let confirmed = cachalot_registry::store::now_secs() - 1800;
    record["checkedAt"] = confirmed.into();
    std::fs::write(tag_file(owner), serde_json::to_vec(&record).unwrap()).unwrap();

    // One asks with a GET, the other with a HEAD: both keep the owner's time.
    let get = get_manifest(&replicas[others[0]].url(), "library/fresh", "1").await;
    assert_eq!(get.status(), 200);
    let head = client()
        .head(format!(
            "{}/v2/library/fresh/manifests/1",
            replicas[others[1]].url()
        ))
        .header("accept", cachalot_registry::oci::media::MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    for i in &others {
        let kept: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tag_file(*i)).unwrap()).unwrap();
        assert_eq!(kept["checkedAt"], confirmed, "replica {i}");
    }
    assert_eq!(
        scene.fault.handle().counts().get("HEAD", Kind::Manifest),
        0,
        "the owner's record was fresh: nothing revalidated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_answering_garbage_is_treated_as_down() {
    if !prerequisites_or_skip("a_peer_answering_garbage_is_treated_as_down") {
        return;
    }
    let mut scene = Scene::start(1).await;
    // The "peer": an HTTP server answering every request with a login page.
    let garbage = FaultProxy::start(&scene.upstream.url()).await.unwrap();
    garbage.handle().add_fault(FaultRule::new(Fault::Respond {
        status: 200,
        content_type: "text/html".into(),
        body: "<html>please log in</html>".into(),
    }));
    scene.extra_peers.push(garbage.url());
    // Ownership depends on the (random) ports: pick an image the fake peer owns part of.
    let peers = scene.peers();
    let owned_by_garbage = |img: &TestImage| {
        std::iter::once("docker.io/library/junk:1".to_owned())
            .chain(img.all_blobs().iter().map(|b| b.digest.clone()))
            .any(|key| rendezvous_order(&key, &peers)[0] == garbage.url())
    };
    let img = (48..148)
        .map(|seed| docker_image(seed, &[MIB, 512 * 1024, 256 * 1024]).unwrap())
        .find(owned_by_garbage)
        .expect("one of 100 images has a key the fake peer owns");
    scene.push("library/junk", &img).await;
    let replicas = scene.start_replicas().await;
    pull_verified(&replicas[0].url(), "library/junk", &img).await;
    // The first forwarded request met the garbage; its circuit then kept the rest away.
    assert_eq!(
        garbage.handle().counts().total(),
        1,
        "{:?}",
        garbage.handle().requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_cached_through_one_replica_is_served_by_another_without_the_upstream() {
    if !prerequisites_or_skip(
        "a_blob_cached_through_one_replica_is_served_by_another_without_the_upstream",
    ) {
        return;
    }
    let mut scene = Scene::start(3).await;
    let img = docker_image(42, &[2 * MIB, 512 * 1024]).unwrap();
    scene.push("library/one", &img).await;
    let replicas = scene.start_replicas().await;
    pull_verified(&replicas[0].url(), "library/one", &img).await;
    scene.published(&img).await;
    scene.fault.handle().reset_counts();
    let layer = &img.layers()[0];
    let response = client()
        .get(format!(
            "{}/v2/library/one/blobs/{}",
            replicas[2].url(),
            layer.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-cache"], "HIT");
    assert_eq!(
        sha256_digest(&response.bytes().await.unwrap()),
        layer.digest
    );
    assert_eq!(scene.fault.handle().counts().total(), 0);

    // A copy in the bucket that rotted: never served whole, removed, then fetched again.
    let config = &img.config().unwrap();
    let digest = config.digest.parse().unwrap();
    let rotten = scene.dir.path().join("rotten");
    let mut bytes = config.read_all().unwrap().to_vec();
    bytes[0] ^= 0xff;
    std::fs::write(&rotten, &bytes).unwrap();
    let bucket = scene.bucket();
    bucket
        .put_blob_file(&digest, &rotten, config.size)
        .await
        .unwrap();
    // A replica that has not seen the config: not the one that pulled, not its owner.
    let peers = scene.peers();
    let owner = rendezvous_order(&config.digest, &peers)[0];
    let fresh = (1..3).find(|i| peers[*i] != owner).unwrap();
    let url = format!(
        "{}/v2/library/one/blobs/{}",
        replicas[fresh].url(),
        config.digest
    );
    // A small blob may fail before its headers went out (the connection closes with no
    // response) or after (a broken body): either way it must not arrive whole.
    let first = match client().get(&url).send().await {
        Ok(response) => response.bytes().await.ok(),
        Err(_) => None,
    };
    assert!(
        first.is_none_or(|body| sha256_digest(&body) != config.digest),
        "the rotten copy was served whole"
    );
    eventually(Duration::from_secs(10), "the rotten copy removed", || {
        let bucket = bucket.clone();
        let digest = &digest;
        async move { bucket.blob_size(digest).await.unwrap().is_none() }
    })
    .await;
    let again = client().get(&url).send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(sha256_digest(&again.bytes().await.unwrap()), config.digest);

    // The same for a manifest: a rotten copy is a miss (and is replaced), never an answer.
    let digest = img.manifest_digest.parse().unwrap();
    bucket
        .write_manifest(&digest, "application/x-rotten", b"{\"not\":\"it\"}")
        .await
        .unwrap();
    let tag_owner = rendezvous_order("docker.io/library/one:1", &peers)[0];
    let fresh = (1..3).find(|i| peers[*i] != tag_owner).unwrap();
    let m = get_manifest(&replicas[fresh].url(), "library/one", &img.manifest_digest).await;
    assert_eq!(m.status(), 200);
    assert_eq!(
        sha256_digest(&m.bytes().await.unwrap()),
        img.manifest_digest
    );
    eventually(Duration::from_secs(10), "the rotten manifest gone", || {
        let bucket = bucket.clone();
        let digest = &digest;
        async move { bucket.read_manifest(digest).await.is_ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_upstream_bytes_never_land_in_the_bucket() {
    if !prerequisites_or_skip("corrupt_upstream_bytes_never_land_in_the_bucket") {
        return;
    }
    let mut scene = Scene::start(2).await;
    // Past the multipart threshold: a multipart upload must not be completed either.
    let img = docker_image(43, &[9 * MIB]).unwrap();
    scene.push("library/bad", &img).await;
    let replicas = scene.start_replicas().await;
    let layer = img.layers()[0].clone();
    scene.fault.handle().add_fault(
        FaultRule::new(Fault::Corrupt { at: 5 * MIB })
            .kind(Kind::Blob)
            .path_contains(&layer.digest),
    );
    for replica in &replicas {
        let response = client()
            .get(format!(
                "{}/v2/library/bad/blobs/{}",
                replica.url(),
                layer.digest
            ))
            .send()
            .await;
        // Failed before or after the headers went out: never complete as the blob.
        let body = match response {
            Ok(response) => response.bytes().await.ok(),
            Err(_) => None,
        };
        assert!(
            body.is_none_or(|body| sha256_digest(&body) != layer.digest),
            "a corrupt body was served whole"
        );
    }
    // Every client's body failed, so every flight has ended: nothing is left to publish.
    let digest = layer.digest.parse().unwrap();
    let bucket = scene.bucket();
    assert!(scene.fault.handle().counts().get("GET", Kind::Blob) >= 1);
    assert_eq!(bucket.blob_size(&digest).await.unwrap(), None);
    assert_eq!(bucket_holds_only_verified_blobs(&bucket).await, 0);

    // Once the upstream is healthy again the blob is fetched, verified and published.
    scene.fault.handle().clear_faults();
    pull_verified(&replicas[1].url(), "library/bad", &img).await;
    scene.published(&img).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owner_killed_mid_fetch_leaves_clients_served_and_nothing_partial() {
    if !prerequisites_or_skip("owner_killed_mid_fetch_leaves_clients_served_and_nothing_partial") {
        return;
    }
    let mut scene = Scene::start(3).await;
    let img = docker_image(44, &[24 * MIB]).unwrap();
    scene.push("library/big", &img).await;
    let mut replicas: Vec<Option<Process>> =
        scene.start_replicas().await.into_iter().map(Some).collect();
    let layer = img.layers()[0].clone();
    let peers = scene.peers();
    let owner_url = rendezvous_order(&layer.digest, &peers)[0].to_owned();
    let owner = peers.iter().position(|p| *p == owner_url).unwrap();
    // The manifest first (not part of the race).
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let m = get_manifest(
        &replicas[others[0]].as_ref().unwrap().url(),
        "library/big",
        "1",
    )
    .await;
    assert_eq!(m.status(), 200);
    // The owner's upstream body stalls after 10 MiB, long enough to kill it half way.
    scene.fault.handle().add_fault(
        FaultRule::new(Fault::Stall {
            after: 10 * MIB,
            pause: Duration::from_secs(20),
        })
        .kind(Kind::Blob)
        .path_contains(&layer.digest)
        .times(1),
    );
    let clients: Vec<_> = others
        .iter()
        .flat_map(|i| {
            let url = format!(
                "{}/v2/library/big/blobs/{}",
                replicas[*i].as_ref().unwrap().url(),
                layer.digest
            );
            [url.clone(), url]
        })
        .map(|url| {
            tokio::spawn(async move {
                let response = client().get(url).send().await.unwrap();
                let status = response.status();
                (status, response.bytes().await.map(|b| sha256_digest(&b)))
            })
        })
        .collect();
    // Kill the owner once the stall holds its fetch half way.
    let fault = scene.fault.handle();
    eventually(
        Duration::from_secs(20),
        "the owner's upstream body under way",
        || {
            let fault = fault.clone();
            async move { fault.body_bytes().get(&Kind::Blob).copied().unwrap_or(0) >= 10 * MIB }
        },
    )
    .await;
    replicas[owner].take().unwrap().kill();
    for client in clients {
        let (status, digest) = client.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(digest.unwrap(), layer.digest, "a client got a broken blob");
    }
    // Nothing partial in the bucket; the layer appears whole once a survivor published it.
    let bucket = scene.bucket();
    assert!(bucket_holds_only_verified_blobs(&bucket).await <= 1);
    let digest = layer.digest.parse().unwrap();
    eventually(Duration::from_secs(30), "the layer in the bucket", || {
        let bucket = bucket.clone();
        let digest = &digest;
        async move { bucket.blob_size(digest).await.unwrap() == Some(layer.size) }
    })
    .await;
    assert_eq!(bucket_holds_only_verified_blobs(&bucket).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_s3_engine_stopped_hot_blobs_serve_and_everything_else_is_a_503() {
    if !prerequisites_or_skip(
        "with_the_s3_engine_stopped_hot_blobs_serve_and_everything_else_is_a_503",
    ) {
        return;
    }
    let mut scene = Scene::start(1).await;
    let hot = docker_image(45, &[MIB]).unwrap();
    let cold = docker_image(46, &[MIB]).unwrap();
    scene.push("library/hot", &hot).await;
    scene.push("library/cold", &cold).await;
    let replicas = scene.start_replicas().await;
    let url = replicas[0].url();
    pull_verified(&url, "library/hot", &hot).await;
    scene.published(&hot).await;
    scene.garage.stop().await.unwrap();

    let caches = pull_verified(&url, "library/hot", &hot).await;
    assert!(caches.iter().all(|c| c == "HIT"), "{caches:?}");
    let started = std::time::Instant::now();
    let m = get_manifest(&url, "library/cold", "1").await;
    assert_eq!(m.status(), 503);
    let body: serde_json::Value = m.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "STORAGE_UNAVAILABLE", "{body}");
    let blob = client()
        .get(format!(
            "{url}/v2/library/cold/blobs/{}",
            cold.layers()[0].digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status(), 503);
    eprintln!("503s answered within {:?} of asking", started.elapsed());
    assert_eq!(
        scene.fault.handle().counts().get("GET", Kind::Blob),
        hot.all_blobs().len() as u64,
        "nothing fetched upstream behind the bucket's back"
    );
    let ready = client().get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        200,
        "still alive:\n{}",
        replicas[0].log_tail()
    );

    // The engine back: the cold image is fetched and served.
    scene.garage.restart().await.unwrap();
    pull_verified(&url, "library/cold", &cold).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bucket_stays_under_its_bound_keeping_pinned_and_recent_images() {
    if !prerequisites_or_skip("the_bucket_stays_under_its_bound_keeping_pinned_and_recent_images") {
        return;
    }
    let mut scene = Scene::start(2).await;
    // No grace (tests only): eviction acts on the next upkeep pass, one a second.
    scene.s3.eviction_grace = Some(Duration::ZERO);
    let pinned = docker_image(50, &[2 * MIB]).unwrap();
    let old = docker_image(51, &[2 * MIB]).unwrap();
    let new = docker_image(52, &[2 * MIB]).unwrap();
    for (repo, img) in [
        ("library/pinned", &pinned),
        ("library/old", &old),
        ("library/new", &new),
    ] {
        scene.push(repo, img).await;
    }
    let bound = 5 * MIB;
    let tweaks: Vec<_> = (0..2).map(|i| scene.tweak(i)).collect();
    let mut replicas = Vec::new();
    for (i, tweak) in tweaks.iter().enumerate() {
        let storage = scene.dir.path().join(format!("evicting-{i}"));
        let replica = Process::start_at(scene.listens[i], &storage, &scene.fault.url(), |c| {
            tweak(c);
            c.storage.max_size_bytes = Some(bound);
            c.storage.last_use_flush_interval = Duration::from_secs(1);
            c.registries.get_mut("docker.io").unwrap().pin = vec!["library/pinned".into()];
        })
        .await
        .unwrap_or_else(|log| panic!("replica {i} did not start:\n{log}"));
        replicas.push(replica);
    }
    // Pinned first (the least recently used of all), then old, then new on the other replica.
    pull_verified(&replicas[0].url(), "library/pinned", &pinned).await;
    pull_verified(&replicas[0].url(), "library/old", &old).await;
    scene.published(&old).await;
    // Last use has a resolution of one second: the new image is used in a later one.
    let old_second = cachalot_registry::store::now_secs();
    eventually(Duration::from_secs(3), "the next second", || async move {
        cachalot_registry::store::now_secs() > old_second
    })
    .await;
    pull_verified(&replicas[1].url(), "library/new", &new).await;
    let bucket = scene.bucket();
    // The new image's layer is uploaded after its clients were served: wait for it (the bucket
    // is then over its bound until the next upkeep pass).
    let new_layer = new.layers()[0].digest.parse().unwrap();
    eventually(
        Duration::from_secs(30),
        "the new layer in the bucket",
        || {
            let (bucket, digest) = (bucket.clone(), &new_layer);
            async move { bucket.blob_size(digest).await.unwrap().is_some() }
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the bucket back under its bound",
        || {
            let bucket = bucket.clone();
            async move {
                let blobs = bucket.list("blobs/").await.unwrap();
                let manifests = bucket.list("manifests/").await.unwrap();
                blobs.iter().chain(&manifests).map(|o| o.size).sum::<u64>() <= bound
            }
        },
    )
    .await;
    let has = |img: &TestImage| {
        let (bucket, digest) = (bucket.clone(), img.layers()[0].digest.parse().unwrap());
        async move { bucket.blob_size(&digest).await.unwrap().is_some() }
    };
    assert!(has(&pinned).await, "the pinned image stays");
    assert!(has(&new).await, "the most recent image stays");
    assert!(
        !has(&old).await,
        "the least recently used unpinned image goes"
    );
    // Evicted means gone from the bucket, not broken: it is fetched again.
    scene.fault.handle().reset_counts();
    pull_verified(&replicas[1].url(), "library/old", &old).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_s3_settings_stop_the_start_with_one_line() {
    if !prerequisites_or_skip("bad_s3_settings_stop_the_start_with_one_line") {
        return;
    }
    let scene = Scene::start(1).await;
    let wrong_secret = scene.dir.path().join("wrong-secret");
    std::fs::write(&wrong_secret, "0".repeat(64)).unwrap();
    let start = |s3: S3Config| {
        let storage: PathBuf = scene.dir.path().join("bad");
        let listen = scene.listens[0];
        let upstream = scene.fault.url();
        async move {
            Process::start_at(listen, &storage, &upstream, move |c: &mut Config| {
                c.storage.s3 = Some(s3.clone());
            })
            .await
        }
    };
    let cases = [
        (
            S3Config {
                secret_access_key_file: Some(wrong_secret.clone()),
                ..scene.s3.clone()
            },
            "storage.s3",
        ),
        (
            S3Config {
                bucket: "no-such-bucket".into(),
                ..scene.s3.clone()
            },
            "storage.s3",
        ),
        (
            S3Config {
                endpoint: Some("http://127.0.0.1:9".into()),
                ..scene.s3.clone()
            },
            "storage.s3",
        ),
    ];
    for (s3, expected) in cases {
        let log = match start(s3.clone()).await {
            Ok(_) => panic!("started with {s3:?}"),
            Err(log) => log,
        };
        assert!(log.contains(expected), "{s3:?}:\n{log}");
    }
    // The first mirror claims the prefix; a second owner is refused.
    let first = start(scene.s3.clone()).await.unwrap();
    first.terminate().await;
    let log = match start(S3Config {
        owner: "someone/else".into(),
        ..scene.s3.clone()
    })
    .await
    {
        Ok(_) => panic!("a second mirror started on a claimed prefix"),
        Err(log) => log,
    };
    assert!(log.contains("belongs to mirror `test/mirror`"), "{log}");
}
