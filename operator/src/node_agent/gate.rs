//! The reachability gate: which mirror endpoints may be written into node files.
//!
//! Pure state machine over probe results; time is passed in so it is testable without waiting.
//! Rules: an endpoint becomes live on its first successful `GET /v2/`; a live endpoint is taken
//! out only after it has not answered for `unreachable_after` (one failed probe of a healthy
//! mirror does not flap the file); an endpoint never seen alive is never written.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Health {
    live: bool,
    last_ok: Option<Instant>,
}

/// Per endpoint liveness, kept across reconcile rounds.
#[derive(Debug, Default, Clone)]
pub struct Gate {
    endpoints: BTreeMap<String, Health>,
}

impl Gate {
    /// Records one probe result at `now`; returns whether the endpoint's liveness changed.
    pub fn observe(
        &mut self,
        endpoint: &str,
        answered: bool,
        now: Instant,
        unreachable_after: Duration,
    ) -> bool {
        let health = self
            .endpoints
            .entry(endpoint.to_string())
            .or_insert(Health {
                live: false,
                last_ok: None,
            });
        let was = health.live;
        if answered {
            health.live = true;
            health.last_ok = Some(now);
        } else if health.live {
            let silent_for = health
                .last_ok
                .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
            if silent_for >= unreachable_after {
                health.live = false;
            }
        }
        was != health.live
    }

    /// Whether `endpoint` may be written.
    #[must_use]
    pub fn is_live(&self, endpoint: &str) -> bool {
        self.endpoints.get(endpoint).is_some_and(|h| h.live)
    }

    /// The live endpoints.
    #[must_use]
    pub fn live_set(&self) -> BTreeSet<String> {
        self.endpoints
            .iter()
            .filter(|(_, h)| h.live)
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// Forgets endpoints that are no longer desired, so a re-added one must pass the gate again.
    pub fn retain(&mut self, desired: &BTreeSet<String>) {
        self.endpoints.retain(|e, _| desired.contains(e));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const AFTER: Duration = Duration::from_secs(30);

    #[test]
    fn endpoint_is_not_live_before_it_ever_answers() {
        let mut g = Gate::default();
        let t0 = Instant::now();
        assert!(!g.observe("http://m", false, t0, AFTER));
        assert!(!g.is_live("http://m"));
        assert!(!g.is_live("http://never-probed"));
    }

    #[test]
    fn endpoint_goes_live_on_first_answer() {
        let mut g = Gate::default();
        assert!(g.observe("http://m", true, Instant::now(), AFTER));
        assert!(g.is_live("http://m"));
    }

    #[test]
    fn live_endpoint_survives_failures_shorter_than_unreachable_after() {
        let mut g = Gate::default();
        let t0 = Instant::now();
        g.observe("http://m", true, t0, AFTER);
        assert!(!g.observe("http://m", false, t0 + Duration::from_secs(29), AFTER));
        assert!(g.is_live("http://m"));
    }

    #[test]
    fn live_endpoint_is_taken_out_after_unreachable_after_and_comes_back_on_answer() {
        let mut g = Gate::default();
        let t0 = Instant::now();
        g.observe("http://m", true, t0, AFTER);
        assert!(g.observe("http://m", false, t0 + AFTER, AFTER));
        assert!(!g.is_live("http://m"));
        assert!(g.observe("http://m", true, t0 + AFTER * 2, AFTER));
        assert!(g.is_live("http://m"));
    }

    #[test]
    fn forgotten_endpoint_must_pass_the_gate_again() {
        let mut g = Gate::default();
        g.observe("http://m", true, Instant::now(), AFTER);
        g.retain(&BTreeSet::new());
        assert!(!g.is_live("http://m"));
        assert!(g.live_set().is_empty());
    }
}
