//! Starts and stops pod workers: one per pod uid bound to this node, fed with the pod's latest
//! object (or `None` once it left the API).
//!
//! Level-triggered: on every change of the pod store and every [`RESYNC`], the set of pods in
//! the store is compared with the set of workers. A worker that finished while its pod is still
//! in the store (a failed final delete) is started again on a later pass, which retries.
//!
//! Invariants: at most one live worker per uid; on shutdown every worker is cancelled and
//! awaited for at most [`SHUTDOWN_DEADLINE`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{worker, NodeRuntime};

/// Period of the full comparison when nothing changes.
pub const RESYNC: Duration = Duration::from_secs(1);
/// How long shutdown waits for the workers.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(40);

struct WorkerHandle {
    pod: watch::Sender<Option<Arc<Pod>>>,
    task: JoinHandle<()>,
}

/// Runs workers for the pods in `rt.pods` until `cancel`; `changed` is notified on every store
/// change.
pub async fn run(rt: Arc<NodeRuntime>, changed: Arc<Notify>, cancel: CancellationToken) {
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
        workers.retain(|_, w| !w.task.is_finished());
        let pods = rt.pods.state();
        let mut seen = std::collections::HashSet::new();
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            seen.insert(uid.clone());
            match workers.get(&uid) {
                Some(handle) => {
                    handle.pod.send_if_modified(|current| {
                        let same = current.as_ref().is_some_and(|c| {
                            c.metadata.resource_version == pod.metadata.resource_version
                        });
                        if !same {
                            *current = Some(pod.clone());
                        }
                        !same
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(Some(pod.clone()));
                    let task = tokio::spawn(worker::run(rt.clone(), rx, cancel.child_token()));
                    workers.insert(uid, WorkerHandle { pod: tx, task });
                }
            }
        }
        for (uid, handle) in &workers {
            if !seen.contains(uid) {
                handle
                    .pod
                    .send_if_modified(|current| current.take().is_some());
            }
        }
    }
    // The senders stay alive until the workers are done: a dropped sender reads as "the pod
    // vanished", which would delete the pods' files instead of just stopping them.
    let (senders, tasks): (Vec<_>, Vec<_>) = workers.into_values().map(|w| (w.pod, w.task)).unzip();
    let all = futures::future::join_all(tasks);
    if tokio::time::timeout(SHUTDOWN_DEADLINE, all).await.is_err() {
        warn!("pod workers did not stop in time");
    }
    drop(senders);
}
