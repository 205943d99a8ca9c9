//! What survives the process: `kill -9` at random points of concurrent large fetches (nothing
//! partial is ever served or left behind), and the LRU order across restarts (the hottest old
//! image survives the first eviction after a restart, the cold one goes), through a graceful
//! shutdown and through a kill after the periodic flush.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cachalot_registry::config::Config;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{FaultProxy, Kind};
use cachalot_testkit::image::{docker_image, TestImage};
use common::{
    blob_file, client, committed, eventually, files_under, pull_verified, tags_never_revalidate,
    Cachalot, Process, MIB,
};
use futures::StreamExt as _;
use rand::{Rng as _, SeedableRng as _};
use sha2::Digest as _;

/// Tags are never revalidated: upstream requests are then content fetches only.
fn never_revalidating(config: &mut Config) {
    config.registries.get_mut("docker.io").unwrap().freshness = tags_never_revalidate();
}

/// One response a client read during a crash round.
#[derive(Debug)]
struct Observed {
    what: String,
    status: u16,
    /// The body read to its end without a transport error: its digest and length.
    complete: Option<(String, u64)>,
    expected: (String, u64),
}

/// Reads a response as a client does, counting bytes into `received` as they arrive.
async fn observe(
    url: String,
    accept_manifests: bool,
    expected: (String, u64),
    received: Arc<AtomicU64>,
) -> Observed {
    let mut request = client().get(&url);
    if accept_manifests {
        request = request.header("accept", cachalot_registry::oci::media::MANIFEST_ACCEPT);
    }
    let Ok(response) = request.send().await else {
        return Observed {
            what: url,
            status: 0,
            complete: None,
            expected,
        };
    };
    let status = response.status().as_u16();
    let mut hasher = sha2::Sha256::new();
    let mut len = 0u64;
    let mut stream = response.bytes_stream();
    let mut broken = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                hasher.update(&chunk);
                len += chunk.len() as u64;
                received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    Observed {
        what: url,
        status,
        complete: (!broken).then(|| (format!("sha256:{}", hex::encode(hasher.finalize())), len)),
        expected,
    }
}

/// One client pulling `repo:1` (manifest, then every blob), recording every response.
async fn crash_client(
    base: String,
    repo: String,
    img: TestImage,
    received: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Observed>>>,
) {
    let manifest = observe(
        format!("{base}/v2/{repo}/manifests/1"),
        true,
        (img.manifest_digest.clone(), img.manifest_bytes.len() as u64),
        Arc::clone(&received),
    )
    .await;
    let go_on = manifest.status == 200 && manifest.complete.is_some();
    seen.lock().unwrap().push(manifest);
    if !go_on {
        return;
    }
    for blob in img.all_blobs() {
        let observed = observe(
            format!("{base}/v2/{repo}/blobs/{}", blob.digest),
            false,
            (blob.digest.clone(), blob.size),
            Arc::clone(&received),
        )
        .await;
        let failed = observed.complete.is_none() || observed.status != 200;
        seen.lock().unwrap().push(observed);
        if failed {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_concurrent_large_fetches_never_serves_or_keeps_partial_content() {
    const ROUNDS: usize = 20;
    let seed: u64 = std::env::var("CACHALOT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    eprintln!("crash test seed {seed} (set CACHALOT_CRASH_SEED to replay another)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let upstream = Distribution::start().await.unwrap();
    let images: Vec<(String, TestImage)> = (0..3u64)
        .map(|i| {
            (
                format!("library/crash{i}"),
                docker_image(900 + i, &[4 * MIB, 2 * MIB]).unwrap(),
            )
        })
        .collect();
    for (repo, img) in &images {
        cachalot_testkit::image::push(&upstream.url(), repo, "1", img)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("cache");
    // A bound below the images' size keeps every round fetching and evicting, so kills also land
    // in the middle of eviction passes.
    let bounded = |c: &mut Config| {
        never_revalidating(c);
        c.storage.max_size_bytes = Some(10 * MIB);
    };
    let image_bytes: u64 = images
        .iter()
        .map(|(_, img)| img.total_bytes() + img.manifest_bytes.len() as u64)
        .sum();
    let clients_per_image = 2u64;

    let mut temp_files_left = 0usize;
    let (mut complete, mut broken) = (0usize, 0usize);
    for round in 0..ROUNDS {
        let process = Process::start(&storage, &upstream.url(), bounded).await;
        assert_eq!(
            std::fs::read_dir(storage.join("tmp")).unwrap().count(),
            0,
            "round {round} (seed {seed}): start-up leaves no temp file"
        );
        let received = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let clients: Vec<_> = images
            .iter()
            .flat_map(|(repo, img)| std::iter::repeat_n((repo, img), clients_per_image as usize))
            .map(|(repo, img)| {
                tokio::spawn(crash_client(
                    process.url(),
                    repo.clone(),
                    img.clone(),
                    Arc::clone(&received),
                    Arc::clone(&seen),
                ))
            })
            .collect();
        // The kill point: after a seeded share of the bytes the clients will receive.
        let kill_after = rng.random_range(0..image_bytes * clients_per_image);
        let started = Instant::now();
        while received.load(Ordering::Relaxed) < kill_after
            && !clients.iter().all(|c| c.is_finished())
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "round {round} (seed {seed}): clients stalled at {} bytes\n{}",
                received.load(Ordering::Relaxed),
                process.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        process.kill();
        temp_files_left += std::fs::read_dir(storage.join("tmp")).unwrap().count();
        for c in clients {
            tokio::time::timeout(Duration::from_secs(30), c)
                .await
                .expect("a client of a killed registry gives up within 30s")
                .unwrap();
        }
        for o in seen.lock().unwrap().iter() {
            match &o.complete {
                Some((digest, len)) if o.status == 200 => {
                    assert_eq!(
                        (digest, *len),
                        (&o.expected.0, o.expected.1),
                        "round {round} (seed {seed}): a 200 with a wrong or short body for {}",
                        o.what
                    );
                    complete += 1;
                }
                Some(_) => panic!(
                    "round {round} (seed {seed}): {} answered {} before the kill",
                    o.what, o.status
                ),
                None => broken += 1,
            }
        }
    }
    eprintln!(
        "{ROUNDS} rounds: {complete} complete verified responses, {broken} broken by the kill, \
         {temp_files_left} temp files left by kills (removed at the next start-up)"
    );
    assert!(
        broken > 0 && temp_files_left > 0,
        "the kills should interrupt transfers and fetches (seed {seed}: {broken} broken, \
         {temp_files_left} temp files)"
    );

    // Afterwards (no bound): every image pulls and verifies, and the store holds exactly what a
    // clean store filled by the same pulls holds.
    let after_crashes = Process::start(&storage, &upstream.url(), never_revalidating).await;
    assert_eq!(std::fs::read_dir(storage.join("tmp")).unwrap().count(), 0);
    for (repo, img) in &images {
        pull_verified(&after_crashes.url(), repo, img).await;
    }
    after_crashes.terminate().await;
    let clean_storage = dir.path().join("clean");
    let clean = Process::start(&clean_storage, &upstream.url(), never_revalidating).await;
    for (repo, img) in &images {
        pull_verified(&clean.url(), repo, img).await;
    }
    clean.terminate().await;

    let content = |root: &Path| {
        let all = files_under(root);
        let kept: std::collections::BTreeMap<_, _> = all
            .iter()
            .filter(|(p, _)| p.starts_with("blobs") || p.starts_with("manifests"))
            .map(|(p, s)| (p.clone(), *s))
            .collect();
        (kept, all.values().sum::<u64>(), all)
    };
    let (crashed_content, crashed_total, crashed_all) = content(&storage);
    let (clean_content, clean_total, clean_all) = content(&clean_storage);
    assert_eq!(
        crashed_content, clean_content,
        "same blobs and manifests as a clean store"
    );
    assert!(
        crashed_total <= clean_total,
        "the crashed store ({crashed_total} bytes) is no larger than a clean one ({clean_total})\n\
         crashed: {crashed_all:#?}\nclean: {clean_all:#?}"
    );
}

/// Three images of one 1 MiB layer; a bound that holds two of them.
const LRU_BOUND: u64 = 2 * MIB + MIB / 2;

/// The LRU tests' scene: an upstream (behind a counting proxy) holding `library/old-hot`,
/// `library/cold` and `library/new`, and a storage directory for cachalot.
struct LruScene {
    _upstream: Distribution,
    fault: FaultProxy,
    images: [TestImage; 3],
    _dir: tempfile::TempDir,
    storage: PathBuf,
}

impl LruScene {
    async fn start() -> LruScene {
        let upstream = Distribution::start().await.unwrap();
        let fault = FaultProxy::start(&upstream.url()).await.unwrap();
        let images = [
            docker_image(951, &[MIB]).unwrap(),
            docker_image(952, &[MIB]).unwrap(),
            docker_image(953, &[MIB]).unwrap(),
        ];
        for (name, img) in ["old-hot", "cold", "new"].iter().zip(&images) {
            cachalot_testkit::image::push(&upstream.url(), &format!("library/{name}"), "1", img)
                .await
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("cache");
        LruScene {
            _upstream: upstream,
            fault,
            images,
            _dir: dir,
            storage,
        }
    }

    /// Pulls old-hot (written first, so oldest by write time), then cold, then old-hot again
    /// (so it is the most recently used); returns the `X-Cache` of the last pull.
    async fn use_the_old_image_after_the_cold_one(&self, url: &str) -> Vec<String> {
        let [hot, cold, _] = &self.images;
        pull_verified(url, "library/old-hot", hot).await;
        committed(&self.storage, hot).await;
        pull_verified(url, "library/cold", cold).await;
        committed(&self.storage, cold).await;
        pull_verified(url, "library/old-hot", hot).await
    }

    /// After the restart, pulling `new` goes over the bound: the cold image's layer is evicted,
    /// the old but hot one is kept and served without an upstream request.
    async fn after_restart_the_cold_image_goes(&self, url: &str) {
        let [hot, cold, new] = &self.images;
        pull_verified(url, "library/new", new).await;
        let cold_layer = blob_file(&self.storage, &cold.layers()[0].digest);
        eventually(Duration::from_secs(10), "an eviction pass", || async {
            !cold_layer.exists()
        })
        .await;
        assert!(blob_file(&self.storage, &hot.layers()[0].digest).exists());
        self.fault.handle().reset_counts();
        assert!(pull_verified(url, "library/old-hot", hot)
            .await
            .iter()
            .all(|c| c == "HIT"));
        assert_eq!(self.fault.handle().counts().kind_total(Kind::Blob), 0);
    }
}

#[tokio::test]
async fn hottest_old_image_survives_the_first_eviction_after_a_graceful_restart() {
    let scene = LruScene::start().await;
    let tweak = |c: &mut Config| {
        never_revalidating(c);
        c.storage.max_size_bytes = Some(LRU_BOUND);
    };

    let first = Cachalot::start(scene.storage.clone(), &scene.fault.url(), tweak).await;
    assert!(scene
        .use_the_old_image_after_the_cold_one(&first.url())
        .await
        .iter()
        .all(|c| c == "HIT"));
    first.stop().await;

    let second = Cachalot::start(scene.storage.clone(), &scene.fault.url(), tweak).await;
    scene.after_restart_the_cold_image_goes(&second.url()).await;
    second.stop().await;
}

#[tokio::test]
async fn hottest_old_image_survives_a_kill_9_after_the_periodic_flush() {
    let scene = LruScene::start().await;
    let [hot, cold, _] = &scene.images;
    let tweak = |c: &mut Config| {
        never_revalidating(c);
        c.storage.max_size_bytes = Some(LRU_BOUND);
        c.storage.last_use_flush_interval = Duration::from_secs(1);
    };

    let first = Process::start(&scene.storage, &scene.fault.url(), tweak).await;
    scene
        .use_the_old_image_after_the_cold_one(&first.url())
        .await;
    // The flush is what makes the order durable: wait for it (the hot layer's recorded last use
    // passes the cold layer's write), then kill without any shutdown.
    let modified = |d: &str| {
        std::fs::metadata(blob_file(&scene.storage, d))
            .unwrap()
            .modified()
            .unwrap()
    };
    eventually(Duration::from_secs(10), "a last-use flush", || async {
        modified(&hot.layers()[0].digest) > modified(&cold.layers()[0].digest)
    })
    .await;
    first.kill();

    let second = Process::start(&scene.storage, &scene.fault.url(), tweak).await;
    scene.after_restart_the_cold_image_goes(&second.url()).await;
    second.kill();
}
