//! Workload pins: the images running Pods use, as pin lists for the registry's pin file
//! (`spec.pinWorkloadImages`).
//!
//! [`workload_pins`] is pure: Pods in, a sorted, deduplicated, bounded pin list per mirrored
//! registry out. An image reference is normalised as the container runtime does (`nginx` is
//! `docker.io/library/nginx:latest`, `index.docker.io` is `docker.io`); images of registries the
//! mirror does not serve are ignored; a reference with a digest, and every
//! `status.containerStatuses[].imageID` of the `repo@digest` form, is pinned by digest, so what a
//! Pod actually runs stays cached even after its tag moved upstream. References the registry's
//! own pin parser refuses are skipped, so the rendered file always loads.
//!
//! Invariant: at most [`MAX_WORKLOAD_PINS`] entries in all. Beyond that the entries last in sort
//! order (registry, then entry) are dropped and counted, so the file stays far below the
//! ConfigMap size limit and the same Pods always give the same file.
//!
//! The Pods are listed (cluster-wide, paginated) by [`list_workload_pods`] at each reconcile pass,
//! which the controller repeats every `requeue_after`: that is the refresh cadence. There is no
//! Pod watch on purpose: a cluster-wide watch would wake every mirror's reconcile on every Pod
//! change in the cluster, and keep every Pod of the cluster in the operator's memory.

use std::collections::{BTreeMap, BTreeSet};

use cachalot_registry::store::pinning::PinEntry;
use k8s_openapi::api::core::v1::{Container, EphemeralContainer, Pod, PodSpec, PodStatus};
use kube::api::{Api, ListParams};

/// Most pin entries written, over all registries of a mirror.
pub const MAX_WORKLOAD_PINS: usize = 2000;
/// Pods asked for per list page.
const PAGE_SIZE: u32 = 500;

/// Failure to list the cluster's Pods for workload pins.
#[derive(Debug, thiserror::Error)]
pub enum ListWorkloadPodsError {
    /// The Pod list (or one of its pages) failed.
    #[error("cannot list Pods for workload pins: {0}")]
    List(#[source] kube::Error),
}

impl ListWorkloadPodsError {
    /// The static category used in metrics labels and Event reasons.
    #[must_use]
    pub fn category(&self) -> &'static str {
        "ListWorkloadPodsFailed"
    }
}

/// The pin lists of one mirror.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadPins {
    /// Registry name → sorted, deduplicated entries (`library/nginx:stable`,
    /// `library/nginx@sha256:…`).
    pub by_registry: BTreeMap<String, Vec<String>>,
    /// Entries left out beyond [`MAX_WORKLOAD_PINS`].
    pub dropped: usize,
}

impl WorkloadPins {
    /// Entries written, over all registries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_registry.values().map(Vec::len).sum()
    }

    /// Whether nothing is pinned.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One image reference split as the runtime resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ImageRef {
    registry: String,
    repository: String,
    /// `:tag` or `@digest`, as the pin entry ends.
    suffix: String,
}

/// Splits `reference` as containerd and the kubelet do; `None` for what is no pullable
/// reference (a bare `sha256:…` image ID, an empty string).
fn parse_reference(reference: &str) -> Option<ImageRef> {
    // dockershim reported imageIDs as `docker-pullable://name@digest`.
    let reference = reference
        .strip_prefix("docker-pullable://")
        .unwrap_or(reference)
        .trim();
    // A bare image ID names a config digest, not pullable content.
    if reference.starts_with("sha256:") {
        return None;
    }
    let (name, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    // A tag is a `:` after the last `/` (a `:` before it is a registry port).
    let (name, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
        _ => (name, None),
    };
    if name.is_empty() {
        return None;
    }
    let (registry, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest)
        }
        _ => ("docker.io", name),
    };
    let registry = if registry == "index.docker.io" {
        "docker.io"
    } else {
        registry
    };
    let repository = if registry == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    let suffix = match (digest, tag) {
        (Some(d), _) => format!("@{d}"),
        (None, Some(t)) => format!(":{t}"),
        (None, None) => ":latest".to_string(),
    };
    Some(ImageRef {
        registry: registry.to_string(),
        repository,
        suffix,
    })
}

/// Every image reference a Pod names: its containers', init containers' and ephemeral
/// containers' images, and the `repo@digest` image IDs its container statuses report.
fn pod_references(pod: &Pod) -> impl Iterator<Item = &str> {
    let spec = pod.spec.as_ref();
    let containers = spec
        .into_iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .filter_map(|c: &Container| c.image.as_deref());
    let ephemeral = spec
        .into_iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
        .filter_map(|c: &EphemeralContainer| c.image.as_deref());
    let status = pod.status.as_ref();
    let ids = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
                .chain(s.ephemeral_container_statuses.iter().flatten())
        })
        .map(|c| c.image_id.as_str())
        // Only a repository digest names pullable content; a bare image ID is the config digest.
        .filter(|id| id.contains('@'));
    containers.chain(ephemeral).chain(ids)
}

/// The pin lists for the mirrored `registries` from the images `pods` use.
#[must_use]
pub fn workload_pins<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    registries: &[String],
) -> WorkloadPins {
    let mut sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for pod in pods {
        for reference in pod_references(pod) {
            let Some(image) = parse_reference(reference) else {
                continue;
            };
            if !registries.contains(&image.registry) {
                continue;
            }
            let entry = format!("{}{}", image.repository, image.suffix);
            // What the registry would refuse (globs, upper case, a malformed digest) is skipped:
            // one odd Pod must not make the whole file invalid.
            if entry.contains(['*', '?']) || PinEntry::parse(&entry, &image.registry).is_err() {
                continue;
            }
            sets.entry(image.registry).or_default().insert(entry);
        }
    }
    let mut pins = WorkloadPins::default();
    let mut room = MAX_WORKLOAD_PINS;
    for (registry, entries) in sets {
        let total = entries.len();
        let kept: Vec<String> = entries.into_iter().take(room).collect();
        room -= kept.len();
        pins.dropped += total - kept.len();
        if !kept.is_empty() {
            pins.by_registry.insert(registry, kept);
        }
    }
    pins
}

/// What [`workload_pins`] reads of a Pod, and nothing else: a pass over a large cluster holds
/// container names, images and statuses, not whole Pods.
fn slim(pod: Pod) -> Pod {
    let container = |c: Container| Container {
        name: c.name,
        image: c.image,
        ..Container::default()
    };
    let spec = pod.spec.map(|s| PodSpec {
        containers: s.containers.into_iter().map(container).collect(),
        init_containers: s
            .init_containers
            .map(|cs| cs.into_iter().map(container).collect()),
        ephemeral_containers: s.ephemeral_containers.map(|cs| {
            cs.into_iter()
                .map(|c| EphemeralContainer {
                    name: c.name,
                    image: c.image,
                    ..EphemeralContainer::default()
                })
                .collect()
        }),
        ..PodSpec::default()
    });
    let status = pod.status.map(|s| PodStatus {
        container_statuses: s.container_statuses,
        init_container_statuses: s.init_container_statuses,
        ephemeral_container_statuses: s.ephemeral_container_statuses,
        ..PodStatus::default()
    });
    Pod {
        spec,
        status,
        ..Pod::default()
    }
}

/// Lists every Pod the operator may see (cluster-wide, or the watched namespace), page by page,
/// keeping only what [`workload_pins`] reads.
///
/// # Errors
/// [`ListWorkloadPodsError`] when a page cannot be listed.
pub async fn list_workload_pods(pods: &Api<Pod>) -> Result<Vec<Pod>, ListWorkloadPodsError> {
    let mut out = Vec::new();
    let mut params = ListParams::default().limit(PAGE_SIZE);
    loop {
        let page = pods
            .list(&params)
            .await
            .map_err(ListWorkloadPodsError::List)?;
        out.extend(page.items.into_iter().map(slim));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn pod(spec: serde_json::Value, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec, "status": status}))
            .unwrap()
    }

    fn images(list: &[&str]) -> Pod {
        let containers: Vec<_> = list
            .iter()
            .enumerate()
            .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
            .collect();
        pod(json!({"containers": containers}), json!({}))
    }

    fn served() -> Vec<String> {
        vec![
            "docker.io".into(),
            "ghcr.io".into(),
            "registry.example:5000".into(),
        ]
    }

    fn pins_of(image: &str) -> BTreeMap<String, Vec<String>> {
        workload_pins([&images(&[image])], &served()).by_registry
    }

    #[test]
    fn image_references_normalise_as_the_runtime_resolves_them() {
        let one = |registry: &str, entry: String| BTreeMap::from([(registry.into(), vec![entry])]);
        for (image, registry, entry) in [
            ("nginx", "docker.io", "library/nginx:latest".to_string()),
            ("nginx:stable", "docker.io", "library/nginx:stable".into()),
            (
                "docker.io/library/nginx:stable",
                "docker.io",
                "library/nginx:stable".into(),
            ),
            (
                "index.docker.io/bitnami/redis:7",
                "docker.io",
                "bitnami/redis:7".into(),
            ),
            ("bitnami/redis", "docker.io", "bitnami/redis:latest".into()),
            ("ghcr.io/org/app:v1.2", "ghcr.io", "org/app:v1.2".into()),
            (
                "registry.example:5000/team/tool",
                "registry.example:5000",
                "team/tool:latest".into(),
            ),
            (
                "registry.example:5000/team/tool:2",
                "registry.example:5000",
                "team/tool:2".into(),
            ),
            (
                &format!("nginx:1.25@{D1}"),
                "docker.io",
                format!("library/nginx@{D1}"),
            ),
            (
                &format!("ghcr.io/org/app@{D2}"),
                "ghcr.io",
                format!("org/app@{D2}"),
            ),
        ] {
            assert_eq!(pins_of(image), one(registry, entry), "{image}");
        }
    }

    #[test]
    fn images_of_other_registries_and_unusable_references_are_ignored() {
        for image in [
            "quay.io/prometheus/node-exporter:v1",
            "localhost/dev:1",
            "registry.example:5001/team/tool:2",
            "",
            "Nginx:1",
            "nginx:v*",
            "nginx@sha256:00",
            D1,
        ] {
            assert!(pins_of(image).is_empty(), "{image:?}");
        }
    }

    #[test]
    fn all_container_kinds_and_repository_digests_from_status_are_pinned_once_each() {
        let p = pod(
            json!({
                "containers": [{"name": "a", "image": "nginx:stable"}, {"name": "b", "image": "nginx:stable"}],
                "initContainers": [{"name": "i", "image": "busybox:1.36"}],
                "ephemeralContainers": [{"name": "e", "image": "ghcr.io/org/debug:1"}],
            }),
            json!({
                "containerStatuses": [
                    {"name": "a", "image": "docker.io/library/nginx:stable", "imageID": format!("docker.io/library/nginx@{D1}"),
                     "ready": true, "restartCount": 0},
                    {"name": "b", "image": "docker.io/library/nginx:stable", "imageID": format!("docker-pullable://nginx@{D1}"),
                     "ready": true, "restartCount": 0},
                ],
                "initContainerStatuses": [
                    {"name": "i", "image": "busybox:1.36", "imageID": D2, "ready": true, "restartCount": 0},
                ],
            }),
        );
        let other = images(&["nginx:stable", "redis"]);
        let pins = workload_pins([&p, &other], &served());
        assert_eq!(
            pins.by_registry,
            BTreeMap::from([
                (
                    "docker.io".to_string(),
                    vec![
                        "library/busybox:1.36".to_string(),
                        "library/nginx:stable".to_string(),
                        format!("library/nginx@{D1}"),
                        "library/redis:latest".to_string(),
                    ]
                ),
                ("ghcr.io".to_string(), vec!["org/debug:1".to_string()]),
            ])
        );
        assert_eq!((pins.len(), pins.dropped), (5, 0));
    }

    #[test]
    fn the_list_is_bounded_and_keeps_the_first_entries_in_sort_order() {
        let many: Vec<String> = (0..MAX_WORKLOAD_PINS + 5)
            .map(|i| format!("ghcr.io/org/app{i:05}:1"))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let mut pods = vec![images(&["zz/last:1"])];
        pods.push(images(&refs));
        let pins = workload_pins(&pods, &served());
        // docker.io sorts first, so its one entry is kept; ghcr.io loses its last six.
        assert_eq!(pins.len(), MAX_WORKLOAD_PINS);
        assert_eq!(pins.dropped, 6);
        assert_eq!(pins.by_registry["docker.io"], ["zz/last:1"]);
        let ghcr = &pins.by_registry["ghcr.io"];
        assert_eq!(ghcr.first().unwrap(), "org/app00000:1");
        assert_eq!(
            ghcr.last().unwrap(),
            &format!("org/app{:05}:1", MAX_WORKLOAD_PINS - 2)
        );
    }

    #[test]
    fn no_pods_pin_nothing() {
        let pins = workload_pins(std::iter::empty::<&Pod>(), &served());
        assert!(pins.is_empty());
        assert_eq!(pins, WorkloadPins::default());
    }
}
