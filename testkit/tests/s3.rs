//! The testkit's S3 server (Garage 2.5.0) driven through `object_store`, the client the registry
//! will use: put and get, ranged reads, listing by prefix, multipart upload completed and aborted,
//! and persistence across a restart. Skips (`SKIPPED <test>: <reason>`) when `scripts/s3-server`
//! has not been run, and fails instead under `CACHALOT_E2E_LOCAL=required`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Instant;

use cachalot_testkit::prerequisites;
use cachalot_testkit::s3::{garage_binary, Garage};
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Whether the Garage binary is there; otherwise skip, or fail when the suite is required.
fn prerequisites_or_skip(test: &str) -> bool {
    prerequisites::run_or_skip(test, garage_binary().err().map(|e| e.to_string()))
}

/// A started Garage, reporting how long the start took.
async fn start_garage() -> Garage {
    let started = Instant::now();
    let garage = Garage::start().await.unwrap();
    eprintln!(
        "garage ready on {} in {:?}",
        garage.endpoint(),
        started.elapsed()
    );
    garage
}

/// An `object_store` client for `garage`'s bucket (path-style, plain HTTP on loopback).
fn store(garage: &Garage) -> Arc<AmazonS3> {
    // reqwest is built without a default TLS provider in this workspace.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(garage.endpoint())
            .with_allow_http(true)
            .with_region(garage.region())
            .with_bucket_name(garage.bucket())
            .with_access_key_id(garage.access_key_id())
            .with_secret_access_key(garage.secret_access_key())
            .build()
            .unwrap(),
    )
}

/// `len` deterministic bytes, different per `seed`.
fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn list(store: &AmazonS3, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = store
        .list(Some(&Path::from(prefix)))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    names.sort();
    names
}

#[tokio::test]
async fn objects_put_get_range_and_list() {
    if !prerequisites_or_skip("objects_put_get_range_and_list") {
        return;
    }
    let garage = start_garage().await;
    let store = store(&garage);
    let body = bytes(1, 100_000);
    let blob = Path::from("blobs/sha256/aa/one");
    store
        .put(&blob, PutPayload::from(body.clone()))
        .await
        .unwrap();
    store
        .put(
            &Path::from("blobs/sha256/bb/two"),
            PutPayload::from(bytes(2, 10)),
        )
        .await
        .unwrap();
    store
        .put(&Path::from("manifests/x"), PutPayload::from(bytes(3, 10)))
        .await
        .unwrap();

    let read = store.get(&blob).await.unwrap().bytes().await.unwrap();
    assert_eq!(read.as_ref(), body.as_slice());
    assert_eq!(store.head(&blob).await.unwrap().size, 100_000);

    let range = store.get_range(&blob, 1000..5000).await.unwrap();
    assert_eq!(range.as_ref(), &body[1000..5000]);

    assert_eq!(
        list(&store, "blobs").await,
        ["blobs/sha256/aa/one", "blobs/sha256/bb/two"]
    );
    assert_eq!(list(&store, "manifests").await, ["manifests/x"]);
    assert!(list(&store, "nothing").await.is_empty());

    let missing = store.get(&Path::from("blobs/missing")).await.unwrap_err();
    assert!(
        matches!(missing, object_store::Error::NotFound { .. }),
        "{missing}"
    );
}

#[tokio::test]
async fn multipart_uploads_complete_or_abort_without_a_trace() {
    if !prerequisites_or_skip("multipart_uploads_complete_or_abort_without_a_trace") {
        return;
    }
    let garage = start_garage().await;
    let store = store(&garage);
    // S3 requires every part but the last to be at least 5 MiB.
    let first = bytes(4, 5 << 20);
    let second = bytes(5, 1 << 20);

    let done = Path::from("uploads/done");
    let mut upload = store.put_multipart(&done).await.unwrap();
    upload
        .put_part(PutPayload::from(first.clone()))
        .await
        .unwrap();
    upload
        .put_part(PutPayload::from(second.clone()))
        .await
        .unwrap();
    upload.complete().await.unwrap();
    let read = store.get(&done).await.unwrap().bytes().await.unwrap();
    assert_eq!(read.len(), first.len() + second.len());
    assert!(read[..first.len()] == first[..] && read[first.len()..] == second[..]);
    // A ranged read across the part boundary.
    let boundary = first.len() as u64;
    let across = store
        .get_range(&done, boundary - 10..boundary + 10)
        .await
        .unwrap();
    assert_eq!(&across[..10], &first[first.len() - 10..]);
    assert_eq!(&across[10..], &second[..10]);

    let aborted = Path::from("uploads/aborted");
    let mut upload = store.put_multipart(&aborted).await.unwrap();
    upload.put_part(PutPayload::from(first)).await.unwrap();
    upload.abort().await.unwrap();
    assert!(matches!(
        store.head(&aborted).await,
        Err(object_store::Error::NotFound { .. })
    ));
    assert_eq!(list(&store, "uploads").await, ["uploads/done"]);
}

#[tokio::test]
async fn objects_survive_a_restart() {
    if !prerequisites_or_skip("objects_survive_a_restart") {
        return;
    }
    let mut garage = start_garage().await;
    let store = store(&garage);
    let body = bytes(6, 300_000);
    let kept = Path::from("kept/object");
    store
        .put(&kept, PutPayload::from(body.clone()))
        .await
        .unwrap();
    let old_pid = garage.pid().unwrap();

    let started = Instant::now();
    garage.restart().await.unwrap();
    eprintln!("garage restarted in {:?}", started.elapsed());
    assert_ne!(garage.pid(), Some(old_pid));
    assert!(!std::path::Path::new(&format!("/proc/{old_pid}")).exists());

    // The same client: same endpoint, bucket and key after the restart.
    let read = store.get(&kept).await.unwrap().bytes().await.unwrap();
    assert_eq!(read.as_ref(), body.as_slice());
    assert_eq!(list(&store, "kept").await, ["kept/object"]);

    garage.stop().await.unwrap();
    assert_eq!(garage.pid(), None);
    assert!(
        std::net::TcpStream::connect(garage.s3_addr()).is_err(),
        "a stopped Garage still listens"
    );
    assert!(garage.data_dir().is_dir(), "the data dir outlives a stop");
}
