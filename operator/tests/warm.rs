//! `spec.warm` against a real `cachalot-registry` process (built next to the operator binary)
//! whose docker.io is a real distribution behind the counting fault proxy: the operator's warm
//! stage, pass by pass as the reconcile runs it (`warm::decide`, then `WarmJobs::act` with the
//! real `HttpProbe`), warms the list in a background job, shows progress and then `Done`, does
//! not warm an unchanged list again after an operator restart, warms a changed list, reports
//! the image that failed and schedules its retry.
//!
//! Skips (`SKIPPED <test>: <reason>`) when the registry binary is not built, and fails instead
//! under `CACHALOT_E2E_LOCAL=required`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cachalot_operator::api::{ConditionStatus, WarmState, WarmStatus};
use cachalot_operator::controller::observe::{HttpProbe, Probe};
use cachalot_operator::controller::warm::{
    decide, plan_warm, WarmAction, WarmDecision, WarmInput, WarmJobs,
};
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::FaultProxy;
use cachalot_testkit::image::{docker_image, TestImage};
use cachalot_testkit::process::LoggedChild;
use cachalot_testkit::wait::{free_port, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

fn registry_binary() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_cachalot-operator")).with_file_name("cachalot-registry")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The real registry with docker.io at `upstream`; its admin base URL.
async fn start_registry(dir: &Path, upstream: &str) -> (LoggedChild, String) {
    let (port, admin_port) = (free_port().unwrap(), free_port().unwrap());
    let mut cmd = Command::new(registry_binary());
    cmd.arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .arg("--storage")
        .arg(dir.join("store"))
        .args(["--upstream", &format!("docker.io={upstream}")]);
    let mut child = LoggedChild::spawn(&mut cmd, &dir.join("registry.log")).unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let client = reqwest::Client::new();
    let readyz = format!("{admin}/readyz");
    let ready = child
        .wait_ready(DEADLINE, POLL, || {
            let request = client.get(&readyz);
            async move { request.send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
    if let Err(e) = ready {
        panic!("cachalot-registry did not start: {e}\n{}", child.log_tail());
    }
    (child, admin)
}

fn blob_file(storage: &Path, digest: &str) -> PathBuf {
    storage
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// One warm pass as the reconcile runs it: decide, then act.
fn pass(
    jobs: &WarmJobs,
    probe: &Arc<dyn Probe>,
    list: &[&str],
    previous: Option<&WarmStatus>,
    target: &str,
) -> WarmDecision {
    let refs: Vec<String> = list.iter().map(|s| (*s).to_string()).collect();
    let plan = plan_warm(&refs, &["docker.io"]);
    let job = jobs.view("ns/mirror");
    let decision = decide(&WarmInput {
        plan: &plan,
        generation: Some(1),
        previous,
        job: job.as_ref(),
        target: Some(target),
        now: unix_now(),
        poll: Duration::from_secs(5),
    });
    jobs.act("ns/mirror", &decision.action, probe);
    decision
}

/// Waits (bounded) until the job of a warm that `status` shows `Warming` has ended, then runs
/// the pass that sees it.
async fn until_settled(
    jobs: &WarmJobs,
    probe: &Arc<dyn Probe>,
    list: &[&str],
    status: WarmStatus,
    target: &str,
) -> WarmDecision {
    assert_eq!(status.state, WarmState::Warming, "{status:?}");
    wait_until(DEADLINE, POLL, || {
        let ended = jobs.view("ns/mirror").is_some_and(|j| j.end.is_some());
        async move { ended }
    })
    .await
    .expect("the warm job ends");
    pass(jobs, probe, list, Some(&status), target)
}

#[tokio::test]
async fn spec_warm_is_warmed_once_by_a_registry_pod_and_again_only_when_the_list_changes() {
    let missing = (!registry_binary().exists())
        .then(|| format!("{} is not built", registry_binary().display()));
    if !cachalot_testkit::prerequisites::run_or_skip(
        "spec_warm_is_warmed_once_by_a_registry_pod_and_again_only_when_the_list_changes",
        missing,
    ) {
        return;
    }
    let upstream = Distribution::start().await.unwrap();
    let fault = FaultProxy::start(&upstream.url()).await.unwrap();
    let (a, b): (TestImage, TestImage) = (
        docker_image(1471, &[1024 * 1024]).unwrap(),
        docker_image(1472, &[512 * 1024]).unwrap(),
    );
    cachalot_testkit::image::push(&upstream.url(), "library/a", "1", &a)
        .await
        .unwrap();
    cachalot_testkit::image::push(&upstream.url(), "library/b", "1", &b)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (registry, target) = start_registry(dir.path(), &fault.url()).await;
    let storage = dir.path().join("store");
    let probe: Arc<dyn Probe> = Arc::new(HttpProbe::new(Duration::from_secs(2)).unwrap());

    // First pass: the list is new, a pod answers: a job starts and status says Warming.
    let jobs = WarmJobs::default();
    let list = ["a:1"];
    let first = pass(&jobs, &probe, &list, None, &target);
    assert!(
        matches!(first.action, WarmAction::Start { attempt: 1, .. }),
        "{first:?}"
    );
    let warming = first.status.unwrap();
    assert_eq!(warming.summary, "Warming 0/1");
    let done = until_settled(&jobs, &probe, &list, warming, &target).await;
    let status = done.status.clone().unwrap();
    assert_eq!(
        status.state,
        WarmState::Done,
        "{status:?}\n{}",
        registry.log_tail()
    );
    assert_eq!(status.summary, "Done 1/1");
    assert_eq!(
        done.condition.as_ref().unwrap().status,
        ConditionStatus::True
    );
    assert_eq!(done.recheck, None);
    for blob in a.all_blobs() {
        assert!(
            blob_file(&storage, &blob.digest).exists(),
            "{}",
            blob.digest
        );
    }

    // The operator restarts (no job) with the list unchanged: nothing is warmed again.
    let upstream_requests = fault.handle().counts().total();
    let restarted = WarmJobs::default();
    let again = pass(&restarted, &probe, &list, Some(&status), &target);
    assert_eq!(again.action, WarmAction::Nothing);
    assert_eq!(again.status.as_ref(), Some(&status));
    assert!(restarted.view("ns/mirror").is_none());
    assert_eq!(fault.handle().counts().total(), upstream_requests);

    // The list changes: b is warmed (a is found cached), and an image the upstream does not have
    // fails, named in status, with a retry a minute later.
    let list = ["a:1", "b:1", "missing:1"];
    let changed = pass(&restarted, &probe, &list, Some(&status), &target);
    assert!(
        matches!(changed.action, WarmAction::Start { attempt: 1, .. }),
        "{changed:?}"
    );
    let failed = until_settled(&restarted, &probe, &list, changed.status.unwrap(), &target).await;
    let status = failed.status.clone().unwrap();
    assert_eq!(status.state, WarmState::Failed, "{status:?}");
    assert_eq!(status.summary, "Failed 3/3");
    assert_eq!(status.failed.len(), 1);
    assert_eq!(status.failed[0].reference, "docker.io/library/missing:1");
    assert!(
        status
            .message
            .starts_with("2/3 image(s) warmed, 1 failed; docker.io/library/missing:1: "),
        "{}",
        status.message
    );
    let condition = failed.condition.unwrap();
    assert_eq!(
        (condition.status, condition.reason.as_str()),
        (ConditionStatus::False, "WarmFailed")
    );
    let recheck = failed.recheck.unwrap();
    assert!(
        recheck > Duration::from_secs(50) && recheck <= Duration::from_secs(60),
        "{recheck:?}"
    );
    for blob in b.all_blobs() {
        assert!(
            blob_file(&storage, &blob.digest).exists(),
            "{}",
            blob.digest
        );
    }
    // Until the retry is due, passes start nothing.
    let waiting = pass(&restarted, &probe, &list, Some(&status), &target);
    assert_eq!(waiting.action, WarmAction::Nothing);
}
