//! A full disk: the cache storage on a 16 MiB tmpfs (mounted for the test, unmounted at the end;
//! needs root). When the cache cannot write, every client still gets the whole verified body
//! from the upstream, nothing partial stays on disk, cached content keeps being served, and
//! caching resumes once there is space again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cachalot_registry::config::Config;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{FaultProxy, Kind};
use cachalot_testkit::image::docker_image;
use common::{
    blob_file, committed, eventually, pull_verified, tags_never_revalidate, Cachalot, MIB,
};

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
        c.registries.get_mut("docker.io").unwrap().freshness = tags_never_revalidate();
    })
    .await;
    let url = cachalot.url();

    pull_verified(&url, "library/small", &small).await;
    committed(&storage, &small).await;

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
    committed(&storage, &big).await;
    fault.handle().reset_counts();
    assert!(pull_verified(&url, "library/big", &big)
        .await
        .iter()
        .all(|c| c == "HIT"));
    assert_eq!(fault.handle().counts().kind_total(Kind::Blob), 0);

    cachalot.stop().await;
    drop(tmpfs);
}
