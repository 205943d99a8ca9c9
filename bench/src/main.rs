//! `cachalot-bench`: runs distribution's pull-through proxy (Debian `docker-registry`, proxy mode)
//! and cachalot-registry side by side against the same real distribution upstream on 127.0.0.1,
//! and prints figures and ratios. Every loop is bounded by a request count; nothing here asserts
//! timings: the table is for people (and the docs), not for pass/fail.
//!
//! Scale rows: start-up with `--objects` cached objects (time until a cached blob is served, and
//! index memory per object from the RSS against an empty store; distribution builds no index, so
//! it has no figure there), and `--connections` concurrent client connections each reading a
//! cached 1 MiB blob (errors, time, peak RSS of each proxy). The objects are written to
//! `/dev/shm` when it exists (no disk), and the bench checks its open-files limit first.
//!
//! Shared S3 rows (`--s3-only`, and a second table at the end of the full run when
//! `scripts/s3-server`'s Garage is there; skipped with a note otherwise): see [`shared_s3`].
//!
//! Run: `cargo build --release -p cachalot-registry -p cachalot-bench && target/release/cachalot-bench`

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cachalot_testkit::distribution::{Distribution, DistributionOptions};
use cachalot_testkit::fault::{Fault, FaultProxy, FaultRule, Kind, RateLimit, TokenAuth};
use cachalot_testkit::image::{self, TestImage};
use clap::Parser;

mod shared_s3;
mod tls;

#[derive(Debug, Parser)]
#[command(about = "cachalot-registry vs distribution proxy, side by side on 127.0.0.1")]
struct Args {
    /// The cachalot-registry binary to benchmark (a release build).
    #[arg(long, default_value = "target/release/cachalot-registry")]
    cachalot: PathBuf,
    /// Size of the big layer in MiB.
    #[arg(long, default_value_t = 200)]
    size_mib: u64,
    /// Sequential HEAD-by-tag requests for the latency figure.
    #[arg(long, default_value_t = 1000)]
    heads: usize,
    /// GET-by-tag requests for the throughput figure (spread over 8 clients).
    #[arg(long, default_value_t = 4000)]
    gets: usize,
    /// Only measure the cold pull (quick check while tuning the fetch path).
    #[arg(long)]
    cold_only: bool,
    /// Only the cold pull table rows and the cached blob throughput (quick check while tuning
    /// the read path; with `--cold-runs 1` it is mostly the throughput).
    #[arg(long)]
    warm_only: bool,
    /// Cold pulls per proxy, each with freshly started proxies and empty caches, the two proxies
    /// taking turns at going first; the table shows the median and the spread (a single cold
    /// pull on 2 shared cores varies by ±50 %).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    cold_runs: u32,
    /// Cached objects in the store for the start-up row.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    objects: u64,
    /// Concurrent client connections on a cached blob.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=5000))]
    connections: u64,
    /// Only the scale rows (start-up with many objects, many connections).
    #[arg(long)]
    scale_only: bool,
    /// Only the shared S3 storage rows (Garage from `scripts/s3-server`; see `shared_s3`).
    #[arg(long)]
    s3_only: bool,
    /// Only the TLS rows: the same binary over plain HTTP and over TLS (see `tls`).
    #[arg(long)]
    tls_only: bool,
}

/// A cachalot-registry child process.
struct Cachalot {
    child: tokio::process::Child,
    url: String,
    /// The admin listener (`/admin/warm`, `/stats`).
    admin_url: String,
    _dir: tempfile::TempDir,
}

impl Cachalot {
    async fn start(binary: &Path, upstream: &str) -> Result<Cachalot> {
        let dir = tempfile::tempdir()?;
        let storage = dir.path().join("cache");
        let (child, url, admin_url) = spawn_cachalot(binary, upstream, &storage)?;
        wait_ready(&url).await?;
        Ok(Cachalot {
            child,
            url,
            admin_url,
            _dir: dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Its cache directory (`--storage`).
    fn storage(&self) -> PathBuf {
        self._dir.path().join("cache")
    }

    /// Makes a cached tag look last checked long ago, so the next request revalidates it.
    fn age_tag(&self, repo: &str, tag: &str) -> Result<()> {
        let path = self
            ._dir
            .path()
            .join("cache/repositories/docker.io")
            .join(repo)
            .join("_tags")
            .join(format!("{tag}.json"));
        let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        record["checkedAt"] = serde_json::json!(0);
        std::fs::write(&path, serde_json::to_vec(&record)?)?;
        Ok(())
    }
}

/// Starts cachalot-registry on `storage` (not waiting for it) and returns it with its public
/// and admin URLs.
fn spawn_cachalot(
    binary: &Path,
    upstream: &str,
    storage: &Path,
) -> Result<(tokio::process::Child, String, String)> {
    let port = cachalot_testkit::wait::free_port()?;
    let admin_port = cachalot_testkit::wait::free_port()?;
    let child = tokio::process::Command::new(binary)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
            "--storage",
        ])
        .arg(storage)
        .arg("--upstream")
        .arg(format!("docker.io={upstream}"))
        // CACHALOT_BENCH_LOG=debug shows the registry's logs while tuning.
        .env(
            "RUST_LOG",
            std::env::var("CACHALOT_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::null())
        .stdout(if std::env::var_os("CACHALOT_BENCH_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "start {} (build it with cargo build --release -p cachalot-registry)",
                binary.display()
            )
        })?;
    Ok((
        child,
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{admin_port}"),
    ))
}

async fn wait_ready(url: &str) -> Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut delay = Duration::from_millis(10);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{url}/v2/")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
    bail!("{url} did not become ready within 20s")
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the state field.
    (ticks(11) + ticks(12)) / 100.0
}

/// Waits until none of `pids` uses CPU any more (its CPU time unchanged over 200 ms; at most
/// 10 s), then flushes dirty pages: a proxy still writing or committing the previous pull, or
/// the kernel writing back its file, must not be charged to the pull measured next.
async fn settle(pids: &[u32]) {
    let total = || pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
    let mut last = total();
    let mut quiet = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = total();
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
        if quiet >= 2 {
            break;
        }
    }
    let _ = tokio::process::Command::new("sync").status().await;
}

/// (VmRSS, VmHWM) of a process in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .build()
        .unwrap_or_default()
}

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Reads a blob fully and returns its length.
async fn get_blob(client: &reqwest::Client, base: &str, repo: &str, digest: &str) -> Result<u64> {
    let mut r = client
        .get(format!("{base}/v2/{repo}/blobs/{digest}"))
        .send()
        .await?
        .error_for_status()?;
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await? {
        n += chunk.len() as u64;
    }
    Ok(n)
}

/// A whole pull as a client does it: manifest by tag, then config and layers.
async fn pull(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    img: &TestImage,
) -> Result<u64> {
    let m = client
        .get(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("accept", ACCEPT)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let mut total = m.len() as u64;
    for blob in img.all_blobs() {
        total += get_blob(client, base, repo, &blob.digest).await?;
    }
    Ok(total)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn head_latencies(
    base: &str,
    repo: &str,
    tag: &str,
    n: usize,
) -> Result<(Duration, Duration)> {
    let c = client();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.head(format!("{base}/v2/{repo}/manifests/{tag}"))
            .header("accept", ACCEPT)
            .send()
            .await?
            .error_for_status()?;
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok((percentile(&samples, 0.5), percentile(&samples, 0.99)))
}

async fn get_by_tag_rate(base: &str, repo: &str, tag: &str, total: usize) -> Result<f64> {
    let per_client = total / 8;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (base, repo, tag) = (base.to_owned(), repo.to_owned(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..per_client {
                c.get(format!("{base}/v2/{repo}/manifests/{tag}"))
                    .header("accept", ACCEPT)
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((per_client * 8) as f64 / started.elapsed().as_secs_f64())
}

async fn blob_throughput(
    base: &str,
    repo: &str,
    digest: &str,
    clients: usize,
    size: u64,
) -> Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (base, repo, digest) = (base.to_owned(), repo.to_owned(), digest.to_owned());
        tasks.push(tokio::spawn(async move {
            get_blob(&client(), &base, &repo, &digest).await
        }));
    }
    for t in tasks {
        let n = t.await??;
        if n != size {
            bail!("short read: {n} of {size}");
        }
    }
    Ok((size * clients as u64) as f64 / started.elapsed().as_secs_f64() / 1e9)
}

/// Where the start-up row's objects go: `/dev/shm` when it exists, so 100 000 files cost no disk.
fn objects_dir() -> Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix("cachalot-bench").clone();
    Ok(if shm.is_dir() {
        builder.tempdir_in(shm)?
    } else {
        builder.tempdir()?
    })
}

/// Fills `storage` with `n` small verified blobs laid out as cachalot stores them; returns the
/// digest of the first one.
fn fill_store(storage: &Path, n: u64) -> Result<String> {
    use sha2::Digest as _;
    let blobs = storage.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let mut first = None;
    for i in 0..n {
        let body = format!("cachalot bench object {i}\n");
        let hex = hex::encode(sha2::Sha256::digest(body.as_bytes()));
        std::fs::write(blobs.join(&hex), body)?;
        first.get_or_insert(hex);
    }
    Ok(format!("sha256:{}", first.context("at least one object")?))
}

/// Starts cachalot on `storage` and returns (seconds until `digest` was served from the cache,
/// RSS in MiB once it was), then stops it.
async fn startup_to_first_hit(
    binary: &Path,
    upstream: &str,
    storage: &Path,
    digest: &str,
) -> Result<(f64, f64)> {
    let started = Instant::now();
    let (mut child, url, _admin) = spawn_cachalot(binary, upstream, storage)?;
    let c = client();
    let blob = format!("{url}/v2/library/any/blobs/{digest}");
    let deadline = started + Duration::from_secs(60);
    loop {
        if let Ok(r) = c.get(&blob).send().await {
            if r.status().is_success() && r.headers().get("x-cache").is_some_and(|v| v == "HIT") {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("{url} served no cached blob within 60s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (rss, _) = memory_mib(child.id().unwrap_or(0));
    child.kill().await?;
    Ok((elapsed, rss))
}

/// The soft open-files limit of this process (children inherit it).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `n` clients, each on its own connection, read a cached blob at once. Returns (failed reads,
/// seconds until all finished).
async fn connection_burst(base: &str, repo: &str, digest: &str, size: u64, n: u64) -> (u64, f64) {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap_or_default();
    let barrier = Arc::new(tokio::sync::Barrier::new(usize::try_from(n).unwrap_or(1)));
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, barrier) = (c.clone(), Arc::clone(&barrier));
            let url = format!("{base}/v2/{repo}/blobs/{digest}");
            tokio::spawn(async move {
                barrier.wait().await;
                let read = async {
                    let mut r = c.get(&url).send().await?.error_for_status()?;
                    let mut got = 0u64;
                    while let Some(chunk) = r.chunk().await? {
                        got += chunk.len() as u64;
                    }
                    anyhow::Ok(got)
                };
                matches!(tokio::time::timeout(Duration::from_secs(120), read).await, Ok(Ok(got)) if got == size)
            })
        })
        .collect();
    let mut failed = 0;
    for t in tasks {
        if !matches!(t.await, Ok(true)) {
            failed += 1;
        }
    }
    (failed, started.elapsed().as_secs_f64())
}

/// The scale rows (see the module header).
async fn scale_rows(args: &Args, upstream: &str, small: &TestImage) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    // Start-up with many cached objects, against an empty store.
    eprintln!("writing {} cached objects...", args.objects);
    let dir = objects_dir()?;
    let full = dir.path().join("full");
    let first = fill_store(&full, args.objects)?;
    let empty = dir.path().join("empty");
    let empty_digest = fill_store(&empty, 1)?;
    let (_, rss_empty) =
        startup_to_first_hit(&args.cachalot, upstream, &empty, &empty_digest).await?;
    let (secs, rss_full) = startup_to_first_hit(&args.cachalot, upstream, &full, &first).await?;
    let per_object = (rss_full - rss_empty).max(0.0) * 1024.0 * 1024.0 / args.objects as f64;
    rows.push(Row {
        what: format!(
            "start-up to first cached blob served, {} objects",
            args.objects
        ),
        distribution: "n/a (no index)".into(),
        cachalot: format!("{secs:.2} s"),
        ratio: "-".into(),
        target: "<= 2 s",
    });
    rows.push(Row {
        what: format!(
            "RSS after start-up, {} objects (empty store {rss_empty:.1} MiB)",
            args.objects
        ),
        distribution: "n/a".into(),
        cachalot: format!("{rss_full:.1} MiB, {per_object:.0} B/object"),
        ratio: "-".into(),
        target: "",
    });
    drop(dir);

    // Many connections on a cached blob, each proxy freshly started (so the peak is this burst).
    let mut connections = args.connections;
    if let Some(limit) = open_files_limit() {
        // Client and server sockets share the limit (children inherit it), plus some slack.
        let fits = limit.saturating_sub(256) / 2;
        if fits < connections {
            eprintln!("open-files limit {limit} allows {fits} connections, not {connections}");
            connections = fits.max(1);
        }
    }
    let layer = &small.layers()[0];
    let dist = start_distribution_proxy(upstream).await?;
    let cach = Cachalot::start(&args.cachalot, upstream).await?;
    let c = client();
    pull(&c, &dist.url(), "library/small", "latest", small).await?;
    pull(&c, &cach.url, "library/small", "latest", small).await?;
    let (d_rss_before, _) = memory_mib(dist.pid());
    let (c_rss_before, _) = memory_mib(cach.pid());
    let (d_failed, d_secs) = connection_burst(
        &dist.url(),
        "library/small",
        &layer.digest,
        layer.size,
        connections,
    )
    .await;
    let (c_failed, c_secs) = connection_burst(
        &cach.url,
        "library/small",
        &layer.digest,
        layer.size,
        connections,
    )
    .await;
    let (d_after, d_peak) = memory_mib(dist.pid());
    let (c_after, c_peak) = memory_mib(cach.pid());
    rows.push(Row {
        what: format!("{connections} connections x cached 1 MiB blob: failed, seconds"),
        distribution: format!("{d_failed}, {d_secs:.2} s"),
        cachalot: format!("{c_failed}, {c_secs:.2} s"),
        ratio: if d_secs > 0.0 {
            format!("{:.2}x", c_secs / d_secs)
        } else {
            "-".into()
        },
        target: "0 failed",
    });
    rows.push(Row {
        what: format!("RSS before / peak / after, {connections} connections"),
        distribution: format!("{d_rss_before:.1} / {d_peak:.1} / {d_after:.1} MiB"),
        cachalot: format!("{c_rss_before:.1} / {c_peak:.1} / {c_after:.1} MiB"),
        ratio: if d_peak > 0.0 {
            format!("{:.2}x", c_peak / d_peak)
        } else {
            "-".into()
        },
        target: "bounded",
    });
    Ok(rows)
}

fn print_table(rows: &[Row]) {
    println!("\n| measurement | distribution proxy | cachalot | cachalot/distribution | target |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what, r.distribution, r.cachalot, r.ratio, r.target
        );
    }
}

struct Row {
    what: String,
    distribution: String,
    cachalot: String,
    ratio: String,
    target: &'static str,
}

fn row(what: &str, d: f64, c: f64, unit: &str, target: &'static str) -> Row {
    Row {
        what: what.to_owned(),
        distribution: format!("{d:.2} {unit}"),
        cachalot: format!("{c:.2} {unit}"),
        ratio: if d > 0.0 {
            format!("{:.2}x", c / d)
        } else {
            "-".into()
        },
        target,
    }
}

/// One cold pull of the big image: direct from the upstream, then through each proxy started
/// afresh, in the order given (runs alternate it, so neither proxy always follows the direct
/// pull's warm-up of the upstream). Seconds and proxy CPU seconds.
struct ColdRun {
    direct: f64,
    dist: f64,
    cach: f64,
    dist_cpu: f64,
    cach_cpu: f64,
    cachalot_first: bool,
}

/// The proxies a cold run started (caches now warm) and their idle RSS before it, in MiB.
type Started = (Distribution, Cachalot, f64, f64);

async fn cold_run(
    cachalot: &Path,
    c: &reqwest::Client,
    upstream: &str,
    big: &TestImage,
    cachalot_first: bool,
) -> Result<(ColdRun, Started)> {
    let t = Instant::now();
    pull(c, upstream, "library/big", "latest", big).await?;
    let direct = t.elapsed().as_secs_f64();
    let dist = start_distribution_proxy(upstream).await?;
    let cach = Cachalot::start(cachalot, upstream).await?;
    let (idle_rss, _) = memory_mib(cach.pid());
    let (dist_idle_rss, _) = memory_mib(dist.pid());
    let (dist_cpu0, cach_cpu0) = (cpu_seconds(dist.pid()), cpu_seconds(cach.pid()));
    let pids = [dist.pid(), cach.pid()];
    let timed_pull = |base: String| async move {
        settle(&pids).await;
        let t = Instant::now();
        pull(c, &base, "library/big", "latest", big).await?;
        anyhow::Ok(t.elapsed().as_secs_f64())
    };
    let (dist_cold, cach_cold) = if cachalot_first {
        let cach_cold = timed_pull(cach.url.clone()).await?;
        (timed_pull(dist.url()).await?, cach_cold)
    } else {
        let dist_cold = timed_pull(dist.url()).await?;
        (dist_cold, timed_pull(cach.url.clone()).await?)
    };
    settle(&pids).await;
    let run = ColdRun {
        direct,
        dist: dist_cold,
        cach: cach_cold,
        dist_cpu: cpu_seconds(dist.pid()) - dist_cpu0,
        cach_cpu: cpu_seconds(cach.pid()) - cach_cpu0,
        cachalot_first,
    };
    Ok((run, (dist, cach, idle_rss, dist_idle_rss)))
}

/// Seconds `cachalot-registry warm` takes to warm the big image into a freshly started
/// cachalot (empty cache), the binary run as an operator would run it.
async fn warm_run(cachalot: &Path, upstream: &str) -> Result<f64> {
    let cach = Cachalot::start(cachalot, upstream).await?;
    let t = Instant::now();
    let status = tokio::process::Command::new(cachalot)
        .args(["warm", "--server", &cach.admin_url, "big:latest"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await?;
    let seconds = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("cachalot-registry warm failed ({status})");
    }
    Ok(seconds)
}

/// Runs per proxy of each cached blob throughput figure.
const WARM_RUNS: usize = 5;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// `median (min–max)` of `values`, each formatted by `fmt`.
fn median_and_spread(values: Vec<f64>, fmt: impl Fn(f64) -> String) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({}–{})", fmt(median(values)), fmt(min), fmt(max))
}

async fn start_distribution_proxy(upstream: &str) -> Result<Distribution> {
    Ok(Distribution::start_with(DistributionOptions {
        proxy_remote_url: Some(upstream.to_owned()),
        ..DistributionOptions::default()
    })
    .await?)
}

/// How long the upstream holds manifest requests in the held-HEAD measurement.
const HELD_FOR: Duration = Duration::from_secs(15);

/// Answer times of `clients` concurrent GETs of a cached tag whose revalidation the upstream
/// holds for [`HELD_FOR`] (distribution's proxy asks the upstream about every tag request;
/// cachalot's tag is aged past its maxAge first). Returns the slowest answer and how many
/// failed; each request gives up after `HELD_FOR` + 10 s.
async fn held_head_answer_time(
    base: &str,
    fault: &FaultProxy,
    repo: &str,
    clients: usize,
) -> Result<(Duration, usize)> {
    let held = fault.handle().add_fault(
        FaultRule::new(Fault::Delay(HELD_FOR))
            .kind(Kind::Manifest)
            .path_contains(repo),
    );
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let target = format!("{base}/v2/{repo}/manifests/latest");
            tokio::spawn(async move {
                let started = Instant::now();
                let answer = reqwest::Client::new()
                    .get(target)
                    .header("accept", ACCEPT)
                    .timeout(HELD_FOR + Duration::from_secs(10))
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status);
                let ok = match answer {
                    Ok(r) => r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                (started.elapsed(), ok)
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    let mut failed = 0;
    for t in tasks {
        let (elapsed, ok) = t.await?;
        slowest = slowest.max(elapsed);
        failed += usize::from(!ok);
    }
    fault.handle().remove_fault(held);
    Ok((slowest, failed))
}

/// `clients` concurrent cold GETs of distinct tags of one repository behind token auth: the
/// token requests the upstream's token service saw, and the failed GETs.
async fn cold_token_requests(
    base: &str,
    fault: &FaultProxy,
    tags: &[String],
) -> Result<(u64, usize)> {
    fault.handle().reset_counts();
    let tasks: Vec<_> = tags
        .iter()
        .map(|tag| {
            let target = format!("{base}/v2/library/crowd/manifests/{tag}");
            tokio::spawn(async move {
                reqwest::Client::new()
                    .get(target)
                    .header("accept", ACCEPT)
                    .timeout(Duration::from_secs(60))
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .is_ok()
            })
        })
        .collect();
    let mut failed = 0;
    for t in tasks {
        failed += usize::from(!t.await?);
    }
    Ok((fault.handle().token_requests().values().sum(), failed))
}

/// The seed scenario against a proxy: 36 clients × 3 mutable tags, the upstream limited to 100
/// counted manifest GETs. Returns (failed pulls, counted GETs, HEADs) seen upstream.
async fn seed_scenario(
    base: &str,
    fault: &FaultProxy,
    images: &[(String, TestImage)],
) -> Result<(usize, u64, u64)> {
    fault.handle().reset_counts();
    fault.handle().set_rate_limit(Some(RateLimit {
        limit: 100,
        retry_after_secs: 3600,
    }));
    let mut tasks = Vec::new();
    for _ in 0..36 {
        for (repo, img) in images {
            let (base, repo, img) = (base.to_owned(), repo.clone(), img.clone());
            tasks.push(tokio::spawn(async move {
                pull(&client(), &base, &repo, "stable", &img).await
            }));
        }
    }
    let mut failed = 0;
    for t in tasks {
        if !matches!(t.await, Ok(Ok(_))) {
            failed += 1;
        }
    }
    let counts = fault.handle().counts();
    fault.handle().set_rate_limit(None);
    Ok((
        failed,
        counts.counted_manifest_gets(),
        counts.get("HEAD", Kind::Manifest),
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    cachalot_testkit::client::install_crypto_provider();
    let size = args.size_mib * 1024 * 1024;
    eprintln!(
        "generating a {} MiB image and starting the upstream...",
        args.size_mib
    );
    let upstream = Distribution::start().await?;
    let big = image::big_image(1, size).await?;
    image::push(&upstream.url(), "library/big", "latest", &big).await?;
    let small = image::docker_image(2, &[1024 * 1024])?;
    image::push(&upstream.url(), "library/small", "latest", &small).await?;
    let mut seed_images = Vec::new();
    for (i, name) in ["nginx", "redis", "busybox"].iter().enumerate() {
        let img = image::docker_image(10 + i as u64, &[1024 * 1024, 2 * 1024 * 1024])?;
        image::push(&upstream.url(), &format!("library/{name}"), "stable", &img).await?;
        seed_images.push((format!("library/{name}"), img));
    }
    let layer = big.layers()[0].clone();
    let image_bytes = big.total_bytes() + big.manifest_bytes.len() as u64;
    let mut rows = Vec::new();
    if args.scale_only {
        print_table(&scale_rows(&args, &upstream.url(), &small).await?);
        return Ok(());
    }
    if args.tls_only {
        let rows = tls::rows(&args.cachalot, &upstream.url(), &big, args.gets).await?;
        tls::print_table(&rows);
        return Ok(());
    }
    if args.s3_only {
        cachalot_testkit::s3::garage_binary()?;
        shared_s3::print_table(&shared_s3::rows(&args.cachalot, &upstream, &big).await?);
        return Ok(());
    }

    // Cold pull: direct vs each proxy (fresh proxies, empty caches), `cold_runs` times.
    let c = client();
    let mut runs = Vec::new();
    let mut proxies = None;
    for n in 0..args.cold_runs {
        let (run, started) =
            cold_run(&args.cachalot, &c, &upstream.url(), &big, n % 2 == 1).await?;
        runs.push(run);
        proxies = Some(started);
    }
    let (dist, cach, idle_rss, dist_idle_rss) =
        proxies.context("--cold-runs is at least 1, so proxies were started")?;
    let median_of = |f: fn(&ColdRun) -> f64| median(runs.iter().map(f).collect());
    let spread_of = |f: fn(&ColdRun) -> f64, fmt: fn(f64) -> String| {
        median_and_spread(runs.iter().map(f).collect(), fmt)
    };
    let seconds = |v: f64| format!("{v:.2}s");
    let times = |v: f64| format!("{v:.2}x");
    let (dist_cpu, cach_cpu) = (median_of(|r| r.dist_cpu), median_of(|r| r.cach_cpu));
    rows.push(Row {
        what: format!(
            "cold pull {} MiB, seconds, median (min–max) of {} (direct {})",
            args.size_mib,
            args.cold_runs,
            spread_of(|r| r.direct, seconds)
        ),
        distribution: spread_of(|r| r.dist, seconds),
        cachalot: spread_of(|r| r.cach, seconds),
        ratio: spread_of(|r| r.cach / r.dist, times),
        target: "cachalot <= 1.0x distribution",
    });
    rows.push(Row {
        what: "cold pull, x direct pull of the same run, median (min–max)".into(),
        distribution: spread_of(|r| r.dist / r.direct, times),
        cachalot: spread_of(|r| r.cach / r.direct, times),
        ratio: "-".into(),
        target: "cachalot <= 1.3x direct",
    });
    rows.push(row(
        "proxy CPU seconds per cold pull",
        dist_cpu,
        cach_cpu,
        "s",
        "",
    ));

    // Warming the same image into a fresh cachalot, beside the cold pull through one.
    let warm_seconds = warm_run(&args.cachalot, &upstream.url()).await?;
    let cach_cold = median_of(|r| r.cach);
    rows.push(Row {
        what: format!(
            "warm {} MiB image (`cachalot-registry warm`) vs cold pull through cachalot ({cach_cold:.2}s)",
            args.size_mib
        ),
        distribution: "-".into(),
        cachalot: format!("{warm_seconds:.2} s"),
        ratio: format!("{:.2}x", warm_seconds / cach_cold),
        target: "",
    });

    if args.cold_only {
        for r in &runs {
            println!(
                "cold pull x direct: distribution {:.2}x, cachalot {:.2}x (direct {:.2}s, {} first); \
                 proxy CPU seconds: distribution {:.2}, cachalot {:.2}",
                r.dist / r.direct,
                r.cach / r.direct,
                r.direct,
                if r.cachalot_first { "cachalot" } else { "distribution" },
                r.dist_cpu,
                r.cach_cpu
            );
        }
        println!(
            "median (min–max): distribution {}, cachalot {}, cachalot/distribution {}",
            spread_of(|r| r.dist / r.direct, times),
            spread_of(|r| r.cach / r.direct, times),
            spread_of(|r| r.cach / r.dist, times)
        );
        println!("warm through cachalot: {warm_seconds:.2}s (cold pull {cach_cold:.2}s)");
        return Ok(());
    }

    // Cached blob throughput, 1 and 8 clients: one GET of the layer takes ~0.1 s here, so each
    // figure is the median of `WARM_RUNS` runs, the proxies alternating and both idle before each.
    let pids = [dist.pid(), cach.pid()];
    for clients in [1usize, 8] {
        let (mut d, mut k) = (Vec::new(), Vec::new());
        for n in 0..WARM_RUNS {
            for cachalot_turn in [n % 2 == 1, n % 2 == 0] {
                settle(&pids).await;
                let (base, into) = if cachalot_turn {
                    (cach.url.clone(), &mut k)
                } else {
                    (dist.url(), &mut d)
                };
                into.push(
                    blob_throughput(&base, "library/big", &layer.digest, clients, layer.size)
                        .await?,
                );
            }
        }
        let ratios: Vec<f64> = k.iter().zip(&d).map(|(k, d)| k / d).collect();
        let gbps = |v: f64| format!("{v:.2} GB/s");
        rows.push(Row {
            what: format!("cached blob GET, {clients} client(s), median (min–max) of {WARM_RUNS}"),
            distribution: median_and_spread(d, gbps),
            cachalot: median_and_spread(k, gbps),
            ratio: median_and_spread(ratios, |v| format!("{v:.2}x")),
            target: ">= distribution",
        });
    }
    if args.warm_only {
        print_table(&rows);
        return Ok(());
    }
    let (_, peak) = memory_mib(cach.pid());
    let (_, dist_peak) = memory_mib(dist.pid());

    // Warm tag requests.
    pull(&c, &dist.url(), "library/small", "latest", &small).await?;
    pull(&c, &cach.url, "library/small", "latest", &small).await?;
    let (dp50, dp99) = head_latencies(&dist.url(), "library/small", "latest", args.heads).await?;
    let (cp50, cp99) = head_latencies(&cach.url, "library/small", "latest", args.heads).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    rows.push(row("HEAD by tag warm p50", ms(dp50), ms(cp50), "ms", ""));
    rows.push(row(
        "HEAD by tag warm p99",
        ms(dp99),
        ms(cp99),
        "ms",
        "<= 0.2x distribution",
    ));
    let d = get_by_tag_rate(&dist.url(), "library/small", "latest", args.gets).await?;
    let k = get_by_tag_rate(&cach.url, "library/small", "latest", args.gets).await?;
    rows.push(row(
        "GET by tag, 8 clients",
        d,
        k,
        "req/s",
        ">= 10x distribution",
    ));
    drop(dist);
    drop(cach);

    // 8 clients cold-pulling the big image at once: bytes the upstream sends.
    let mut amplification = Vec::new();
    for which in ["distribution", "cachalot"] {
        let fault = FaultProxy::start(&upstream.url()).await?;
        let proxy_url;
        let _keep_dist;
        let _keep_cach;
        if which == "distribution" {
            let d = start_distribution_proxy(&fault.url()).await?;
            proxy_url = d.url();
            _keep_dist = Some(d);
            _keep_cach = None;
        } else {
            let k = Cachalot::start(&args.cachalot, &fault.url()).await?;
            proxy_url = k.url.clone();
            _keep_cach = Some(k);
            _keep_dist = None;
        }
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (url, big) = (proxy_url.clone(), big.clone());
                tokio::spawn(
                    async move { pull(&client(), &url, "library/big", "latest", &big).await },
                )
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        // Body bytes the upstream sent for manifests and blobs, over the image's bytes.
        let sent = fault.handle().body_bytes();
        let bytes: u64 = [Kind::Manifest, Kind::Blob]
            .iter()
            .map(|k| sent.get(k).copied().unwrap_or(0))
            .sum();
        amplification.push(bytes as f64 / image_bytes as f64);
    }
    rows.push(Row {
        what: "8 cold clients: upstream bytes / image bytes".into(),
        distribution: format!("{:.2}", amplification[0]),
        cachalot: format!("{:.2}", amplification[1]),
        ratio: "-".into(),
        target: "cachalot = 1.00",
    });

    // The seed scenario, counting what reaches the upstream.
    let mut seed = Vec::new();
    for which in ["distribution", "cachalot"] {
        let fault = FaultProxy::start(&upstream.url()).await?;
        let result = if which == "distribution" {
            let d = start_distribution_proxy(&fault.url()).await?;
            seed_scenario(&d.url(), &fault, &seed_images).await?
        } else {
            let k = Cachalot::start(&args.cachalot, &fault.url()).await?;
            seed_scenario(&k.url, &fault, &seed_images).await?
        };
        seed.push(result);
    }
    rows.push(Row {
        what: "seed scenario 108 pulls: failed / counted GETs / HEADs".into(),
        distribution: format!("{} / {} / {}", seed[0].0, seed[0].1, seed[0].2),
        cachalot: format!("{} / {} / {}", seed[1].0, seed[1].1, seed[1].2),
        ratio: "-".into(),
        target: "0 failed, GETs <= 3",
    });
    // A cached tag while the upstream holds every manifest request for 15 s.
    let mut held = Vec::new();
    for which in ["distribution", "cachalot"] {
        let fault = FaultProxy::start(&upstream.url()).await?;
        let mut keep_dist = None;
        let mut keep_cach = None;
        let base = if which == "distribution" {
            let d = start_distribution_proxy(&fault.url()).await?;
            let url = d.url();
            keep_dist = Some(d);
            url
        } else {
            let k = Cachalot::start(&args.cachalot, &fault.url()).await?;
            let url = k.url.clone();
            keep_cach = Some(k);
            url
        };
        pull(&c, &base, "library/small", "latest", &small).await?;
        if let Some(k) = &keep_cach {
            k.age_tag("library/small", "latest")?;
        }
        held.push(held_head_answer_time(&base, &fault, "library/small", 10).await?);
        drop((keep_dist, keep_cach));
    }
    let secs = |(d, failed): (Duration, usize)| {
        if failed > 0 {
            format!("{:.2} s ({failed} failed)", d.as_secs_f64())
        } else {
            format!("{:.2} s", d.as_secs_f64())
        }
    };
    rows.push(Row {
        what: format!(
            "cached tag, upstream HEAD held {} s: slowest of 10 answers",
            HELD_FOR.as_secs()
        ),
        distribution: secs(held[0]),
        cachalot: secs(held[1]),
        ratio: "-".into(),
        target: "cachalot <= revalidateWait (1 s)",
    });

    // 50 cold requests of one repository behind token auth: token requests.
    let crowd: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
    for tag in &crowd {
        image::push(&upstream.url(), "library/crowd", tag, &small).await?;
    }
    let mut tokens = Vec::new();
    for which in ["distribution", "cachalot"] {
        let fault = FaultProxy::start(&upstream.url()).await?;
        fault.handle().enable_token_auth(TokenAuth::default());
        let result = if which == "distribution" {
            let d = start_distribution_proxy(&fault.url()).await?;
            cold_token_requests(&d.url(), &fault, &crowd).await?
        } else {
            let k = Cachalot::start(&args.cachalot, &fault.url()).await?;
            cold_token_requests(&k.url, &fault, &crowd).await?
        };
        tokens.push(result);
    }
    let token_cell = |(n, failed): (u64, usize)| {
        if failed > 0 {
            format!("{n} ({failed} failed)")
        } else {
            n.to_string()
        }
    };
    rows.push(Row {
        what: "50 concurrent cold requests, one repository: token requests".into(),
        distribution: token_cell(tokens[0]),
        cachalot: token_cell(tokens[1]),
        ratio: "-".into(),
        target: "cachalot = 1",
    });

    rows.push(row("RSS idle", dist_idle_rss, idle_rss, "MiB", "<= 20 MiB"));
    rows.push(row(
        "RSS peak (8 parallel blob GETs)",
        dist_peak,
        peak,
        "MiB",
        "<= 48 MiB",
    ));

    rows.extend(scale_rows(&args, &upstream.url(), &small).await?);
    print_table(&rows);
    match cachalot_testkit::s3::garage_binary() {
        Ok(_) => shared_s3::print_table(&shared_s3::rows(&args.cachalot, &upstream, &big).await?),
        Err(e) => println!("\nShared S3 rows skipped: {e}"),
    }
    Ok(())
}
