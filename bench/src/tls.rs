//! TLS rows (`--tls-only`): the same cachalot binary served over plain HTTP and over TLS (a
//! certificate from a CA generated here), side by side: cached blob throughput with 1 and 8
//! clients, the server's CPU per GB served, and the GET-by-tag rate with 8 clients; medians of
//! alternating runs. Goal: TLS at least 0.8x plain on blobs.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cachalot_testkit::certs::TestCa;
use cachalot_testkit::image::TestImage;

/// A registry child process and a client that reaches it.
struct Served {
    _child: tokio::process::Child,
    pid: u32,
    url: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// A CA and a serving certificate for 127.0.0.1: (CA PEM, cert PEM, key PEM).
fn certificates() -> Result<(String, String, String)> {
    let ca = TestCa::new("bench CA")?;
    let server = ca.server("cachalot", &[IpAddr::V4(Ipv4Addr::LOCALHOST)], &[])?;
    Ok((ca.pem(), server.cert_pem, server.key_pem))
}

async fn start(binary: &Path, upstream: &str, tls: bool) -> Result<Served> {
    let dir = tempfile::tempdir()?;
    let port = cachalot_testkit::wait::free_port()?;
    let mut config = cachalot_registry::config::Config {
        listen: format!("127.0.0.1:{port}").parse()?,
        // Not read here: the admin listener takes any free port.
        admin_listen: "127.0.0.1:0".parse()?,
        ..Default::default()
    };
    config.storage.path = dir.path().join("cache");
    config.registries.insert(
        "docker.io".into(),
        cachalot_registry::config::RegistryConfig {
            url: Some(upstream.to_owned()),
            ..Default::default()
        },
    );
    let mut client = reqwest::Client::builder().pool_max_idle_per_host(16);
    if tls {
        let (ca, cert, key) = certificates()?;
        let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert_file, cert)?;
        std::fs::write(&key_file, key)?;
        config.tls = Some(cachalot_registry::config::TlsConfig {
            cert_file,
            key_file,
            client_ca_file: None,
        });
        client = client.tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())?]);
    }
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, serde_yaml::to_string(&config)?)?;
    let child = tokio::process::Command::new(binary)
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", binary.display()))?;
    let url = format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" });
    let client = client.build()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("{url}/readyz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("{url} not ready within 20s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.id().context("the registry exited at once")?;
    Ok(Served {
        _child: child,
        pid,
        url,
        client,
        _dir: dir,
    })
}

async fn get_blob(served: &Served, repo: &str, digest: &str) -> Result<u64> {
    read_blob(
        served.client.clone(),
        format!("{}/v2/{repo}/blobs/{digest}", served.url),
    )
    .await
}

async fn read_blob(client: reqwest::Client, url: String) -> Result<u64> {
    let mut r = client.get(url).send().await?.error_for_status()?;
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await? {
        n += chunk.len() as u64;
    }
    Ok(n)
}

/// GB/s of `clients` concurrent reads of the cached blob, and the server's CPU seconds for
/// them (all its threads, from the scheduler's nanosecond counters).
async fn blob_rate(
    served: &Served,
    repo: &str,
    digest: &str,
    size: u64,
    clients: usize,
) -> Result<(f64, f64)> {
    let cpu0 = thread_cpu_seconds(served.pid);
    let started = Instant::now();
    let url = format!("{}/v2/{repo}/blobs/{digest}", served.url);
    // One task per client, as real clients decrypt on their own cores.
    let reads: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(read_blob(served.client.clone(), url.clone())))
        .collect();
    for read in reads {
        if read.await?? != size {
            bail!("short read");
        }
    }
    let gbps = (size * clients as u64) as f64 / started.elapsed().as_secs_f64() / 1e9;
    Ok((gbps, thread_cpu_seconds(served.pid) - cpu0))
}

/// CPU seconds the live threads of `pid` have run, from `/proc/PID/task/*/schedstat`
/// (nanoseconds, unlike the 10 ms ticks of `/proc/PID/stat`). A thread that exits during a
/// measurement takes its time with it; the registry's serving threads do not exit.
fn thread_cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    nanos as f64 / 1e9
}

/// Requests per second of GET by tag, `total` spread over 8 concurrent clients.
async fn tag_rate(served: &Served, repo: &str, tag: &str, total: usize) -> Result<f64> {
    let per_client = total / 8;
    let started = Instant::now();
    let url = format!("{}/v2/{repo}/manifests/{tag}", served.url);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (client, url) = (served.client.clone(), url.clone());
            tokio::spawn(async move {
                for _ in 0..per_client {
                    client
                        .get(&url)
                        .header("accept", super::ACCEPT)
                        .send()
                        .await?
                        .error_for_status()?
                        .bytes()
                        .await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for done in clients {
        done.await??;
    }
    Ok((per_client * 8) as f64 / started.elapsed().as_secs_f64())
}

/// One row: a measurement, plain and TLS figures (`median (min–max)` of the runs), the ratio
/// of the medians, the target.
pub struct Row {
    what: String,
    plain: String,
    tls: String,
    ratio: f64,
    target: &'static str,
}

fn row(what: String, plain: Vec<f64>, tls: Vec<f64>, unit: &str, target: &'static str) -> Row {
    let fmt = |v: f64| format!("{v:.2}");
    let ratio = super::median(tls.clone()) / super::median(plain.clone());
    Row {
        what,
        plain: format!("{} {unit}", super::median_and_spread(plain, fmt)),
        tls: format!("{} {unit}", super::median_and_spread(tls, fmt)),
        ratio,
        target,
    }
}

/// The rows: plain HTTP vs TLS on the same binary, caches warmed first. Every figure is taken
/// [`super::WARM_RUNS`] times, alternating which server goes first, and the machine is let
/// settle before each. Beside the throughput (clients and server share the machine's cores,
/// so the clients' decryption slows the TLS figure) the server's CPU per GB served: its
/// inverse ratio is the TLS/plain throughput of a server whose CPU is the limit, with its
/// clients on other machines.
pub async fn rows(binary: &Path, upstream: &str, big: &TestImage, gets: usize) -> Result<Vec<Row>> {
    let layer = big.layers()[0].clone();
    let plain = start(binary, upstream, false).await?;
    let tls = start(binary, upstream, true).await?;
    for served in [&plain, &tls] {
        get_blob(served, "library/big", &layer.digest).await?;
        tag_rate(served, "library/small", "latest", 8).await?;
    }
    let pids = [plain.pid, tls.pid];
    let mut rows = Vec::new();
    for clients in [1usize, 8] {
        let (mut rate, mut cpu) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        for run in 0..super::WARM_RUNS {
            for side in [run % 2, 1 - run % 2] {
                super::settle(&pids).await;
                let served = [&plain, &tls][side];
                let (gbps, seconds) =
                    blob_rate(served, "library/big", &layer.digest, layer.size, clients).await?;
                let gb = (layer.size * clients as u64) as f64 / 1e9;
                rate[side].push(gbps);
                cpu[side].push(seconds * 1e3 / gb);
            }
        }
        let [rate_plain, rate_tls] = rate;
        let [cpu_plain, cpu_tls] = cpu;
        rows.push(row(
            format!("cached blob GET, {clients} client(s)"),
            rate_plain,
            rate_tls,
            "GB/s",
            "TLS >= 0.8x plain",
        ));
        let mut cpu_row = row(
            format!("server CPU per GB served, {clients} client(s)"),
            cpu_plain,
            cpu_tls,
            "ms",
            "TLS >= 0.8x plain (ratio: plain/TLS)",
        );
        // Less CPU is better: the ratio is the throughput a CPU-bound server keeps under TLS.
        cpu_row.ratio = 1.0 / cpu_row.ratio;
        rows.push(cpu_row);
    }
    let (mut p, mut t) = (Vec::new(), Vec::new());
    for run in 0..super::WARM_RUNS {
        for side in [run % 2, 1 - run % 2] {
            super::settle(&pids).await;
            let rate = tag_rate([&plain, &tls][side], "library/small", "latest", gets).await?;
            [&mut p, &mut t][side].push(rate);
        }
    }
    rows.push(row("GET by tag, 8 clients".into(), p, t, "req/s", ""));
    Ok(rows)
}

pub fn print_table(rows: &[Row]) {
    println!("\n| measurement | plain HTTP | TLS | TLS/plain | target |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.2}x | {} |",
            r.what, r.plain, r.tls, r.ratio, r.target
        );
    }
}
