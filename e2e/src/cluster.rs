//! Settings and small building blocks of the real-cluster suite (`tests/cluster.rs`).
//!
//! Invariants: the suite touches a cluster only when explicitly enabled (`CACHALOT_E2E=1` and a
//! `KUBECONFIG`); otherwise [`Settings::from_env`] says why it skips, so `cargo test` on a laptop or
//! in CI without a cluster is a clean no-op that prints its reason. Every wait is bounded by a
//! deadline and reports what it waited for.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Label put on every namespace the suite creates, so leftovers can be found and removed with
/// `kubectl delete ns -l cachalot.dev/e2e=true`.
pub const CLEANUP_LABEL: (&str, &str) = ("cachalot.dev/e2e", "true");

/// What the suite needs from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The cluster's kubeconfig (`KUBECONFIG`).
    pub kubeconfig: PathBuf,
    /// The helm binary (`CACHALOT_E2E_HELM`, default `helm` from PATH).
    pub helm: String,
    /// The chart directory (`charts/cachalot` of this checkout).
    pub chart: PathBuf,
    /// Namespace of the operator release (`CACHALOT_E2E_RELEASE_NAMESPACE`, default `cachalot-system`).
    pub release_namespace: String,
    /// Image repository and tag for the chart (`CACHALOT_E2E_IMAGE`, e.g. `cachalot:dev` loaded
    /// with `kind load docker-image`); the chart default when unset.
    pub image: Option<(String, String)>,
    /// Image the test pods pull with `imagePullPolicy: Always` (`CACHALOT_E2E_PULL_IMAGE`).
    pub pull_image: String,
    /// Image of the helper pods that inspect node files (`CACHALOT_E2E_TOOLS_IMAGE`).
    pub tools_image: String,
    /// containerd's `config_path` on the nodes (`CACHALOT_E2E_CERTS_DIR`).
    pub certs_dir: String,
    /// containerd's config file on the nodes (`CACHALOT_E2E_CONTAINERD_CONFIG`, e.g. k3s's
    /// generated one); the RegistryMirror default when unset.
    pub containerd_config: Option<String>,
    /// URL of docker.io's upstream in the mirrors the suite applies
    /// (`CACHALOT_E2E_UPSTREAM_URL`); Docker Hub itself when unset. The local target points it at
    /// its distribution registry.
    pub upstream_url: Option<String>,
    /// A CA the upstream's certificate needs, as (ConfigMap name, PEM): the suite creates the
    /// ConfigMap in each test namespace and references it from the mirror (`caConfigMap`).
    pub upstream_ca: Option<(String, String)>,
    /// Upper bound of each wait (`CACHALOT_E2E_TIMEOUT_SECS`, default 300).
    pub timeout: Duration,
}

/// Why the suite does not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("CACHALOT_E2E is not set to 1; the real-cluster suite runs only when asked (see docs/testing.md)")]
    NotEnabled,
    #[error("KUBECONFIG is not set; point it at a kind or k3d cluster (see docs/testing.md)")]
    NoKubeconfig,
    #[error("KUBECONFIG points at {0}, which does not exist")]
    KubeconfigMissing(PathBuf),
    #[error("CACHALOT_E2E_IMAGE must look like repository:tag, got {0:?}")]
    BadImage(String),
    #[error("CACHALOT_E2E_TIMEOUT_SECS must be a positive number of seconds, got {0:?}")]
    BadTimeout(String),
}

impl Settings {
    /// Reads the settings from the process environment.
    ///
    /// # Errors
    /// A [`SkipReason`] when the suite must not run.
    pub fn from_env() -> Result<Self, SkipReason> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads the settings through `lookup` (pure, for tests).
    ///
    /// # Errors
    /// A [`SkipReason`] when the suite must not run.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SkipReason> {
        if lookup("CACHALOT_E2E").as_deref() != Some("1") {
            return Err(SkipReason::NotEnabled);
        }
        let kubeconfig = lookup("KUBECONFIG")
            .filter(|v| !v.is_empty())
            .ok_or(SkipReason::NoKubeconfig)?;
        // KUBECONFIG may be a `:`-list; the first file must exist.
        let first = PathBuf::from(kubeconfig.split(':').next().unwrap_or_default());
        if !first.is_file() {
            return Err(SkipReason::KubeconfigMissing(first));
        }
        let image = match lookup("CACHALOT_E2E_IMAGE").filter(|v| !v.is_empty()) {
            None => None,
            Some(image) => Some(split_image(&image).ok_or(SkipReason::BadImage(image))?),
        };
        let timeout = match lookup("CACHALOT_E2E_TIMEOUT_SECS") {
            None => Duration::from_secs(300),
            Some(raw) => match raw.parse::<u64>() {
                Ok(secs) if secs > 0 => Duration::from_secs(secs),
                _ => return Err(SkipReason::BadTimeout(raw)),
            },
        };
        let or = |key: &str, default: &str| {
            lookup(key)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        Ok(Self {
            kubeconfig: first,
            helm: or("CACHALOT_E2E_HELM", "helm"),
            chart: chart_dir(),
            release_namespace: or("CACHALOT_E2E_RELEASE_NAMESPACE", "cachalot-system"),
            image,
            pull_image: or("CACHALOT_E2E_PULL_IMAGE", "docker.io/library/busybox:1.36"),
            tools_image: or("CACHALOT_E2E_TOOLS_IMAGE", "docker.io/library/busybox:1.36"),
            certs_dir: or("CACHALOT_E2E_CERTS_DIR", "/etc/containerd/certs.d"),
            containerd_config: lookup("CACHALOT_E2E_CONTAINERD_CONFIG").filter(|v| !v.is_empty()),
            upstream_url: lookup("CACHALOT_E2E_UPSTREAM_URL").filter(|v| !v.is_empty()),
            upstream_ca: None,
            timeout,
        })
    }
}

/// The chart of this checkout.
#[must_use]
pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("charts")
        .join("cachalot")
}

/// Splits `repo[:port]/path:tag` into repository and tag; `None` without a tag.
pub fn split_image(image: &str) -> Option<(String, String)> {
    let (repo, tag) = image.rsplit_once(':')?;
    if repo.is_empty() || tag.is_empty() || tag.contains('/') {
        return None;
    }
    Some((repo.to_owned(), tag.to_owned()))
}

/// Hit ratio `hits / (hits + misses)` from a registry `/stats` answer, read leniently: the counts
/// may sit at the top level or under `totals`. `None` when the answer has no counts.
pub fn hit_counts(stats: &serde_json::Value) -> Option<(u64, u64)> {
    let source = if stats.get("totals").is_some() {
        &stats["totals"]
    } else {
        stats
    };
    Some((
        source.get("hits")?.as_u64()?,
        source.get("misses")?.as_u64()?,
    ))
}

/// A wait that gave up.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:?} waiting for {what}; last observation: {last}")]
pub struct WaitTimeout {
    /// What was awaited.
    pub what: String,
    /// How long.
    pub waited: Duration,
    /// The last thing `check` reported, to make the failure readable.
    pub last: String,
}

/// Polls `check` every `every` until it returns `Ok(value)` or `deadline` passes; `Err(text)` from
/// `check` means "not yet", with `text` kept for the timeout message.
///
/// # Errors
/// [`WaitTimeout`] when the deadline passes.
pub async fn wait_until<T, F, Fut>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut check: F,
) -> Result<T, WaitTimeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let every = every.max(Duration::from_millis(1));
    let max_polls = deadline.as_millis() / every.as_millis() + 2;
    let mut last = String::from("nothing yet");
    for _ in 0..max_polls {
        match check().await {
            Ok(value) => return Ok(value),
            Err(observed) => last = observed,
        }
        if started.elapsed() >= deadline {
            break;
        }
        tokio::time::sleep(every).await;
    }
    Err(WaitTimeout {
        what: what.to_owned(),
        waited: started.elapsed(),
        last,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |key| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn suite_is_skipped_unless_explicitly_enabled() {
        assert_eq!(Settings::from_lookup(env(&[])), Err(SkipReason::NotEnabled));
        assert_eq!(
            Settings::from_lookup(env(&[("CACHALOT_E2E", "yes")])),
            Err(SkipReason::NotEnabled)
        );
        assert_eq!(
            Settings::from_lookup(env(&[("CACHALOT_E2E", "1")])),
            Err(SkipReason::NoKubeconfig)
        );
    }

    #[test]
    fn a_kubeconfig_that_does_not_exist_is_a_skip_reason_naming_the_path() {
        let got = Settings::from_lookup(env(&[
            ("CACHALOT_E2E", "1"),
            ("KUBECONFIG", "/nonexistent/kc:/other"),
        ]));
        assert_eq!(
            got,
            Err(SkipReason::KubeconfigMissing(PathBuf::from(
                "/nonexistent/kc"
            )))
        );
    }

    #[test]
    fn settings_read_image_and_timeout_and_reject_malformed_ones() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let kc = file.path().to_str().unwrap();
        let ok = Settings::from_lookup(env(&[
            ("CACHALOT_E2E", "1"),
            ("KUBECONFIG", kc),
            ("CACHALOT_E2E_IMAGE", "localhost:5001/cachalot:dev"),
            ("CACHALOT_E2E_TIMEOUT_SECS", "42"),
        ]))
        .unwrap();
        assert_eq!(
            ok.image,
            Some(("localhost:5001/cachalot".to_owned(), "dev".to_owned()))
        );
        assert_eq!(ok.timeout, Duration::from_secs(42));
        let bad_image = Settings::from_lookup(env(&[
            ("CACHALOT_E2E", "1"),
            ("KUBECONFIG", kc),
            ("CACHALOT_E2E_IMAGE", "localhost:5001/cachalot"),
        ]));
        assert!(matches!(bad_image, Err(SkipReason::BadImage(_))));
        let bad_timeout = Settings::from_lookup(env(&[
            ("CACHALOT_E2E", "1"),
            ("KUBECONFIG", kc),
            ("CACHALOT_E2E_TIMEOUT_SECS", "0"),
        ]));
        assert!(matches!(bad_timeout, Err(SkipReason::BadTimeout(_))));
    }

    #[test]
    fn hit_counts_read_flat_and_nested_stats() {
        assert_eq!(
            hit_counts(&serde_json::json!({"hits": 3, "misses": 1})),
            Some((3, 1))
        );
        assert_eq!(
            hit_counts(&serde_json::json!({"totals": {"hits": 5, "misses": 2}})),
            Some((5, 2))
        );
        assert_eq!(hit_counts(&serde_json::json!({"upstreams": []})), None);
    }

    #[tokio::test]
    async fn wait_until_returns_the_first_ready_value_and_times_out_with_the_last_observation() {
        let mut n = 0;
        let got = wait_until(
            "n to reach 3",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                let seen = n;
                async move {
                    if seen >= 3 {
                        Ok(seen)
                    } else {
                        Err(format!("n={seen}"))
                    }
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(got, 3);
        let err = wait_until(
            "never",
            Duration::from_millis(30),
            Duration::from_millis(5),
            || async { Err::<(), _>("still no".to_owned()) },
        )
        .await
        .unwrap_err();
        assert_eq!(err.last, "still no");
        assert!(err.waited >= Duration::from_millis(30));
    }
}
