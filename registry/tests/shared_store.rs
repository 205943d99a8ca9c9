//! Conformance of the shared tier: one suite (`suite`) that every `object_store` backend the
//! registry can run on passes, run against a local directory (`local_fs::…`) and a real S3
//! server, Garage 2.5.0 (`garage::…`), each below a non-empty prefix. The Garage store is built
//! by `SharedStore::from_config`, as the registry builds it, so its timeouts and retries are the
//! production ones. Then what only a network store can do: fail fast when the server is gone, and
//! refuse wrong keys and a missing bucket at the startup claim.
//!
//! The Garage tests skip (`SKIPPED <test>: <reason>`) when `scripts/s3-server` has not been run,
//! and fail instead under `CACHALOT_E2E_LOCAL=required`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachalot_registry::config::S3Config;
use cachalot_registry::oci::{media, Digest, RepositoryName, Tag};
use cachalot_registry::store::s3_uploads::MultipartUploads;
use cachalot_registry::store::shared::{
    blob_key, manifest_key, SharedStore, SharedStoreError, MULTIPART_PART,
};
use cachalot_registry::store::shared_lru::{evict, protected_keys, read_last_use, SharedLastUse};
use cachalot_registry::store::{now_secs, PinRules, TagRecord};
use cachalot_testkit::prerequisites;
use cachalot_testkit::s3::{garage_binary, Garage};
use futures::TryStreamExt as _;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

/// The prefix of the store under test; a second one shares its bucket.
const PREFIX: &str = "mirrors/a/";
const OTHER_PREFIX: &str = "mirrors/b/";

/// A shared tier under test, and the raw object store below it (for what the tier itself never
/// does: writing garbage, listing across prefixes).
struct Backend {
    shared: SharedStore,
    raw: Arc<dyn ObjectStore>,
    kind: Kind,
}

enum Kind {
    Local(tempfile::TempDir),
    Garage {
        garage: Garage,
        keys: tempfile::TempDir,
    },
}

impl Backend {
    fn local() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        Backend {
            shared: SharedStore::new(Arc::clone(&raw), PREFIX),
            raw,
            kind: Kind::Local(dir),
        }
    }

    /// A started Garage, or `None` when the test skips.
    async fn garage(test: &str) -> Option<Backend> {
        if !garage_available(test) {
            return None;
        }
        let garage = start_garage().await;
        let keys = tempfile::tempdir().unwrap();
        let shared = SharedStore::from_config(&s3_config(&garage, keys.path(), PREFIX)).unwrap();
        let raw: Arc<dyn ObjectStore> = Arc::new(raw_s3(&garage));
        Some(Backend {
            shared,
            raw,
            kind: Kind::Garage { garage, keys },
        })
    }

    /// The multipart uploads below the prefix, on S3 (a local directory has none to list).
    fn uploads(&self) -> Option<MultipartUploads> {
        match &self.kind {
            Kind::Local(_) => None,
            Kind::Garage { garage, keys } => Some(
                MultipartUploads::from_config(&s3_config(garage, keys.path(), PREFIX)).unwrap(),
            ),
        }
    }

    /// A new client on the same bucket below `prefix`, built as at a replica's start.
    fn open(&self, prefix: &str) -> SharedStore {
        match &self.kind {
            Kind::Local(dir) => SharedStore::new(
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap(),
                ),
                prefix,
            ),
            Kind::Garage { garage, keys } => {
                SharedStore::from_config(&s3_config(garage, keys.path(), prefix)).unwrap()
            }
        }
    }
}

fn garage_available(test: &str) -> bool {
    prerequisites::run_or_skip(test, garage_binary().err().map(|e| e.to_string()))
}

async fn start_garage() -> Garage {
    let started = Instant::now();
    let garage = Garage::start().await.unwrap();
    eprintln!("garage ready in {:?}", started.elapsed());
    garage
}

/// The registry's config for `garage`'s bucket below `prefix`, with the keys in files under
/// `dir` (as a mounted Secret provides them).
fn s3_config(garage: &Garage, dir: &FsPath, prefix: &str) -> S3Config {
    s3_config_with(
        garage,
        dir,
        prefix,
        garage.bucket(),
        garage.secret_access_key(),
    )
}

fn s3_config_with(
    garage: &Garage,
    dir: &FsPath,
    prefix: &str,
    bucket: &str,
    secret: &str,
) -> S3Config {
    let id_file = dir.join("access-key-id");
    let secret_file = dir.join(format!("secret-{}", secret.len()));
    std::fs::write(&id_file, format!("{}\n", garage.access_key_id())).unwrap();
    std::fs::write(&secret_file, secret).unwrap();
    serde_json::from_value(serde_json::json!({
        "endpoint": garage.endpoint(),
        "bucket": bucket,
        "region": garage.region(),
        "prefix": prefix,
        "accessKeyIdFile": id_file,
        "secretAccessKeyFile": secret_file,
    }))
    .unwrap()
}

/// A plain client of `garage`'s bucket, without prefix.
fn raw_s3(garage: &Garage) -> object_store::aws::AmazonS3 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(garage.endpoint())
        .with_allow_http(true)
        .with_region(garage.region())
        .with_bucket_name(garage.bucket())
        .with_access_key_id(garage.access_key_id())
        .with_secret_access_key(garage.secret_access_key())
        .build()
        .unwrap()
}

/// `len` deterministic bytes, different per `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 13) as u8))
        .collect()
}

/// Writes `bytes` to a file in `dir` and uploads it as the blob of their digest.
async fn put_blob(store: &SharedStore, dir: &FsPath, bytes: &[u8]) -> Digest {
    let digest = Digest::sha256_of(bytes);
    let file = dir.join(digest.hex());
    std::fs::write(&file, bytes).unwrap();
    store
        .put_blob_file(&digest, &file, bytes.len() as u64)
        .await
        .unwrap();
    digest
}

/// Reads a blob (or a range of it) whole.
async fn read_blob(
    store: &SharedStore,
    digest: &Digest,
    range: Option<std::ops::Range<u64>>,
) -> (u64, Vec<u8>) {
    let blob = store.get_blob(digest, range).await.unwrap().unwrap();
    let chunks: Vec<bytes::Bytes> = blob.body.try_collect().await.unwrap();
    (blob.size, chunks.concat())
}

/// Every key below `prefix` in the raw store, sorted.
async fn raw_keys(raw: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = raw
        .list(Some(&Path::from(prefix)))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

fn tag_record(digest: &Digest, checked_at: u64) -> TagRecord {
    TagRecord {
        digest: digest.clone(),
        media_type: media::OCI_MANIFEST.into(),
        size: 1,
        checked_at,
    }
}

/// An image in the shared tier: its manifest, config and layer keys.
struct Image {
    manifest: Digest,
    keys: [String; 3],
    size: u64,
}

/// Stores an image (config, one layer of `layer_size` bytes, manifest) tagged `repo:tag`.
async fn put_image(
    store: &SharedStore,
    dir: &FsPath,
    repo: &str,
    tag: &str,
    seed: u8,
    layer_size: usize,
) -> Image {
    let config_bytes = format!("config {repo}:{tag}").into_bytes();
    let config = put_blob(store, dir, &config_bytes).await;
    let layer = put_blob(store, dir, &pattern(seed, layer_size)).await;
    let manifest_bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_bytes.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}],
    }))
    .unwrap();
    let manifest = Digest::sha256_of(&manifest_bytes);
    store
        .write_manifest(&manifest, media::OCI_MANIFEST, &manifest_bytes)
        .await
        .unwrap();
    let (name, tag): (RepositoryName, Tag) = (repo.parse().unwrap(), tag.parse().unwrap());
    store
        .write_tag("docker.io", &name, &tag, &tag_record(&manifest, 1))
        .await
        .unwrap();
    let keys = [manifest_key(&manifest), blob_key(&config), blob_key(&layer)];
    // As stored: a manifest object also holds its media type.
    let size = store
        .list("")
        .await
        .unwrap()
        .iter()
        .filter(|o| keys.contains(&o.key))
        .map(|o| o.size)
        .sum();
    assert!(size > (config_bytes.len() + layer_size + manifest_bytes.len()) as u64);
    Image {
        keys,
        size,
        manifest,
    }
}

/// The keys below `blobs/` and `manifests/`.
async fn content_keys(store: &SharedStore) -> HashSet<String> {
    let mut keys: HashSet<String> = HashSet::new();
    for top in ["blobs/", "manifests/"] {
        keys.extend(store.list(top).await.unwrap().into_iter().map(|o| o.key));
    }
    keys
}

/// The suite every backend passes. Each case gets a fresh, empty backend.
mod suite {
    use super::*;

    pub async fn blobs_go_up_in_one_put_or_in_parts_and_read_back_whole_and_ranged(b: &Backend) {
        let dir = tempfile::tempdir().unwrap();
        let small = pattern(1, 100_000);
        let large = pattern(2, MULTIPART_PART + (1 << 20) + 17);
        let small_digest = put_blob(&b.shared, dir.path(), &small).await;
        let started = Instant::now();
        let large_digest = put_blob(&b.shared, dir.path(), &large).await;
        eprintln!(
            "{} byte multipart upload: {:?}",
            large.len(),
            started.elapsed()
        );

        for (digest, bytes) in [(&small_digest, &small), (&large_digest, &large)] {
            assert_eq!(
                b.shared.blob_size(digest).await.unwrap(),
                Some(bytes.len() as u64)
            );
            let (size, whole) = read_blob(&b.shared, digest, None).await;
            assert_eq!(size, bytes.len() as u64);
            assert!(whole == *bytes, "whole blob differs");
        }
        let (size, range) = read_blob(&b.shared, &small_digest, Some(1000..5000)).await;
        assert_eq!((size, &range[..]), (small.len() as u64, &small[1000..5000]));
        // Across the boundary of the first part.
        let boundary = MULTIPART_PART as u64;
        let (size, range) =
            read_blob(&b.shared, &large_digest, Some(boundary - 10..boundary + 10)).await;
        assert_eq!(size, large.len() as u64);
        assert_eq!(&range[..], &large[MULTIPART_PART - 10..MULTIPART_PART + 10]);
    }

    pub async fn missing_objects_read_as_none(b: &Backend) {
        let digest = Digest::sha256_of(b"never stored");
        let (name, tag): (RepositoryName, Tag) =
            ("library/none".parse().unwrap(), "1".parse().unwrap());
        assert_eq!(b.shared.blob_size(&digest).await.unwrap(), None);
        assert!(b.shared.get_blob(&digest, None).await.unwrap().is_none());
        assert!(b
            .shared
            .get_blob(&digest, Some(0..1))
            .await
            .unwrap()
            .is_none());
        assert!(b.shared.read_manifest(&digest).await.unwrap().is_none());
        assert!(b
            .shared
            .read_tag("docker.io", &name, &tag)
            .await
            .unwrap()
            .is_none());
        assert!(b
            .shared
            .read_object("_cachalot/none")
            .await
            .unwrap()
            .is_none());
        assert!(b.shared.list("blobs/").await.unwrap().is_empty());
        assert!(b.shared.repositories("docker.io").await.unwrap().is_empty());
        b.shared.delete(&blob_key(&digest)).await.unwrap();
    }

    pub async fn manifests_round_trip_with_their_media_type(b: &Backend) {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        let digest = Digest::sha256_of(body);
        b.shared
            .write_manifest(&digest, media::OCI_INDEX, body)
            .await
            .unwrap();
        let read = b.shared.read_manifest(&digest).await.unwrap().unwrap();
        assert_eq!(&read.bytes[..], body);
        assert_eq!(read.media_type, media::OCI_INDEX);
        assert_eq!(
            raw_keys(&*b.raw, PREFIX).await,
            [format!("{PREFIX}{}", manifest_key(&digest))]
        );
    }

    pub async fn a_corrupted_manifest_reads_as_corrupt_never_as_a_manifest(b: &Backend) {
        let body = br#"{"schemaVersion":2}"#;
        let digest = Digest::sha256_of(body);
        let path = Path::from(format!("{PREFIX}{}", manifest_key(&digest)));
        let mut flipped = body.to_vec();
        flipped[3] ^= 1;
        let mut wrong_bytes = format!("{}\n", media::OCI_MANIFEST).into_bytes();
        wrong_bytes.extend_from_slice(&flipped);
        for garbage in [b"garbage without a type line".to_vec(), wrong_bytes] {
            b.raw.put(&path, PutPayload::from(garbage)).await.unwrap();
            match b.shared.read_manifest(&digest).await {
                Err(SharedStoreError::Corrupt { key, .. }) => {
                    assert!(key.ends_with(digest.hex()), "{key}")
                }
                other => panic!("a corrupt manifest read as {other:?}"),
            }
        }
    }

    pub async fn tag_records_are_written_read_overwritten_and_listed(b: &Backend) {
        let digest = Digest::sha256_of(b"m1");
        let newer = Digest::sha256_of(b"m2");
        let name: RepositoryName = "library/alpine".parse().unwrap();
        let nested: RepositoryName = "team/tools/ci".parse().unwrap();
        let tag: Tag = "3.19".parse().unwrap();
        b.shared
            .write_tag("docker.io", &name, &tag, &tag_record(&digest, 1))
            .await
            .unwrap();
        assert_eq!(
            b.shared.read_tag("docker.io", &name, &tag).await.unwrap(),
            Some(tag_record(&digest, 1))
        );
        b.shared
            .write_tag("docker.io", &name, &tag, &tag_record(&newer, 2))
            .await
            .unwrap();
        assert_eq!(
            b.shared.read_tag("docker.io", &name, &tag).await.unwrap(),
            Some(tag_record(&newer, 2))
        );
        b.shared
            .write_tag("docker.io", &nested, &tag, &tag_record(&digest, 3))
            .await
            .unwrap();
        b.shared
            .write_tag("quay.io", &name, &tag, &tag_record(&digest, 4))
            .await
            .unwrap();
        assert_eq!(
            b.shared.repositories("docker.io").await.unwrap(),
            ["library/alpine", "team/tools/ci"]
        );
        assert_eq!(
            b.shared.repositories("quay.io").await.unwrap(),
            ["library/alpine"]
        );
    }

    pub async fn listing_names_keys_below_the_prefix_and_delete_removes_them(b: &Backend) {
        let dir = tempfile::tempdir().unwrap();
        let one = put_blob(&b.shared, dir.path(), b"one").await;
        let two = put_blob(&b.shared, dir.path(), b"two!").await;
        let before = now_secs();
        let mut listed = b.shared.list("blobs/").await.unwrap();
        listed.sort_by(|x, y| x.key.cmp(&y.key));
        let mut expected = vec![(blob_key(&one), 3), (blob_key(&two), 4)];
        expected.sort();
        assert_eq!(
            listed
                .iter()
                .map(|o| (o.key.clone(), o.size))
                .collect::<Vec<_>>(),
            expected
        );
        for object in &listed {
            assert!(
                object.modified + 120 > before && object.modified <= before + 120,
                "modified {} is not about now ({before})",
                object.modified
            );
        }
        b.shared.delete(&blob_key(&one)).await.unwrap();
        assert_eq!(b.shared.blob_size(&one).await.unwrap(), None);
        let left: Vec<String> = b
            .shared
            .list("blobs/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(left, [blob_key(&two)]);
    }

    pub async fn the_claim_accepts_its_owner_again_and_refuses_another(b: &Backend) {
        b.shared.claim("ns/mirror").await.unwrap();
        b.shared.claim("ns/mirror").await.unwrap();
        match b.shared.claim("ns/other").await {
            Err(e @ SharedStoreError::Claimed { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains("ns/mirror") && message.contains(PREFIX),
                    "{message}"
                );
            }
            other => panic!("a second owner was let in: {other:?}"),
        }
        // The refused claim changed nothing.
        b.shared.claim("ns/mirror").await.unwrap();
    }

    pub async fn a_short_local_file_aborts_the_multipart_upload_and_leaves_nothing(b: &Backend) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = pattern(3, MULTIPART_PART + (1 << 20));
        let file = dir.path().join("short");
        std::fs::write(&file, &bytes).unwrap();
        let declared = bytes.len() as u64 + (1 << 20);
        let digest = Digest::sha256_of(b"what the full file would hash to");
        match b.shared.put_blob_file(&digest, &file, declared).await {
            Err(SharedStoreError::ReadLocal { source, .. }) => {
                assert!(source.to_string().contains("of"), "{source}")
            }
            other => panic!("a short file was uploaded: {other:?}"),
        }
        assert_eq!(b.shared.blob_size(&digest).await.unwrap(), None);
        assert!(b.shared.list("").await.unwrap().is_empty());
        assert!(raw_keys(&*b.raw, PREFIX).await.is_empty());
        // Nor are its parts kept: the upload was aborted, not abandoned.
        if let Some(uploads) = b.uploads() {
            assert_eq!(uploads.list().await.unwrap(), []);
        }
    }

    pub async fn two_prefixes_in_one_bucket_do_not_see_each_others_objects(b: &Backend) {
        let dir = tempfile::tempdir().unwrap();
        let other = b.open(OTHER_PREFIX);
        let mine = put_blob(&b.shared, dir.path(), b"mine").await;
        let theirs = put_blob(&other, dir.path(), b"theirs").await;
        let name: RepositoryName = "library/x".parse().unwrap();
        let tag: Tag = "1".parse().unwrap();
        other
            .write_tag("docker.io", &name, &tag, &tag_record(&theirs, 1))
            .await
            .unwrap();
        b.shared.claim("owner-a").await.unwrap();
        other.claim("owner-b").await.unwrap();

        assert_eq!(b.shared.blob_size(&theirs).await.unwrap(), None);
        assert_eq!(other.blob_size(&mine).await.unwrap(), None);
        let mut listed: Vec<String> = b
            .shared
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        listed.sort();
        let mut expected = vec!["_cachalot/owner".to_owned(), blob_key(&mine)];
        expected.sort();
        assert_eq!(listed, expected);
        assert!(b.shared.repositories("docker.io").await.unwrap().is_empty());
        assert_eq!(
            other.repositories("docker.io").await.unwrap(),
            ["library/x"]
        );
        assert!(b
            .shared
            .read_tag("docker.io", &name, &tag)
            .await
            .unwrap()
            .is_none());
        // Deleting a key below one prefix leaves the other's object of that name alone.
        let same = put_blob(&other, dir.path(), b"mine").await;
        b.shared.delete(&blob_key(&mine)).await.unwrap();
        assert_eq!(other.blob_size(&same).await.unwrap(), Some(4));
    }

    pub async fn eviction_removes_the_least_recently_used_and_keeps_recent_and_pinned(b: &Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = &b.shared;
        let pinned = put_image(store, dir.path(), "library/pinned", "stable", 1, 1000).await;
        let old = put_image(store, dir.path(), "library/old", "1", 2, 1000).await;
        let used = put_image(store, dir.path(), "library/used", "1", 3, 1000).await;
        let recent = put_image(store, dir.path(), "library/recent", "1", 4, 1000).await;
        let total = pinned.size + old.size + used.size + recent.size;

        let mut pins = PinRules::default();
        pins.add("docker.io", "pinned:stable").unwrap();
        let protected = protected_keys(store, &pins).await.unwrap();
        assert_eq!(protected, pinned.keys.iter().cloned().collect());

        // The pass runs "an hour later", so every write is older than the grace period; what
        // orders the images is what replica `a` recorded using.
        let grace = Duration::from_secs(60);
        let now = now_secs() + 3600;
        let last_use = SharedLastUse::new();
        for key in &used.keys {
            last_use.note_at(key, now - 600);
        }
        for key in &recent.keys {
            last_use.note_at(key, now - 10);
        }
        assert_eq!(last_use.flush(store, "a").await.unwrap().written, 6);

        // Room for all but one image: the least recently used unpinned one goes.
        let pass = evict(store, total - old.size, &protected, grace, now)
            .await
            .unwrap();
        assert_eq!(pass.evicted, 3);
        assert_eq!(pass.total_after, total - old.size);
        assert_eq!(pass.protected_bytes, pinned.size);
        let left = content_keys(store).await;
        assert!(old.keys.iter().all(|k| !left.contains(k)), "old image kept");
        for image in [&pinned, &used, &recent] {
            assert!(
                image.keys.iter().all(|k| left.contains(k)),
                "{:?}",
                image.keys
            );
        }
        assert!(store
            .read_manifest(&pinned.manifest)
            .await
            .unwrap()
            .is_some());

        // A bound nothing but the pinned image fits: `used` goes (and its last-use entries are
        // pruned), `recent` (within the grace period) and the pinned image stay over the bound.
        let pass = evict(store, pinned.size, &protected, grace, now)
            .await
            .unwrap();
        assert_eq!(pass.evicted, 3);
        assert_eq!(pass.pruned, 3);
        assert_eq!(pass.total_after, pinned.size + recent.size);
        let left = content_keys(store).await;
        let expected: HashSet<String> = pinned.keys.iter().chain(&recent.keys).cloned().collect();
        assert_eq!(left, expected);
        let records = read_last_use(store, now, grace).await.unwrap();
        assert_eq!(records.len(), 1);
        let uses = records[0].uses.clone().unwrap();
        assert_eq!(
            uses.keys().cloned().collect::<HashSet<_>>(),
            recent.keys.iter().cloned().collect()
        );

        // Under the bound a pass deletes nothing.
        let pass = evict(store, total, &protected, grace, now).await.unwrap();
        assert_eq!(
            (pass.evicted, pass.total_after),
            (0, pinned.size + recent.size)
        );
    }

    pub async fn pins_reach_through_an_index_to_the_stored_children_and_their_blobs(b: &Backend) {
        let dir = tempfile::tempdir().unwrap();
        let store = &b.shared;
        let amd64 = put_image(store, dir.path(), "library/children", "amd64", 1, 100).await;
        let arm64 = put_image(store, dir.path(), "library/children", "arm64", 2, 100).await;
        let by_digest = put_image(store, dir.path(), "library/other", "1", 3, 100).await;
        let unpinned = put_image(store, dir.path(), "library/unpinned", "1", 4, 100).await;
        let never_stored = Digest::sha256_of(b"a child nobody pulled");
        let child = |digest: &Digest| serde_json::json!({"mediaType": media::OCI_MANIFEST, "digest": digest, "size": 1});
        let index_bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": [child(&amd64.manifest), child(&never_stored), child(&arm64.manifest)],
        }))
        .unwrap();
        let index = Digest::sha256_of(&index_bytes);
        store
            .write_manifest(&index, media::OCI_INDEX, &index_bytes)
            .await
            .unwrap();
        let (name, tag): (RepositoryName, Tag) =
            ("library/multi".parse().unwrap(), "stable".parse().unwrap());
        store
            .write_tag("docker.io", &name, &tag, &tag_record(&index, 1))
            .await
            .unwrap();

        let mut pins = PinRules::default();
        pins.add("docker.io", "multi:stable").unwrap();
        pins.add(
            "docker.io",
            &format!("library/other@{}", by_digest.manifest),
        )
        .unwrap();
        let protected = protected_keys(store, &pins).await.unwrap();
        let mut expected: HashSet<String> = amd64
            .keys
            .iter()
            .chain(&arm64.keys)
            .chain(&by_digest.keys)
            .cloned()
            .collect();
        expected.insert(manifest_key(&index));
        assert_eq!(protected, expected);
        assert!(unpinned.keys.iter().all(|k| !protected.contains(k)));
        assert!(protected_keys(store, &PinRules::default())
            .await
            .unwrap()
            .is_empty());
    }

    pub async fn last_use_survives_a_restart_and_flushes_write_each_use_twice(b: &Backend) {
        let dir = tempfile::tempdir().unwrap();
        // `first` is written first, so by its write time alone it would go first.
        let first = put_blob(&b.shared, dir.path(), &pattern(5, 1000)).await;
        let second = put_blob(&b.shared, dir.path(), &pattern(6, 1000)).await;
        let now = now_secs() + 3600;
        {
            let before_restart = SharedLastUse::new();
            before_restart.note_at(&blob_key(&first), now - 100);
            assert_eq!(
                before_restart.flush(&b.shared, "a").await.unwrap().written,
                1
            );
            // The next flush writes the same use again, the one after that nothing.
            assert_eq!(
                before_restart.flush(&b.shared, "a").await.unwrap().written,
                1
            );
            assert_eq!(
                before_restart.flush(&b.shared, "a").await.unwrap().written,
                0
            );
            assert_eq!(before_restart.pending(), 0);
        }
        // The replica restarts: a new client and no notes in memory. Its next flush merges
        // with the record instead of replacing it.
        let restarted = b.open(PREFIX);
        let notes = SharedLastUse::new();
        let third = put_blob(&restarted, dir.path(), &pattern(7, 1000)).await;
        notes.note_at(&blob_key(&third), now - 50);
        notes.flush(&restarted, "a").await.unwrap();
        let records = read_last_use(&restarted, now, Duration::from_secs(60))
            .await
            .unwrap();
        let uses = records[0].uses.clone().unwrap();
        assert_eq!(uses.get(&blob_key(&first)), Some(&(now - 100)));
        assert_eq!(uses.get(&blob_key(&third)), Some(&(now - 50)));

        let pass = evict(
            &restarted,
            2000,
            &HashSet::new(),
            Duration::from_secs(60),
            now,
        )
        .await
        .unwrap();
        assert_eq!(pass.evicted, 1);
        assert_eq!(restarted.blob_size(&second).await.unwrap(), None);
        assert!(restarted.blob_size(&first).await.unwrap().is_some());
    }

    pub async fn a_recent_corrupt_last_use_record_stops_eviction_and_an_old_one_is_dropped(
        b: &Backend,
    ) {
        let dir = tempfile::tempdir().unwrap();
        put_blob(&b.shared, dir.path(), &pattern(8, 1000)).await;
        b.shared
            .write_object("_cachalot/last-use/broken.json", b"{not json".to_vec())
            .await
            .unwrap();
        let grace = Duration::from_secs(60);
        let now = now_secs();
        let err = evict(&b.shared, 0, &HashSet::new(), grace, now + 30)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("broken.json"), "{err}");
        assert_eq!(b.shared.list("blobs/").await.unwrap().len(), 1);
        // An hour later the record cannot hold a use within the grace period.
        let pass = evict(&b.shared, 0, &HashSet::new(), grace, now + 3600)
            .await
            .unwrap();
        assert_eq!(pass.evicted, 1);
        assert!(b
            .shared
            .list("_cachalot/last-use/")
            .await
            .unwrap()
            .is_empty());
    }
}

/// One test per suite case and backend: `local_fs::<case>` and `garage::<case>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod local_fs {
            $(
                #[tokio::test]
                async fn $case() {
                    let backend = super::Backend::local();
                    super::suite::$case(&backend).await;
                }
            )*
        }
        mod garage {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(backend) = super::Backend::garage(stringify!($case)).await else {
                        return;
                    };
                    let started = std::time::Instant::now();
                    super::suite::$case(&backend).await;
                    eprintln!("{} on garage: {:?}", stringify!($case), started.elapsed());
                }
            )*
        }
    };
}

conformance!(
    blobs_go_up_in_one_put_or_in_parts_and_read_back_whole_and_ranged,
    missing_objects_read_as_none,
    manifests_round_trip_with_their_media_type,
    a_corrupted_manifest_reads_as_corrupt_never_as_a_manifest,
    tag_records_are_written_read_overwritten_and_listed,
    listing_names_keys_below_the_prefix_and_delete_removes_them,
    the_claim_accepts_its_owner_again_and_refuses_another,
    a_short_local_file_aborts_the_multipart_upload_and_leaves_nothing,
    two_prefixes_in_one_bucket_do_not_see_each_others_objects,
    eviction_removes_the_least_recently_used_and_keeps_recent_and_pinned,
    last_use_survives_a_restart_and_flushes_write_each_use_twice,
    pins_reach_through_an_index_to_the_stored_children_and_their_blobs,
    a_recent_corrupt_last_use_record_stops_eviction_and_an_old_one_is_dropped,
);

/// Runs `op` with a deadline well above the client's bounded retries; returns its outcome and
/// how long it took.
async fn bounded<T: std::fmt::Debug>(
    what: &str,
    op: impl std::future::Future<Output = Result<T, impl std::fmt::Display>>,
) -> Duration {
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(30), op)
        .await
        .unwrap_or_else(|_| panic!("{what} hung for 30 s against a stopped server"));
    let took = started.elapsed();
    match outcome {
        Ok(value) => panic!("{what} succeeded against a stopped server: {value:?}"),
        Err(e) => eprintln!("{what}: error after {took:?}: {e}"),
    }
    took
}

#[tokio::test]
async fn with_garage_stopped_every_operation_fails_within_seconds() {
    let Some(mut backend) =
        Backend::garage("with_garage_stopped_every_operation_fails_within_seconds").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = backend.shared.clone();
    let kept = put_blob(&store, dir.path(), b"stored before the outage").await;
    let Kind::Garage { garage, .. } = &mut backend.kind else {
        unreachable!()
    };
    garage.stop().await.unwrap();

    let small = dir.path().join("small");
    std::fs::write(&small, b"small").unwrap();
    let large = dir.path().join("large");
    std::fs::write(&large, pattern(9, MULTIPART_PART + 1)).unwrap();
    let digest = Digest::sha256_of(b"x");
    let (name, tag): (RepositoryName, Tag) = ("library/x".parse().unwrap(), "1".parse().unwrap());
    let mut pins = PinRules::default();
    pins.add("docker.io", "x:1").unwrap();
    let notes = SharedLastUse::new();
    notes.note(&blob_key(&kept));

    let mut slowest = Duration::ZERO;
    let mut took = |d: Duration| slowest = slowest.max(d);
    took(bounded("claim", store.claim("owner")).await);
    took(bounded("blob_size", store.blob_size(&kept)).await);
    took(
        bounded("get_blob", async {
            store.get_blob(&kept, None).await.map(|b| b.is_some())
        })
        .await,
    );
    took(
        bounded(
            "put_blob_file (one PUT)",
            store.put_blob_file(&digest, &small, 5),
        )
        .await,
    );
    took(
        bounded(
            "put_blob_file (multipart)",
            store.put_blob_file(&digest, &large, MULTIPART_PART as u64 + 1),
        )
        .await,
    );
    took(
        bounded("read_manifest", async {
            store.read_manifest(&digest).await.map(|m| m.is_some())
        })
        .await,
    );
    took(
        bounded(
            "write_manifest",
            store.write_manifest(&digest, "a/b", b"{}"),
        )
        .await,
    );
    took(bounded("read_tag", store.read_tag("docker.io", &name, &tag)).await);
    took(
        bounded(
            "write_tag",
            store.write_tag("docker.io", &name, &tag, &tag_record(&digest, 1)),
        )
        .await,
    );
    took(bounded("repositories", store.repositories("docker.io")).await);
    took(bounded("list", store.list("blobs/")).await);
    took(bounded("delete", store.delete(&blob_key(&kept))).await);
    took(bounded("flush last use", notes.flush(&store, "a")).await);
    took(
        bounded(
            "evict",
            evict(
                &store,
                0,
                &HashSet::new(),
                Duration::from_secs(60),
                now_secs(),
            ),
        )
        .await,
    );
    took(bounded("protected_keys", protected_keys(&store, &pins)).await);
    eprintln!("slowest failure: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(10),
        "an operation took {slowest:?} to fail"
    );
    // The failed flush kept its notes for the next try.
    assert_eq!(notes.pending(), 1);
}

#[tokio::test]
async fn wrong_keys_or_a_missing_bucket_fail_the_claim_with_the_reason() {
    if !garage_available("wrong_keys_or_a_missing_bucket_fail_the_claim_with_the_reason") {
        return;
    }
    let garage = start_garage().await;
    let dir = tempfile::tempdir().unwrap();

    let wrong_secret = "0".repeat(64);
    let config = s3_config_with(&garage, dir.path(), PREFIX, garage.bucket(), &wrong_secret);
    let err = SharedStore::from_config(&config)
        .unwrap()
        .claim("owner")
        .await
        .unwrap_err();
    let message = err.to_string();
    eprintln!("wrong secret: {message}");
    assert!(
        message.contains("403") && message.contains("AccessDenied"),
        "{message}"
    );

    let unknown_key = tempfile::tempdir().unwrap();
    let mut config = s3_config(&garage, unknown_key.path(), PREFIX);
    let id_file = config.access_key_id_file.take().unwrap();
    std::fs::write(&id_file, "GKnobody0000000000000000000").unwrap();
    config.access_key_id_file = Some(id_file);
    let err = SharedStore::from_config(&config)
        .unwrap()
        .claim("owner")
        .await
        .unwrap_err();
    let message = err.to_string();
    eprintln!("unknown key id: {message}");
    assert!(message.contains("403"), "{message}");

    let config = s3_config_with(
        &garage,
        dir.path(),
        PREFIX,
        "no-such-bucket",
        garage.secret_access_key(),
    );
    let err = SharedStore::from_config(&config)
        .unwrap()
        .claim("owner")
        .await
        .unwrap_err();
    let message = err.to_string();
    eprintln!("missing bucket: {message}");
    assert!(message.contains("NoSuchBucket"), "{message}");

    // The right keys and bucket claim the prefix.
    let config = s3_config(&garage, dir.path(), PREFIX);
    SharedStore::from_config(&config)
        .unwrap()
        .claim("owner")
        .await
        .unwrap();
}

#[tokio::test]
async fn abandoned_multipart_uploads_below_the_prefix_are_listed_and_aborted() {
    if !garage_available("abandoned_multipart_uploads_below_the_prefix_are_listed_and_aborted") {
        return;
    }
    let garage = start_garage().await;
    let keys = tempfile::tempdir().unwrap();
    let raw = raw_s3(&garage);
    // What a replica killed mid-upload leaves: an upload with a part, never completed.
    let abandoned = format!("{PREFIX}blobs/sha256/abandoned");
    let mut upload = raw
        .put_multipart(&Path::from(abandoned.as_str()))
        .await
        .unwrap();
    upload
        .put_part(PutPayload::from(pattern(1, 5 << 20)))
        .await
        .unwrap();
    drop(upload);
    let other_prefix = raw
        .put_multipart(&Path::from(format!("{OTHER_PREFIX}blobs/sha256/theirs")))
        .await
        .unwrap();
    drop(other_prefix);

    let uploads = MultipartUploads::from_config(&s3_config(&garage, keys.path(), PREFIX)).unwrap();
    let listed = uploads.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].key, abandoned);
    let now = now_secs();
    assert!(
        listed[0].initiated.abs_diff(now) < 120,
        "{listed:?} at {now}"
    );

    // Younger than the bound: kept.
    let started = Instant::now();
    assert_eq!(
        uploads
            .abort_stale_uploads(Duration::from_secs(3600), now)
            .await
            .unwrap(),
        0
    );
    assert_eq!(uploads.list().await.unwrap().len(), 1);
    assert_eq!(
        uploads
            .abort_stale_uploads(Duration::ZERO, now_secs())
            .await
            .unwrap(),
        1
    );
    eprintln!("listed and aborted in {:?}", started.elapsed());
    assert_eq!(uploads.list().await.unwrap(), []);
    // Nothing became readable at the key, and the other prefix's upload is not this mirror's.
    assert!(raw_keys(&raw, PREFIX).await.is_empty());
    let theirs =
        MultipartUploads::from_config(&s3_config(&garage, keys.path(), OTHER_PREFIX)).unwrap();
    assert_eq!(theirs.list().await.unwrap().len(), 1);
}
