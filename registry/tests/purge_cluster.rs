//! Purge across `cluster` replicas: three real `cachalot-registry` processes, each on its own
//! loopback address (127.0.0.1-3) with the same public and admin ports, as pods of one mirror
//! share one config, each with its own disk, in front of a real distribution upstream. A purge
//! sent to one replica's admin listener is forwarded to the others and the answer lists each;
//! a replica that is down is reported and fails the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use cachalot_registry::config::ClusterConfig;
use cachalot_registry::proxy::purge::{PurgeReport, ReplicaOutcome};
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::FaultProxy;
use cachalot_testkit::image::docker_image;
use common::{blob_file, cli, client, committed, fresh_for, pull_verified, CliRun, Process, MIB};

/// Three replicas on 127.0.0.1-3, one public and one admin port for all.
async fn start_replicas(upstream: &str, dir: &std::path::Path) -> (Vec<Process>, Vec<String>) {
    let (port, admin_port) = (
        cachalot_testkit::wait::free_port().unwrap(),
        cachalot_testkit::wait::free_port().unwrap(),
    );
    let ips: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let urls: Vec<String> = ips.iter().map(|ip| format!("http://{ip}:{port}")).collect();
    let mut replicas = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let (self_url, peers) = (urls[i].clone(), urls.clone());
        let tweak = move |c: &mut cachalot_registry::config::Config| {
            c.admin_listen = SocketAddr::from((*ip, admin_port));
            c.cluster = Some(ClusterConfig {
                self_url: self_url.clone(),
                peers: peers.clone(),
                peer_timeout: Duration::from_secs(1),
            });
            c.registries.get_mut("docker.io").unwrap().freshness =
                vec![fresh_for("*", Duration::from_secs(3600))];
        };
        let storage = dir.join(format!("replica-{i}"));
        let process = Process::start_at(SocketAddr::from((*ip, port)), &storage, upstream, tweak)
            .await
            .unwrap_or_else(|log| panic!("replica {i} did not start:\n{log}"));
        replicas.push(process);
    }
    (replicas, urls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_sent_to_one_replica_reaches_every_replica_and_one_that_is_down_fails_the_cli() {
    let upstream = Distribution::start().await.unwrap();
    let fault = FaultProxy::start(&upstream.url()).await.unwrap();
    let img = docker_image(1460, &[MIB, MIB / 2]).unwrap();
    cachalot_testkit::image::push(&upstream.url(), "library/app", "1", &img)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut replicas, urls) = start_replicas(&fault.url(), dir.path()).await;

    // Every replica serves the image (each keeps what it served on its own disk).
    for r in &replicas {
        pull_verified(&r.url(), "library/app", &img).await;
    }
    let own_blobs: Vec<String> = img.all_blobs().iter().map(|b| b.digest.clone()).collect();
    for r in &replicas {
        committed(&r.storage, &img).await;
    }

    // A digest purge sent to the second replica's admin listener.
    let admin = format!("http://{}", replicas[1].admin_addr);
    let reference = format!("app@{}", img.manifest_digest);
    let CliRun {
        code,
        stdout,
        stderr,
    } = cli(&["purge", "--server", &admin, &reference]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert!(lines[0].contains("1 manifest(s), 3 blob(s)"), "{stdout}");
    // This replica first, then the others by URL.
    let order = [&urls[1], &urls[0], &urls[2]];
    for (line, url) in lines[1..4].iter().zip(order) {
        assert!(
            line.starts_with(&format!("  replica {url}: purged (3 blob(s), ")),
            "{stdout}"
        );
    }
    // Last, where its spokes learn of it (each replica logs its own part).
    assert!(
        lines[4].starts_with("  spokes: drop it on their next request to this mirror (purge log "),
        "{stdout}"
    );
    for r in &replicas {
        for blob in &own_blobs {
            assert!(
                !blob_file(&r.storage, blob).exists(),
                "{} still has {blob}",
                r.url()
            );
        }
    }

    // A forwarded purge is not forwarded again: asked directly with the marker, a replica
    // answers for itself only (here: nothing left).
    let r = client()
        .post(format!("{admin}/admin/purge"))
        .header("x-cachalot-purge-forwarded", urls[0].as_str())
        .body(format!(r#"{{"ref":"{reference}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Asked without it, the 404 says no replica had it.
    let r = client()
        .post(format!("{admin}/admin/purge"))
        .body(format!(r#"{{"ref":"{reference}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let envelope: serde_json::Value = r.json().await.unwrap();
    assert!(
        envelope["errors"][0]["message"].as_str().unwrap().contains(
            "is not cached here nor on the 2 other replica(s); recorded in the purge log"
        ),
        "{envelope}"
    );

    // The third replica goes down; the others cache the tag again. A tag purge reaches the two
    // that run, names the one that does not, and the CLI fails.
    replicas.pop().unwrap().kill();
    for r in &replicas {
        pull_verified(&r.url(), "library/app", &img).await;
    }
    let admin = format!("http://{}", replicas[0].admin_addr);
    let r = client()
        .delete(format!("{admin}/admin/purge?ref=app:1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let report: PurgeReport = r.json().await.unwrap();
    let outcomes: Vec<(&str, ReplicaOutcome)> = report
        .replicas
        .iter()
        .map(|r| (r.replica.as_str(), r.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            (urls[0].as_str(), ReplicaOutcome::Purged),
            (urls[1].as_str(), ReplicaOutcome::Purged),
            (urls[2].as_str(), ReplicaOutcome::Unreachable),
        ]
    );
    assert!(report.incomplete());

    for r in &replicas {
        pull_verified(&r.url(), "library/app", &img).await;
    }
    let CliRun {
        code,
        stdout,
        stderr,
    } = cli(&["purge", "--server", &admin, "app:1"]).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("  replica {}: UNREACHABLE: ", urls[2])),
        "{stdout}"
    );
    assert!(
        stderr.contains("the purge did not reach every replica"),
        "{stderr}"
    );
}
