//! TLS rows (`--tls-only`): the same cachalot binary served over plain HTTP and over TLS (a
//! certificate from a CA generated here), side by side: cached blob throughput with 1 and 8
//! clients, and the GET-by-tag rate with 8 clients. Goal: TLS at least 0.8x plain on blobs.

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
    Ok(Served {
        _child: child,
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

/// GB/s of `clients` concurrent reads of the cached blob.
async fn blob_rate(
    served: &Served,
    repo: &str,
    digest: &str,
    size: u64,
    clients: usize,
) -> Result<f64> {
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
    Ok((size * clients as u64) as f64 / started.elapsed().as_secs_f64() / 1e9)
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

/// The rows: plain HTTP vs TLS on the same binary, caches warmed first.
pub async fn rows(
    binary: &Path,
    upstream: &str,
    big: &TestImage,
    gets: usize,
) -> Result<Vec<(String, f64, f64, &'static str, &'static str)>> {
    let layer = big.layers()[0].clone();
    let plain = start(binary, upstream, false).await?;
    let tls = start(binary, upstream, true).await?;
    for served in [&plain, &tls] {
        get_blob(served, "library/big", &layer.digest).await?;
        tag_rate(served, "library/small", "latest", 8).await?;
    }
    let mut rows = Vec::new();
    for clients in [1usize, 8] {
        let p = blob_rate(&plain, "library/big", &layer.digest, layer.size, clients).await?;
        let t = blob_rate(&tls, "library/big", &layer.digest, layer.size, clients).await?;
        rows.push((
            format!("cached blob GET, {clients} client(s)"),
            p,
            t,
            "GB/s",
            "TLS >= 0.8x plain",
        ));
    }
    let p = tag_rate(&plain, "library/small", "latest", gets).await?;
    let t = tag_rate(&tls, "library/small", "latest", gets).await?;
    rows.push(("GET by tag, 8 clients".into(), p, t, "req/s", ""));
    Ok(rows)
}

pub fn print_table(rows: &[(String, f64, f64, &'static str, &'static str)]) {
    println!("\n| measurement | plain HTTP | TLS | TLS/plain | target |");
    println!("|---|---|---|---|---|");
    for (what, plain, tls, unit, target) in rows {
        println!(
            "| {what} | {plain:.2} {unit} | {tls:.2} {unit} | {:.2}x | {target} |",
            tls / plain
        );
    }
}
