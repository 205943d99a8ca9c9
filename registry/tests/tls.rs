//! TLS and client authentication with certificates generated here (rcgen): pulls over TLS with a
//! client trusting the test CA, a wrong CA refused, certificate rotation and a bad new
//! certificate, bearer-token and mTLS client authentication, a spoke process reaching its hub
//! process (pulls and its purge log) over TLS with a token and a client certificate, a real
//! containerd pulling over TLS through a hosts.toml with `ca`, and `cluster` replicas behind TLS
//! and a token forwarding to each other on their admin listeners.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cachalot_registry::config::ClusterConfig;
use cachalot_registry::config::{ClientAuthConfig, Config, ParentConfig, TlsConfig};
use cachalot_registry::upstream::FORWARDED_BY;
use cachalot_testkit::certs::TestCa;
use cachalot_testkit::containerd::Containerd;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{FaultProxy, Kind};
use cachalot_testkit::image::{docker_image, sha256_digest, TestImage};
use cachalot_testkit::process::LoggedChild;
use common::{eventually, Process, Rig, MIB};

/// A certificate for 127.0.0.1 and localhost (server) or a client: (cert PEM, key PEM).
fn sign(ca: &TestCa, common_name: &str, client: bool) -> (String, String) {
    let signed = if client {
        ca.client(common_name)
    } else {
        ca.server(
            common_name,
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            &["localhost"],
        )
    }
    .unwrap();
    (signed.cert_pem, signed.key_pem)
}

/// PEM files in a directory: `ca.crt`, `tls.crt`, `tls.key` and friends.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        // Written whole then renamed, as the kubelet swaps a Secret's files.
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A server certificate from `ca` in `files` (`tls.crt`, `tls.key`), and the `tls` config.
fn serve_with(ca: &TestCa, files: &Files) -> TlsConfig {
    let (cert, key) = sign(ca, "cachalot", false);
    TlsConfig {
        cert_file: files.write("tls.crt", &cert),
        key_file: files.write("tls.key", &key),
        client_ca_file: None,
    }
}

fn client_trusting(ca_pem: &str) -> reqwest::ClientBuilder {
    cachalot_testkit::client::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
}

fn https(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

/// Pulls `repo:tag` with `client` and checks the manifest and every blob by digest.
async fn pull_verified(client: &reqwest::Client, base: &str, repo: &str, img: &TestImage) {
    let m = client
        .get(format!("{base}/v2/{repo}/manifests/1"))
        .header("accept", cachalot_registry::oci::media::MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(m.status(), 200, "{repo}");
    assert_eq!(
        sha256_digest(&m.bytes().await.unwrap()),
        img.manifest_digest
    );
    for blob in img.all_blobs() {
        let r = client
            .get(format!("{base}/v2/{repo}/blobs/{}", blob.digest))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", blob.digest);
        assert_eq!(sha256_digest(&r.bytes().await.unwrap()), blob.digest);
    }
}

/// The DER certificate a fresh TLS connection to `addr` is served (no connection reuse).
async fn presented_cert(ca_pem: &str, addr: SocketAddr) -> Vec<u8> {
    let client = client_trusting(ca_pem)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = client
        .get(format!("{}/healthz", https(addr)))
        .send()
        .await
        .unwrap();
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .unwrap()
        .to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn pulls_over_tls_with_the_test_ca_and_a_client_trusting_another_ca_fails() {
    let ca = TestCa::new("test CA").unwrap();
    let files = Files::new();
    let tls = serve_with(&ca, &files);
    let rig = Rig::start_with(move |c| c.tls = Some(tls)).await;
    let img = docker_image(1401, &[MIB, 2 * MIB]).unwrap();
    rig.push("library/tls", "1", &img).await;
    let base = https(rig.cachalot.addr);
    let client = client_trusting(&ca.pem()).build().unwrap();
    pull_verified(&client, &base, "library/tls", &img).await;
    // Again from the cache.
    pull_verified(&client, &base, "library/tls", &img).await;

    let other = TestCa::new("other CA").unwrap();
    let wrong = client_trusting(&other.pem()).build().unwrap();
    let err = wrong
        .get(format!("{base}/v2/"))
        .send()
        .await
        .expect_err("a client trusting another CA must not connect");
    assert!(err.is_connect(), "{err:?}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = common::client()
        .get(format!("http://{}/v2/", rig.cachalot.addr))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() == 400);
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_handshakes() {
    let ca = TestCa::new("test CA").unwrap();
    let files = Files::new();
    let tls = serve_with(&ca, &files);
    let rig = Rig::start_with(move |c| c.tls = Some(tls)).await;
    let addr = rig.cachalot.addr;
    let first = presented_cert(&ca.pem(), addr).await;
    assert_eq!(
        first,
        der_of(&std::fs::read_to_string(files.path("tls.crt")).unwrap())
    );

    // A new pair (the key first, as a Secret update may land): served once both are in place.
    let (cert, key) = sign(&ca, "cachalot-rotated", false);
    files.write("tls.key", &key);
    files.write("tls.crt", &cert);
    let rotated = der_of(&cert);
    eventually(
        Duration::from_secs(10),
        "the rotated certificate served",
        || {
            let (ca_pem, rotated) = (ca.pem(), rotated.clone());
            async move { presented_cert(&ca_pem, addr).await == rotated }
        },
    )
    .await;
}

/// The real binary with `config` (its own TLS config), ready when `/readyz` answers over TLS.
struct TlsProcess {
    child: LoggedChild,
    addr: SocketAddr,
    /// The admin listener (plain HTTP, no client auth: it is never exposed).
    admin_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn spawn_binary(config: &Config) -> (LoggedChild, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, serde_yaml::to_string(config).unwrap()).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_cachalot-registry"));
    command
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "info");
    let child = LoggedChild::spawn(&mut command, &dir.path().join("registry.log")).unwrap();
    (child, dir)
}

impl TlsProcess {
    /// Probed with `identity` (a client certificate and key) when the hub asks for one.
    async fn start(
        ca_pem: &str,
        identity: Option<&(String, String)>,
        storage: &Path,
        upstream_url: &str,
        tweak: impl Fn(&mut Config),
    ) -> TlsProcess {
        let port = cachalot_testkit::wait::free_port().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let admin_addr =
            SocketAddr::from(([127, 0, 0, 1], cachalot_testkit::wait::free_port().unwrap()));
        let mut config = Config {
            listen: addr,
            admin_listen: admin_addr,
            ..Config::default()
        };
        config.storage.path = storage.to_owned();
        config.registries.insert(
            "docker.io".into(),
            cachalot_registry::config::RegistryConfig {
                url: Some(upstream_url.to_owned()),
                ..Default::default()
            },
        );
        tweak(&mut config);
        let (mut child, dir) = spawn_binary(&config).await;
        let mut probe = client_trusting(ca_pem);
        if let Some((cert, key)) = identity {
            probe = probe.identity(
                reqwest::Identity::from_pem(format!("{key}\n{cert}").as_bytes()).unwrap(),
            );
        }
        let probe = probe.build().unwrap();
        let url = format!("{}/readyz", https(addr));
        child
            .wait_ready(Duration::from_secs(20), Duration::from_millis(10), || {
                let request = probe.get(url.clone()).send();
                async move { request.await.is_ok_and(|r| r.status() == 200) }
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", child.log_tail()));
        TlsProcess {
            child,
            addr,
            admin_addr,
            _dir: dir,
        }
    }
}

impl Drop for TlsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[tokio::test]
async fn a_bad_certificate_at_start_exits_non_zero_with_a_message_and_a_bad_new_one_is_reported() {
    let ca = TestCa::new("test CA").unwrap();
    let files = Files::new();
    let storage = tempfile::tempdir().unwrap();

    // Bad at start: the process exits with a message naming the file.
    let mut config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], cachalot_testkit::wait::free_port().unwrap())),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tls: Some(TlsConfig {
            cert_file: files.write("bad.crt", "not a certificate"),
            key_file: files.write("bad.key", "not a key"),
            client_ca_file: None,
        }),
        ..Config::default()
    };
    config.storage.path = storage.path().join("bad");
    let (mut child, _dir) = spawn_binary(&config).await;
    let mut status = None;
    cachalot_testkit::wait::wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
        status = child.try_wait().unwrap();
        let exited = status.is_some();
        async move { exited }
    })
    .await
    .expect("exits on a bad certificate");
    assert!(!status.unwrap().success());
    let log = child.log_tail();
    assert!(
        log.contains("bad.crt") && log.contains("no PEM certificate"),
        "{log}"
    );

    // Bad after a good start: logged, and the good one is still served.
    let tls = serve_with(&ca, &files);
    let process = TlsProcess::start(
        &ca.pem(),
        None,
        &storage.path().join("good"),
        "http://127.0.0.1:1",
        move |c| c.tls = Some(tls.clone()),
    )
    .await;
    let good = presented_cert(&ca.pem(), process.addr).await;
    files.write("tls.crt", "garbage");
    eventually(
        Duration::from_secs(10),
        "the bad certificate reported",
        || {
            let log = process.child.log_tail();
            async move { log.contains("still serving the last good certificate") }
        },
    )
    .await;
    assert_eq!(presented_cert(&ca.pem(), process.addr).await, good);
}

#[tokio::test]
async fn a_bearer_token_is_required_for_the_pull_api_and_health_stays_open() {
    let files = Files::new();
    let token = files.write("token", "s3cret-one\n");
    let rig = Rig::start_with(move |c| {
        c.auth = Some(ClientAuthConfig {
            bearer_token_file: token,
        })
    })
    .await;
    let img = docker_image(1402, &[MIB]).unwrap();
    rig.push("library/auth", "1", &img).await;
    let base = rig.cachalot.url();
    let url = format!("{base}/v2/library/auth/manifests/1");
    let get = |token: Option<&'static str>| {
        let mut request = common::client()
            .get(&url)
            .header("accept", cachalot_registry::oci::media::MANIFEST_ACCEPT);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    for (token, what) in [(None, "no token"), (Some("wrong"), "a wrong token")] {
        let r = get(token).await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        assert_eq!(
            r.headers()["docker-distribution-api-version"],
            "registry/2.0"
        );
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer realm=\"cachalot\"",
            "{what}"
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED", "{what}: {body}");
    }
    // A Basic credential is not a bearer token.
    let r = common::client()
        .get(&url)
        .basic_auth("u", Some("s3cret-one"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        rig.faults()
            .counts()
            .get("GET", cachalot_testkit::fault::Kind::Manifest),
        0,
        "nothing reached the upstream"
    );
    let r = get(Some("s3cret-one")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        sha256_digest(&r.bytes().await.unwrap()),
        img.manifest_digest
    );
    for open in ["/healthz", "/readyz"] {
        let r = common::client()
            .get(format!("{base}{open}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{open}");
    }

    // The token file changes: the new token works, the old one no longer does.
    files.write("token", "s3cret-two");
    eventually(Duration::from_secs(10), "the new token accepted", || {
        let r = get(Some("s3cret-two"));
        async move { r.await.unwrap().status() == 200 }
    })
    .await;
    assert_eq!(get(Some("s3cret-one")).await.unwrap().status(), 401);
}

#[tokio::test]
async fn mtls_accepts_a_client_certificate_from_the_client_ca_only() {
    let ca = TestCa::new("server CA").unwrap();
    let client_ca = TestCa::new("client CA").unwrap();
    let files = Files::new();
    let mut tls = serve_with(&ca, &files);
    tls.client_ca_file = Some(files.write("client-ca.crt", &client_ca.pem()));
    let rig = Rig::start_with(move |c| c.tls = Some(tls)).await;
    let img = docker_image(1403, &[MIB]).unwrap();
    rig.push("library/mtls", "1", &img).await;
    let base = https(rig.cachalot.addr);
    let identity = |(cert, key): (String, String)| {
        reqwest::Identity::from_pem(format!("{key}\n{cert}").as_bytes()).unwrap()
    };

    let good = client_trusting(&ca.pem())
        .identity(identity(sign(&client_ca, "spoke", true)))
        .build()
        .unwrap();
    pull_verified(&good, &base, "library/mtls", &img).await;

    let none = client_trusting(&ca.pem()).build().unwrap();
    let foreign = client_trusting(&ca.pem())
        .identity(identity(sign(
            &TestCa::new("stranger CA").unwrap(),
            "spoke",
            true,
        )))
        .build()
        .unwrap();
    for (client, what) in [
        (none, "no client certificate"),
        (foreign, "a certificate from another CA"),
    ] {
        let r = client.get(format!("{base}/v2/")).send().await;
        assert!(r.is_err(), "{what}: {r:?}");
    }
}

#[tokio::test]
async fn a_spoke_process_reaches_its_hub_process_over_tls_with_a_token_and_a_client_certificate() {
    let ca = TestCa::new("hub CA").unwrap();
    let client_ca = TestCa::new("spoke CA").unwrap();
    let files = Files::new();
    let mut tls = serve_with(&ca, &files);
    tls.client_ca_file = Some(files.write("client-ca.crt", &client_ca.pem()));
    let token = files.write("hub-token", "hub-s3cret");
    let upstream = cachalot_testkit::distribution::Distribution::start()
        .await
        .unwrap();
    let img = docker_image(1404, &[MIB, MIB]).unwrap();
    cachalot_testkit::image::push(&upstream.url(), "library/chain", "1", &img)
        .await
        .unwrap();
    let stores = tempfile::tempdir().unwrap();
    let (client_cert, client_key) = sign(&client_ca, "spoke", true);
    let spoke_identity = (client_cert.clone(), client_key.clone());
    let hub = TlsProcess::start(
        &ca.pem(),
        Some(&spoke_identity),
        &stores.path().join("hub"),
        &upstream.url(),
        move |c| {
            c.tls = Some(tls.clone());
            c.auth = Some(ClientAuthConfig {
                bearer_token_file: token.clone(),
            });
        },
    )
    .await;

    let parent = ParentConfig {
        url: https(hub.addr),
        ca_file: Some(files.write("hub-ca.crt", &ca.pem())),
        insecure_skip_verify: false,
        client_cert_file: Some(files.write("spoke.crt", &client_cert)),
        client_key_file: Some(files.write("spoke.key", &client_key)),
        bearer_token_file: Some(files.write("spoke-token", "hub-s3cret\n")),
        spoke_id: Some("tls-spoke".into()),
    };
    let spoke = Process::start(&stores.path().join("spoke"), "http://127.0.0.1:1", |c| {
        c.parent = Some(parent.clone());
    })
    .await;
    pull_verified(&common::client(), &spoke.url(), "library/chain", &img).await;
    // Stats are on the hub's admin listener: plain, internal, no client auth.
    let hub_stats: cachalot_registry::telemetry::StatsSnapshot =
        reqwest::get(format!("http://{}/stats", hub.admin_addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert!(
        hub_stats.misses >= 3,
        "the hub fetched for the spoke: {hub_stats:?}"
    );
    assert!(
        hub_stats.spokes["tls-spoke"].requests >= 3,
        "the spoke named itself over TLS: {hub_stats:?}"
    );
    // The spoke follows the hub's purge log through the same TLS, certificate and token.
    let hub_epoch = hub_stats.purge_log.unwrap().epoch;
    common::eventually(
        Duration::from_secs(20),
        "the spoke read the hub's purge log",
        || async {
            let s = spoke.stats().await.parent_purges.unwrap_or_default();
            s.epoch.as_deref() == Some(hub_epoch.as_str()) && s.failures == 0
        },
    )
    .await;

    // A spoke with a wrong token is refused by the hub; its client sees the failure.
    let mut wrong = parent.clone();
    wrong.bearer_token_file = Some(files.write("wrong-token", "nope"));
    let refused = Process::start(&stores.path().join("refused"), "http://127.0.0.1:1", |c| {
        c.parent = Some(wrong.clone());
    })
    .await;
    let r = common::get_manifest(&refused.url(), "library/chain", "1").await;
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED", "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("401"),
        "{body}"
    );
}

#[tokio::test]
async fn containerd_pulls_over_tls_through_a_hosts_toml_with_ca() {
    let ca = TestCa::new("mirror CA").unwrap();
    let files = Files::new();
    let tls = serve_with(&ca, &files);
    let rig = Rig::start_with(move |c| c.tls = Some(tls)).await;
    let img = docker_image(1405, &[MIB, 2 * MIB]).unwrap();
    rig.push("library/tlsweb", "stable", &img).await;
    let ca_file = files.write("ca.crt", &ca.pem());
    let containerd = Containerd::start().await.unwrap();
    // `server` goes nowhere: the pull can only succeed through the mirror.
    let write_hosts = |dir: &Path, ca: Option<&Path>| {
        let host_dir = dir.join("docker.io");
        std::fs::create_dir_all(&host_dir).unwrap();
        let mut text = format!(
            "server = \"http://127.0.0.1:1\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"1s\"\n",
            https(rig.cachalot.addr)
        );
        if let Some(ca) = ca {
            text.push_str(&format!("  ca = \"{}\"\n", ca.display()));
        }
        std::fs::write(host_dir.join("hosts.toml"), text).unwrap();
    };
    let reference = "docker.io/library/tlsweb:stable";

    let untrusted = tempfile::tempdir().unwrap();
    write_hosts(untrusted.path(), None);
    let pull = containerd.pull(reference, untrusted.path()).await.unwrap();
    assert!(
        !pull.success(),
        "a mirror with an unknown CA must not be trusted"
    );

    let trusted = tempfile::tempdir().unwrap();
    write_hosts(trusted.path(), Some(&ca_file));
    let pull = containerd.pull(reference, trusted.path()).await.unwrap();
    assert!(
        pull.success(),
        "pull over TLS failed: {}\n{}",
        pull.stderr,
        containerd.log_tail()
    );
    let stats = rig.cachalot.stats().await;
    assert!(stats.registries["docker.io"].misses >= 3, "{stats:?}");
}

/// Three `cluster` replicas on 127.0.0.1-3 whose public listeners have TLS and a token: the
/// clients pull over TLS with the token from every replica, the replicas forward to each other
/// on their admin listeners (plain, no token), so each blob leaves the upstream once. The admin
/// listener serves `/v2/` only to a request a replica forwarded, and the forwarding header opens
/// nothing on the public listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_replicas_behind_tls_and_a_token_forward_to_each_other_on_the_admin_listener() {
    let upstream = Distribution::start().await.unwrap();
    let fault = FaultProxy::start(&upstream.url()).await.unwrap();
    let img = docker_image(1470, &[MIB, MIB / 2]).unwrap();
    cachalot_testkit::image::push(&upstream.url(), "library/app", "1", &img)
        .await
        .unwrap();
    let ca = TestCa::new("cluster CA").unwrap();
    let ips: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let signed = ca
        .server(
            "cachalot",
            &ips.iter().map(|ip| IpAddr::V4(*ip)).collect::<Vec<_>>(),
            &[],
        )
        .unwrap();
    let files = Files::new();
    let tls = TlsConfig {
        cert_file: files.write("tls.crt", &signed.cert_pem),
        key_file: files.write("tls.key", &signed.key_pem),
        client_ca_file: None,
    };
    let token = files.write("token", "cluster-token");
    let (port, admin_port) = (
        cachalot_testkit::wait::free_port().unwrap(),
        cachalot_testkit::wait::free_port().unwrap(),
    );
    let urls: Vec<String> = ips
        .iter()
        .map(|ip| format!("https://{ip}:{port}"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let (self_url, peers, tls, token) =
            (urls[i].clone(), urls.clone(), tls.clone(), token.clone());
        let tweak = move |c: &mut Config| {
            c.admin_listen = SocketAddr::from((*ip, admin_port));
            c.tls = Some(tls.clone());
            c.auth = Some(ClientAuthConfig {
                bearer_token_file: token.clone(),
            });
            c.cluster = Some(ClusterConfig {
                self_url: self_url.clone(),
                peers: peers.clone(),
                peer_timeout: Duration::from_secs(1),
            });
        };
        let storage = dir.path().join(format!("replica-{i}"));
        let replica =
            Process::start_at(SocketAddr::from((*ip, port)), &storage, &fault.url(), tweak)
                .await
                .unwrap_or_else(|log| panic!("replica {i} did not start:\n{log}"));
        replicas.push(replica);
    }

    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        "Bearer cluster-token".parse().unwrap(),
    );
    let client = client_trusting(&ca.pem())
        .default_headers(headers)
        .build()
        .unwrap();
    for url in &urls {
        pull_verified(&client, url, "library/app", &img).await;
    }
    let counts = fault.counts();
    for blob in img.all_blobs() {
        let gets = fault
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(&blob.digest))
            .count();
        assert_eq!(gets, 1, "{} left the upstream {gets} times", blob.digest);
    }
    assert_eq!(
        counts.get("GET", Kind::Manifest),
        1,
        "one replica owns the tag"
    );

    // The admin listener serves `/v2/` to a forwarded request only.
    let blob = &img.all_blobs()[0].digest;
    let admin = format!("http://{}:{admin_port}/v2/library/app/blobs/{blob}", ips[1]);
    let plain = common::client();
    let r = plain.get(&admin).send().await.unwrap();
    assert_eq!(
        r.status(),
        404,
        "a /v2/ request without the forwarding header"
    );
    let r = plain
        .get(&admin)
        .header(FORWARDED_BY, urls[0].as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), *blob);
    // The forwarding header is no credential on the public listener.
    let r = client_trusting(&ca.pem())
        .build()
        .unwrap()
        .get(format!("{}/v2/library/app/blobs/{blob}", urls[1]))
        .header(FORWARDED_BY, urls[0].as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
