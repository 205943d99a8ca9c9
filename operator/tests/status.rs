//! Pure status computation: conditions, numbers and their stability.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use cachalot_operator::api::{
    BudgetState, ConditionStatus, ConditionType, MirrorCondition, RegistryMirror,
    RegistryMirrorStatus,
};
use cachalot_operator::controller::observe::{
    not_ready_pods, AgentObservation, Observations, RateLimitedSpell, RegistryPodObservation,
    RegistryStats,
};
use cachalot_operator::controller::references::{MissingObject, Referenced};
use cachalot_operator::controller::status::{compute_status, hit_ratio, transitions, Outcome};
use cachalot_operator::node_agent::protocol::{AgentStatus, ContainerdStatus, Problem, Reason};
use common::registry_stats;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

const GEN: &str = "g1";

fn mirror() -> RegistryMirror {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
        "metadata": {"name": "hub", "namespace": "ns", "uid": "u", "generation": 4},
        "spec": {"registries": [{"name": "docker.io"}]}
    }))
    .unwrap()
}

fn agent(node: &str, ready: bool, problem: Option<Reason>) -> AgentObservation {
    AgentObservation {
        node: node.to_string(),
        status: Ok(AgentStatus {
            node: node.to_string(),
            mirror: "ns/hub".to_string(),
            generation: GEN.to_string(),
            ready,
            registries: Vec::new(),
            containerd: ContainerdStatus {
                config_version: Some(2),
                problems: problem
                    .map(|reason| {
                        vec![Problem {
                            reason,
                            message: "containerd config_path not set".to_string(),
                        }]
                    })
                    .unwrap_or_default(),
            },
            managed_files: Vec::new(),
            problems: Vec::new(),
        }),
    }
}

fn running(obs: Observations) -> Outcome {
    Outcome::Running {
        endpoint: Some("http://10.96.0.12:5000".to_string()),
        external: false,
        desired_generation: GEN.to_string(),
        reserves: BTreeMap::from([("docker.io".to_string(), 10)]),
        observations: obs,
    }
}

fn at(secs: i64) -> Time {
    Time(Timestamp::UNIX_EPOCH + SignedDuration::from_secs(secs))
}

fn cond(status: &RegistryMirrorStatus, t: ConditionType) -> &MirrorCondition {
    status.conditions.iter().find(|c| c.type_ == t).unwrap()
}

fn pods(list: Vec<RegistryStats>) -> Vec<RegistryPodObservation> {
    list.into_iter()
        .enumerate()
        .map(|(i, s)| RegistryPodObservation {
            pod: format!("p{i}"),
            stats: Ok(s),
        })
        .collect()
}

#[test]
fn partially_configured_nodes_report_n_of_m_with_the_dominant_node_reason() {
    let obs = Observations {
        registry_pods: pods(vec![registry_stats(1, 1, 0, 50)]),
        registry_pods_not_ready: Vec::new(),
        ready_replicas: 1,
        desired_nodes: Some(4),
        agents: vec![
            agent("node-1", true, None),
            agent("node-2", false, Some(Reason::ConfigPathNotSet)),
            agent("node-3", false, Some(Reason::ConfigPathNotSet)),
            AgentObservation {
                node: "node-4".to_string(),
                status: Err("connection refused".to_string()),
            },
        ],
    };
    let status = compute_status(&mirror(), &running(obs), &at(0));
    let nodes = status.nodes.as_ref().unwrap();
    assert_eq!(nodes.summary, "1/4");
    assert_eq!(nodes.not_configured.len(), 3);
    let c = cond(&status, ConditionType::NodesConfigured);
    assert_eq!(c.status, ConditionStatus::False);
    assert_eq!(c.reason, "ConfigPathNotSet");
    assert!(
        c.message
            .starts_with("1/4 nodes; node-2: containerd config_path not set"),
        "{}",
        c.message
    );
    // One configured node is enough to serve pulls.
    assert_eq!(
        cond(&status, ConditionType::Ready).status,
        ConditionStatus::True
    );
}

#[test]
fn an_agent_on_an_older_desired_state_is_pending_not_configured() {
    let mut stale_agent = agent("node-1", true, None);
    if let Ok(s) = &mut stale_agent.status {
        s.generation = "older".to_string();
    }
    let obs = Observations {
        registry_pods: pods(vec![registry_stats(0, 0, 0, 50)]),
        registry_pods_not_ready: Vec::new(),
        ready_replicas: 1,
        desired_nodes: Some(1),
        agents: vec![stale_agent],
    };
    let status = compute_status(&mirror(), &running(obs), &at(0));
    assert_eq!(status.nodes.as_ref().unwrap().summary, "0/1");
    assert_eq!(
        cond(&status, ConditionType::NodesConfigured).reason,
        "Pending"
    );
    assert_eq!(
        cond(&status, ConditionType::Ready).status,
        ConditionStatus::False
    );
}

#[test]
fn agents_of_a_daemon_set_not_yet_counted_by_its_controller_are_not_all_nodes() {
    // The DaemonSet controller creates its first pod before it writes the count: one configured
    // agent must not read `1/1 nodes` and make the mirror Ready.
    let obs = Observations {
        registry_pods: pods(vec![registry_stats(0, 0, 0, 50)]),
        registry_pods_not_ready: Vec::new(),
        ready_replicas: 1,
        desired_nodes: None,
        agents: vec![agent("node-1", true, None)],
    };
    let status = compute_status(&mirror(), &running(obs), &at(0));
    let nodes = cond(&status, ConditionType::NodesConfigured);
    assert_eq!(
        (nodes.status, nodes.reason.as_str()),
        (ConditionStatus::False, "AgentsStarting"),
        "{}",
        nodes.message
    );
    assert!(
        nodes.message.starts_with("1/? nodes; "),
        "{}",
        nodes.message
    );
    assert_eq!(status.nodes.as_ref().unwrap().summary, "1/?");
    let ready = cond(&status, ConditionType::Ready);
    assert_eq!(ready.status, ConditionStatus::True);
    assert!(ready.message.ends_with("; 1/? nodes"), "{}", ready.message);
}

#[test]
fn cache_counts_are_summed_over_pods_and_budget_is_the_lowest_remaining() {
    let obs = Observations {
        registry_pods: pods(vec![
            registry_stats(6, 1, 1, 40),
            registry_stats(2, 1, 0, 35),
        ]),
        registry_pods_not_ready: Vec::new(),
        ready_replicas: 2,
        desired_nodes: Some(1),
        agents: vec![agent("node-1", true, None)],
    };
    let status = compute_status(&mirror(), &running(obs), &at(0));
    let cache = status.cache.as_ref().unwrap();
    assert_eq!((cache.hits, cache.misses, cache.stale), (8, 2, 1));
    assert_eq!(cache.hit_ratio, "81.8%");
    assert_eq!(cache.pods_reporting, 2);
    assert_eq!(status.budget[0].remaining, Some(35));
    assert_eq!(status.budget[0].state, BudgetState::Current);
    assert_eq!(status.budget_summary.as_deref(), Some("35/100"));
    let budget = cond(&status, ConditionType::UpstreamBudget);
    assert_eq!(
        (budget.status, budget.reason.as_str()),
        (ConditionStatus::True, "BudgetAvailable")
    );
    assert_eq!(budget.message, "docker.io 35/100 per 21600s");
}

#[test]
fn a_hubs_spokes_are_summed_over_its_pods_and_listed_by_id_with_their_last_request() {
    use cachalot_registry::fleet::SpokeStats;
    let spoke = |requests, hits, last_seen| SpokeStats {
        requests,
        hits,
        last_seen,
        ..SpokeStats::default()
    };
    let mut a = registry_stats(1, 0, 0, 40);
    a.spokes.insert("c1/ns/spoke".into(), spoke(5, 4, 100));
    a.spokes.insert("c2/ns/spoke".into(), spoke(1, 0, 90));
    let mut b = registry_stats(1, 0, 0, 40);
    b.spokes.insert("c1/ns/spoke".into(), spoke(3, 3, 120));
    let obs = Observations {
        registry_pods: pods(vec![a, b]),
        registry_pods_not_ready: Vec::new(),
        ready_replicas: 2,
        desired_nodes: Some(1),
        agents: vec![agent("node-1", true, None)],
    };
    let status = compute_status(&mirror(), &running(obs), &at(0));
    let listed: Vec<(&str, i64, i64, &str)> = status
        .spokes
        .iter()
        .map(|s| (s.id.as_str(), s.requests, s.hits, s.last_seen.as_str()))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("c1/ns/spoke", 8, 7, "1970-01-01T00:02:00Z"),
            ("c2/ns/spoke", 1, 0, "1970-01-01T00:01:30Z"),
        ]
    );
}

#[test]
fn a_hub_lists_only_its_most_recently_seen_spokes() {
    use cachalot_operator::api::MAX_SPOKES_IN_STATUS;
    use cachalot_registry::fleet::SpokeStats;
    let mut a = registry_stats(1, 0, 0, 40);
    for i in 0..(MAX_SPOKES_IN_STATUS as u64 + 5) {
        a.spokes.insert(
            format!("s{i:03}"),
            SpokeStats {
                requests: 1,
                last_seen: 1_000 + i,
                ..SpokeStats::default()
            },
        );
    }
    let obs = Observations {
        registry_pods: pods(vec![a]),
        registry_pods_not_ready: Vec::new(),
        ready_replicas: 1,
        desired_nodes: Some(1),
        agents: vec![agent("node-1", true, None)],
    };
    let status = compute_status(&mirror(), &running(obs), &at(0));
    assert_eq!(status.spokes.len(), MAX_SPOKES_IN_STATUS);
    assert_eq!(
        status.spokes[0].id, "s005",
        "the 5 seen longest ago are left out"
    );
}

#[test]
fn exhausted_budget_is_rate_limited_and_low_budget_is_the_reserve() {
    let status_for = |remaining| {
        let obs = Observations {
            registry_pods: pods(vec![registry_stats(1, 0, 0, remaining)]),
            registry_pods_not_ready: Vec::new(),
            ready_replicas: 1,
            desired_nodes: Some(0),
            agents: Vec::new(),
        };
        compute_status(&mirror(), &running(obs), &at(0))
    };
    let limited = status_for(0);
    let c = cond(&limited, ConditionType::UpstreamBudget);
    assert_eq!(
        (c.status, c.reason.as_str()),
        (ConditionStatus::False, "RateLimited")
    );
    let low = status_for(10);
    assert_eq!(
        cond(&low, ConditionType::UpstreamBudget).reason,
        "BudgetReserve"
    );
}

/// When the budget figures below were observed: 2026-01-02T03:04:05Z.
const OBSERVED: u64 = 1_767_323_045;

/// Observations of one registry pod reporting `upstream` for docker.io.
fn budget_observations(
    upstream: cachalot_operator::controller::observe::UpstreamBudget,
) -> Observations {
    let mut stats = registry_stats(1, 0, 0, 0);
    stats.upstreams = vec![upstream];
    Observations {
        registry_pods: pods(vec![stats]),
        registry_pods_not_ready: Vec::new(),
        ready_replicas: 1,
        desired_nodes: Some(0),
        agents: Vec::new(),
    }
}

/// A docker.io figure of `remaining`/100 per 6 h observed at [`OBSERVED`].
fn figure(remaining: u64) -> cachalot_operator::controller::observe::UpstreamBudget {
    let mut stats = registry_stats(0, 0, 0, remaining);
    let mut upstream = stats.upstreams.remove(0);
    upstream.observed_at = Some(OBSERVED);
    upstream
}

fn budget_at(obs: &Observations, now: u64) -> RegistryMirrorStatus {
    compute_status(&mirror(), &running(obs.clone()), &at(now as i64))
}

/// What status says about the budget (the condition without its transition time).
fn budget_view(
    status: &RegistryMirrorStatus,
) -> (
    Vec<cachalot_operator::api::UpstreamBudgetStatus>,
    Option<String>,
    (ConditionStatus, String, String),
) {
    let c = cond(status, ConditionType::UpstreamBudget);
    (
        status.budget.clone(),
        status.budget_summary.clone(),
        (c.status, c.reason.clone(), c.message.clone()),
    )
}

#[test]
fn an_exhausted_figure_is_rate_limited_only_within_its_window_then_expired() {
    let obs = budget_observations(figure(0));
    let within = budget_at(&obs, OBSERVED + 100);
    let c = cond(&within, ConditionType::UpstreamBudget);
    assert_eq!(
        (c.status, c.reason.as_str(), c.message.as_str()),
        (
            ConditionStatus::False,
            "RateLimited",
            "docker.io 0/100 per 21600s at 2026-01-02T03:04:05Z"
        )
    );
    assert_eq!(within.budget_summary.as_deref(), Some("0/100"));
    assert_eq!(within.budget[0].state, BudgetState::RateLimited);
    assert_eq!(
        within.budget[0].observed_at.as_deref(),
        Some("2026-01-02T03:04:05Z")
    );
    // Time passing inside the window changes nothing: no status write per pass.
    assert_eq!(
        budget_view(&within),
        budget_view(&budget_at(&obs, OBSERVED + 21_599))
    );

    let after = budget_at(&obs, OBSERVED + 21_600);
    let c = cond(&after, ConditionType::UpstreamBudget);
    assert_eq!(
        (c.status, c.reason.as_str()),
        (ConditionStatus::Unknown, "BudgetExpired")
    );
    assert!(
        c.message.contains("at 2026-01-02T03:04:05Z, expired"),
        "{}",
        c.message
    );
    assert_eq!(after.budget_summary.as_deref(), Some("Expired"));
    assert_eq!(after.budget[0].state, BudgetState::Expired);
    assert_eq!(after.budget[0].remaining, Some(0), "kept for reference");
    assert_eq!(
        budget_view(&after),
        budget_view(&budget_at(&obs, OBSERVED + 90_000))
    );
}

#[test]
fn a_bare_429_is_rate_limited_until_its_retry_after_and_then_unknown() {
    let mut upstream = figure(0);
    (upstream.limit, upstream.remaining, upstream.window_seconds) = (None, None, None);
    upstream.observed_at = None;
    upstream.rate_limited = Some(RateLimitedSpell {
        observed_at: OBSERVED,
        until: OBSERVED + 60,
    });
    let obs = budget_observations(upstream);
    let limited = budget_at(&obs, OBSERVED + 10);
    let c = cond(&limited, ConditionType::UpstreamBudget);
    assert_eq!(
        (c.status, c.reason.as_str(), c.message.as_str()),
        (
            ConditionStatus::False,
            "RateLimited",
            "docker.io answered 429 at 2026-01-02T03:04:05Z; waiting until 2026-01-02T03:05:05Z"
        )
    );
    assert_eq!(limited.budget_summary.as_deref(), Some("RateLimited"));
    assert_eq!(
        limited.budget[0].rate_limited_until.as_deref(),
        Some("2026-01-02T03:05:05Z")
    );
    let over = budget_at(&obs, OBSERVED + 60);
    assert_eq!(
        cond(&over, ConditionType::UpstreamBudget).reason,
        "NoRateLimitHeaders"
    );
    assert!(over.budget.is_empty() && over.budget_summary.is_none());
}

#[test]
fn a_current_figure_of_one_pod_wins_over_an_expired_lower_one_of_another() {
    let mut old = figure(3);
    old.observed_at = Some(OBSERVED - 30_000);
    let mut stats = vec![registry_stats(1, 0, 0, 0), registry_stats(1, 0, 0, 0)];
    stats[0].upstreams = vec![old];
    stats[1].upstreams = vec![figure(97)];
    let obs = Observations {
        registry_pods: pods(stats),
        registry_pods_not_ready: Vec::new(),
        ready_replicas: 2,
        desired_nodes: Some(0),
        agents: Vec::new(),
    };
    let status = budget_at(&obs, OBSERVED + 5);
    assert_eq!(status.budget_summary.as_deref(), Some("97/100"));
    let c = cond(&status, ConditionType::UpstreamBudget);
    assert_eq!(
        (c.reason.as_str(), c.message.as_str()),
        (
            "BudgetAvailable",
            "docker.io 97/100 per 21600s at 2026-01-02T03:04:05Z"
        )
    );
}

#[test]
fn no_ready_registry_pod_means_proxy_unavailable_and_not_ready() {
    let obs = Observations {
        registry_pods: vec![RegistryPodObservation {
            pod: "p0".to_string(),
            stats: Err("timeout".to_string()),
        }],
        registry_pods_not_ready: Vec::new(),
        ready_replicas: 0,
        desired_nodes: Some(1),
        agents: vec![agent("node-1", true, None)],
    };
    let status = compute_status(&mirror(), &running(obs), &at(0));
    assert_eq!(
        cond(&status, ConditionType::ProxyAvailable).reason,
        "NoReadyPods"
    );
    let ready = cond(&status, ConditionType::Ready);
    assert_eq!(
        (ready.status, ready.reason.as_str()),
        (ConditionStatus::False, "ProxyUnavailable")
    );
    assert_eq!(
        cond(&status, ConditionType::CacheEffective).reason,
        "NoStats"
    );
    assert!(status.cache.is_none());
}

#[test]
fn recomputing_an_unchanged_world_keeps_transition_times_and_a_flip_moves_only_that_one() {
    let obs = |ready_agent| Observations {
        registry_pods: pods(vec![registry_stats(5, 5, 0, 50)]),
        registry_pods_not_ready: Vec::new(),
        ready_replicas: 1,
        desired_nodes: Some(1),
        agents: vec![agent("node-1", ready_agent, None)],
    };
    let mut m = mirror();
    let first = compute_status(&m, &running(obs(true)), &at(100));
    m.status = Some(first.clone());
    let again = compute_status(&m, &running(obs(true)), &at(200));
    assert_eq!(
        first, again,
        "an unchanged world must give an identical status"
    );
    assert!(transitions(Some(&first), &again).is_empty());

    let flipped = compute_status(&m, &running(obs(false)), &at(300));
    assert_eq!(
        cond(&flipped, ConditionType::Ready).last_transition_time,
        Some(at(300))
    );
    assert_eq!(
        cond(&flipped, ConditionType::ProxyAvailable).last_transition_time,
        Some(at(100))
    );
    let events = transitions(Some(&first), &flipped);
    assert_eq!(events.len(), 1);
    assert!(events[0].warning);
    assert_eq!(flipped.observed_generation, Some(4));
    assert!(flipped
        .conditions
        .iter()
        .all(|c| c.observed_generation == Some(4)));
    let order: Vec<ConditionType> = flipped.conditions.iter().map(|c| c.type_).collect();
    // Every type but `Warmed`, which only a mirror with `spec.warm` has.
    assert_eq!(order, ConditionType::ALL[..7]);
}

#[test]
fn hit_ratio_is_a_rounded_percentage_or_a_dash_without_traffic() {
    assert_eq!(hit_ratio(0, 0, 0), "-");
    assert_eq!(hit_ratio(7, 1, 0), "87.5%");
    assert_eq!(hit_ratio(1, 2, 0), "33.3%");
    assert_eq!(hit_ratio(2, 1, 0), "66.7%");
    assert_eq!(hit_ratio(0, 5, 0), "0.0%");
    assert_eq!(hit_ratio(0, 0, 3), "100.0%");
    assert_eq!(hit_ratio(u64::MAX, u64::MAX, 0), "50.0%");
}

#[test]
fn a_missing_credentials_secret_is_a_warning_transition_and_recomputes_to_the_same_status() {
    let missing = Outcome::ReferencesMissing {
        missing: vec![MissingObject {
            referenced: Referenced::CredentialsSecret,
            message: r#"spec.registries[0].credentialsSecret.name: Secret "hub-creds" not found in namespace "ns""#
                .to_string(),
        }],
    };
    let first = compute_status(&mirror(), &missing, &at(10));
    let ready = cond(&first, ConditionType::Ready);
    assert_eq!(ready.status, ConditionStatus::False);
    assert_eq!(ready.reason, "CredentialsSecretMissing");
    assert!(
        ready.message.contains(r#"Secret "hub-creds""#),
        "{}",
        ready.message
    );
    assert_eq!(
        cond(&first, ConditionType::Conflict).status,
        ConditionStatus::False
    );
    let events = transitions(None, &first);
    assert!(
        events
            .iter()
            .any(|t| t.warning && t.reason == "CredentialsSecretMissing"),
        "{events:?}"
    );
    // The next pass, later, over the same world: the same status, so no write and no Event.
    let mut again = mirror();
    again.status = Some(first.clone());
    let second = compute_status(&again, &missing, &at(70));
    assert_eq!(second, first);
    assert!(transitions(Some(&first), &second).is_empty());
}

#[test]
fn a_missing_ca_config_map_is_a_warning_transition_naming_the_field_and_recomputes_to_the_same_status(
) {
    let missing = Outcome::ReferencesMissing {
        missing: vec![MissingObject {
            referenced: Referenced::CaConfigMap,
            message: r#"spec.registries[0].caConfigMap.name: ConfigMap "corp-ca" not found in namespace "ns""#
                .to_string(),
        }],
    };
    let first = compute_status(&mirror(), &missing, &at(10));
    let ready = cond(&first, ConditionType::Ready);
    assert_eq!(ready.status, ConditionStatus::False);
    assert_eq!(ready.reason, "CaConfigMapMissing");
    assert_eq!(
        ready.message,
        r#"spec.registries[0].caConfigMap.name: ConfigMap "corp-ca" not found in namespace "ns""#
    );
    for t in [
        ConditionType::ProxyAvailable,
        ConditionType::NodesConfigured,
        ConditionType::CacheEffective,
        ConditionType::UpstreamBudget,
    ] {
        let c = cond(&first, t);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::Unknown, "CaConfigMapMissing")
        );
        assert!(c.message.contains("CA ConfigMap"), "{}", c.message);
    }
    assert!(first.endpoint.is_none() && first.nodes.is_none());
    let events = transitions(None, &first);
    assert!(
        events
            .iter()
            .any(|t| t.warning && t.reason == "CaConfigMapMissing"),
        "{events:?}"
    );
    let mut again = mirror();
    again.status = Some(first.clone());
    let second = compute_status(&again, &missing, &at(70));
    assert_eq!(second, first);
    assert!(transitions(Some(&first), &second).is_empty());
}

#[test]
fn with_a_secret_and_a_ca_config_map_missing_the_first_in_field_order_names_the_reason_and_both_are_listed(
) {
    let missing = Outcome::ReferencesMissing {
        missing: vec![
            MissingObject {
                referenced: Referenced::CaConfigMap,
                message: r#"spec.registries[0].caConfigMap.name: ConfigMap "corp-ca" not found in namespace "ns""#
                    .to_string(),
            },
            MissingObject {
                referenced: Referenced::CredentialsSecret,
                message: r#"spec.registries[1].credentialsSecret.name: Secret "hub-creds" not found in namespace "ns""#
                    .to_string(),
            },
        ],
    };
    let status = compute_status(&mirror(), &missing, &at(10));
    let ready = cond(&status, ConditionType::Ready);
    assert_eq!(ready.reason, "CaConfigMapMissing");
    assert_eq!(
        ready.message,
        r#"spec.registries[0].caConfigMap.name: ConfigMap "corp-ca" not found in namespace "ns"; spec.registries[1].credentialsSecret.name: Secret "hub-creds" not found in namespace "ns""#
    );
}

const CREDENTIALS_LOG: &str = "cachalot-registry: registries.docker.io.credentials: cannot read credentials file /etc/cachalot/credentials/docker.io/username: No such file or directory";

/// A registry pod of a mirror whose Basic Secret lacks `username`, at one instant of its crash
/// loop: `state` is the container's current state, `restarts` its restart count.
fn credentials_crash(state: serde_json::Value, restarts: i32) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "cachalot-hub-7d9f8-abcde", "namespace": "ns"},
        "spec": {"containers": [{"name": "registry"}]},
        "status": {
            "phase": "Running", "podIP": "10.0.0.7",
            "conditions": [{"type": "PodScheduled", "status": "True"},
                           {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
            "containerStatuses": [{
                "name": "registry", "ready": false, "restartCount": restarts,
                "image": "cachalot:dev", "imageID": "", "state": state,
                "lastState": {"terminated": {
                    "exitCode": 1, "reason": "Error",
                    "finishedAt": format!("2026-01-02T00:00:{:02}Z", restarts * 7),
                    "message": format!("{CREDENTIALS_LOG}\n"),
                }},
            }],
        },
    }))
    .unwrap()
}

fn not_ready_world(pods: &[Pod]) -> Observations {
    Observations {
        registry_pods: Vec::new(),
        registry_pods_not_ready: not_ready_pods(pods),
        ready_replicas: 0,
        desired_nodes: Some(1),
        agents: vec![agent("node-1", true, None)],
    }
}

#[test]
fn a_registry_pod_that_cannot_read_its_credentials_names_the_cause_in_proxy_available_and_ready() {
    let pod = credentials_crash(
        serde_json::json!({"waiting": {"reason": "CrashLoopBackOff",
            "message": "back-off 10s restarting failed container=registry pod=cachalot-hub-7d9f8-abcde"}}),
        1,
    );
    let status = compute_status(&mirror(), &running(not_ready_world(&[pod])), &at(0));
    let expected = format!(
        "registry pod cachalot-hub-7d9f8-abcde: CrashLoopBackOff; last exit 1: {CREDENTIALS_LOG}"
    );
    let proxy = cond(&status, ConditionType::ProxyAvailable);
    assert_eq!(
        (proxy.status, proxy.reason.as_str(), proxy.message.as_str()),
        (ConditionStatus::False, "RegistryFailing", expected.as_str())
    );
    let ready = cond(&status, ConditionType::Ready);
    assert_eq!(
        (ready.status, ready.reason.as_str(), ready.message.as_str()),
        (
            ConditionStatus::False,
            "ProxyUnavailable",
            expected.as_str()
        )
    );
    let events = transitions(None, &status);
    assert!(
        events
            .iter()
            .any(|t| t.warning && t.reason == "RegistryFailing" && t.note == expected),
        "{events:?}"
    );
}

#[test]
fn a_crash_loop_observed_at_later_restarts_recomputes_to_the_same_status_and_no_event() {
    let first_pod = credentials_crash(
        serde_json::json!({"waiting": {"reason": "CrashLoopBackOff",
            "message": "back-off 10s restarting failed container=registry pod=cachalot-hub-7d9f8-abcde"}}),
        1,
    );
    let mut m = mirror();
    let first = compute_status(&m, &running(not_ready_world(&[first_pod])), &at(100));
    m.status = Some(first.clone());
    for (state, restarts) in [
        (
            serde_json::json!({"waiting": {"reason": "CrashLoopBackOff",
                "message": "back-off 2m40s restarting failed container=registry pod=cachalot-hub-7d9f8-abcde"}}),
            5,
        ),
        (
            serde_json::json!({"running": {"startedAt": "2026-01-02T00:09:00Z"}}),
            6,
        ),
        (
            serde_json::json!({"terminated": {"exitCode": 1, "reason": "Error",
                "finishedAt": "2026-01-02T00:09:01Z", "message": format!("{CREDENTIALS_LOG}\n")}}),
            6,
        ),
    ] {
        let later = credentials_crash(state, restarts);
        let again = compute_status(&m, &running(not_ready_world(&[later])), &at(200));
        assert_eq!(again, first, "restart {restarts}");
        assert!(transitions(Some(&first), &again).is_empty());
    }
}

#[test]
fn a_registry_pod_being_created_is_pending_with_the_kubelets_message_and_one_waiting_for_its_probe_is_starting(
) {
    let pod = |waiting: serde_json::Value| -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cachalot-hub-0", "namespace": "ns"},
            "spec": {"containers": [{"name": "registry"}]},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": "registry", "ready": false, "restartCount": 0, "image": "i",
                "imageID": "", "state": {"waiting": waiting}}]},
        }))
        .unwrap()
    };
    let mount = pod(serde_json::json!({"reason": "ContainerCreating",
        "message": "MountVolume.SetUp failed for volume \"ca-0\" : configmap references non-existent config key: ca.crt"}));
    let status = compute_status(&mirror(), &running(not_ready_world(&[mount])), &at(0));
    let proxy = cond(&status, ConditionType::ProxyAvailable);
    assert_eq!(proxy.reason, "RegistryPending");
    assert_eq!(
        proxy.message,
        "registry pod cachalot-hub-0: ContainerCreating: MountVolume.SetUp failed for volume \"ca-0\" : configmap references non-existent config key: ca.crt"
    );
    assert_eq!(cond(&status, ConditionType::Ready).message, proxy.message);
    assert!(
        transitions(None, &status)
            .iter()
            .all(|t| t.reason != "RegistryFailing"),
        "pending is not a failure"
    );

    // A real kubelet reports a mount failure only as an Event: the pod is just being created.
    let creating = pod(serde_json::json!({"reason": "ContainerCreating"}));
    let status = compute_status(&mirror(), &running(not_ready_world(&[creating])), &at(0));
    let proxy = cond(&status, ConditionType::ProxyAvailable);
    assert_eq!(
        (proxy.reason.as_str(), proxy.message.as_str()),
        (
            "RegistryPending",
            "registry pod cachalot-hub-0: ContainerCreating"
        )
    );

    // Running and waiting for its readiness probe: plain starting.
    let probing: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "cachalot-hub-0", "namespace": "ns"},
        "spec": {"containers": [{"name": "registry"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "registry", "ready": false, "restartCount": 0,
                "image": "i", "imageID": "", "state": {"running": {}}}]},
    }))
    .unwrap();
    let status = compute_status(&mirror(), &running(not_ready_world(&[probing])), &at(0));
    let proxy = cond(&status, ConditionType::ProxyAvailable);
    assert_eq!(
        (proxy.reason.as_str(), proxy.message.as_str()),
        ("NoReadyPods", "no registry pod is ready yet")
    );
}

fn mirror_with(spec: serde_json::Value) -> RegistryMirror {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
        "metadata": {"name": "hub", "namespace": "ns", "uid": "u", "generation": 4},
        "spec": spec
    }))
    .unwrap()
}

fn healthy() -> Observations {
    Observations {
        registry_pods: pods(vec![registry_stats(5, 5, 0, 50)]),
        registry_pods_not_ready: Vec::new(),
        ready_replicas: 1,
        desired_nodes: Some(1),
        agents: vec![agent("node-1", true, None)],
    }
}

#[test]
fn several_replicas_with_pod_local_caches_are_cache_shared_false_but_still_ready() {
    for (storage, kind) in [
        (serde_json::json!({"type": "EmptyDir"}), "EmptyDir"),
        (
            serde_json::json!({"type": "PersistentVolumeClaim", "size": "10Gi"}),
            "PersistentVolumeClaim",
        ),
    ] {
        let m = mirror_with(serde_json::json!({
            "registries": [{"name": "docker.io"}], "replicas": 3, "storage": storage
        }));
        let status = compute_status(&m, &running(healthy()), &at(100));
        let c = cond(&status, ConditionType::CacheShared);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::False, "PerReplicaCache")
        );
        assert!(
            c.message.contains(&format!(
                "each of the 3 registry pods keeps its own {kind} cache"
            )) && c.message.contains("up to 3 times")
                && c.message.contains("spec.storage.type S3"),
            "{}",
            c.message
        );
        assert_eq!(
            cond(&status, ConditionType::Ready).status,
            ConditionStatus::True,
            "existing multi-replica mirrors keep working"
        );
    }
}

#[test]
fn s3_storage_and_a_single_replica_share_one_cache_and_an_external_endpoint_is_unknown() {
    let shared = |spec: serde_json::Value, external: bool| {
        let mut outcome = running(healthy());
        if let Outcome::Running { external: e, .. } = &mut outcome {
            *e = external;
        }
        let status = compute_status(&mirror_with(spec), &outcome, &at(100));
        let c = cond(&status, ConditionType::CacheShared).clone();
        (c.status, c.reason)
    };
    assert_eq!(
        shared(
            serde_json::json!({"registries": [{"name": "docker.io"}], "replicas": 3,
                "storage": {"type": "S3", "s3": {"bucket": "cachalot"}}}),
            false
        ),
        (ConditionStatus::True, "SharedStorage".to_string())
    );
    assert_eq!(
        shared(
            serde_json::json!({"registries": [{"name": "docker.io"}]}),
            false
        ),
        (ConditionStatus::True, "SingleReplica".to_string())
    );
    assert_eq!(
        shared(
            serde_json::json!({"registries": [{"name": "docker.io"}], "replicas": 2,
                "service": {"type": "External", "externalUrl": "http://10.0.0.5:5000"}}),
            true
        ),
        (ConditionStatus::Unknown, "ExternalEndpoint".to_string())
    );
}

#[test]
fn cache_shared_false_is_stable_and_sends_no_event() {
    let m = mirror_with(serde_json::json!({"registries": [{"name": "docker.io"}], "replicas": 2}));
    let first = compute_status(&m, &running(healthy()), &at(100));
    let mut again_m = m.clone();
    again_m.status = Some(first.clone());
    let again = compute_status(&again_m, &running(healthy()), &at(200));
    assert_eq!(first, again);
    assert!(transitions(Some(&first), &again).is_empty());
}
