//! The shared S3 storage rows of `cachalot-bench` (`--s3-only`, and the end of the full run when
//! `scripts/s3-server`'s Garage is there): cachalot-registry processes with `storage.s3` on a real
//! Garage, all on 127.0.0.1.
//!
//! - Warm blob GET throughput of the big layer (1 and 8 clients): from local disk (plain
//!   cachalot), from the S3 local read cache (the blob pulled once through a cachalot with
//!   `storage.s3`), and on a local-cache miss: a second cachalot on the same bucket prefix whose
//!   `localCacheMaxSizeBytes` is half the blob, so the blob is evicted right after each fetch and
//!   every measured run streams it from the bucket (hashing it and writing it to the local disk,
//!   as any miss does; 8 concurrent clients share one bucket read). Before each run the bench
//!   waits until the previous fetch's file is gone (committed and evicted), so nothing is served
//!   from disk. Beside it, the raw Garage GET throughput of the same object with object_store
//!   (the engine's limit), measured alternately with the misses.
//! - 3 replicas × 8 cold clients through a round-robin proxy: upstream blob bytes over the image's
//!   blob bytes, and upstream manifest GETs, counted by a `FaultProxy` in front of the upstream;
//!   cachalot (cluster + S3) against 3 distribution proxies behind the same kind of proxy, on
//!   shared S3 too (the Debian build has the `s3-aws` driver; blob redirects off, so bytes go
//!   through the proxies as with cachalot).
//! - The extra latency of a forwarded miss: cold GETs of distinct ~64 KiB blobs through a replica
//!   that does not own them (forwarded to the owner) against cold GETs through the owner.
//!
//! Every figure is printed; nothing is asserted. Every wait has a deadline and every loop a count.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cachalot_registry::config::{ClusterConfig, Config, RegistryConfig, S3Config};
use cachalot_registry::upstream::peers::rendezvous_order;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{FaultProxy, Kind};
use cachalot_testkit::image::{self, TestImage};
use cachalot_testkit::process::LoggedChild;
use cachalot_testkit::round_robin::RoundRobin;
use cachalot_testkit::s3::Garage;
use futures::StreamExt as _;
use object_store::{ObjectStore, ObjectStoreExt as _};

use super::{blob_throughput, client, get_blob, median, percentile, pull, Cachalot};

/// Repetitions of each throughput figure; the table shows the median.
const RUNS: usize = 5;
/// Content size of the one layer of each small image (the gzipped blob is a little larger).
const SMALL_BLOB: u64 = 64 * 1024;
/// Cold GETs through each path (owner, non-owner) that are measured.
const PER_PATH: usize = 50;
/// Cold GETs before those, not measured (connections, first requests).
const WARM_UP: usize = 10;
/// How long a replica or distribution may take to answer after its start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the bench waits for a blob to reach the bucket, or to leave a local read cache.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The owner every cachalot here claims its bucket prefix for (`storage.s3.owner`).
const OWNER: &str = "bench/mirror";

/// One row of the shared S3 table.
pub struct S3Row {
    what: String,
    cachalot: String,
    reference: String,
    ratio: String,
    goal: &'static str,
}

/// Prints the shared S3 table (markdown).
pub fn print_table(rows: &[S3Row]) {
    println!("\n| measurement (shared S3) | cachalot | reference | cachalot / reference | goal |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what, r.cachalot, r.reference, r.ratio, r.goal
        );
    }
}

/// Runs every shared S3 row against `upstream` (which has `library/big:latest` = `big`) on a
/// fresh Garage. Fails when Garage is not there (the caller checks first in the full run).
pub async fn rows(binary: &Path, upstream: &Distribution, big: &TestImage) -> Result<Vec<S3Row>> {
    eprintln!("starting Garage...");
    let bucket = Bucket::start().await?;
    let mut rows = Vec::new();
    eprintln!("shared S3: warm blob GET throughput...");
    rows.extend(read_rows(binary, &upstream.url(), &bucket, big).await?);
    eprintln!("shared S3: 3 replicas x 8 cold clients...");
    rows.extend(cluster_rows(binary, &upstream.url(), &bucket, big).await?);
    eprintln!("shared S3: forwarded miss latency...");
    rows.extend(forward_rows(binary, upstream, &bucket).await?);
    Ok(rows)
}

/// Garage, the files holding its keys, and an object_store client of its bucket.
struct Bucket {
    garage: Garage,
    keys: tempfile::TempDir,
    engine: Arc<dyn ObjectStore>,
}

impl Bucket {
    async fn start() -> Result<Bucket> {
        let garage = Garage::start().await?;
        let keys = tempfile::Builder::new()
            .prefix("cachalot-bench-keys")
            .tempdir()?;
        std::fs::write(keys.path().join("key-id"), garage.access_key_id())?;
        std::fs::write(keys.path().join("secret"), garage.secret_access_key())?;
        // The same client settings as the registry's (no total timeout: a large object streams
        // for seconds), so the engine figure is what the registry could get.
        let options = object_store::ClientOptions::new()
            .with_timeout_disabled()
            .with_connect_timeout(Duration::from_secs(5))
            .with_read_timeout(Duration::from_secs(30));
        let engine = object_store::aws::AmazonS3Builder::new()
            .with_client_options(options)
            .with_endpoint(garage.endpoint())
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_region(garage.region())
            .with_bucket_name(garage.bucket())
            .with_access_key_id(garage.access_key_id())
            .with_secret_access_key(garage.secret_access_key())
            .build()?;
        Ok(Bucket {
            garage,
            keys,
            engine: Arc::new(engine),
        })
    }

    /// `storage.s3` for a cachalot on `prefix` (ending in `/`).
    fn config(&self, prefix: &str, local_cache: Option<u64>) -> S3Config {
        S3Config {
            endpoint: Some(self.garage.endpoint()),
            bucket: self.garage.bucket().to_owned(),
            region: Some(self.garage.region().to_owned()),
            prefix: prefix.to_owned(),
            access_key_id_file: Some(self.keys.path().join("key-id")),
            secret_access_key_file: Some(self.keys.path().join("secret")),
            local_cache_max_size_bytes: local_cache,
            eviction_grace: None,
            owner: OWNER.to_owned(),
        }
    }

    /// The object key of blob `digest` (`sha256:<hex>`) under `prefix`.
    fn blob_path(prefix: &str, digest: &str) -> Result<object_store::path::Path> {
        let hex = digest
            .strip_prefix("sha256:")
            .with_context(|| format!("{digest} is not a sha256 digest"))?;
        Ok(object_store::path::Path::from(format!(
            "{prefix}blobs/sha256/{hex}"
        )))
    }

    /// Waits until the bucket holds `size` bytes at `path` (the registry publishes in the
    /// background after a fetch).
    async fn wait_for_object(&self, path: &object_store::path::Path, size: u64) -> Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(meta) = self.engine.head(path).await {
                if meta.size == size {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{path} did not reach the bucket within {SETTLE_TIMEOUT:?}")
    }
}

/// A `cachalot-registry` process with `storage.s3`, started from a config file.
struct Replica {
    // Before `dir`: the process is killed and reaped before its files go.
    _child: LoggedChild,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Replica {
    async fn start(
        binary: &Path,
        listen: SocketAddr,
        upstream: &str,
        s3: S3Config,
        cluster: Option<ClusterConfig>,
    ) -> Result<Replica> {
        let dir = tempfile::Builder::new()
            .prefix("cachalot-bench-replica")
            .tempdir()?;
        let mut config = Config {
            listen,
            // Replicas share 127.0.0.1: the admin listener (not read here) takes any free port.
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cluster,
            ..Config::default()
        };
        config.storage.path = dir.path().join("cache");
        config.storage.s3 = Some(s3);
        config.registries.insert(
            "docker.io".into(),
            RegistryConfig {
                url: Some(upstream.to_owned()),
                ..RegistryConfig::default()
            },
        );
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, serde_yaml::to_string(&config)?)?;
        let mut command = std::process::Command::new(binary);
        command.args(["serve", "--config"]).arg(&config_path).env(
            "RUST_LOG",
            std::env::var("CACHALOT_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        );
        let mut child = LoggedChild::spawn(&mut command, &dir.path().join("registry.log"))
            .with_context(|| format!("start {}", binary.display()))?;
        let probe = client();
        let url = format!("http://{listen}/readyz");
        let ready = child
            .wait_ready(START_TIMEOUT, Duration::from_millis(20), || {
                let request = probe.get(url.clone()).send();
                async move { request.await.is_ok_and(|r| r.status() == 200) }
            })
            .await;
        if let Err(e) = ready {
            bail!(
                "cachalot-registry on {listen} (storage.s3) did not start: {e}\n{}",
                child.log_tail()
            );
        }
        Ok(Replica {
            _child: child,
            addr: listen,
            dir,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn storage(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
}

fn loopback_port() -> Result<SocketAddr> {
    Ok(SocketAddr::from((
        [127, 0, 0, 1],
        cachalot_testkit::wait::free_port()?,
    )))
}

/// Waits until a cache at `storage` has committed blob `digest` (a pull's last byte can reach
/// the client before the commit).
async fn wait_committed(storage: &Path, digest: &str) -> Result<()> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let blob = storage.join("blobs/sha256").join(hex);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while Instant::now() < deadline {
        if blob.exists() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{digest} was not committed at {storage:?} within {SETTLE_TIMEOUT:?}")
}

/// Waits until a replica's local read cache no longer holds blob `digest` and no fetch is
/// writing a temp file: the previous fetch committed and was evicted, so the next GET misses.
async fn wait_evicted(storage: &Path, digest: &str) -> Result<()> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let blob = storage.join("blobs/sha256").join(hex);
    let tmp = storage.join("tmp");
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while Instant::now() < deadline {
        let fetching = std::fs::read_dir(&tmp).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("fetch-"))
        });
        if !fetching && !blob.exists() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{digest} stayed in the local read cache at {storage:?} for {SETTLE_TIMEOUT:?}")
}

/// GB/s of `clients` concurrent object_store GETs of `path` (`size` bytes each).
async fn engine_throughput(
    engine: &Arc<dyn ObjectStore>,
    path: &object_store::path::Path,
    clients: usize,
    size: u64,
) -> Result<f64> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (engine, path) = (Arc::clone(engine), path.clone());
            tokio::spawn(async move {
                let mut body = engine.get(&path).await?.into_stream();
                let mut n = 0u64;
                while let Some(chunk) = body.next().await {
                    n += chunk?.len() as u64;
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    for t in tasks {
        let n = t.await??;
        if n != size {
            bail!("short object_store read: {n} of {size}");
        }
    }
    Ok((size * clients as u64) as f64 / started.elapsed().as_secs_f64() / 1e9)
}

fn gbps(v: f64) -> String {
    format!("{v:.2} GB/s")
}

fn times(c: f64, r: f64) -> String {
    if r > 0.0 {
        format!("{:.2}x", c / r)
    } else {
        "-".into()
    }
}

/// Row 1: warm blob GET throughput from local disk, the S3 local read cache, and S3 itself.
/// Each pair compared in the table is measured alternately, run by run, so drift on the shared
/// machine affects both sides alike.
async fn read_rows(
    binary: &Path,
    upstream: &str,
    bucket: &Bucket,
    big: &TestImage,
) -> Result<Vec<S3Row>> {
    let layer = big.layers().first().context("the big image has a layer")?;
    let (digest, size) = (layer.digest.as_str(), layer.size);
    let counts = [1usize, 8];
    let c = client();

    // Local disk: plain cachalot, the blob pulled once and committed.
    let plain = Cachalot::start(binary, upstream).await?;
    pull(&c, &plain.url, "library/big", "latest", big).await?;
    wait_committed(&plain.storage(), digest).await?;
    // The S3 local read cache: a cachalot on S3, the blob pulled once, committed locally and
    // published to the bucket (so no upload runs while it is measured).
    let prefix = "bench-read/";
    let object = Bucket::blob_path(prefix, digest)?;
    let cached = Replica::start(
        binary,
        loopback_port()?,
        upstream,
        bucket.config(prefix, None),
        None,
    )
    .await?;
    let cached_url = cached.url();
    pull(&c, &cached_url, "library/big", "latest", big).await?;
    wait_committed(&cached.storage(), digest).await?;
    bucket.wait_for_object(&object, size).await?;
    let (mut local, mut read_cache) = (Vec::new(), Vec::new());
    for clients in counts {
        let (mut l, mut r) = (Vec::with_capacity(RUNS), Vec::with_capacity(RUNS));
        for _ in 0..RUNS {
            l.push(blob_throughput(&plain.url, "library/big", digest, clients, size).await?);
            r.push(blob_throughput(&cached_url, "library/big", digest, clients, size).await?);
        }
        local.push(median(l));
        read_cache.push(median(r));
    }
    drop((plain, cached));

    // S3 misses: another cachalot on the same prefix whose read cache cannot keep the blob,
    // against the engine: object_store GETs of the same object.
    let missing = Replica::start(
        binary,
        loopback_port()?,
        upstream,
        bucket.config(prefix, Some((size / 2).max(1))),
        None,
    )
    .await?;
    let (storage, missing_url) = (missing.storage(), missing.url());
    let (mut miss, mut engine) = (Vec::new(), Vec::new());
    for clients in counts {
        let (mut m, mut e) = (Vec::with_capacity(RUNS), Vec::with_capacity(RUNS));
        for _ in 0..RUNS {
            wait_evicted(&storage, digest).await?;
            m.push(blob_throughput(&missing_url, "library/big", digest, clients, size).await?);
            wait_evicted(&storage, digest).await?;
            e.push(engine_throughput(&bucket.engine, &object, clients, size).await?);
        }
        miss.push(median(m));
        engine.push(median(e));
    }
    drop(missing);

    let mib = size / (1024 * 1024);
    let mut rows = Vec::new();
    for (i, clients) in counts.iter().enumerate() {
        rows.push(S3Row {
            what: format!(
                "warm GET {mib} MiB blob, {clients} client(s): S3 local read cache \
                 (pulled once) vs local disk (plain cachalot), median of {RUNS}"
            ),
            cachalot: gbps(read_cache[i]),
            reference: format!("local disk {}", gbps(local[i])),
            ratio: times(read_cache[i], local[i]),
            goal: "read cache >= 0.9x local disk",
        });
    }
    for (i, clients) in counts.iter().enumerate() {
        let how = if *clients == 1 {
            "every GET streams from the bucket"
        } else {
            "the 8 GETs share one bucket read"
        };
        rows.push(S3Row {
            what: format!(
                "GET {mib} MiB blob, {clients} client(s): S3 miss (localCacheMaxSizeBytes = half \
                 the blob, evicted before each run: {how}, hashed, written to local disk) vs \
                 {clients} raw object_store GET(s) of the object, median of {RUNS}"
            ),
            cachalot: gbps(miss[i]),
            reference: format!("engine {}", gbps(engine[i])),
            ratio: times(miss[i], engine[i]),
            goal: "S3 miss ≈ engine",
        });
    }
    Ok(rows)
}

/// 8 concurrent cold pulls of `big` through `service`; fails on a short pull.
async fn eight_cold_pulls(service: &str, big: &TestImage) -> Result<()> {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (url, big) = (service.to_owned(), big.clone());
            tokio::spawn(async move { pull(&client(), &url, "library/big", "latest", &big).await })
        })
        .collect();
    for t in tasks {
        let got = t.await??;
        if got != big.total_bytes() {
            bail!("a pull got {got} bytes of {}", big.total_bytes());
        }
    }
    Ok(())
}

/// What the upstream saw: blob body bytes over the image's blob bytes, and manifest GETs.
fn upstream_cost(fault: &FaultProxy, big: &TestImage) -> (f64, u64) {
    let blob_bytes = fault
        .handle()
        .body_bytes()
        .get(&Kind::Blob)
        .copied()
        .unwrap_or(0);
    let image: u64 = big.all_blobs().iter().map(|b| b.size).sum();
    (
        blob_bytes as f64 / image.max(1) as f64,
        fault.handle().counts().get("GET", Kind::Manifest),
    )
}

/// A distribution pull-through proxy of `remote` storing in the shared bucket under `root`.
struct DistributionOnS3 {
    // Before `_dir`: the process is killed and reaped before its files go.
    _child: LoggedChild,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl DistributionOnS3 {
    async fn start(bucket: &Bucket, root: &str, remote: &str) -> Result<DistributionOnS3> {
        let binary = Path::new(cachalot_testkit::distribution::DEFAULT_BINARY);
        let dir = tempfile::Builder::new()
            .prefix("cachalot-bench-distribution")
            .tempdir()?;
        let addr = loopback_port()?;
        let quoted = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
        // `redirect.disable`: blobs are served through the proxy (as cachalot serves them), not
        // by redirecting clients to the bucket.
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  s3:\n    accesskey: {key}\n    secretkey: {secret}\n    \
             region: {region}\n    regionendpoint: {endpoint}\n    bucket: {bucket}\n    \
             rootdirectory: {root}\n    secure: false\n    v4auth: true\n  \
             redirect:\n    disable: true\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n  secret: cachalot-bench-secret\n\
             health:\n  storagedriver:\n    enabled: false\n\
             proxy:\n  remoteurl: {remote}\n",
            key = quoted(bucket.garage.access_key_id()),
            secret = quoted(bucket.garage.secret_access_key()),
            region = quoted(bucket.garage.region()),
            endpoint = quoted(&bucket.garage.endpoint()),
            bucket = quoted(bucket.garage.bucket()),
            root = quoted(root),
            addr = quoted(&addr.to_string()),
            remote = quoted(remote),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let mut command = std::process::Command::new(binary);
        command.arg("serve").arg(&config_path);
        // distribution lets `REGISTRY_*` override its config file, and the AWS SDK reads `AWS_*`
        // (an `AWS_CA_BUNDLE` makes it panic at start with its custom HTTP transport); the
        // bucket is plain HTTP on 127.0.0.1 with the keys above, so neither is wanted.
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("REGISTRY_") || name.starts_with("AWS_") {
                command.env_remove(key);
            }
        }
        let mut child = LoggedChild::spawn(&mut command, &dir.path().join("registry.log"))
            .with_context(|| format!("start {}", binary.display()))?;
        let probe = client();
        let url = format!("http://{addr}/v2/");
        let ready = child
            .wait_ready(START_TIMEOUT, Duration::from_millis(20), || {
                let request = probe.get(url.clone()).send();
                async move { request.await.is_ok() }
            })
            .await;
        if let Err(e) = ready {
            bail!(
                "distribution on {addr} (storage s3) did not start: {e}\n{}",
                child.log_tail()
            );
        }
        Ok(DistributionOnS3 {
            _child: child,
            addr,
            _dir: dir,
        })
    }
}

/// Row 2: 3 replicas × 8 cold clients through a round-robin proxy, cachalot and distribution.
async fn cluster_rows(
    binary: &Path,
    upstream: &str,
    bucket: &Bucket,
    big: &TestImage,
) -> Result<Vec<S3Row>> {
    // cachalot: 3 replicas, cluster + shared S3.
    let fault = FaultProxy::start(upstream).await?;
    let listens = (0..3)
        .map(|_| loopback_port())
        .collect::<Result<Vec<_>>>()?;
    let peers: Vec<String> = listens.iter().map(|a| format!("http://{a}")).collect();
    let mut replicas = Vec::new();
    for listen in &listens {
        let cluster = ClusterConfig {
            self_url: format!("http://{listen}"),
            peers: peers.clone(),
            peer_timeout: Duration::from_secs(2),
        };
        replicas.push(
            Replica::start(
                binary,
                *listen,
                &fault.url(),
                bucket.config("bench-cluster/", None),
                Some(cluster),
            )
            .await?,
        );
    }
    let service = RoundRobin::start(listens.clone()).await?;
    let started = Instant::now();
    eight_cold_pulls(&service.url(), big).await?;
    let cachalot_secs = started.elapsed().as_secs_f64();
    let cachalot = upstream_cost(&fault, big);
    let cachalot_spread = service.accepted();
    drop((service, replicas, fault));

    // distribution: 3 proxies on one shared S3 root.
    let fault = FaultProxy::start(upstream).await?;
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(DistributionOnS3::start(bucket, "/bench-distribution", &fault.url()).await?);
    }
    let service = RoundRobin::start(proxies.iter().map(|p| p.addr).collect()).await?;
    let started = Instant::now();
    eight_cold_pulls(&service.url(), big).await?;
    let distribution_secs = started.elapsed().as_secs_f64();
    let distribution = upstream_cost(&fault, big);
    let distribution_spread = service.accepted();
    drop((service, proxies, fault));

    Ok(vec![
        S3Row {
            what: format!(
                "3 replicas x 8 cold clients via round-robin: upstream blob bytes / image blob \
                 bytes (connections per replica: cachalot {cachalot_spread:?}, distribution \
                 {distribution_spread:?}; all 8 pulls took {cachalot_secs:.1} s / \
                 {distribution_secs:.1} s)"
            ),
            cachalot: format!("{:.2}", cachalot.0),
            reference: format!("distribution x3 on shared S3: {:.2}", distribution.0),
            ratio: "-".into(),
            goal: "cachalot = 1.00",
        },
        S3Row {
            what: "3 replicas x 8 cold clients via round-robin: upstream manifest GETs".into(),
            cachalot: cachalot.1.to_string(),
            reference: format!("distribution x3 on shared S3: {}", distribution.1),
            ratio: "-".into(),
            goal: "cachalot = 1",
        },
    ])
}

/// Row 3: cold GETs of small blobs through a non-owner (forwarded) against through the owner.
async fn forward_rows(
    binary: &Path,
    upstream: &Distribution,
    bucket: &Bucket,
) -> Result<Vec<S3Row>> {
    let total = WARM_UP + 2 * PER_PATH;
    let mut layers = Vec::with_capacity(total);
    for i in 0..total {
        let img = image::docker_image(5000 + i as u64, &[SMALL_BLOB])?;
        image::push(&upstream.url(), "library/tiny", &format!("t{i}"), &img).await?;
        let layer = img.layers().first().context("a one-layer image")?;
        layers.push((layer.digest.clone(), layer.size));
    }
    let listens = (0..3)
        .map(|_| loopback_port())
        .collect::<Result<Vec<_>>>()?;
    let peers: Vec<String> = listens.iter().map(|a| format!("http://{a}")).collect();
    let mut replicas = Vec::new();
    for listen in &listens {
        let cluster = ClusterConfig {
            self_url: format!("http://{listen}"),
            peers: peers.clone(),
            peer_timeout: Duration::from_secs(2),
        };
        replicas.push(
            Replica::start(
                binary,
                *listen,
                &upstream.url(),
                bucket.config("bench-forward/", None),
                Some(cluster),
            )
            .await?,
        );
    }
    let c = client();
    let (mut at_owner, mut forwarded) = (Vec::new(), Vec::new());
    // Alternating, so drift on the shared machine affects both paths alike.
    for (i, (digest, size)) in layers.iter().enumerate() {
        let order = rendezvous_order(digest, &peers);
        let via_owner = i % 2 == 0;
        // The owner, or the next replica in the order (which forwards to the owner).
        let target = *order
            .get(usize::from(!via_owner))
            .context("3 peers give an order of 3")?;
        let started = Instant::now();
        let n = get_blob(&c, target, "library/tiny", digest).await?;
        let elapsed = started.elapsed();
        if n != *size {
            bail!("short read of {digest} through {target}: {n} of {size}");
        }
        if i < WARM_UP {
            continue;
        }
        if via_owner {
            at_owner.push(elapsed);
        } else {
            forwarded.push(elapsed);
        }
    }
    drop(replicas);
    at_owner.sort();
    forwarded.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (o50, o90) = (
        ms(percentile(&at_owner, 0.5)),
        ms(percentile(&at_owner, 0.9)),
    );
    let (f50, f90) = (
        ms(percentile(&forwarded, 0.5)),
        ms(percentile(&forwarded, 0.9)),
    );
    Ok(vec![S3Row {
        what: format!(
            "cold GET of a ~64 KiB blob (a 64 KiB layer, gzipped), {} distinct blobs per path, p50 (p90): through a \
             non-owner replica (forwarded to the owner) vs through the owner",
            at_owner.len().min(forwarded.len())
        ),
        cachalot: format!("forwarded {f50:.1} ms ({f90:.1} ms)"),
        reference: format!("owner {o50:.1} ms ({o90:.1} ms)"),
        ratio: format!("{:+.1} ms at p50", f50 - o50),
        goal: "report (no target)",
    }])
}
