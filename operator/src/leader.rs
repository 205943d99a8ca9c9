//! Leader election with a `coordination.k8s.io/v1` Lease, so that several operator replicas are
//! safe: only the holder reconciles.
//!
//! kube 5 ships no elector, so this is a small one in the client-go style: the holder renews
//! `renewTime` every `retry_period`; a candidate takes over only when the lease has not been
//! renewed for `lease_duration`. Every write is a replace carrying the read `resourceVersion`, so
//! two candidates racing for an expired lease cannot both win (one gets 409 Conflict).
//!
//! Invariants: [`decide`] is pure (the clock is a parameter); a holder that cannot renew within
//! `renew_deadline` reports the loss and the caller stops reconciling (the binary exits, so a
//! fresh process re-enters the election).
//!
//! Fencing: the loop that renews may learn of a loss too late (a process frozen for longer than
//! the lease wakes up with reconciles in flight, as a hung node or a stopped container does). So
//! the holder also keeps a [`LeaseGuard`]: the monotonic instant of its last successful renewal.
//! Every write of the controller asks the guard first, and the guard says "held" only within
//! `renew_deadline` of that instant, which is shorter than the `lease_duration` a standby waits
//! before taking over. A woken process therefore stops writing before its first write, without
//! waiting for its renewal loop to notice.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;
use tracing::{info, warn};

/// Failure of a lease operation.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Reading the Lease failed.
    #[error("cannot read Lease {namespace}/{name}: {source}")]
    Read {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// API error.
        #[source]
        source: kube::Error,
    },
    /// Writing the Lease failed for another reason than losing a race.
    #[error("cannot write Lease {namespace}/{name}: {source}")]
    Write {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// API error.
        #[source]
        source: kube::Error,
    },
    /// The holder could not renew within the deadline.
    #[error("lost the leader Lease {namespace}/{name}: not renewed within {deadline:?}")]
    Lost {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The renew deadline.
        deadline: Duration,
    },
}

/// The holder's own view of how long its lease is still safely held, shared with the controller.
#[derive(Debug, Clone)]
pub struct LeaseGuard {
    renewed: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    valid_for: Duration,
}

/// Whether a lease renewed at `renewed` is still held at `now`, renewals counting for
/// `valid_for`. Pure.
#[must_use]
pub fn still_held(
    renewed: Option<std::time::Instant>,
    valid_for: Duration,
    now: std::time::Instant,
) -> bool {
    renewed.is_some_and(|at| now.saturating_duration_since(at) < valid_for)
}

impl LeaseGuard {
    /// A guard that counts each renewal for `valid_for` (the renew deadline).
    #[must_use]
    pub fn new(valid_for: Duration) -> Self {
        Self {
            renewed: std::sync::Arc::new(std::sync::Mutex::new(None)),
            valid_for,
        }
    }

    /// Records a successful renewal that was sent at `at`.
    pub fn renewed_at(&self, at: std::time::Instant) {
        let mut renewed = self.renewed.lock().unwrap_or_else(|e| e.into_inner());
        *renewed = Some(renewed.map_or(at, |before| before.max(at)));
    }

    /// Forgets the lease (released or lost).
    pub fn clear(&self) {
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether writes are allowed now.
    #[must_use]
    pub fn held(&self) -> bool {
        let renewed = *self.renewed.lock().unwrap_or_else(|e| e.into_inner());
        still_held(renewed, self.valid_for, std::time::Instant::now())
    }
}

/// Election settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// How long the holder keeps trying to renew before giving up leadership.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    #[must_use]
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a candidate should do with the lease it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No lease exists: create it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it over.
    TakeOver,
    /// Someone else holds a valid lease.
    Wait,
}

/// Decides from the current lease spec, who we are and the time.
#[must_use]
pub fn decide(
    lease: Option<&LeaseSpec>,
    identity: &str,
    now: Timestamp,
    default_duration: Duration,
) -> Decision {
    let Some(spec) = lease else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let duration = spec.lease_duration_seconds.map_or(default_duration, |s| {
        Duration::from_secs(u64::try_from(s).unwrap_or(0))
    });
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return Decision::TakeOver;
    };
    let expires = renewed
        .0
        .checked_add(SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX);
    if expires < now {
        Decision::TakeOver
    } else {
        Decision::Wait
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// A lease elector for one identity.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    guard: LeaseGuard,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Elector {
    /// An elector using `client`.
    #[must_use]
    pub fn new(client: Client, config: LeaderConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            guard: LeaseGuard::new(config.renew_deadline),
            config,
        }
    }

    /// The guard the controller checks before each write.
    #[must_use]
    pub fn guard(&self) -> LeaseGuard {
        self.guard.clone()
    }

    fn read_err(&self, source: kube::Error) -> LeaseError {
        LeaseError::Read {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        }
    }
    fn write_err(&self, source: kube::Error) -> LeaseError {
        LeaseError::Write {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        }
    }

    /// One attempt to acquire or renew. `Ok(true)` when we hold the lease afterwards.
    ///
    /// # Errors
    /// [`LeaseError`] for API failures other than losing a race.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaseError> {
        // Taken before the request: the lease counts from no later than this.
        let sent = std::time::Instant::now();
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.read_err(e))?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.config.identity,
            now,
            self.config.lease_duration,
        );
        let seconds = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let result = match (decision, current) {
            (Decision::Wait, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.config.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::TakeOver {
                    spec.holder_identity = Some(self.config.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions =
                        Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
                }
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(MicroTime(now));
                // The read resourceVersion stays in metadata: a concurrent writer makes this 409.
                self.api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
            }
            (_, None) => return Ok(false),
        };
        match result {
            Ok(_) => {
                self.guard.renewed_at(sent);
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(self.write_err(e)),
        }
    }

    /// Waits until this replica holds the lease. API errors are logged and retried.
    pub async fn acquire(&self) {
        let mut tick = tokio::time::interval(self.config.retry_period);
        loop {
            tick.tick().await;
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.config.name, identity = %self.config.identity, "acquired leader lease");
                    return;
                }
                Ok(false) => {}
                Err(error) => warn!(%error, "leader election attempt failed"),
            }
        }
    }

    /// Renews until a renewal fails for longer than `renew_deadline`; returns the loss.
    pub async fn hold(&self) -> LeaseError {
        let mut tick = tokio::time::interval(self.config.retry_period);
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    self.guard.clear();
                    return LeaseError::Lost {
                        namespace: self.config.namespace.clone(),
                        name: self.config.name.clone(),
                        deadline: self.config.renew_deadline,
                    };
                }
                Err(error) => warn!(%error, "lease renewal failed"),
            }
            if last_renewed.elapsed() > self.config.renew_deadline {
                self.guard.clear();
                return LeaseError::Lost {
                    namespace: self.config.namespace.clone(),
                    name: self.config.name.clone(),
                    deadline: self.config.renew_deadline,
                };
            }
        }
    }

    /// Gives the lease up on a clean shutdown so a standby takes over at once.
    ///
    /// # Errors
    /// [`LeaseError`] when the lease cannot be read or written.
    pub async fn release(&self) -> Result<(), LeaseError> {
        self.guard.clear();
        let Some(mut lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.read_err(e))?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
            .map_err(|e| self.write_err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_lease_is_held_only_within_the_renew_deadline_of_the_last_renewal() {
        let t0 = std::time::Instant::now();
        let deadline = Duration::from_secs(10);
        assert!(!still_held(None, deadline, t0), "never renewed");
        assert!(still_held(Some(t0), deadline, t0 + Duration::from_secs(9)));
        assert!(!still_held(
            Some(t0),
            deadline,
            t0 + Duration::from_secs(10)
        ));
        // A process frozen for a minute wakes up without the right to write.
        assert!(!still_held(
            Some(t0),
            deadline,
            t0 + Duration::from_secs(60)
        ));
    }

    #[test]
    fn a_guard_keeps_the_latest_renewal_and_forgets_on_clear() {
        let guard = LeaseGuard::new(Duration::from_secs(10));
        assert!(!guard.held());
        let now = std::time::Instant::now();
        guard.renewed_at(now);
        guard.renewed_at(now.checked_sub(Duration::from_secs(30)).unwrap_or(now));
        assert!(
            guard.held(),
            "an older renewal reported late does not shorten the lease"
        );
        guard.clear();
        assert!(!guard.held());
    }

    fn spec(holder: &str, renewed_secs_ago: i64, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn absent_lease_is_created_and_own_lease_is_renewed() {
        let now = Timestamp::now();
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "a", now, d), Decision::Create);
        assert_eq!(
            decide(Some(&spec("a", 1, now)), "a", now, d),
            Decision::Renew
        );
    }

    #[test]
    fn another_holders_fresh_lease_is_respected_and_an_expired_one_taken_over() {
        let now = Timestamp::now();
        let d = Duration::from_secs(15);
        assert_eq!(
            decide(Some(&spec("b", 5, now)), "a", now, d),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&spec("b", 16, now)), "a", now, d),
            Decision::TakeOver
        );
        assert_eq!(
            decide(Some(&spec("", 1, now)), "a", now, d),
            Decision::TakeOver
        );
    }
}
