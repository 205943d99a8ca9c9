//! A full disk: the cache storage on a 16 MiB tmpfs (mounted for the test, unmounted at the end;
//! needs root). When the cache cannot write, every client still gets the whole verified body
//! from the upstream, nothing partial stays on disk, cached content keeps being served, and
//! caching resumes once there is space again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cachalot_registry::config::{Config, FreshnessRule};
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{FaultProxy, Kind};
use cachalot_testkit::image::{docker_image, sha256_digest, TestImage};
use common::{client, eventually, get_manifest, Cachalot, MIB};

/// A tmpfs mounted on a directory for the life of the value.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds a file open: detach it now, it goes when released.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
    }
}

/// Fills the file system holding `path` with a file there, leaving about `leave` bytes free.
fn fill(path: &Path, leave: u64) {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a_u8; 256 * 1024];
    // 16 MiB of tmpfs takes at most 64 chunks; the bound only guards against a bigger mount.
    for _ in 0..1024 {
        if file.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = file.flush();
    let full = file.metadata().unwrap().len();
    file.set_len(full.saturating_sub(leave)).unwrap();
}

fn blob_file(storage: &Path, digest: &str) -> PathBuf {
    storage
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// Pulls `repo:1` and checks every digest and length; returns the `X-Cache` of each response.
async fn pull_verified(base: &str, repo: &str, img: &TestImage) -> Vec<String> {
    let m = get_manifest(base, repo, "1").await;
    assert_eq!(m.status(), 200, "{repo}");
    let mut caches = vec![m.headers()["x-cache"].to_str().unwrap().to_owned()];
    assert_eq!(
        sha256_digest(&m.bytes().await.unwrap()),
        img.manifest_digest
    );
    for blob in img.all_blobs() {
        let r = client()
            .get(format!("{base}/v2/{repo}/blobs/{}", blob.digest))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{repo} {}", blob.digest);
        caches.push(r.headers()["x-cache"].to_str().unwrap().to_owned());
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len() as u64, blob.size);
        assert_eq!(sha256_digest(&body), blob.digest);
    }
    caches
}

fn cache_write_failures(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("cachalot_registry_cache_write_failures_total{registry=\"docker.io\"}")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_serves_every_client_verified_content_and_caching_resumes_with_space() {
    let upstream = Distribution::start().await.unwrap();
    let fault = FaultProxy::start(&upstream.url()).await.unwrap();
    let small = docker_image(961, &[MIB]).unwrap();
    let big = docker_image(962, &[6 * MIB, 3 * MIB]).unwrap();
    for (repo, img) in [("library/small", &small), ("library/big", &big)] {
        cachalot_testkit::image::push(&upstream.url(), repo, "1", img)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("cache");
    let tmpfs = Tmpfs::mount(&storage, "16m");
    let cachalot = Cachalot::start(storage.clone(), &fault.url(), |c: &mut Config| {
        c.registries.get_mut("docker.io").unwrap().freshness = vec![FreshnessRule {
            pattern: "*".into(),
            repository: None,
            max_age: None,
            immutable: true,
        }];
    })
    .await;
    let url = cachalot.url();

    pull_verified(&url, "library/small", &small).await;
    eventually(Duration::from_secs(10), "small committed", || async {
        small
            .all_blobs()
            .iter()
            .all(|b| blob_file(&storage, &b.digest).exists())
    })
    .await;

    // The disk fills up with half a MiB left: the big layers' writes fail part-way.
    let filler = storage.join("filler");
    fill(&filler, 512 * 1024);
    assert_eq!(cache_write_failures(&cachalot.metrics().await), 0);
    let pulls: Vec<_> = (0..3)
        .map(|_| {
            let (url, big) = (url.clone(), big.clone());
            tokio::spawn(async move { pull_verified(&url, "library/big", &big).await })
        })
        .collect();
    for p in pulls {
        p.await.unwrap();
    }
    // Not cached, so a second pull fetches again, and is just as whole.
    assert!(pull_verified(&url, "library/big", &big)
        .await
        .iter()
        .skip(1)
        .any(|c| c == "MISS"));
    assert!(cache_write_failures(&cachalot.metrics().await) > 0);
    eventually(
        Duration::from_secs(10),
        "the partial files removed",
        || async { std::fs::read_dir(storage.join("tmp")).unwrap().count() == 0 },
    )
    .await;
    for layer in big.layers() {
        assert!(!blob_file(&storage, &layer.digest).exists());
    }

    // What is cached is still served from the cache.
    fault.handle().reset_counts();
    assert!(pull_verified(&url, "library/small", &small)
        .await
        .iter()
        .all(|c| c == "HIT"));
    assert_eq!(fault.handle().counts().total(), 0);

    // Space again: the next fetch caches, and the one after is served from the cache.
    std::fs::remove_file(&filler).unwrap();
    pull_verified(&url, "library/big", &big).await;
    eventually(Duration::from_secs(10), "big committed", || async {
        big.all_blobs()
            .iter()
            .all(|b| blob_file(&storage, &b.digest).exists())
    })
    .await;
    fault.handle().reset_counts();
    assert!(pull_verified(&url, "library/big", &big)
        .await
        .iter()
        .all(|c| c == "HIT"));
    assert_eq!(fault.handle().counts().kind_total(Kind::Blob), 0);

    cachalot.stop().await;
    drop(tmpfs);
}
