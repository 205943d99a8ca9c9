//! Warm stage: `spec.warm` pre-fetched by one registry pod, as a background job the reconcile
//! polls.
//!
//! The warm of a list can take minutes (hundreds of MiB per image), longer than a reconcile pass
//! may block, so a pass never waits for it: it asks one registry pod that answers (`POST
//! /admin/warm` on its admin port, through [`Probe::warm`]) from a task kept in [`WarmJobs`],
//! and each later pass reads how far the task got. The task ends when the registry's stream
//! ends, when no progress line came for [`IDLE_LIMIT`] (a blob in progress reports its bytes
//! every 250 ms) or after [`MAX_WARM_DURATION`] in all.
//!
//! Invariants:
//! - What to do is decided by [`decide`], a pure function of the list ([`plan_warm`]), the
//!   previous `status.warm`, the job's progress, whether a registry pod answers and the time.
//!   It is level-triggered: a list is keyed by its hash (references normalised, sorted and
//!   deduplicated), and a list whose hash the status records as `Done` is never warmed again,
//!   across operator restarts too; one recorded as `Warming` with no job here (the operator
//!   restarted mid-warm) is warmed again (cached content costs nothing).
//! - A failed attempt is retried after [`retry_delay`] (1 min doubling to 1 h), measured from
//!   the end recorded in status, never at every pass.
//! - Status carries no clock but the start or end of an attempt, so an unchanged world writes
//!   nothing; progress (`done`) moves once per image.
//! - An invalid list (a bad reference, a registry the mirror does not serve, more than
//!   [`MAX_WARM_REFS`]) stops any job and names the item; it does not touch the mirror's
//!   serving (`Ready` ignores `Warmed`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest as _, Sha256};

use cachalot_registry::api::admin::{Outcome as ItemOutcome, WarmEvent, WarmRequest};
use cachalot_registry::oci::ImageRef;

use super::observe::Probe;
use crate::api::{
    ConditionStatus, ConditionType, MirrorCondition, WarmFailure, WarmState, WarmStatus,
    MAX_WARM_FAILURES_IN_STATUS,
};

/// Most references `spec.warm` may list (the CRD says the same).
pub const MAX_WARM_REFS: usize = 100;
/// A warm whose registry pod sends no progress line for this long is given up.
pub const IDLE_LIMIT: Duration = Duration::from_secs(300);
/// A warm still running after this long is given up (and retried later).
pub const MAX_WARM_DURATION: Duration = Duration::from_secs(2 * 3600);

/// Why `spec.warm` cannot be warmed as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WarmSpecError {
    /// More references than [`MAX_WARM_REFS`].
    #[error("spec.warm: {count} references; at most {MAX_WARM_REFS}")]
    TooMany {
        /// How many the list has.
        count: usize,
    },
    /// A reference does not parse.
    #[error("spec.warm[{index}]: {message}")]
    BadRef {
        /// Its position in the list.
        index: usize,
        /// The parser's message (it names the reference).
        message: String,
    },
    /// `service.type: External`: no registry runs here to warm anything.
    #[error("spec.warm: service.type External runs no registry here to warm the images; warm them on the external mirror")]
    NoRegistry,
    /// A reference names a registry this mirror does not serve.
    #[error("spec.warm[{index}]: `{reference}` is in registry `{registry}`, which this mirror does not serve (spec.registries: {served})")]
    NotMirrored {
        /// Its position in the list.
        index: usize,
        /// The reference as written.
        reference: String,
        /// Its registry.
        registry: String,
        /// The registries served, comma-separated.
        served: String,
    },
}

impl WarmSpecError {
    /// The `Warmed` condition's reason.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooMany { .. } => "TooManyWarmRefs",
            Self::BadRef { .. } => "InvalidWarmRef",
            Self::NotMirrored { .. } => "WarmRegistryNotMirrored",
            Self::NoRegistry => "NoRegistryToWarm",
        }
    }
}

/// A valid, non-empty `spec.warm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPlan {
    /// The references normalised (`docker.io/library/nginx:stable`), sorted, deduplicated.
    pub refs: Vec<String>,
    /// Hex SHA-256 (first 16 characters) of `refs` joined by newlines.
    pub hash: String,
}

/// The hash that keys a list. Pure.
#[must_use]
pub fn list_hash(refs: &[String]) -> String {
    let mut hasher = Sha256::new();
    for r in refs {
        hasher.update(r.as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(&hasher.finalize()[..8])
}

/// Checks `spec.warm` against the registries the mirror serves. `Ok(None)` for an empty list.
/// Pure.
///
/// # Errors
/// [`WarmSpecError`] naming the first bad item.
pub fn plan_warm(refs: &[String], served: &[&str]) -> Result<Option<WarmPlan>, WarmSpecError> {
    if refs.is_empty() {
        return Ok(None);
    }
    if refs.len() > MAX_WARM_REFS {
        return Err(WarmSpecError::TooMany { count: refs.len() });
    }
    let mut normalised = Vec::with_capacity(refs.len());
    for (index, text) in refs.iter().enumerate() {
        let image = text
            .parse::<ImageRef>()
            .map_err(|e| WarmSpecError::BadRef {
                index,
                message: e.to_string(),
            })?;
        if !served.contains(&image.registry.as_str()) {
            return Err(WarmSpecError::NotMirrored {
                index,
                reference: text.clone(),
                registry: image.registry.clone(),
                served: served.join(", "),
            });
        }
        normalised.push(image.to_string());
    }
    normalised.sort();
    normalised.dedup();
    let hash = list_hash(&normalised);
    Ok(Some(WarmPlan {
        refs: normalised,
        hash,
    }))
}

/// The wait before attempt `attempts + 1` after `attempts` failed ones: 1 min doubling, at most
/// 1 h. Pure.
#[must_use]
pub fn retry_delay(attempts: i32) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1).clamp(0, 6)).unwrap_or(6);
    Duration::from_secs(60u64 << exp).min(Duration::from_secs(3600))
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnd {
    /// Unix seconds.
    pub at: u64,
    /// Why the warm as a whole broke off (the pod could not be reached, the stream stopped);
    /// `None` when the registry sent its summary.
    pub broken: Option<String>,
}

/// What a warm job has done so far.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobView {
    /// The list's hash.
    pub hash: String,
    /// Which attempt this is (1-based).
    pub attempt: i32,
    /// Unix seconds.
    pub started_at: u64,
    /// Images ended.
    pub done: usize,
    /// Images in the list.
    pub total: usize,
    /// Failed images (the first [`MAX_WARM_FAILURES_IN_STATUS`]).
    pub failed: Vec<WarmFailure>,
    /// All failed images.
    pub failed_count: usize,
    /// Set once the job ended.
    pub end: Option<JobEnd>,
}

/// What the reconcile should do about the warm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmAction {
    /// Leave any job as it is.
    Nothing,
    /// Start (or restart) the job for this list at `base_url`, replacing any other.
    Start {
        /// The registry pod's admin base URL.
        base_url: String,
        /// The list.
        refs: Vec<String>,
        /// Its hash.
        hash: String,
        /// The attempt number.
        attempt: i32,
        /// Unix seconds: the start the status records.
        started_at: u64,
    },
    /// Stop and forget any job (the list is empty or invalid).
    Stop,
}

/// The decision of one pass.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmDecision {
    /// `status.warm`.
    pub status: Option<WarmStatus>,
    /// The `Warmed` condition (with `status`).
    pub condition: Option<MirrorCondition>,
    /// What to do.
    pub action: WarmAction,
    /// Look again within this long (a warm in progress, a retry due).
    pub recheck: Option<Duration>,
}

/// What [`decide`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct WarmInput<'a> {
    /// `spec.warm` checked.
    pub plan: &'a Result<Option<WarmPlan>, WarmSpecError>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The current `status.warm`.
    pub previous: Option<&'a WarmStatus>,
    /// The job kept for this mirror, if any (of any list).
    pub job: Option<&'a JobView>,
    /// The admin base URL of a registry pod that answers, if any.
    pub target: Option<&'a str>,
    /// Unix seconds.
    pub now: u64,
    /// How often a warm in progress is looked at.
    pub poll: Duration,
}

fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| "-".to_string(), |t| t.to_string())
}

fn parse_time(text: Option<&str>) -> Option<u64> {
    let t: k8s_openapi::jiff::Timestamp = text?.parse().ok()?;
    u64::try_from(t.as_second()).ok()
}

fn to_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn condition(status: ConditionStatus, reason: &str, message: String) -> MirrorCondition {
    MirrorCondition {
        type_: ConditionType::Warmed,
        status,
        reason: reason.to_string(),
        message,
        observed_generation: None,
        last_transition_time: None,
    }
}

/// The `Warmed` condition of a status. Pure.
fn warmed_condition(status: &WarmStatus, invalid_reason: &str) -> MirrorCondition {
    let (done, total) = (status.done, status.total);
    match status.state {
        WarmState::Pending => condition(
            ConditionStatus::Unknown,
            "WaitingForRegistry",
            format!("{total} image(s) to warm once a registry pod answers"),
        ),
        WarmState::Warming => condition(
            ConditionStatus::Unknown,
            "Warming",
            format!(
                "{done}/{total} image(s) warmed or failed (attempt {})",
                status.attempts
            ),
        ),
        WarmState::Done => condition(
            ConditionStatus::True,
            "Warmed",
            format!("{total}/{total} image(s) cached"),
        ),
        WarmState::Failed => {
            condition(ConditionStatus::False, "WarmFailed", status.message.clone())
        }
        WarmState::Invalid => condition(
            ConditionStatus::False,
            invalid_reason,
            status.message.clone(),
        ),
    }
}

fn summary(state: WarmState, done: i32, total: i32) -> String {
    match state {
        WarmState::Invalid => "Invalid".to_string(),
        _ => format!("{state:?} {done}/{total}"),
    }
}

fn warming(plan: &WarmPlan, generation: Option<i64>, attempt: i32, now: u64) -> WarmStatus {
    let total = to_i32(plan.refs.len());
    WarmStatus {
        observed_hash: plan.hash.clone(),
        observed_generation: generation,
        state: WarmState::Warming,
        done: 0,
        total,
        failed: Vec::new(),
        attempts: attempt,
        last_time: Some(rfc3339(now)),
        summary: summary(WarmState::Warming, 0, total),
        message: String::new(),
    }
}

/// The status a job shows. Pure.
fn from_job(job: &JobView, generation: Option<i64>, retry_at: Option<u64>) -> WarmStatus {
    let total = to_i32(job.total);
    let (state, done, last, message) = match &job.end {
        None => (WarmState::Warming, job.done, job.started_at, String::new()),
        Some(end) if end.broken.is_none() && job.failed_count == 0 => {
            (WarmState::Done, job.total, end.at, String::new())
        }
        Some(end) => {
            let ok = job.done.saturating_sub(job.failed_count);
            let mut message = match &end.broken {
                Some(why) => format!("{ok}/{} image(s) warmed, then: {why}", job.total),
                None => format!(
                    "{ok}/{} image(s) warmed, {} failed",
                    job.total, job.failed_count
                ),
            };
            if let Some(first) = job.failed.first() {
                message.push_str(&format!("; {}: {}", first.reference, first.message));
            }
            if let Some(at) = retry_at {
                message.push_str(&format!("; retried at {}", rfc3339(at)));
            }
            (WarmState::Failed, job.done, end.at, message)
        }
    };
    let done = to_i32(done);
    WarmStatus {
        observed_hash: job.hash.clone(),
        observed_generation: generation,
        state,
        done,
        total,
        failed: job.failed.clone(),
        attempts: job.attempt,
        last_time: Some(rfc3339(last)),
        summary: summary(state, done, total),
        message,
    }
}

/// Decides the warm of one pass (see the module header). Pure.
#[must_use]
pub fn decide(input: &WarmInput<'_>) -> WarmDecision {
    let plan = match input.plan {
        Ok(None) => {
            return WarmDecision {
                status: None,
                condition: None,
                action: WarmAction::Stop,
                recheck: None,
            }
        }
        Err(e) => {
            let status = WarmStatus {
                observed_hash: String::new(),
                observed_generation: input.generation,
                state: WarmState::Invalid,
                summary: summary(WarmState::Invalid, 0, 0),
                message: e.to_string(),
                ..WarmStatus::default()
            };
            return WarmDecision {
                condition: Some(warmed_condition(&status, e.reason())),
                status: Some(status),
                action: WarmAction::Stop,
                recheck: None,
            };
        }
        Ok(Some(plan)) => plan,
    };
    let start = |attempt: i32, base_url: &str| {
        let status = warming(plan, input.generation, attempt, input.now);
        WarmDecision {
            condition: Some(warmed_condition(&status, "")),
            status: Some(status),
            action: WarmAction::Start {
                base_url: base_url.to_string(),
                refs: plan.refs.clone(),
                hash: plan.hash.clone(),
                attempt,
                started_at: input.now,
            },
            recheck: Some(input.poll),
        }
    };
    let keep = |status: WarmStatus, recheck: Option<Duration>| WarmDecision {
        condition: Some(warmed_condition(&status, "")),
        status: Some(status),
        action: WarmAction::Nothing,
        recheck,
    };
    // A failed attempt ended at `end` is retried once its delay has passed and a pod answers.
    let retry = |attempts: i32, end: u64, status: WarmStatus| {
        let due = end.saturating_add(retry_delay(attempts).as_secs());
        match input.target {
            Some(target) if input.now >= due => start(attempts.saturating_add(1), target),
            _ => {
                let wait = Duration::from_secs(due.saturating_sub(input.now)).max(input.poll);
                keep(status, Some(wait))
            }
        }
    };
    if let Some(job) = input.job.filter(|j| j.hash == plan.hash) {
        return match &job.end {
            None => keep(from_job(job, input.generation, None), Some(input.poll)),
            Some(end) => {
                let failed = end.broken.is_some() || job.failed_count > 0;
                let due = failed.then(|| end.at.saturating_add(retry_delay(job.attempt).as_secs()));
                let status = from_job(job, input.generation, due);
                if failed {
                    retry(job.attempt, end.at, status)
                } else {
                    keep(status, None)
                }
            }
        };
    }
    let previous = input.previous.filter(|p| p.observed_hash == plan.hash);
    match (previous, input.target) {
        (Some(p), _) if p.state == WarmState::Done => {
            let mut status = p.clone();
            status.observed_generation = input.generation;
            keep(status, None)
        }
        (Some(p), _) if p.state == WarmState::Failed => {
            let end = parse_time(p.last_time.as_deref()).unwrap_or(0);
            let mut status = p.clone();
            status.observed_generation = input.generation;
            retry(p.attempts.max(1), end, status)
        }
        // Warming with no job here: the operator restarted mid-warm; the same attempt again.
        (Some(p), Some(target)) if p.state == WarmState::Warming => {
            start(p.attempts.max(1), target)
        }
        (_, Some(target)) => start(1, target),
        (_, None) => {
            let total = to_i32(plan.refs.len());
            let status = WarmStatus {
                observed_hash: plan.hash.clone(),
                observed_generation: input.generation,
                state: WarmState::Pending,
                total,
                attempts: previous.map_or(0, |p| p.attempts),
                summary: summary(WarmState::Pending, 0, total),
                ..WarmStatus::default()
            };
            keep(status, Some(input.poll))
        }
    }
}

/// A running or ended warm job of one mirror. Its task is aborted when it is dropped.
struct Job {
    progress: Arc<Mutex<JobView>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Job {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The warm jobs of every mirror, by `namespace/name`: at most one each.
#[derive(Default)]
pub struct WarmJobs {
    jobs: Mutex<HashMap<String, Job>>,
}

impl std::fmt::Debug for WarmJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmJobs").finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl WarmJobs {
    /// What the job of `key` has done so far.
    #[must_use]
    pub fn view(&self, key: &str) -> Option<JobView> {
        let jobs = self.jobs.lock().ok()?;
        let job = jobs.get(key)?;
        job.progress.lock().ok().map(|p| p.clone())
    }

    /// Carries out `action` for `key`.
    pub fn act(&self, key: &str, action: &WarmAction, probe: &Arc<dyn Probe>) {
        let Ok(mut jobs) = self.jobs.lock() else {
            return;
        };
        match action {
            WarmAction::Nothing => {}
            WarmAction::Stop => {
                jobs.remove(key);
            }
            WarmAction::Start {
                base_url,
                refs,
                hash,
                attempt,
                started_at,
            } => {
                tracing::info!(mirror = %key, images = refs.len(), %base_url, attempt, "warming spec.warm");
                let progress = Arc::new(Mutex::new(JobView {
                    hash: hash.clone(),
                    attempt: *attempt,
                    started_at: *started_at,
                    total: refs.len(),
                    ..JobView::default()
                }));
                let events = probe.warm(
                    base_url.clone(),
                    WarmRequest {
                        refs: refs.clone(),
                        platform: None,
                    },
                );
                let task = tokio::spawn(follow(
                    key.to_string(),
                    events,
                    Arc::clone(&progress),
                    IDLE_LIMIT,
                    MAX_WARM_DURATION,
                ));
                jobs.insert(key.to_string(), Job { progress, task });
            }
        }
    }

    /// Forgets the job of a mirror that goes away.
    pub fn remove(&self, key: &str) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.remove(key);
        }
    }
}

/// Follows a warm stream into `progress` until it ends, stalls for `idle` or runs past `limit`.
pub async fn follow(
    key: String,
    mut events: futures::stream::BoxStream<'static, Result<WarmEvent, super::observe::ProbeError>>,
    progress: Arc<Mutex<JobView>>,
    idle: Duration,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    let update = |f: &dyn Fn(&mut JobView)| {
        if let Ok(mut p) = progress.lock() {
            f(&mut p);
        }
    };
    let broken = loop {
        let next = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + idle),
            events.next(),
        )
        .await;
        match next {
            Ok(Some(Ok(WarmEvent::Done {
                reference,
                outcome,
                error,
                ..
            }))) => update(&|p| {
                p.done += 1;
                if outcome == ItemOutcome::Failed {
                    p.failed_count += 1;
                    if p.failed.len() < MAX_WARM_FAILURES_IN_STATUS {
                        p.failed.push(WarmFailure {
                            reference: reference.clone(),
                            message: error.clone().unwrap_or_default(),
                        });
                    }
                }
            }),
            Ok(Some(Ok(WarmEvent::Summary { .. }))) => break None,
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => break Some(e.to_string()),
            Ok(None) => {
                break Some("the registry pod's warm stream ended before its summary".to_string())
            }
            Err(_) if tokio::time::Instant::now() >= deadline => {
                break Some(format!("not finished after {limit:?}"))
            }
            Err(_) => break Some(format!("no progress for {idle:?}")),
        }
    };
    let at = unix_now();
    update(&|p| {
        p.end = Some(JobEnd {
            at,
            broken: broken.clone(),
        });
    });
    match &broken {
        None => tracing::info!(mirror = %key, "spec.warm done"),
        Some(why) => tracing::warn!(mirror = %key, error = %why, "spec.warm broke off"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn refs(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_string()).collect()
    }

    const SERVED: &[&str] = &["docker.io", "ghcr.io"];

    #[test]
    fn a_list_is_normalised_sorted_and_keyed_by_its_hash() {
        let a = plan_warm(&refs(&["nginx:stable", "ghcr.io/org/app:1"]), SERVED)
            .unwrap()
            .unwrap();
        assert_eq!(
            a.refs,
            ["docker.io/library/nginx:stable", "ghcr.io/org/app:1"]
        );
        let b = plan_warm(
            &refs(&[
                "ghcr.io/org/app:1",
                "docker.io/library/nginx:stable",
                "nginx:stable",
            ]),
            SERVED,
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.hash, b.hash, "same images, another spelling and order");
        let c = plan_warm(&refs(&["nginx:1.27"]), SERVED).unwrap().unwrap();
        assert_ne!(a.hash, c.hash);
        assert_eq!(plan_warm(&[], SERVED), Ok(None));
    }

    #[test]
    fn a_bad_reference_or_an_unserved_registry_is_named_with_its_reason() {
        let e = plan_warm(&refs(&["nginx", "Bad:Ref"]), SERVED).unwrap_err();
        assert_eq!(e.reason(), "InvalidWarmRef");
        assert!(e.to_string().starts_with("spec.warm[1]: "), "{e}");
        assert!(e.to_string().contains("Bad:Ref"), "{e}");
        assert_eq!(WarmSpecError::NoRegistry.reason(), "NoRegistryToWarm");
        let e = plan_warm(&refs(&["quay.io/org/app:1"]), SERVED).unwrap_err();
        assert_eq!(e.reason(), "WarmRegistryNotMirrored");
        assert_eq!(
            e.to_string(),
            "spec.warm[0]: `quay.io/org/app:1` is in registry `quay.io`, which this mirror does not serve (spec.registries: docker.io, ghcr.io)"
        );
        let many: Vec<String> = (0..=MAX_WARM_REFS).map(|i| format!("app:{i}")).collect();
        assert_eq!(
            plan_warm(&many, SERVED).unwrap_err().reason(),
            "TooManyWarmRefs"
        );
    }

    #[test]
    fn retries_wait_one_minute_doubling_to_an_hour() {
        assert_eq!(retry_delay(1), Duration::from_secs(60));
        assert_eq!(retry_delay(2), Duration::from_secs(120));
        assert_eq!(retry_delay(6), Duration::from_secs(1920));
        assert_eq!(retry_delay(7), Duration::from_secs(3600));
        assert_eq!(retry_delay(1000), Duration::from_secs(3600));
        assert_eq!(retry_delay(0), Duration::from_secs(60));
    }

    const NOW: u64 = 1_800_000_000;
    const POLL: Duration = Duration::from_secs(5);

    fn input<'a>(
        plan: &'a Result<Option<WarmPlan>, WarmSpecError>,
        previous: Option<&'a WarmStatus>,
        job: Option<&'a JobView>,
        target: Option<&'a str>,
        now: u64,
    ) -> WarmInput<'a> {
        WarmInput {
            plan,
            generation: Some(2),
            previous,
            job,
            target,
            now,
            poll: POLL,
        }
    }

    fn plan() -> Result<Option<WarmPlan>, WarmSpecError> {
        plan_warm(&refs(&["a:1", "b:1"]), SERVED)
    }

    #[test]
    fn a_new_list_waits_for_a_pod_then_starts_and_shows_progress_then_done() {
        let plan = plan();
        let hash = plan.as_ref().unwrap().as_ref().unwrap().hash.clone();
        let pending = decide(&input(&plan, None, None, None, NOW));
        let status = pending.status.clone().unwrap();
        assert_eq!(status.state, WarmState::Pending);
        assert_eq!(status.summary, "Pending 0/2");
        assert_eq!(pending.action, WarmAction::Nothing);
        assert_eq!(pending.condition.unwrap().reason, "WaitingForRegistry");

        let started = decide(&input(
            &plan,
            Some(&status),
            None,
            Some("http://pod:5001"),
            NOW,
        ));
        assert_eq!(
            started.action,
            WarmAction::Start {
                base_url: "http://pod:5001".into(),
                refs: refs(&["docker.io/library/a:1", "docker.io/library/b:1"]),
                hash: hash.clone(),
                attempt: 1,
                started_at: NOW,
            }
        );
        assert_eq!(started.recheck, Some(POLL));
        let status = started.status.unwrap();
        assert_eq!(status.summary, "Warming 0/2");

        let mut job = JobView {
            hash,
            attempt: 1,
            started_at: NOW,
            done: 1,
            total: 2,
            ..JobView::default()
        };
        let halfway = decide(&input(
            &plan,
            Some(&status),
            Some(&job),
            Some("http://pod:5001"),
            NOW + 10,
        ));
        assert_eq!(halfway.action, WarmAction::Nothing, "no second job");
        let halfway_status = halfway.status.unwrap();
        assert_eq!(halfway_status.summary, "Warming 1/2");
        assert_eq!(
            halfway_status.last_time, status.last_time,
            "the start time stays"
        );

        job.done = 2;
        job.end = Some(JobEnd {
            at: NOW + 20,
            broken: None,
        });
        let done = decide(&input(
            &plan,
            Some(&halfway_status),
            Some(&job),
            Some("http://pod:5001"),
            NOW + 30,
        ));
        let done_status = done.status.clone().unwrap();
        assert_eq!(done_status.state, WarmState::Done);
        assert_eq!(done_status.summary, "Done 2/2");
        assert_eq!(done.recheck, None);
        let cond = done.condition.unwrap();
        assert_eq!(
            (cond.status, cond.reason.as_str()),
            (ConditionStatus::True, "Warmed")
        );
        // Later passes with the job still kept, or after an operator restart (no job): the same
        // status, nothing started.
        let again = decide(&input(
            &plan,
            Some(&done_status),
            Some(&job),
            Some("http://pod:5001"),
            NOW + 999,
        ));
        assert_eq!(again.status.as_ref(), Some(&done_status));
        assert_eq!(again.action, WarmAction::Nothing);
        let restarted = decide(&input(
            &plan,
            Some(&done_status),
            None,
            Some("http://pod:5001"),
            NOW + 9999,
        ));
        assert_eq!(restarted.status.as_ref(), Some(&done_status));
        assert_eq!(restarted.action, WarmAction::Nothing);
    }

    #[test]
    fn a_changed_list_is_warmed_again_and_an_emptied_one_stops() {
        let old = plan();
        let old_hash = old.as_ref().unwrap().as_ref().unwrap().hash.clone();
        let done = WarmStatus {
            observed_hash: old_hash,
            state: WarmState::Done,
            done: 2,
            total: 2,
            attempts: 1,
            ..WarmStatus::default()
        };
        let new = plan_warm(&refs(&["a:1", "b:1", "c:1"]), SERVED);
        let d = decide(&input(
            &new,
            Some(&done),
            None,
            Some("http://pod:5001"),
            NOW,
        ));
        assert!(
            matches!(d.action, WarmAction::Start { attempt: 1, .. }),
            "{d:?}"
        );
        assert_eq!(d.status.unwrap().total, 3);

        let empty = Ok(None);
        let d = decide(&input(
            &empty,
            Some(&done),
            None,
            Some("http://pod:5001"),
            NOW,
        ));
        assert_eq!(
            (d.status, d.condition, d.action),
            (None, None, WarmAction::Stop)
        );
    }

    #[test]
    fn a_failed_attempt_is_retried_after_its_delay_not_at_every_pass() {
        let plan = plan();
        let hash = plan.as_ref().unwrap().as_ref().unwrap().hash.clone();
        let job = JobView {
            hash,
            attempt: 2,
            started_at: NOW,
            done: 2,
            total: 2,
            failed: vec![WarmFailure {
                reference: "docker.io/library/b:1".into(),
                message: "manifest unknown".into(),
            }],
            failed_count: 1,
            end: Some(JobEnd {
                at: NOW + 10,
                broken: None,
            }),
        };
        let target = Some("http://pod:5001");
        let failed = decide(&input(&plan, None, Some(&job), target, NOW + 11));
        let status = failed.status.clone().unwrap();
        assert_eq!(status.state, WarmState::Failed);
        assert_eq!(status.summary, "Failed 2/2");
        assert_eq!(status.failed.len(), 1);
        assert!(
            status
                .message
                .starts_with("1/2 image(s) warmed, 1 failed; docker.io/library/b:1: manifest unknown; retried at "),
            "{}",
            status.message
        );
        assert_eq!(failed.action, WarmAction::Nothing);
        // Attempt 2 failed: the next one waits 2 minutes from the end.
        assert_eq!(failed.recheck, Some(Duration::from_secs(119)));
        assert_eq!(failed.condition.unwrap().reason, "WarmFailed");

        // After an operator restart the same wait comes from the status.
        let restarted = decide(&input(&plan, Some(&status), None, target, NOW + 60));
        assert_eq!(restarted.action, WarmAction::Nothing);
        assert_eq!(restarted.status.as_ref(), Some(&status));
        assert_eq!(restarted.recheck, Some(Duration::from_secs(70)));
        let due = decide(&input(&plan, Some(&status), None, target, NOW + 130));
        assert!(
            matches!(due.action, WarmAction::Start { attempt: 3, .. }),
            "{due:?}"
        );
        let due = decide(&input(&plan, Some(&status), Some(&job), target, NOW + 130));
        assert!(
            matches!(due.action, WarmAction::Start { attempt: 3, .. }),
            "{due:?}"
        );
        // No pod answers: it waits, polling.
        let no_pod = decide(&input(&plan, Some(&status), None, None, NOW + 130));
        assert_eq!(no_pod.action, WarmAction::Nothing);
        assert_eq!(no_pod.recheck, Some(POLL));
    }

    #[test]
    fn a_warm_cut_short_by_an_operator_restart_starts_again_with_the_same_attempt() {
        let plan = plan();
        let hash = plan.as_ref().unwrap().as_ref().unwrap().hash.clone();
        let warming = WarmStatus {
            observed_hash: hash,
            state: WarmState::Warming,
            done: 1,
            total: 2,
            attempts: 2,
            ..WarmStatus::default()
        };
        let d = decide(&input(
            &plan,
            Some(&warming),
            None,
            Some("http://pod:5001"),
            NOW,
        ));
        assert!(
            matches!(d.action, WarmAction::Start { attempt: 2, .. }),
            "{d:?}"
        );
    }

    #[test]
    fn an_invalid_list_stops_the_job_and_names_the_item() {
        let bad = plan_warm(&refs(&["quay.io/x:1"]), SERVED);
        let d = decide(&input(&bad, None, None, Some("http://pod:5001"), NOW));
        assert_eq!(d.action, WarmAction::Stop);
        let status = d.status.unwrap();
        assert_eq!(
            (status.state, status.summary.as_str()),
            (WarmState::Invalid, "Invalid")
        );
        let cond = d.condition.unwrap();
        assert_eq!(
            (cond.status, cond.reason.as_str()),
            (ConditionStatus::False, "WarmRegistryNotMirrored")
        );
        assert!(cond.message.contains("quay.io"), "{}", cond.message);
    }

    #[tokio::test]
    async fn a_job_counts_items_keeps_failures_and_ends_on_the_summary_or_a_broken_stream() {
        let done = |item: usize, failed: bool| {
            Ok(WarmEvent::Done {
                item,
                reference: format!("docker.io/library/i:{item}"),
                outcome: if failed {
                    ItemOutcome::Failed
                } else {
                    ItemOutcome::Ok
                },
                manifests: 1,
                blobs: 1,
                bytes: 1,
                fetched_bytes: 1,
                error: failed.then(|| "boom".to_string()),
            })
        };
        let summary = Ok(WarmEvent::Summary {
            items: 2,
            ok: 1,
            failed: 1,
            bytes: 2,
            fetched_bytes: 2,
        });
        let progress = Arc::new(Mutex::new(JobView::default()));
        let events = futures::stream::iter(vec![done(0, false), done(1, true), summary]).boxed();
        follow(
            "ns/m".into(),
            events,
            Arc::clone(&progress),
            IDLE_LIMIT,
            MAX_WARM_DURATION,
        )
        .await;
        let p = progress.lock().unwrap().clone();
        assert_eq!((p.done, p.failed_count), (2, 1));
        assert_eq!(p.failed[0].message, "boom");
        assert_eq!(p.end.unwrap().broken, None);

        let progress = Arc::new(Mutex::new(JobView::default()));
        let events = futures::stream::iter(vec![done(0, false)]).boxed();
        follow(
            "ns/m".into(),
            events,
            Arc::clone(&progress),
            IDLE_LIMIT,
            MAX_WARM_DURATION,
        )
        .await;
        let p = progress.lock().unwrap().clone();
        assert_eq!(
            p.end.unwrap().broken.as_deref(),
            Some("the registry pod's warm stream ended before its summary")
        );

        let progress = Arc::new(Mutex::new(JobView::default()));
        let events = futures::stream::pending().boxed();
        follow(
            "ns/m".into(),
            events,
            Arc::clone(&progress),
            Duration::from_millis(50),
            MAX_WARM_DURATION,
        )
        .await;
        let p = progress.lock().unwrap().clone();
        assert_eq!(
            p.end.unwrap().broken.as_deref(),
            Some("no progress for 50ms")
        );
    }
}
