//! Configured pins against a real distribution upstream: with a small cache bound, pulling a
//! pinned image and then unpinned ones evicts only unpinned content, and the pinned image stays
//! servable from the cache without a single upstream request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use cachalot_testkit::fault::Kind;
use cachalot_testkit::image::{docker_image, oci_index, sha256_digest, TestImage};
use common::{
    blob_file, client, committed, eventually, get_manifest, tags_never_revalidate, Rig, MIB,
};

/// The cache bound: room for the pinned image and about two unpinned ones.
const BOUND: u64 = 3 * MIB;

/// GETs a URL through cachalot; returns the `X-Cache` header and the body.
async fn fetch(url: &str) -> (String, bytes::Bytes) {
    let response = client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    let cache = response.headers()["x-cache"].to_str().unwrap().to_owned();
    (cache, response.bytes().await.unwrap())
}

/// Pulls `repo:tag` as a linux/amd64 client does (index, then the amd64 child by digest, then
/// its config and layers) and checks every digest; returns the `X-Cache` of each response.
async fn pull(base: &str, repo: &str, tag: &str) -> Vec<String> {
    let mut caches = Vec::new();
    let top = get_manifest(base, repo, tag).await;
    assert_eq!(top.status(), 200);
    caches.push(top.headers()["x-cache"].to_str().unwrap().to_owned());
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&top.bytes().await.unwrap()).unwrap();
    if let Some(children) = manifest["manifests"].as_array() {
        let amd64 = children
            .iter()
            .find(|c| c["platform"]["architecture"] == "amd64")
            .unwrap();
        let digest = amd64["digest"].as_str().unwrap();
        let child = get_manifest(base, repo, digest).await;
        assert_eq!(child.status(), 200);
        caches.push(child.headers()["x-cache"].to_str().unwrap().to_owned());
        manifest = serde_json::from_slice(&child.bytes().await.unwrap()).unwrap();
    }
    let mut blobs = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
    for layer in manifest["layers"].as_array().unwrap() {
        blobs.push(layer["digest"].as_str().unwrap().to_owned());
    }
    for digest in blobs {
        let (cache, body) = fetch(&format!("{base}/v2/{repo}/blobs/{digest}")).await;
        assert_eq!(sha256_digest(&body), digest);
        caches.push(cache);
    }
    caches
}

#[tokio::test]
async fn pinned_image_survives_eviction_and_is_served_without_upstream_requests() {
    let rig = Rig::start_with(|config| {
        config.storage.max_size_bytes = Some(BOUND);
        let hub = config.registries.get_mut("docker.io").unwrap();
        // One-component name on docker.io: pins `library/pinned:stable`, as a pull of
        // `pinned:stable` means.
        hub.pin = vec!["pinned:stable".into()];
        // Tags never revalidate here, so any upstream request below is content that was evicted.
        hub.freshness = tags_never_revalidate();
    })
    .await;
    let url = rig.cachalot.url();
    let storage = rig.cachalot.storage.clone();

    // The pinned image is an OCI index; only its amd64 child is ever pulled.
    let pinned = oci_index(41, &[MIB]).unwrap();
    let amd64 = pinned.child_for("amd64").unwrap().clone();
    rig.push("library/pinned", "stable", &pinned).await;
    let others: Vec<TestImage> = (0..4)
        .map(|i| docker_image(500 + i, &[MIB]).unwrap())
        .collect();
    for (i, img) in others.iter().enumerate() {
        rig.push(&format!("library/other{i}"), "1", img).await;
    }

    // The pinned image first, so it is the least recently used content from now on.
    assert!(pull(&url, "pinned", "stable")
        .await
        .iter()
        .all(|c| c == "MISS"));
    committed(&storage, &amd64).await;
    for (i, img) in others.iter().enumerate() {
        assert!(pull(&url, &format!("other{i}"), "1")
            .await
            .iter()
            .all(|c| c == "MISS"));
        committed(&storage, img).await;
    }
    let cachalot = &rig.cachalot;
    eventually(
        Duration::from_secs(10),
        "eviction back under the bound",
        || async {
            let stats = cachalot.stats().await;
            stats.evictions > 0 && stats.cache_size_bytes <= BOUND
        },
    )
    .await;

    // Unpinned content went, oldest first, although the pinned image is older still.
    let oldest_unpinned_layer = &others[0].layers()[0].digest;
    assert!(!blob_file(&storage, oldest_unpinned_layer).exists());
    // Everything the pin reaches is kept, and counted as pinned: the index, the cached child and
    // its blobs (the never-pulled arm64 child is not in the cache, so not counted).
    let pinned_bytes = (pinned.manifest_bytes.len() + amd64.manifest_bytes.len()) as u64
        + amd64.all_blobs().iter().map(|b| b.size).sum::<u64>();
    assert_eq!(cachalot.stats().await.pinned_bytes, pinned_bytes);
    let metrics = cachalot.metrics().await;
    assert!(
        metrics.contains(&format!("cachalot_registry_pinned_bytes {pinned_bytes}")),
        "{metrics}"
    );

    // The pinned image is served from the cache alone.
    rig.faults().reset_counts();
    let caches = pull(&url, "pinned", "stable").await;
    assert_eq!(caches.len(), 2 + amd64.all_blobs().len());
    assert!(caches.iter().all(|c| c == "HIT"), "{caches:?}");
    assert_eq!(rig.faults().counts().total(), 0);

    // The oldest unpinned image was evicted whole (manifest, config, layer): pulling it again
    // goes upstream for each.
    pull(&url, "other0", "1").await;
    let counts = rig.faults().counts();
    assert_eq!(
        (
            counts.counted_manifest_gets(),
            counts.get("GET", Kind::Blob)
        ),
        (1, 2)
    );
}

/// Whether every blob of `img` is still in the cache.
fn cached(storage: &Path, img: &TestImage) -> bool {
    img.all_blobs()
        .iter()
        .all(|b| blob_file(storage, &b.digest).exists())
}

/// Bytes of manifests and blobs on disk: what eviction bounds, read from the files themselves
/// (the stats gauge may still show the size from before the last pass).
fn disk_usage(storage: &Path) -> u64 {
    ["blobs/sha256", "manifests/sha256"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(storage.join(dir)).ok())
        .flat_map(|entries| entries.flatten())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Pulls `repo:1`, waits for its blobs to be committed and for the cache to be back under
/// `bound` (with a little slack for the small `.type` files eviction does not count).
async fn pull_and_settle(rig: &Rig, repo: &str, img: &TestImage, bound: u64) {
    pull(&rig.cachalot.url(), repo, "1").await;
    let storage = &rig.cachalot.storage;
    committed(storage, img).await;
    eventually(
        Duration::from_secs(10),
        "the cache back under its bound",
        || async { disk_usage(storage) <= bound + 64 * 1024 },
    )
    .await;
}

#[tokio::test]
async fn the_pin_file_is_reread_at_each_eviction_pass_and_protection_follows_it() {
    let images: Vec<TestImage> = (0..7)
        .map(|i| docker_image(700 + i, &[MIB]).unwrap())
        .collect();
    let repos = [
        "first", "next1", "next2", "next3", "next4", "next5", "next6",
    ];
    // Room for three and a half images: each pull from the fourth on evicts exactly one image.
    let image_size = images.iter().map(TestImage::total_bytes).max().unwrap();
    let bound = 3 * image_size + image_size / 2;

    let pins = tempfile::tempdir().unwrap();
    let pin_file = pins.path().join("pins.yaml");
    // A tag, as the operator writes for a Pod's `image: first:1`.
    std::fs::write(&pin_file, "docker.io:\n- library/first:1\n").unwrap();
    let rig = Rig::start_with(|config| {
        config.storage.max_size_bytes = Some(bound);
        config.pin_file = Some(pin_file.clone());
        config.registries.get_mut("docker.io").unwrap().freshness = tags_never_revalidate();
    })
    .await;
    let storage = rig.cachalot.storage.clone();
    for (repo, img) in repos.iter().zip(&images) {
        rig.push(&format!("library/{repo}"), "1", img).await;
    }

    // first (pinned through the file), next1, next2, then next3 pushes the cache over its bound:
    // the oldest unpinned image goes, not the older but pinned first.
    for i in 0..4 {
        pull_and_settle(&rig, repos[i], &images[i], bound).await;
    }
    assert!(cached(&storage, &images[0]), "pinned through the file");
    assert!(
        !cached(&storage, &images[1]),
        "the oldest unpinned image evicted"
    );

    // The file now pins next2 by digest (as the operator writes an imageID) and no longer first:
    // next4 and next5 evict first, now unpinned and the oldest, and keep next2, older than both.
    std::fs::write(
        &pin_file,
        format!(
            "docker.io:\n- library/next2@{}\n",
            images[2].manifest_digest
        ),
    )
    .unwrap();
    pull_and_settle(&rig, repos[4], &images[4], bound).await;
    pull_and_settle(&rig, repos[5], &images[5], bound).await;
    assert!(
        !cached(&storage, &images[0]),
        "unpinned by the file, evicted"
    );
    assert!(
        cached(&storage, &images[2]),
        "pinned by digest through the file"
    );

    // A broken file keeps the last good pins: next6 evicts again, and next2 stays.
    std::fs::write(&pin_file, "docker.io: [library/next2@").unwrap();
    pull_and_settle(&rig, repos[6], &images[6], bound).await;
    assert!(cached(&storage, &images[2]), "the last good pins kept");
    // The gauge is set once the pass is over, just after its last removal.
    let cachalot = &rig.cachalot;
    eventually(Duration::from_secs(10), "pinnedBytes of next2", || async {
        cachalot.stats().await.pinned_bytes == images[2].total_bytes()
    })
    .await;
}
