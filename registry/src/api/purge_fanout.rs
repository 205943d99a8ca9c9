//! Purge fan-out: with `cluster` replicas, a purge sent to one replica is forwarded to every
//! other replica's admin listener, so no replica keeps serving what was purged from its own
//! disk.
//!
//! A peer's admin listener is the peer's host (from `cluster.peers`, which name the public
//! listeners) on this replica's admin port: every replica runs with the same config. A
//! forwarded request carries [`FORWARDED_HEADER`] and is purged locally only, so a purge
//! crosses the replica set once and never loops. Peers are asked concurrently, each bounded
//! by [`FORWARD_TIMEOUT`] (there are at most `MAX_PEERS` of them).
//!
//! The answer lists every replica (this one first) with its outcome; a peer that cannot be
//! reached or fails is listed as such, never skipped, and the overall answer is then
//! incomplete ([`PurgeReport::incomplete`]). Only when no replica had it cached is the answer
//! a 404.

use std::time::Duration;

use http::StatusCode;

use crate::config::Config;
use crate::oci::{ErrorCode, ImageRef, OciError};
use crate::proxy::purge::{PurgeError, PurgeReport, ReplicaOutcome, ReplicaPurge};
use crate::upstream::peers::admin_url;

/// One replica's purge: its report, or its outcome (not purged) and why.
pub type ReplicaResult = Result<PurgeReport, (ReplicaOutcome, String)>;

/// Marks a purge forwarded by a replica (its value: the sender's `cluster.self`).
pub const FORWARDED_HEADER: &str = "x-cachalot-purge-forwarded";

/// How long one peer may take to purge.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(120);

/// The other replicas' admin listeners.
#[derive(Debug, Clone)]
pub struct PurgeFanout {
    self_url: String,
    /// `(peer URL as configured, its admin base URL)`, sorted by peer URL.
    peers: Vec<(String, String)>,
    client: reqwest::Client,
}

/// Why the fan-out could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BuildPurgeFanoutError {
    #[error("cluster.peers: `{0}` has no host to reach its admin listener at")]
    PeerUrl(String),
    #[error("cannot build the HTTP client for purge fan-out: {0}")]
    Client(#[source] reqwest::Error),
}

impl ReplicaPurge {
    fn of(replica: &str, result: &ReplicaResult) -> Self {
        match result {
            Ok(r) => ReplicaPurge {
                replica: replica.to_owned(),
                outcome: ReplicaOutcome::Purged,
                blobs: r.blobs,
                bytes_freed: r.bytes_freed,
                message: String::new(),
            },
            Err((outcome, message)) => ReplicaPurge {
                replica: replica.to_owned(),
                outcome: *outcome,
                blobs: 0,
                bytes_freed: 0,
                message: message.clone(),
            },
        }
    }
}

/// A local purge's result in the replica outcomes' terms.
pub fn local_outcome(result: Result<PurgeReport, PurgeError>) -> ReplicaResult {
    result.map_err(|e| match e {
        PurgeError::NotCached(_) => (ReplicaOutcome::NotCached, e.to_string()),
        _ => (ReplicaOutcome::Failed, e.to_string()),
    })
}

/// Combines every replica's result (this one first) into one answer: a 404 when none had it,
/// else the union of what went, with each replica listed. Pure.
pub fn combine(
    reference: &str,
    results: Vec<(String, ReplicaResult)>,
) -> Result<PurgeReport, OciError> {
    let replicas: Vec<ReplicaPurge> = results
        .iter()
        .map(|(replica, result)| ReplicaPurge::of(replica, result))
        .collect();
    if replicas
        .iter()
        .all(|r| r.outcome == ReplicaOutcome::NotCached)
    {
        return Err(OciError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ManifestUnknown,
            format!(
                "{reference} is not cached here nor on the {} other replica(s)",
                replicas.len().saturating_sub(1)
            ),
        ));
    }
    let mut report = PurgeReport {
        reference: reference.to_owned(),
        ..PurgeReport::default()
    };
    for (_, result) in &results {
        let Ok(r) = result else { continue };
        for tag in &r.tags {
            if !report.tags.contains(tag) {
                report.tags.push(tag.clone());
            }
        }
        for manifest in &r.manifests {
            if !report.manifests.contains(manifest) {
                report.manifests.push(manifest.clone());
            }
        }
        report.blobs = report.blobs.max(r.blobs);
        report.blobs_kept = report.blobs_kept.max(r.blobs_kept);
        report.bytes_freed = report.bytes_freed.saturating_add(r.bytes_freed);
    }
    report.replicas = replicas;
    Ok(report)
}

impl PurgeFanout {
    /// The fan-out of `config.cluster`; `None` without other replicas.
    ///
    /// # Errors
    /// A peer URL without a host, or an HTTP client that cannot be built.
    pub fn from_config(config: &Config) -> Result<Option<Self>, BuildPurgeFanoutError> {
        let Some(cluster) = &config.cluster else {
            return Ok(None);
        };
        let port = config.admin_listen.port();
        let mut peers = Vec::new();
        for peer in cluster.peers.iter().filter(|p| **p != cluster.self_url) {
            let admin = admin_url(peer, port)
                .ok_or_else(|| BuildPurgeFanoutError::PeerUrl(peer.clone()))?;
            peers.push((peer.clone(), admin));
        }
        if peers.is_empty() {
            return Ok(None);
        }
        peers.sort();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(cluster.peer_timeout)
            .timeout(FORWARD_TIMEOUT)
            .build()
            .map_err(BuildPurgeFanoutError::Client)?;
        Ok(Some(PurgeFanout {
            self_url: cluster.self_url.clone(),
            peers,
            client,
        }))
    }

    /// This replica's URL.
    pub fn self_url(&self) -> &str {
        &self.self_url
    }

    /// Asks one peer to purge `image` locally.
    async fn forward(&self, admin: &str, image: &ImageRef) -> ReplicaResult {
        let url = format!("{admin}/admin/purge");
        let body = serde_json::json!({ "ref": image.to_string() }).to_string();
        let response = self
            .client
            .post(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(FORWARDED_HEADER, &self.self_url)
            .body(body)
            .send()
            .await
            .map_err(|e| (ReplicaOutcome::Unreachable, format!("{url}: {e}")))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| (ReplicaOutcome::Unreachable, format!("{url}: {e}")))?;
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|e| {
                (
                    ReplicaOutcome::Failed,
                    format!("{url}: unreadable answer: {e}"),
                )
            });
        }
        let envelope: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        let code = envelope
            .as_ref()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned));
        let message = envelope
            .as_ref()
            .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| text.chars().take(200).collect());
        if status == StatusCode::NOT_FOUND && code.as_deref() == Some("MANIFEST_UNKNOWN") {
            return Err((ReplicaOutcome::NotCached, message));
        }
        Err((
            ReplicaOutcome::Failed,
            format!("{url} answered {status}: {message}"),
        ))
    }

    /// Asks every peer to purge `image`; their results sorted by peer URL.
    pub async fn forward_all(&self, image: &ImageRef) -> Vec<(String, ReplicaResult)> {
        // At most `MAX_PEERS` peers, all asked at once.
        let mut results: Vec<_> =
            futures::future::join_all(self.peers.iter().map(|(peer, admin)| {
                let forwarded = self.forward(admin, image);
                async move { (peer.clone(), forwarded.await) }
            }))
            .await;
        results.sort_by(|a, b| a.0.cmp(&b.0));
        for (peer, result) in &results {
            if let Err((outcome, message)) = result {
                if matches!(
                    outcome,
                    ReplicaOutcome::Failed | ReplicaOutcome::Unreachable
                ) {
                    tracing::warn!(%peer, reference = %image, ?outcome, message, "purge not done on a replica");
                }
            }
        }
        results
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn purged(tag: &str, blobs: u64, bytes: u64) -> ReplicaResult {
        Ok(PurgeReport {
            reference: "docker.io/library/a:1".into(),
            tags: vec![tag.into()],
            blobs,
            bytes_freed: bytes,
            ..PurgeReport::default()
        })
    }

    #[test]
    fn replicas_are_combined_and_one_unreachable_makes_the_answer_incomplete() {
        let report = combine(
            "docker.io/library/a:1",
            vec![
                ("http://b".into(), purged("library/a:1", 2, 100)),
                (
                    "http://a".into(),
                    Err((ReplicaOutcome::NotCached, "not cached here".into())),
                ),
                (
                    "http://c".into(),
                    Err((ReplicaOutcome::Unreachable, "connection refused".into())),
                ),
                ("http://d".into(), purged("library/a:1", 2, 50)),
            ],
        )
        .unwrap();
        assert_eq!(report.tags, ["library/a:1"]);
        assert_eq!(report.blobs, 2);
        assert_eq!(report.bytes_freed, 150);
        let outcomes: Vec<_> = report.replicas.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [
                ReplicaOutcome::Purged,
                ReplicaOutcome::NotCached,
                ReplicaOutcome::Unreachable,
                ReplicaOutcome::Purged
            ]
        );
        assert!(report.incomplete());
        assert_eq!(report.replicas[2].message, "connection refused");
    }

    #[test]
    fn nothing_cached_anywhere_is_a_404() {
        let not = || Err((ReplicaOutcome::NotCached, "not cached".into()));
        let e = combine(
            "docker.io/library/a:1",
            vec![("http://a".into(), not()), ("http://b".into(), not())],
        )
        .unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(
            e.message,
            "docker.io/library/a:1 is not cached here nor on the 1 other replica(s)"
        );
    }
}
