//! Tests of the fake API server itself, through a real `kube::Client`: the behaviours a kube-runtime
//! controller relies on (SSA, NotFound, selectors, watch streams, status subresource, finalizers,
//! owner garbage collection, discovery). Each test starts its own server process on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use cachalot_e2e::fake_apiserver::FakeApiServer;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::watcher;
use serde_json::json;

const NS: &str = "default";
const MANAGER: &str = "cachalot-test";
/// Upper bound for any single scenario; an unanswered call would otherwise hang the test.
const SCENARIO: Duration = Duration::from_secs(60);

async fn server() -> (FakeApiServer, kube::Client) {
    let server = FakeApiServer::start().await.expect("start fake API server");
    let client = server.client(NS).await.expect("kube client");
    (server, client)
}

fn config_map(name: &str, labels: &[(&str, &str)], data: &[(&str, &str)]) -> serde_json::Value {
    let labels: BTreeMap<_, _> = labels.iter().copied().collect();
    let data: BTreeMap<_, _> = data.iter().copied().collect();
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "labels": labels}, "data": data})
}

fn ssa() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// A namespaced test kind with a status subresource, registered through a real CRD object so the
/// dynamic CRD path of the server is exercised too.
async fn widgets(client: &kube::Client) -> Api<DynamicObject> {
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.cachalot.dev"},
        "spec": {"group": "test.cachalot.dev", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object",
                                          "x-kubernetes-preserve-unknown-fields": true}}}]}
    }))
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let created = crds.create(&PostParams::default(), &crd).await.unwrap();
    let established = created
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    assert!(established, "a created CRD reports Established");
    let gvk = GroupVersionKind::gvk("test.cachalot.dev", "v1", "Widget");
    Api::namespaced_with(
        client.clone(),
        NS,
        &ApiResource::from_gvk_with_plural(&gvk, "widgets"),
    )
}

#[tokio::test]
async fn server_side_apply_creates_then_updates_and_drops_keys_no_longer_applied() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let cms: Api<ConfigMap> = Api::default_namespaced(client);
        let first = config_map("reg", &[("app", "cachalot")], &[("a", "1"), ("b", "2")]);
        let created = cms
            .patch("reg", &ssa(), &Patch::Apply(&first))
            .await
            .unwrap();
        let meta = &created.metadata;
        assert_eq!(
            meta.namespace.as_deref(),
            Some(NS),
            "namespace stamped from the URL"
        );
        assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
        let rv1: u64 = meta.resource_version.as_deref().unwrap().parse().unwrap();

        let second = config_map("reg", &[("app", "cachalot")], &[("a", "10")]);
        let updated = cms
            .patch("reg", &ssa(), &Patch::Apply(&second))
            .await
            .unwrap();
        let data = updated.data.unwrap();
        assert_eq!(data.get("a").map(String::as_str), Some("10"));
        assert!(
            !data.contains_key("b"),
            "a key the manager stopped applying is removed"
        );
        let rv2: u64 = updated.metadata.resource_version.unwrap().parse().unwrap();
        assert!(rv2 > rv1, "resourceVersion increases: {rv1} -> {rv2}");
        assert_eq!(updated.metadata.uid, created.metadata.uid);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn reapplying_an_unchanged_object_keeps_its_resource_version() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let cms: Api<ConfigMap> = Api::default_namespaced(client);
        let cm = config_map("same", &[], &[("k", "v")]);
        let a = cms.patch("same", &ssa(), &Patch::Apply(&cm)).await.unwrap();
        let b = cms.patch("same", &ssa(), &Patch::Apply(&cm)).await.unwrap();
        assert_eq!(a.metadata.resource_version, b.metadata.resource_version);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn get_opt_of_a_missing_object_is_none_and_get_is_a_not_found_status() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let cms: Api<ConfigMap> = Api::default_namespaced(client);
        assert!(cms.get_opt("absent").await.unwrap().is_none());
        match cms.get("absent").await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 404);
                assert_eq!(status.reason, "NotFound");
            }
            other => panic!("expected a NotFound status, got {other:?}"),
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn create_of_an_existing_name_is_already_exists_and_a_stale_replace_is_a_conflict() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let cms: Api<ConfigMap> = Api::default_namespaced(client);
        let cm: ConfigMap = serde_json::from_value(config_map("dup", &[], &[])).unwrap();
        let created = cms.create(&PostParams::default(), &cm).await.unwrap();
        match cms.create(&PostParams::default(), &cm).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"))
            }
            other => panic!("expected AlreadyExists, got {other:?}"),
        }
        let mut fresh = created.clone();
        fresh.data = Some(BTreeMap::from([("x".to_owned(), "1".to_owned())]));
        cms.replace("dup", &PostParams::default(), &fresh)
            .await
            .unwrap();
        // `created` still carries the old resourceVersion.
        match cms.replace("dup", &PostParams::default(), &created).await {
            Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
            other => panic!("expected Conflict, got {other:?}"),
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn list_filters_by_equality_and_set_based_label_selectors() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
        for (name, tier) in [("a", "front"), ("b", "back"), ("c", "cache")] {
            let cm = config_map(name, &[("tier", tier), ("app", "x")], &[]);
            cms.patch(name, &ssa(), &Patch::Apply(&cm)).await.unwrap();
        }
        let plain = config_map("d", &[], &[]);
        cms.patch("d", &ssa(), &Patch::Apply(&plain)).await.unwrap();
        let other_ns: Api<ConfigMap> = Api::namespaced(client, "elsewhere");
        let elsewhere = config_map("e", &[("tier", "front")], &[]);
        other_ns
            .patch("e", &ssa(), &Patch::Apply(&elsewhere))
            .await
            .unwrap();

        let names = |list: kube::core::ObjectList<ConfigMap>| {
            list.items
                .into_iter()
                .map(|c| c.metadata.name.unwrap())
                .collect::<Vec<_>>()
        };
        let eq = cms
            .list(&ListParams::default().labels("tier=front"))
            .await
            .unwrap();
        assert_eq!(names(eq), ["a"]);
        let set = cms
            .list(&ListParams::default().labels("tier in (back,cache)"))
            .await
            .unwrap();
        assert_eq!(names(set), ["b", "c"]);
        let ne = cms
            .list(&ListParams::default().labels("app=x,tier!=front"))
            .await
            .unwrap();
        assert_eq!(names(ne), ["b", "c"]);
        let absent = cms
            .list(&ListParams::default().labels("!tier"))
            .await
            .unwrap();
        assert_eq!(names(absent), ["d"]);
        let by_name = cms
            .list(&ListParams::default().fields("metadata.name=c"))
            .await
            .unwrap();
        assert_eq!(names(by_name), ["c"]);
        let malformed = cms.list(&ListParams::default().labels("tier in (a")).await;
        assert!(matches!(malformed, Err(kube::Error::Api(s)) if s.code == 400));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn watcher_sees_create_modify_and_delete_in_order() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let cms: Api<ConfigMap> = Api::default_namespaced(client);
        let existing = config_map("before", &[("w", "1")], &[]);
        cms.patch("before", &ssa(), &Patch::Apply(&existing))
            .await
            .unwrap();
        let mut events = watcher(cms.clone(), watcher::Config::default().labels("w=1")).boxed();

        // The initial list must complete before the changes, or they would show up as InitApply.
        let mut initial = Vec::new();
        loop {
            match events.next().await.unwrap().unwrap() {
                watcher::Event::Init => {}
                watcher::Event::InitApply(cm) => initial.push(cm.metadata.name.unwrap()),
                watcher::Event::InitDone => break,
                other => panic!("unexpected event during the initial list: {other:?}"),
            }
        }
        assert_eq!(initial, ["before"]);

        let v1 = config_map("live", &[("w", "1")], &[("k", "1")]);
        cms.patch("live", &ssa(), &Patch::Apply(&v1)).await.unwrap();
        let ignored = config_map("unselected", &[("w", "2")], &[]);
        cms.patch("unselected", &ssa(), &Patch::Apply(&ignored))
            .await
            .unwrap();
        let v2 = config_map("live", &[("w", "1")], &[("k", "2")]);
        cms.patch("live", &ssa(), &Patch::Apply(&v2)).await.unwrap();
        cms.delete("live", &DeleteParams::default()).await.unwrap();

        let mut seen = Vec::new();
        for _ in 0..3 {
            match events.next().await.unwrap().unwrap() {
                watcher::Event::Apply(cm) => {
                    let k = cm
                        .data
                        .unwrap_or_default()
                        .get("k")
                        .cloned()
                        .unwrap_or_default();
                    seen.push(format!("apply {} k={k}", cm.metadata.name.unwrap()));
                }
                watcher::Event::Delete(cm) => {
                    seen.push(format!("delete {}", cm.metadata.name.unwrap()))
                }
                other => panic!("unexpected event: {other:?}"),
            }
        }
        assert_eq!(seen, ["apply live k=1", "apply live k=2", "delete live"]);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn status_patch_on_a_custom_resource_changes_only_status_and_spec_changes_bump_generation() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let api = widgets(&client).await;
        let obj = json!({"apiVersion": "test.cachalot.dev/v1", "kind": "Widget",
                         "metadata": {"name": "w"}, "spec": {"size": 1},
                         "status": {"phase": "ignored on the main resource"}});
        let created = api.patch("w", &ssa(), &Patch::Apply(&obj)).await.unwrap();
        assert_eq!(created.metadata.generation, Some(1));
        assert!(
            created.data.get("status").is_none(),
            "status is dropped on the main resource"
        );

        let status = json!({"status": {"phase": "Ready", "observedGeneration": 1},
                            "spec": {"size": 99}});
        let patched = api
            .patch_status("w", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
        assert_eq!(patched.data["status"]["phase"], "Ready");
        assert_eq!(
            patched.data["spec"]["size"], 1,
            "a /status patch leaves spec alone"
        );
        assert_eq!(
            patched.metadata.generation,
            Some(1),
            "a status change keeps generation"
        );

        let spec = json!({"spec": {"size": 2}, "status": {"phase": "overwritten?"}});
        let respec = api
            .patch("w", &PatchParams::default(), &Patch::Merge(&spec))
            .await
            .unwrap();
        assert_eq!(respec.data["spec"]["size"], 2);
        assert_eq!(
            respec.data["status"]["phase"], "Ready",
            "a main patch leaves status alone"
        );
        assert_eq!(
            respec.metadata.generation,
            Some(2),
            "a spec change bumps generation"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn delete_with_a_finalizer_keeps_the_object_until_the_finalizer_is_removed() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let api = widgets(&client).await;
        let obj = json!({"apiVersion": "test.cachalot.dev/v1", "kind": "Widget",
                         "metadata": {"name": "f", "finalizers": ["cachalot.dev/cleanup"]},
                         "spec": {}});
        api.patch("f", &ssa(), &Patch::Apply(&obj)).await.unwrap();
        api.delete("f", &DeleteParams::default()).await.unwrap();
        let marked = api.get("f").await.unwrap();
        assert!(
            marked.metadata.deletion_timestamp.is_some(),
            "deletion is only marked"
        );

        // Removing the finalizer the way kube-runtime's finalizer helper does: test + remove.
        let remove: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "cachalot.dev/cleanup"},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ]))
        .unwrap();
        api.patch("f", &PatchParams::default(), &Patch::<()>::Json(remove))
            .await
            .unwrap();
        assert!(
            api.get_opt("f").await.unwrap().is_none(),
            "gone once no finalizer is left"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_dependents() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let cms: Api<ConfigMap> = Api::default_namespaced(client);
        let owner = cms
            .patch(
                "owner",
                &ssa(),
                &Patch::Apply(&config_map("owner", &[], &[])),
            )
            .await
            .unwrap();
        let mut child = config_map("child", &[], &[]);
        child["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.metadata.uid.unwrap(), "controller": true}]);
        cms.patch("child", &ssa(), &Patch::Apply(&child))
            .await
            .unwrap();
        cms.delete("owner", &DeleteParams::default()).await.unwrap();
        assert!(cms.get_opt("child").await.unwrap().is_none());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn discovery_finds_core_v1_apps_and_the_cachalot_group() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let discovery = kube::Discovery::new(client).run().await.unwrap();
        let kinds: Vec<String> = discovery
            .groups()
            .flat_map(|g| g.recommended_resources())
            .map(|(ar, _)| format!("{}/{}", ar.api_version, ar.plural))
            .collect();
        for wanted in [
            "v1/configmaps",
            "v1/pods",
            "apps/v1/daemonsets",
            "policy/v1/poddisruptionbudgets",
            "coordination.k8s.io/v1/leases",
            "events.k8s.io/v1/events",
            "apiextensions.k8s.io/v1/customresourcedefinitions",
            "cachalot.dev/v1alpha1/registrymirrors",
        ] {
            assert!(
                kinds.iter().any(|k| k == wanted),
                "{wanted} missing from {kinds:?}"
            );
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_watch_from_a_resource_version_replays_only_the_later_events() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let cms: Api<ConfigMap> = Api::default_namespaced(client);
        let a = cms
            .patch(
                "a",
                &ssa(),
                &Patch::Apply(&config_map("a", &[], &[("v", "1")])),
            )
            .await
            .unwrap();
        let from = a.metadata.resource_version.unwrap();
        cms.patch("b", &ssa(), &Patch::Apply(&config_map("b", &[], &[])))
            .await
            .unwrap();
        cms.patch(
            "a",
            &ssa(),
            &Patch::Apply(&config_map("a", &[], &[("v", "2")])),
        )
        .await
        .unwrap();
        let stream = cms
            .watch(&kube::api::WatchParams::default().timeout(5), &from)
            .await
            .unwrap();
        let events: Vec<String> = stream
            .take(2)
            .map(|e| match e.unwrap() {
                kube::api::WatchEvent::Added(cm) => format!("ADDED {}", cm.metadata.name.unwrap()),
                kube::api::WatchEvent::Modified(cm) => {
                    format!("MODIFIED {}", cm.metadata.name.unwrap())
                }
                other => format!("{other:?}"),
            })
            .collect()
            .await;
        assert_eq!(events, ["ADDED b", "MODIFIED a"]);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn namespaces_can_be_created_and_listed_and_bad_bodies_are_bad_requests() {
    tokio::time::timeout(SCENARIO, async {
        let (_server, client) = server().await;
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        let ns = serde_json::from_value(json!({"metadata": {"name": "team-a"}})).unwrap();
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        let listed = namespaces.list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), 1);
        let bad: Api<ConfigMap> = Api::default_namespaced(client);
        let nameless: ConfigMap = serde_json::from_value(json!({"metadata": {}})).unwrap();
        match bad.create(&PostParams::default(), &nameless).await {
            Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (422, "Invalid")),
            other => panic!("expected Invalid, got {other:?}"),
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_watch_from_a_resource_version_older_than_the_history_gets_410_expired() {
    tokio::time::timeout(SCENARIO, async {
        let server = FakeApiServer::start_with_args(&["--history", "2"])
            .await
            .unwrap();
        let cms: Api<ConfigMap> = Api::default_namespaced(server.client(NS).await.unwrap());
        let first = cms
            .patch("c0", &ssa(), &Patch::Apply(&config_map("c0", &[], &[])))
            .await
            .unwrap();
        for name in ["c1", "c2", "c3"] {
            cms.patch(name, &ssa(), &Patch::Apply(&config_map(name, &[], &[])))
                .await
                .unwrap();
        }
        let from = first.metadata.resource_version.unwrap();
        let mut stream = cms
            .watch(&kube::api::WatchParams::default().timeout(5), &from)
            .await
            .unwrap()
            .boxed();
        match stream.next().await {
            Some(Ok(kube::api::WatchEvent::Error(status))) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            }
            other => panic!("expected a 410 ERROR event, got {other:?}"),
        }
    })
    .await
    .unwrap();
}
