//! Conflict detection between RegistryMirrors: two mirrors must not both write
//! `certs.d/<registry>/hosts.toml` on the same node.
//!
//! Invariants: pure; the decision is symmetric and total, so exactly one of two conflicting
//! mirrors wins: the older one by `creationTimestamp`, then by `namespace/name`. Node overlap is
//! decided from the node selectors alone (no node list), conservatively: two selectors overlap
//! unless some key is required with different values by both.

use std::collections::BTreeMap;

use crate::api::RegistryMirror;

/// Another mirror that claims one of this mirror's registries on overlapping nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// `namespace/name` of the mirror that wins.
    pub winner: String,
    /// The registries both claim, sorted.
    pub registries: Vec<String>,
}

/// Whether two equality node selectors can select a common node.
#[must_use]
pub fn selectors_overlap(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    !a.iter()
        .any(|(key, value)| b.get(key).is_some_and(|other| other != value))
}

fn key(m: &RegistryMirror) -> (Option<&k8s_openapi::jiff::Timestamp>, String) {
    (
        m.metadata.creation_timestamp.as_ref().map(|t| &t.0),
        format!(
            "{}/{}",
            m.metadata.namespace.as_deref().unwrap_or_default(),
            m.metadata.name.as_deref().unwrap_or_default()
        ),
    )
}

/// The first (oldest) mirror among `others` that conflicts with `mirror`, or `None`.
/// Mirrors being deleted still count until their finalizer is gone: their files are still on
/// the nodes.
#[must_use]
pub fn find_conflict<'a>(
    mirror: &RegistryMirror,
    others: impl IntoIterator<Item = &'a RegistryMirror>,
) -> Option<Conflict> {
    let me = key(mirror);
    let mine: Vec<&str> = mirror
        .spec
        .registries
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    let mut winners: Vec<(_, Conflict)> = others
        .into_iter()
        .filter(|other| key(other).1 != me.1)
        .filter(|other| key(other) < me)
        .filter(|other| {
            selectors_overlap(
                &mirror.spec.nodes.node_selector,
                &other.spec.nodes.node_selector,
            )
        })
        .filter_map(|other| {
            let mut shared: Vec<String> = other
                .spec
                .registries
                .iter()
                .map(|r| r.name.clone())
                .filter(|n| mine.contains(&n.as_str()))
                .collect();
            shared.sort();
            shared.dedup();
            let k = key(other);
            (!shared.is_empty()).then(|| {
                (
                    (k.0.copied(), k.1.clone()),
                    Conflict {
                        winner: k.1,
                        registries: shared,
                    },
                )
            })
        })
        .collect();
    winners.sort_by(|a, b| a.0.cmp(&b.0));
    winners.into_iter().next().map(|(_, c)| c)
}
