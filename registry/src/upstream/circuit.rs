//! A circuit breaker per upstream: after a run of consecutive failures it opens and requests fail
//! fast; after a cool-down one probe request is let through, and its outcome closes or re-opens it.
//! A 429 with `Retry-After` also blocks requests until then, so a rate-limited upstream is not asked
//! again before it said it would answer.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct State {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probe_in_flight: bool,
    rate_limited_until: Option<Instant>,
}

/// The breaker.
#[derive(Debug)]
pub struct Circuit {
    threshold: u32,
    open_for: Duration,
    state: Mutex<State>,
}

/// What a caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send the request.
    Allow,
    /// Send it as the single probe of a half-open circuit.
    Probe,
    /// Do not send: the circuit is open for this much longer.
    Open(Duration),
    /// Do not send: the upstream asked us to wait this much longer (429 with Retry-After).
    RateLimited(Duration),
}

impl Circuit {
    pub fn new(threshold: u32, open_for: Duration) -> Circuit {
        Circuit {
            threshold: threshold.max(1),
            open_for,
            state: Mutex::new(State {
                consecutive_failures: 0,
                open_until: None,
                probe_in_flight: false,
                rate_limited_until: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks whether a request may go upstream now.
    pub fn admit(&self, now: Instant) -> Admission {
        let mut s = self.lock();
        if let Some(until) = s.rate_limited_until {
            if now < until {
                return Admission::RateLimited(until - now);
            }
            s.rate_limited_until = None;
        }
        match s.open_until {
            None => Admission::Allow,
            Some(until) if now < until => Admission::Open(until - now),
            Some(_) if s.probe_in_flight => Admission::Open(Duration::ZERO),
            Some(_) => {
                s.probe_in_flight = true;
                Admission::Probe
            }
        }
    }

    /// Records an upstream answer that shows it is healthy (any status below 500 but 429).
    pub fn success(&self) {
        let mut s = self.lock();
        s.consecutive_failures = 0;
        s.open_until = None;
        s.probe_in_flight = false;
    }

    /// Records a connection failure, timeout or 5xx. Returns true when the circuit is now open.
    pub fn failure(&self, now: Instant) -> bool {
        let mut s = self.lock();
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        s.probe_in_flight = false;
        if s.consecutive_failures >= self.threshold || s.open_until.is_some() {
            s.open_until = Some(now + self.open_for);
            return true;
        }
        false
    }

    /// Records a 429; with `retry_after` the upstream is not asked again before then.
    pub fn rate_limited(&self, now: Instant, retry_after: Option<Duration>) {
        let mut s = self.lock();
        s.probe_in_flight = false;
        if let Some(wait) = retry_after {
            // Bounded: a hostile or broken header must not silence an upstream for days.
            s.rate_limited_until = Some(now + wait.min(Duration::from_secs(3600)));
        }
    }

    pub fn is_open(&self, now: Instant) -> bool {
        matches!(self.lock().open_until, Some(until) if now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_opens_after_threshold_and_lets_one_probe_through_after_cool_down() {
        let c = Circuit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!c.failure(t0));
        assert!(!c.failure(t0));
        assert_eq!(c.admit(t0), Admission::Allow);
        assert!(c.failure(t0));
        assert!(matches!(c.admit(t0), Admission::Open(_)));
        let later = t0 + Duration::from_secs(11);
        assert_eq!(c.admit(later), Admission::Probe);
        assert!(
            matches!(c.admit(later), Admission::Open(_)),
            "only one probe"
        );
        c.success();
        assert_eq!(c.admit(later), Admission::Allow);
    }

    #[test]
    fn failed_probe_reopens_the_circuit() {
        let c = Circuit::new(1, Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(c.failure(t0));
        let t1 = t0 + Duration::from_secs(6);
        assert_eq!(c.admit(t1), Admission::Probe);
        assert!(c.failure(t1));
        assert!(matches!(c.admit(t1), Admission::Open(_)));
    }

    #[test]
    fn retry_after_blocks_requests_until_it_passes() {
        let c = Circuit::new(3, Duration::from_secs(5));
        let t0 = Instant::now();
        c.rate_limited(t0, Some(Duration::from_secs(30)));
        assert!(matches!(c.admit(t0), Admission::RateLimited(_)));
        assert_eq!(c.admit(t0 + Duration::from_secs(31)), Admission::Allow);
        c.rate_limited(t0, None);
        assert_eq!(c.admit(t0), Admission::Allow);
    }
}
