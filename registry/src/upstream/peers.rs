//! The other replicas of this mirror, and which one owns each object.
//!
//! Every blob, manifest and tag has one owner among the replicas, chosen by rendezvous hashing
//! (highest random weight) over the configured peers: each replica computes the same owner with
//! no coordination, and a replica joining or leaving moves only its own share of the keys. A
//! replica that misses asks the owner ([`Peers::route`] gives the owner as an [`Upstream`] that
//! speaks to it with `?ns=`), the owner fetches from the real upstream once and streams to every
//! asker, so the replica set spends the upstream budget once per object. The owner answers from
//! its own cache, so the freshness of a tag (one revalidation HEAD per `maxAge`) is the owner's
//! for the whole set.
//!
//! Peers are configured by their public listeners. While those are plain and open, forwarded
//! requests go there; when the public listener has TLS or requires a token (`tls`, `auth`),
//! they go to the peer's admin listener instead ([`peer_base`]), which serves `/v2/` to
//! requests a replica forwarded (and only to those).
//!
//! A peer that cannot answer is skipped: its [`Upstream`] falls back to the real upstream for
//! that request and its circuit opens for `upstream.circuitOpenFor`, during which the next
//! replica in the key's rendezvous order is the owner. Replicas agree on that order as long as
//! they agree on who is down; when they briefly do not, an object may be fetched twice, never
//! served wrong (content is verified by digest wherever it comes from).

use std::collections::BTreeMap;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::{BuildUpstreamError, Upstream, Upstreams};
use crate::config::Config;
use crate::telemetry::Telemetry;

/// One other replica, as one [`Upstream`] per mirrored registry.
#[derive(Debug)]
struct Peer {
    url: String,
    by_registry: BTreeMap<String, Arc<Upstream>>,
}

/// The replicas of this mirror (itself included) and the way to each of the others.
#[derive(Debug)]
pub struct Peers {
    self_url: String,
    /// Every replica's URL, sorted (the config normalises the list and adds `self`).
    urls: Vec<String>,
    others: BTreeMap<String, Peer>,
}

/// The weight of `peer` for `key`: the first 8 bytes of SHA-256 over both. Pure.
fn weight(peer: &str, key: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(peer.as_bytes());
    hasher.update([0u8]);
    hasher.update(key.as_bytes());
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

/// The admin base URL of the replica whose public base URL is `peer`: its host, `port`, plain
/// HTTP (the admin listener never has TLS). `None` for a URL without a host. Pure.
#[must_use]
pub fn admin_url(peer: &str, port: u16) -> Option<String> {
    let rest = peer
        .strip_prefix("http://")
        .or_else(|| peer.strip_prefix("https://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        format!("[{}]", v6.split(']').next()?)
    } else {
        authority.split(':').next().unwrap_or("").to_owned()
    };
    if host.is_empty() || host == "[]" {
        return None;
    }
    Some(format!("http://{host}:{port}"))
}

/// Where this replica sends the requests it forwards to `peer` (configured as the peer's public
/// listener): that listener while it is plain and open, else the peer's admin listener (its
/// host, `admin_port`): TLS and the pull API's token guard the public listener from clients,
/// and replicas reach each other inside the cluster, as they do for a purge. `None` for a URL
/// without a host. Pure.
#[must_use]
pub fn peer_base(peer: &str, public_is_open: bool, admin_port: u16) -> Option<String> {
    if public_is_open {
        Some(peer.to_owned())
    } else {
        admin_url(peer, admin_port)
    }
}

/// The peers in the order they own `key`: the first is the owner, the next takes over when it
/// is down. Ties (never in practice) break by URL, so every replica computes the same order.
/// Pure.
pub fn rendezvous_order<'a>(key: &str, peers: &'a [String]) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> = peers.iter().map(|p| (weight(p, key), p.as_str())).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.into_iter().map(|(_, p)| p).collect()
}

impl Peers {
    /// The peers of `config.cluster`, each falling back to the matching upstream of
    /// `upstreams`; `None` without a cluster (or with no other replica).
    pub fn new(
        config: &Config,
        upstreams: &Upstreams,
    ) -> Result<Option<Peers>, BuildUpstreamError> {
        let Some(cluster) = &config.cluster else {
            return Ok(None);
        };
        // Requests to peers are not upstream requests: they get their own (unexported) metrics.
        let telemetry = Arc::new(Telemetry::new(upstreams.names()));
        let mut others = BTreeMap::new();
        let admin_port = config.admin_listen.port();
        for url in cluster.peers.iter().filter(|u| **u != cluster.self_url) {
            let base = peer_base(url, config.public_listener_is_open(), admin_port)
                .ok_or_else(|| BuildUpstreamError::PeerUrl { url: url.clone() })?;
            let mut by_registry = BTreeMap::new();
            for registry in upstreams.names() {
                let peer = upstreams.peer(
                    registry,
                    &base,
                    &cluster.self_url,
                    &config.upstream,
                    cluster.peer_timeout,
                    Arc::clone(&telemetry),
                )?;
                if let Some(peer) = peer {
                    by_registry.insert(registry.to_owned(), Arc::new(peer));
                }
            }
            others.insert(
                url.clone(),
                Peer {
                    url: url.clone(),
                    by_registry,
                },
            );
        }
        if others.is_empty() {
            return Ok(None);
        }
        Ok(Some(Peers {
            self_url: cluster.self_url.clone(),
            urls: cluster.peers.clone(),
            others,
        }))
    }

    pub fn self_url(&self) -> &str {
        &self.self_url
    }

    /// The replica that owns `key` now: the first in its rendezvous order that is this replica
    /// or a peer whose circuit is closed.
    pub fn owner(&self, key: &str) -> &str {
        for url in rendezvous_order(key, &self.urls) {
            if url == self.self_url {
                return url;
            }
            let up = self.others.get(url).is_some_and(|peer| {
                peer.by_registry
                    .values()
                    .next()
                    .is_none_or(|u| !u.is_down())
            });
            if up {
                return url;
            }
        }
        &self.self_url
    }

    /// The way to `registry` for `key`: the owner peer's [`Upstream`], or `None` when this
    /// replica owns the key (it asks the real upstream itself).
    pub fn route(&self, registry: &str, key: &str) -> Option<Arc<Upstream>> {
        let owner = self.owner(key);
        let peer = self.others.get(owner)?;
        debug_assert_eq!(peer.url, owner);
        peer.by_registry.get(registry).map(Arc::clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://replica-{i}:5000")).collect()
    }

    #[test]
    fn a_peers_admin_url_is_its_host_on_the_admin_port() {
        assert_eq!(
            admin_url("http://mirror-0.mirror-peers:5000", 5001).as_deref(),
            Some("http://mirror-0.mirror-peers:5001")
        );
        assert_eq!(
            admin_url("http://127.0.0.2:40000/", 41000).as_deref(),
            Some("http://127.0.0.2:41000")
        );
        assert_eq!(
            admin_url("https://[fd00::1]:5000/prefix", 5001).as_deref(),
            Some("http://[fd00::1]:5001")
        );
        assert_eq!(
            admin_url("http://host", 5001).as_deref(),
            Some("http://host:5001")
        );
        assert_eq!(admin_url("host:5000", 5001), None);
        assert_eq!(admin_url("http://:5000", 5001), None);
    }

    #[test]
    fn peers_are_reached_on_their_admin_listener_when_the_public_one_is_guarded() {
        let peer = "http://mirror-1.mirror-peers:5000";
        assert_eq!(peer_base(peer, true, 5001).as_deref(), Some(peer));
        assert_eq!(
            peer_base(peer, false, 5001).as_deref(),
            Some("http://mirror-1.mirror-peers:5001")
        );
        assert_eq!(
            peer_base("https://127.0.0.3:5000", false, 41000).as_deref(),
            Some("http://127.0.0.3:41000")
        );
        assert_eq!(peer_base("http://:5000", false, 5001), None);
    }

    #[test]
    fn every_key_has_one_owner_and_keys_spread_over_the_replicas() {
        let peers = urls(3);
        let mut owned = BTreeMap::<&str, usize>::new();
        for i in 0..3000 {
            let key = format!("sha256:{i:064x}");
            let order = rendezvous_order(&key, &peers);
            assert_eq!(order.len(), 3);
            assert_eq!(order, rendezvous_order(&key, &peers), "deterministic");
            *owned.entry(order[0]).or_default() += 1;
        }
        assert_eq!(owned.len(), 3);
        for (peer, n) in owned {
            assert!((800..=1200).contains(&n), "{peer} owns {n} of 3000");
        }
    }

    #[test]
    fn removing_a_replica_moves_only_its_own_keys() {
        let three = urls(3);
        let two: Vec<String> = three[..2].to_vec();
        for i in 0..1000 {
            let key = format!("docker.io/library/app:{i}");
            let before = rendezvous_order(&key, &three)[0];
            let after = rendezvous_order(&key, &two)[0];
            if before != three[2] {
                assert_eq!(before, after, "{key} moved although its owner stayed");
            }
        }
    }
}
