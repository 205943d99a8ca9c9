//! Prometheus metrics of the operator: reconcile counts, failures by static category, reconcile
//! durations, the writes of owned objects (applies by kind and reason, skipped applies, deletes)
//! and leadership.
//!
//! Invariants: labels are bounded (a category is one of the static `category()` strings, a kind
//! one of the six owned kinds, a reason `missing`, `changed` or `drifted`; never an object name
//! or error text); names use base units (`_seconds`).

use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set of a failure.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// Static error category, e.g. `ApplyFailed`.
    pub category: String,
}

/// Label set of an apply sent.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApplyLabels {
    /// Owned kind, e.g. `ConfigMap`.
    pub kind: String,
    /// `missing`, `changed` or `drifted`.
    pub reason: String,
}

/// Label set of a skipped apply or a delete.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Owned kind, e.g. `ConfigMap`.
    pub kind: String,
}

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    reconciliations: Counter,
    failures: Family<FailureLabels, Counter>,
    applies: Family<ApplyLabels, Counter>,
    apply_skips: Family<KindLabels, Counter>,
    deletes: Family<KindLabels, Counter>,
    duration: Histogram,
    leader: Gauge<i64, AtomicI64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cachalot_operator");
        let reconciliations = Counter::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let leader = Gauge::<i64, AtomicI64>::default();
        let applies = Family::<ApplyLabels, Counter>::default();
        let apply_skips = Family::<KindLabels, Counter>::default();
        let deletes = Family::<KindLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "RegistryMirror reconciliations run",
            reconciliations.clone(),
        );
        registry.register(
            "reconcile_failures",
            "RegistryMirror reconciliations that failed, by error category",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one RegistryMirror reconciliation",
            duration.clone(),
        );
        registry.register(
            "applies",
            "Server-side applies of owned objects sent, by kind and reason (missing, changed, drifted)",
            applies.clone(),
        );
        registry.register(
            "apply_skips",
            "Applies of owned objects skipped because the cached object is unchanged, by kind",
            apply_skips.clone(),
        );
        registry.register(
            "deletes",
            "Deletes of owned objects the spec no longer wants, by kind",
            deletes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciliations,
            failures,
            duration,
            applies,
            apply_skips,
            deletes,
            leader,
        }
    }

    /// Records one reconciliation and, when it failed, its category.
    pub fn observe_reconcile(&self, elapsed: Duration, failure: Option<&'static str>) {
        self.reconciliations.inc();
        self.duration.observe(elapsed.as_secs_f64());
        if let Some(category) = failure {
            self.failures
                .get_or_create(&FailureLabels {
                    category: category.to_string(),
                })
                .inc();
        }
    }

    /// Counts one apply sent for an owned `kind` (`reason`: `missing`, `changed`, `drifted`).
    pub fn observe_apply(&self, kind: &str, reason: &'static str) {
        self.applies
            .get_or_create(&ApplyLabels {
                kind: kind.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts one apply of an owned `kind` skipped as unchanged.
    pub fn observe_apply_skipped(&self, kind: &str) {
        self.apply_skips
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Counts one delete of an owned `kind`.
    pub fn observe_delete(&self, kind: &str) {
        self.deletes
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Sets the leadership gauge.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Reconciliations counted so far (for tests and logs).
    #[must_use]
    pub fn reconciliations(&self) -> u64 {
        self.reconciliations.get()
    }

    /// The OpenMetrics text exposition.
    ///
    /// # Errors
    /// When formatting fails (never for a `String`).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn failures_are_counted_by_category_with_base_unit_durations() {
        let m = Metrics::new();
        m.observe_reconcile(Duration::from_millis(20), None);
        m.observe_reconcile(Duration::from_millis(30), Some("ApplyFailed"));
        let text = m.encode().unwrap();
        assert!(
            text.contains("cachalot_operator_reconciliations_total 2"),
            "{text}"
        );
        assert!(
            text.contains("cachalot_operator_reconcile_failures_total{category=\"ApplyFailed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cachalot_operator_reconcile_duration_seconds_count 2"),
            "{text}"
        );
    }

    #[test]
    fn applies_are_counted_by_kind_and_reason_and_skips_and_deletes_by_kind() {
        let m = Metrics::new();
        m.observe_apply("ConfigMap", "drifted");
        m.observe_apply("ConfigMap", "drifted");
        m.observe_apply("Deployment", "missing");
        m.observe_apply_skipped("Service");
        m.observe_delete("PodDisruptionBudget");
        let text = m.encode().unwrap();
        for line in [
            "cachalot_operator_applies_total{kind=\"ConfigMap\",reason=\"drifted\"} 2",
            "cachalot_operator_applies_total{kind=\"Deployment\",reason=\"missing\"} 1",
            "cachalot_operator_apply_skips_total{kind=\"Service\"} 1",
            "cachalot_operator_deletes_total{kind=\"PodDisruptionBudget\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
