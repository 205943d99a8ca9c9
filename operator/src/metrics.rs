//! Prometheus metrics of the operator: reconcile counts, failures by static category, reconcile
//! durations and leadership.
//!
//! Invariants: labels are bounded (a category is one of the static `category()` strings, never
//! an object name or error text); names use base units (`_seconds`).

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

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    reconciliations: Counter,
    failures: Family<FailureLabels, Counter>,
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
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciliations,
            failures,
            duration,
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
}
