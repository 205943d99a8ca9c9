//! The end-to-end suite, part two: operating the operator on a real API server. Leader election
//! with two replicas and the leader killed; a spec change rolling the registry; a rotated
//! credentials Secret reaching the running registry; an operator restart adopting what exists
//! without writing; and bad input reported in conditions without a hot loop.
//!
//! Tests that need the machine itself (the API server's audit log, killing a process, the Docker
//! Hub stand-in's credentials, a node's containerd config) run on the local target only and say
//! so when they skip on another.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use cachalot_e2e::cluster::wait_until;
use cachalot_e2e::local::LocalCluster;
use cachalot_e2e::suite::{
    apply_mirror, condition, mirror_manifest, mirrors, node_names, puller, run_pod,
    wait_for_condition, wait_for_mirror, Scene, POLL,
};
use cachalot_e2e::target::Target;
use cachalot_testkit::cluster::audit::AuditEvent;
use cachalot_testkit::fault::TokenAuth;
use cachalot_testkit::image;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

const OPERATOR_SA: &str = "system:serviceaccount:cachalot-system:cachalot";

fn local_or_skip<'a>(target: &'a Target, test: &str) -> Option<&'a LocalCluster> {
    let local = target.local();
    if local.is_none() {
        eprintln!("SKIPPED {test}: needs the local cluster (audit log, processes, the upstream's credentials)");
    }
    local
}

/// Pods of the operator (the chart's Deployment), running ones only.
async fn operator_pods(client: &kube::Client, namespace: &str) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(pods
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/name=cachalot,app.kubernetes.io/instance=cachalot"),
        )
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

async fn lease_holder(client: &kube::Client, namespace: &str) -> Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    Ok(leases
        .get_opt("cachalot-operator")
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity))
}

/// Writes by the operator's ServiceAccount, except its Lease renewals and Events.
fn operator_writes(events: &[AuditEvent]) -> Vec<&AuditEvent> {
    events
        .iter()
        .filter(|e| e.user.username == OPERATOR_SA && e.is_write())
        .filter(|e| {
            e.object_ref
                .as_ref()
                .is_some_and(|o| o.resource != "leases" && o.resource != "events")
        })
        .collect()
}

fn describe(events: &[&AuditEvent]) -> String {
    events
        .iter()
        .map(|e| format!("{} {} {}", e.stage_timestamp, e.verb, e.request_uri))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sends `signal` (`-STOP`, `-CONT`, `-KILL`) to every process of a pod (local target).
fn signal_pod(local: &LocalCluster, pod: &str, signal: &str) -> Result<usize> {
    let pids = local.cluster.processes_with_env("HOSTNAME", pod);
    for pid in &pids {
        std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
    }
    Ok(pids.len())
}

/// The leader stops answering (frozen, as a hung process or a partitioned node would): its Lease
/// runs out, the standby takes over and reconciles a spec change, and when the old leader wakes
/// up it writes nothing before it notices it lost the Lease. On another target the leader's pod
/// is force-deleted instead.
#[tokio::test(flavor = "multi_thread")]
async fn when_the_leader_stops_the_standby_takes_over_and_the_old_leader_never_writes_again(
) -> Result<()> {
    let Some(scene) = Scene::set_up("leader_failover", 1, &["operator.replicaCount=2"]).await?
    else {
        return Ok(());
    };
    let (settings, client, _ns, api) = (scene.settings(), &scene.client, &scene.ns, &scene.api);
    scene.ready_mirror("m", &json!({})).await?;

    let release = &settings.release_namespace;
    let pods = operator_pods(client, release).await?;
    assert_eq!(pods.len(), 2, "two operator replicas run");
    let leader = lease_holder(client, release)
        .await?
        .context("a Lease holder")?;
    // Replicas are told apart by their User-Agent, which names the pod.
    let from = |e: &AuditEvent, pod: &str| e.user_agent.contains(&format!("({pod})"));

    let stopped_at = Instant::now();
    match scene.target.local() {
        Some(local) => {
            assert!(
                signal_pod(local, &leader, "-STOP")? > 0,
                "found the leader's process"
            );
        }
        None => {
            Api::<Pod>::namespaced(client.clone(), release)
                .delete(&leader, &DeleteParams::default().grace_period(0))
                .await?;
        }
    }
    let holder = wait_until(
        "another replica to hold the Lease",
        settings.timeout,
        POLL,
        || async {
            match lease_holder(client, release).await {
                Ok(Some(h)) if h != leader => Ok(h),
                other => Err(format!("holder {other:?}")),
            }
        },
    )
    .await?;
    let takeover = stopped_at.elapsed();
    eprintln!("the Lease moved from {leader} to {holder} {takeover:?} after the leader stopped");

    // The new leader reconciles: a spec change is observed.
    apply_mirror(
        api,
        &mirror_manifest(settings, "m", &json!({"storage": {"maxSize": "2Gi"}})),
    )
    .await?;
    wait_for_mirror(settings, api, "m", "observedGeneration 2", |m| {
        m.data["status"]["observedGeneration"] == 2
    })
    .await?;

    let Some(local) = scene.target.local() else {
        return Ok(());
    };
    // Wake the old leader: it holds stale state and a lapsed Lease.
    let events = local.cluster.audit_events();
    let woke = events
        .last()
        .map(|e| e.stage_timestamp.clone())
        .unwrap_or_default();
    signal_pod(local, &leader, "-CONT")?;
    // It notices at its next renewal (every 2 s) and exits; the container restarts as a standby.
    wait_until(
        "the old leader to try its Lease again",
        settings.timeout,
        POLL,
        || async {
            let events = local.cluster.audit_events();
            let tried = events.iter().any(|e| {
                e.stage_timestamp > woke
                    && from(e, &leader)
                    && e.object_ref
                        .as_ref()
                        .is_some_and(|o| o.resource == "leases")
            });
            if tried {
                Ok(())
            } else {
                Err("no Lease request from the old leader yet".to_owned())
            }
        },
    )
    .await?;
    let events = local.cluster.audit_events();
    let stale: Vec<&AuditEvent> = operator_writes(&events)
        .into_iter()
        .filter(|e| e.stage_timestamp > woke && from(e, &leader))
        .collect();
    assert!(
        stale.is_empty(),
        "the old leader wrote after it woke up without the Lease:\n{}",
        describe(&stale)
    );
    let acquired = events
        .iter()
        .filter(|e| from(e, &holder) && e.is_write())
        .filter(|e| {
            e.object_ref
                .as_ref()
                .is_some_and(|o| o.resource == "leases")
        })
        .map(|e| e.stage_timestamp.clone())
        .min()
        .context("the new leader's first Lease write")?;
    let early: Vec<&AuditEvent> = operator_writes(&events)
        .into_iter()
        .filter(|e| from(e, &holder) && e.stage_timestamp < acquired)
        .collect();
    assert!(
        early.is_empty(),
        "the standby wrote before it held the Lease ({acquired}):\n{}",
        describe(&early)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spec_change_rolls_the_registry_to_the_new_config() -> Result<()> {
    let Some(scene) = Scene::set_up("spec_change_rolls", 1, &[]).await? else {
        return Ok(());
    };
    let (settings, client, ns, api) = (scene.settings(), &scene.client, &scene.ns, &scene.api);
    scene.ready_mirror("roll", &json!({})).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let hash = |d: &Deployment| {
        d.spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("cachalot.dev/config-hash").cloned())
            .unwrap_or_default()
    };
    let before = hash(&deployments.get("cachalot-roll").await?);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let selector = "app.kubernetes.io/instance=roll,app.kubernetes.io/component=registry";
    let old_pods: BTreeSet<String> = pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();

    apply_mirror(
        api,
        &mirror_manifest(
            settings,
            "roll",
            &json!({"registries": [{"name": "docker.io",
                                     "url": settings.upstream_url,
                                     "caConfigMap": settings.upstream_ca.as_ref().map(|(n, _)| json!({"name": n})),
                                     "freshness": [{"pattern": "latest", "maxAge": "30s"}]}]}),
        ),
    )
    .await?;
    let after = wait_until("a new config hash", settings.timeout, POLL, || async {
        let d = deployments
            .get("cachalot-roll")
            .await
            .map_err(|e| e.to_string())?;
        let h = hash(&d);
        if h != before {
            Ok(h)
        } else {
            Err(format!("still {h}"))
        }
    })
    .await?;
    wait_until(
        "the registry rolled to the new pods",
        settings.timeout,
        POLL,
        || async {
            let list = pods
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| e.to_string())?;
            let names: Vec<(String, bool, String)> = list
                .items
                .iter()
                .map(|p| {
                    let ready = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    let h = p
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("cachalot.dev/config-hash").cloned())
                        .unwrap_or_default();
                    (p.metadata.name.clone().unwrap_or_default(), ready, h)
                })
                .collect();
            let rolled = !names.is_empty()
                && names
                    .iter()
                    .all(|(n, ready, h)| !old_pods.contains(n) && *ready && *h == after);
            if rolled {
                Ok(())
            } else {
                Err(format!("{names:?}"))
            }
        },
    )
    .await?;
    let config = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("cachalot-roll-config")
        .await?;
    let text = config
        .data
        .and_then(|d| d.get("config.yaml").cloned())
        .unwrap_or_default();
    assert!(
        text.contains("latest"),
        "the new freshness rule is in the config: {text}"
    );
    wait_for_mirror(settings, api, "roll", "Ready at generation 2", |m| {
        m.data["status"]["observedGeneration"] == 2
            && condition(m, "Ready").is_some_and(|c| c["status"] == "True")
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_credentials_secret_reaches_the_running_registry() -> Result<()> {
    let Some(scene) = Scene::set_up("secret_rotation", 1, &[]).await? else {
        return Ok(());
    };
    let Some(local) = local_or_skip(&scene.target, "secret_rotation") else {
        return Ok(());
    };
    let (settings, client, ns) = (scene.settings(), &scene.client, &scene.ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let secret = |password: &str| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "hub-credentials"},
            "type": "kubernetes.io/basic-auth",
            "stringData": {"username": "puller", "password": password}
        }))
        .unwrap()
    };
    secrets
        .create(&PostParams::default(), &secret("first"))
        .await?;
    let hub = local.hub.handle();
    let auth = |password: &str| TokenAuth {
        credentials: Some(("puller".to_owned(), password.to_owned())),
        ..TokenAuth::default()
    };
    hub.enable_token_auth(auth("first"));
    // Two more images, each a new token scope.
    for (seed, repo) in [(41, "library/first"), (42, "library/second")] {
        let img = image::docker_image(seed, &[256 * 1024])?;
        image::push(&local.upstream.url(), repo, "1", &img).await?;
    }
    let api = mirrors(client, &ns.name);
    let mut registry = json!({"name": "docker.io", "url": settings.upstream_url,
                              "credentialsSecret": {"name": "hub-credentials", "type": "Basic"}});
    if let Some((name, _)) = &settings.upstream_ca {
        registry["caConfigMap"] = json!({"name": name});
    }
    apply_mirror(
        &api,
        &mirror_manifest(settings, "rotate", &json!({"registries": [registry]})),
    )
    .await?;
    wait_for_condition(settings, &api, "rotate", "Ready", "True").await?;
    let node = node_names(client).await?.remove(0);
    run_pod(
        settings,
        client,
        &ns.name,
        puller("pull-first", "docker.io/library/first:1", Some(&node)),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let registry_pods =
        || async {
            let list = pods
                .list(&ListParams::default().labels(
                    "app.kubernetes.io/instance=rotate,app.kubernetes.io/component=registry",
                ))
                .await?;
            Ok::<_, kube::Error>(
                list.items
                    .into_iter()
                    .map(|p| {
                        let restarts: i32 = p
                            .status
                            .and_then(|s| s.container_statuses)
                            .unwrap_or_default()
                            .iter()
                            .map(|c| c.restart_count)
                            .sum();
                        (p.metadata.name.unwrap_or_default(), restarts)
                    })
                    .collect::<Vec<_>>(),
            )
        };
    let before = registry_pods().await?;

    // Rotate: the hub now wants the new password, and the Secret has it.
    hub.enable_token_auth(auth("second"));
    secrets
        .replace("hub-credentials", &PostParams::default(), &{
            let mut s = secret("second");
            s.metadata.resource_version = secrets
                .get("hub-credentials")
                .await?
                .metadata
                .resource_version;
            s
        })
        .await?;
    let mut attempt = 0;
    wait_until(
        "a pull with the rotated password",
        settings.timeout,
        Duration::from_secs(2),
        || {
            attempt += 1;
            let name = format!("pull-second-{attempt}");
            let client = client.clone();
            let node = node.clone();
            let ns = ns.name.clone();
            async move {
                run_pod(
                    settings,
                    &client,
                    &ns,
                    puller(&name, "docker.io/library/second:1", Some(&node)),
                )
                .await
                .map_err(|e| e.to_string())
            }
        },
    )
    .await?;
    let after = registry_pods().await?;
    assert_eq!(
        before, after,
        "the registry pods were neither replaced nor restarted"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_operator_adopts_what_exists_without_writing() -> Result<()> {
    let Some(scene) = Scene::set_up("restart_adopts", 2, &[]).await? else {
        return Ok(());
    };
    let Some(local) = local_or_skip(&scene.target, "restart_adopts") else {
        return Ok(());
    };
    let (settings, client, _ns, api) = (scene.settings(), &scene.client, &scene.ns, &scene.api);
    scene.ready_mirror("adopt", &json!({})).await?;
    // Let the status settle (node figures, cache figures) before counting.
    let quiet = Duration::from_secs(20);
    let settled = wait_until(
        "a quiet period without operator writes",
        settings.timeout,
        POLL,
        || async {
            let events = local.cluster.audit_events();
            let writes = operator_writes(&events);
            let last = writes
                .last()
                .map(|e| e.stage_timestamp.clone())
                .unwrap_or_default();
            tokio::time::sleep(quiet).await;
            let events = local.cluster.audit_events();
            let later: Vec<&AuditEvent> = operator_writes(&events)
                .into_iter()
                .filter(|e| e.stage_timestamp > last)
                .collect();
            if later.is_empty() {
                Ok(())
            } else {
                Err(describe(&later))
            }
        },
    )
    .await;
    settled.context("an idle operator writes nothing (requeue every 5 s)")?;

    let release = &settings.release_namespace;
    let operator = operator_pods(client, release).await?;
    let name = operator[0].metadata.name.clone().unwrap_or_default();
    let restarts = |p: &Pod| -> i32 {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|c| c.iter().map(|c| c.restart_count).sum())
            .unwrap_or(0)
    };
    let restarts_before = restarts(&operator[0]);
    let marker = local
        .cluster
        .audit_events()
        .last()
        .map(|e| e.stage_timestamp.clone())
        .unwrap_or_default();
    assert!(
        signal_pod(local, &name, "-KILL")? > 0,
        "found the operator's process"
    );
    wait_until(
        "the operator restarted and Ready",
        settings.timeout,
        POLL,
        || async {
            let pods = operator_pods(client, release)
                .await
                .map_err(|e| e.to_string())?;
            let p = pods.first().ok_or("no operator pod")?;
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if restarts(p) > restarts_before && ready {
                Ok(())
            } else {
                Err(format!("restarts {} ready {ready}", restarts(p)))
            }
        },
    )
    .await?;
    // The new process lists everything, reconciles every mirror, and finds nothing to change.
    // An observation window (absence of writes cannot be waited for), not a wait for a condition.
    tokio::time::sleep(quiet).await;
    let events = local.cluster.audit_events();
    let reads_after = events
        .iter()
        .filter(|e| e.stage_timestamp > marker && e.user.username == OPERATOR_SA)
        .filter(|e| e.verb == "list" || e.verb == "watch")
        .count();
    assert!(
        reads_after > 0,
        "the restarted operator listed and watched again"
    );
    let writes: Vec<&AuditEvent> = operator_writes(&events)
        .into_iter()
        .filter(|e| e.stage_timestamp > marker)
        .collect();
    if !writes.is_empty() {
        bail!(
            "the restarted operator wrote although nothing changed:\n{}",
            describe(&writes)
        );
    }
    condition(&api.get("adopt").await?, "Ready")
        .filter(|c| c["status"] == "True")
        .context("still Ready")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_reported_in_conditions_without_a_crash_or_a_hot_loop() -> Result<()> {
    let Some(scene) = Scene::set_up("bad_input", 2, &[]).await? else {
        return Ok(());
    };
    let (settings, client, _ns, api) = (scene.settings(), &scene.client, &scene.ns, &scene.api);

    // A missing credentials Secret.
    let mut registry = json!({"name": "docker.io", "url": settings.upstream_url,
                              "credentialsSecret": {"name": "nowhere", "type": "Basic"}});
    if let Some((name, _)) = &settings.upstream_ca {
        registry["caConfigMap"] = json!({"name": name});
    }
    apply_mirror(
        api,
        &mirror_manifest(settings, "nosecret", &json!({"registries": [registry]})),
    )
    .await?;
    let missing = wait_for_mirror(settings, api, "nosecret", "CredentialsSecretMissing", |m| {
        condition(m, "Ready").is_some_and(|c| c["reason"] == "CredentialsSecretMissing")
    })
    .await?;
    let message = condition(&missing, "Ready").unwrap()["message"].to_string();
    assert!(
        message.contains("spec.registries[0].credentialsSecret.name")
            && message.contains("nowhere"),
        "{message}"
    );
    api.delete("nosecret", &DeleteParams::default()).await?;

    // Two mirrors for docker.io: the second is refused by name.
    scene.ready_mirror("first", &json!({})).await?;
    apply_mirror(api, &mirror_manifest(settings, "second", &json!({}))).await?;
    let second = wait_for_condition(settings, api, "second", "Ready", "False").await?;
    let ready = condition(&second, "Ready").unwrap();
    assert!(
        ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains("first"),
        "the conflict names the mirror that keeps docker.io: {ready}"
    );

    // A node whose containerd has no config_path (local: rewrite node-2's config).
    if let Some(local) = scene.target.local() {
        let node = &local.cluster.nodes()[1];
        let config = node.path("/etc/containerd/config.toml");
        let text = std::fs::read_to_string(&config)?;
        let without: String = text
            .lines()
            .filter(|l| !l.contains("config_path"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&config, without)?;
        let first = wait_for_mirror(
            settings,
            api,
            "first",
            "node-2 reported without config_path",
            |m| {
                condition(m, "NodesConfigured").is_some_and(|c| {
                    c["status"] == "False"
                        && c["message"]
                            .as_str()
                            .is_some_and(|t| t.contains(&node.name) && t.contains("config_path"))
                })
            },
        )
        .await?;
        eprintln!(
            "NodesConfigured: {}",
            condition(&first, "NodesConfigured").unwrap()
        );
        std::fs::write(&config, text)?;
        wait_for_mirror(settings, api, "first", "node-2 configured again", |m| {
            condition(m, "NodesConfigured").is_some_and(|c| c["status"] == "True")
        })
        .await?;

        // No crash, no hot loop: the operator never restarted, and over 20 s it read the
        // conflicting mirror's world a bounded number of times (requeue every 5 s).
        let marker = local
            .cluster
            .audit_events()
            .last()
            .map(|e| e.stage_timestamp.clone())
            .unwrap_or_default();
        // An observation window, not a wait for a condition.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let requests = local
            .cluster
            .audit_events()
            .into_iter()
            .filter(|e| e.stage_timestamp > marker && e.user.username == OPERATOR_SA)
            .filter(|e| {
                e.object_ref
                    .as_ref()
                    .is_some_and(|o| o.resource != "leases")
            })
            .count();
        assert!(
            requests < 100,
            "{requests} operator requests in 20 s: a hot loop"
        );
    }
    for pod in operator_pods(client, &settings.release_namespace).await? {
        let statuses = pod
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default();
        let restarts: i32 = statuses.iter().map(|c| c.restart_count).sum();
        // Why it restarted (exit code, reason, termination message), for the failure message.
        let last: Vec<_> = statuses.iter().map(|c| &c.last_state).collect();
        assert_eq!(
            restarts, 0,
            "the operator never crashed; last state: {last:?}"
        );
    }
    Ok(())
}
