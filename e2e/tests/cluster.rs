//! The end-to-end suite, part one: what a user meets first. `helm install` the chart, `kubectl
//! apply` a RegistryMirror, pull through it with containerd on every node, read
//! `kubectl get registrymirrors`, delete it, and check that examples and known-bad mirrors are
//! treated as documented, that the operator lives with only the chart's RBAC, and that its
//! server-side applies leave other managers' fields alone.
//!
//! Each test runs against the cluster that `KUBECONFIG` names with `CACHALOT_E2E=1` (kind, k3d),
//! or else against a real control plane started on this machine for the test (see
//! `cachalot_e2e::target` and docs/testing.md). Each test works in its own namespace labelled
//! `cachalot.dev/e2e=true`, deleted at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use cachalot_e2e::cluster::wait_until;
use cachalot_e2e::suite::{
    apply_mirror, condition, get_registrymirrors, kubectl, mirror_manifest, node_files, node_names,
    puller, registry_hits_misses, run, run_pod, wait_for_condition, wait_for_mirror, wait_gone,
    Scene, MANAGER, POLL,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

fn repo_path(relative: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_serves_pulls_on_every_node_raises_its_hit_ratio_and_cleans_up_when_deleted(
) -> Result<()> {
    let Some(scene) = Scene::set_up("pulls_on_every_node", 2, &[]).await? else {
        return Ok(());
    };
    let (settings, client, ns, api) = (scene.settings(), &scene.client, &scene.ns, &scene.api);

    apply_mirror(api, &mirror_manifest(settings, "e2e", &json!({}))).await?;
    let ready = wait_for_condition(settings, api, "e2e", "Ready", "True").await?;
    let endpoint = ready.data["status"]["endpoint"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!endpoint.is_empty(), "a Ready mirror reports its endpoint");
    let nodes = node_names(client).await?;
    let table = get_registrymirrors(settings, &ns.name)?;
    assert_eq!(table.len(), 1, "{table:?}");
    assert_eq!(table[0]["READY"], "True", "{table:?}");
    assert_eq!(
        table[0]["NODES"],
        format!("{n}/{n}", n = nodes.len()),
        "every node configured: {table:?}"
    );

    let files = node_files(settings, client, &ns.name, "present").await?;
    for (node, content) in &files {
        assert!(
            content.contains(&endpoint),
            "node {node} points docker.io at {endpoint}: {content}"
        );
    }

    // Every node's containerd pulls the image twice with `imagePullPolicy: Always`; after each
    // round the status catches up with the registry's own counts, and the HIT-RATIO column rises.
    let (hits0, misses0) = registry_hits_misses(client, &ns.name, "e2e").await?;
    let mut columns = Vec::new();
    for round in 0..2 {
        for (i, node) in nodes.iter().enumerate() {
            run_pod(
                settings,
                client,
                &ns.name,
                puller(
                    &format!("pull-{round}-{i}"),
                    &settings.pull_image,
                    Some(node),
                ),
            )
            .await
            .with_context(|| format!("pull on {node}, round {round}"))?;
        }
        let (hits, misses) = registry_hits_misses(client, &ns.name, "e2e").await?;
        wait_for_mirror(
            settings,
            api,
            "e2e",
            "status with the registry's counts",
            |m| {
                m.data["status"]["cache"]["hits"] == hits
                    && m.data["status"]["cache"]["misses"] == misses
            },
        )
        .await?;
        let rows = get_registrymirrors(settings, &ns.name)?;
        let row = rows.into_iter().next().context("a row")?;
        eprintln!("after pull round {round} (/stats hits {hits}, misses {misses}): {row:?}");
        columns.push(row);
    }
    let (hits1, misses1) = registry_hits_misses(client, &ns.name, "e2e").await?;
    let pulls = 2 * nodes.len() as u64;
    let served = (hits1 + misses1) - (hits0 + misses0);
    assert!(
        served >= pulls,
        "{pulls} Always pulls went through the mirror's registry: {served} requests counted"
    );
    let ratio = |row: &std::collections::BTreeMap<String, String>| -> f64 {
        row["HIT-RATIO"]
            .trim_end_matches('%')
            .parse()
            .unwrap_or(-1.0)
    };
    assert!(
        ratio(&columns[1]) > ratio(&columns[0]),
        "HIT-RATIO rose on the second pull: {} -> {}",
        columns[0]["HIT-RATIO"],
        columns[1]["HIT-RATIO"]
    );
    assert!(
        columns[1]["BUDGET"].contains('/'),
        "BUDGET shows remaining/limit: {:?}",
        columns[1]
    );
    wait_for_condition(settings, api, "e2e", "CacheEffective", "True").await?;

    api.delete("e2e", &DeleteParams::default()).await?;
    wait_gone(settings, api, "e2e").await?;
    let after = node_files(settings, client, &ns.name, "absent").await?;
    for (node, content) in &after {
        assert!(
            content.trim() == "ABSENT",
            "node {node} still has the mirror's hosts.toml: {content}"
        );
    }
    // The owned objects go by owner-reference garbage collection.
    let selector = "cachalot.dev/mirror=e2e";
    wait_until(
        "owned objects collected",
        settings.timeout,
        POLL,
        || async {
            let lp = ListParams::default().labels(selector);
            let count = |n: usize, what: &str| {
                if n == 0 {
                    Ok(())
                } else {
                    Err(format!("{n} {what} left"))
                }
            };
            let d = Api::<Deployment>::namespaced(client.clone(), &ns.name)
                .list(&lp)
                .await
                .map_err(|e| e.to_string())?;
            count(d.items.len(), "Deployments")?;
            let ds = Api::<DaemonSet>::namespaced(client.clone(), &ns.name)
                .list(&lp)
                .await
                .map_err(|e| e.to_string())?;
            count(ds.items.len(), "DaemonSets")?;
            let s = Api::<Service>::namespaced(client.clone(), &ns.name)
                .list(&lp)
                .await
                .map_err(|e| e.to_string())?;
            count(s.items.len(), "Services")?;
            let c = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
                .list(&lp)
                .await
                .map_err(|e| e.to_string())?;
            count(c.items.len(), "ConfigMaps")
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_mirror_is_not_ready_and_applies_no_registry() -> Result<()> {
    let Some(scene) = Scene::set_up("invalid_mirror", 1, &[]).await? else {
        return Ok(());
    };
    let (settings, client, ns, api) = (scene.settings(), &scene.client, &scene.ns, &scene.api);
    // Passes the CRD schema (a valid URL shape) but names the same registry twice.
    let mirror = json!({"apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
                        "metadata": {"name": "twice"},
                        "spec": {"registries": [{"name": "docker.io"}, {"name": "docker.io"}]}});
    match apply_mirror(api, &mirror).await {
        // The CRD's own validation may already refuse it, which is just as good.
        Err(e) if e.to_string().contains("may appear only once") => return Ok(()),
        other => {
            other?;
        }
    }
    wait_for_condition(settings, api, "twice", "Ready", "False").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert!(
        deployments
            .list(&ListParams::default())
            .await?
            .items
            .is_empty(),
        "no registry was deployed"
    );
    Ok(())
}

/// The `# apiserver: REGEX` or `# operator: REASON REGEX` line of a known-bad fixture.
enum Expectation {
    Refused(String),
    Reported { reason: String, message: String },
}

fn expectation(path: &Path) -> Result<Expectation> {
    let text = std::fs::read_to_string(path)?;
    for line in text.lines() {
        if let Some(regex) = line.strip_prefix("# apiserver: ") {
            return Ok(Expectation::Refused(regex.trim().to_owned()));
        }
        if let Some(rest) = line.strip_prefix("# operator: ") {
            let (reason, message) = rest.trim().split_once(' ').unwrap_or((rest.trim(), ""));
            return Ok(Expectation::Reported {
                reason: reason.to_owned(),
                message: message.to_owned(),
            });
        }
    }
    bail!(
        "{} has no `# apiserver:` or `# operator:` line",
        path.display()
    )
}

/// Whether `text` contains `needle`, where `needle` is a plain substring (the fixtures' lines are
/// substrings, not regular expressions, to keep this crate free of a regex engine).
fn mentions(text: &str, needle: &str) -> bool {
    text.contains(needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_example_is_accepted_and_every_known_bad_mirror_is_refused_or_reported() -> Result<()>
{
    let Some(scene) = Scene::set_up("examples_and_bad_fixtures", 1, &[]).await? else {
        return Ok(());
    };
    let (settings, ns, api) = (scene.settings(), &scene.ns, &scene.api);

    let mut examples: Vec<_> = std::fs::read_dir(repo_path("examples"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 4, "examples found: {examples:?}");
    for example in &examples {
        let out = run(kubectl(settings)
            .args(["apply", "--dry-run=server", "--validate=strict", "-f"])
            .arg(example))
        .with_context(|| format!("the API server accepts {}", example.display()))?;
        assert!(
            out.contains("(server dry run)"),
            "{}: {out}",
            example.display()
        );
    }

    let mut fixtures: Vec<_> = std::fs::read_dir(repo_path("tools/validate/bad"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("registrymirror-"))
        })
        .collect();
    fixtures.sort();
    assert!(fixtures.len() >= 10, "fixtures found: {fixtures:?}");
    let mut refused = 0;
    let mut reported = 0;
    for fixture in &fixtures {
        let expected = expectation(fixture)?;
        // Fixtures name the chart's namespace; apply them into the test's own.
        let text = std::fs::read_to_string(fixture)?.replace(
            "namespace: cachalot-system",
            &format!("namespace: {}", ns.name),
        );
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), text)?;
        let out = kubectl(settings)
            .args(["apply", "--validate=strict", "-f"])
            .arg(file.path())
            .output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        match expected {
            Expectation::Refused(needle) => {
                assert!(
                    !out.status.success(),
                    "{} was accepted by the API server: {said}",
                    fixture.display()
                );
                assert!(
                    mentions(&said, &needle),
                    "{} refused, but without `{needle}`: {said}",
                    fixture.display()
                );
                refused += 1;
            }
            Expectation::Reported { reason, message } => {
                assert!(out.status.success(), "{}: {said}", fixture.display());
                let name = said
                    .lines()
                    .find_map(|l| l.strip_prefix("registrymirror.cachalot.dev/"))
                    .and_then(|l| l.split_whitespace().next())
                    .with_context(|| format!("mirror name in {said}"))?
                    .to_owned();
                let mirror = wait_for_mirror(
                    settings,
                    api,
                    &name,
                    &format!("{name} Ready=False {reason}"),
                    |m| {
                        condition(m, "Ready").is_some_and(|c| {
                            c["status"] == "False"
                                && c["reason"] == reason.as_str()
                                && c["message"]
                                    .as_str()
                                    .is_some_and(|text| mentions(text, &message))
                        })
                    },
                )
                .await
                .with_context(|| fixture.display().to_string())?;
                eprintln!(
                    "{}: reported {}",
                    fixture.display(),
                    condition(&mirror, "Ready")
                        .map(ToString::to_string)
                        .unwrap_or_default()
                );
                api.delete(&name, &DeleteParams::default()).await?;
                // Fixtures share names; the next one must not land on this one's deletion.
                wait_gone(settings, api, &name).await?;
                reported += 1;
            }
        }
    }
    eprintln!("known-bad mirrors: {refused} refused by the API server, {reported} reported by the operator");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_runs_as_the_charts_service_account_with_only_its_rbac() -> Result<()> {
    let Some(scene) = Scene::set_up("operator_rbac", 1, &[]).await? else {
        return Ok(());
    };
    let (settings, client) = (scene.settings(), &scene.client);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &settings.release_namespace);
    let operator = pods
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/name=cachalot,app.kubernetes.io/instance=cachalot"),
        )
        .await?
        .items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .context("the operator pod")?;
    let account = operator
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_default();
    assert_eq!(
        account, "cachalot",
        "the operator pod runs as the chart's ServiceAccount"
    );
    let who = format!(
        "--as=system:serviceaccount:{}:{account}",
        settings.release_namespace
    );
    let can = |args: &[&str]| -> Result<bool> {
        let out = kubectl(settings)
            .args(["auth", "can-i"])
            .args(args)
            .arg(&who)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
    };
    for allowed in [
        ["watch", "registrymirrors.cachalot.dev"],
        ["patch", "registrymirrors.cachalot.dev/status"],
        ["patch", "deployments.apps"],
        ["patch", "daemonsets.apps"],
        ["list", "pods"],
        ["get", "secrets"],
        ["create", "events.events.k8s.io"],
    ] {
        assert!(can(&allowed)?, "the operator may {allowed:?}");
    }
    for denied in [
        ["list", "secrets"],
        ["watch", "secrets"],
        ["delete", "nodes"],
        ["create", "clusterroles.rbac.authorization.k8s.io"],
        ["create", "pods"],
        ["delete", "customresourcedefinitions.apiextensions.k8s.io"],
    ] {
        assert!(!can(&denied)?, "the operator must not {denied:?}");
    }
    // And it works with exactly that: a mirror gets a status written by it.
    scene.ready_mirror("rbac", &json!({})).await?;
    if let Some(local) = scene.target.local() {
        let sa = format!(
            "system:serviceaccount:{}:cachalot",
            settings.release_namespace
        );
        let writes: Vec<_> = local
            .cluster
            .audit_events()
            .into_iter()
            .filter(|e| {
                e.is_write()
                    && e.object_ref
                        .as_ref()
                        .is_some_and(|o| o.resource == "registrymirrors")
            })
            .collect();
        assert!(
            !writes.is_empty(),
            "the audit log shows writes to the mirror"
        );
        let by_operator = writes.iter().filter(|e| e.user.username == sa).count();
        let by_suite = writes.iter().filter(|e| e.user.username == "admin").count();
        assert_eq!(
            by_operator + by_suite,
            writes.len(),
            "every mirror write came from the operator's ServiceAccount or the suite"
        );
        assert!(by_operator > 0, "the operator wrote as {sa}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_restores_the_operators_fields_and_keeps_other_managers_fields(
) -> Result<()> {
    let Some(scene) = Scene::set_up("server_side_apply", 1, &[]).await? else {
        return Ok(());
    };
    let (settings, client, ns, _api) = (scene.settings(), &scene.client, &scene.ns, &scene.api);
    scene.ready_mirror("ssa", &json!({})).await?;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let config_name = "cachalot-ssa-config";
    let original = config_maps.get(config_name).await?;
    let original_config = original
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .cloned()
        .context("config.yaml in the registry ConfigMap")?;

    // Another manager adds its own annotation to the Deployment, and takes over (force) a field
    // the operator owns.
    deployments
        .patch(
            "cachalot-ssa",
            &PatchParams::apply("team-tooling"),
            &Patch::Apply(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                                 "metadata": {"name": "cachalot-ssa",
                                              "annotations": {"team.example/owner": "platform"}}})),
        )
        .await?;
    config_maps
        .patch(
            config_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": config_name},
                                 "data": {"config.yaml": "listen: 0.0.0.0:5000\n"}})),
        )
        .await?;

    wait_until(
        "the operator restores its ConfigMap",
        settings.timeout,
        POLL,
        || async {
            let now = config_maps
                .get(config_name)
                .await
                .map_err(|e| e.to_string())?;
            let data = now
                .data
                .and_then(|d| d.get("config.yaml").cloned())
                .unwrap_or_default();
            if data == original_config {
                Ok(())
            } else {
                Err(format!("config.yaml is {data:?}"))
            }
        },
    )
    .await?;
    let deployment = deployments.get("cachalot-ssa").await?;
    let annotations = deployment.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations.get("team.example/owner").map(String::as_str),
        Some("platform"),
        "another manager's annotation survives the operator's applies"
    );
    let managers: Vec<String> = deployment
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().any(|m| m == "cachalot-operator"),
        "{managers:?}"
    );
    assert!(managers.iter().any(|m| m == "team-tooling"), "{managers:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn spec_warm_is_warmed_by_a_registry_pod_shown_in_status_and_a_failing_image_is_named(
) -> Result<()> {
    let Some(scene) = Scene::set_up("spec_warm", 1, &[]).await? else {
        return Ok(());
    };
    let (settings, client, ns, api) = (scene.settings(), &scene.client, &scene.ns, &scene.api);
    let image = settings.pull_image.clone();

    // The list is warmed once the registry answers: status.warm, the Warmed condition and the
    // WARM column say Done, and the pull that follows costs the registry no miss.
    apply_mirror(
        api,
        &mirror_manifest(settings, "warm", &json!({"warm": [image]})),
    )
    .await?;
    wait_for_condition(settings, api, "warm", "Ready", "True").await?;
    let warmed = wait_for_condition(settings, api, "warm", "Warmed", "True").await?;
    let warm = &warmed.data["status"]["warm"];
    assert_eq!(warm["state"], "Done", "{warm}");
    assert_eq!(
        (warm["done"].as_i64(), warm["total"].as_i64()),
        (Some(1), Some(1)),
        "{warm}"
    );
    assert_eq!(warm["attempts"], 1, "{warm}");
    let table = get_registrymirrors(settings, &ns.name)?;
    assert_eq!(table[0]["WARM"], "Done 1/1", "{table:?}");
    let (_, misses0) = registry_hits_misses(client, &ns.name, "warm").await?;
    let node = node_names(client).await?.remove(0);
    run_pod(
        settings,
        client,
        &ns.name,
        puller("pull-warmed", &image, Some(&node)),
    )
    .await?;
    let (hits1, misses1) = registry_hits_misses(client, &ns.name, "warm").await?;
    assert_eq!(
        misses1, misses0,
        "a warmed image pulls with no miss ({hits1} hits)"
    );

    // The list changes to include an image the upstream does not have: warmed again, that image
    // named in status and the condition.
    let missing = "docker.io/library/not-there:1";
    apply_mirror(
        api,
        &mirror_manifest(settings, "warm", &json!({"warm": [image, missing]})),
    )
    .await?;
    let failed = wait_for_condition(settings, api, "warm", "Warmed", "False").await?;
    let warm = &failed.data["status"]["warm"];
    assert_eq!(warm["state"], "Failed", "{warm}");
    assert_eq!(warm["failed"][0]["ref"], missing, "{warm}");
    let cond = condition(&failed, "Warmed").context("Warmed")?;
    assert_eq!(cond["reason"], "WarmFailed", "{cond}");
    assert!(
        cond["message"]
            .as_str()
            .unwrap_or_default()
            .contains(missing),
        "{cond}"
    );
    assert_eq!(
        condition(&failed, "Ready").context("Ready")?["status"],
        "True",
        "a failed warm leaves the mirror Ready"
    );

    // A registry the mirror does not serve is refused with its own reason, naming the item.
    apply_mirror(
        api,
        &mirror_manifest(settings, "warm", &json!({"warm": ["quay.io/org/app:1"]})),
    )
    .await?;
    let invalid = wait_for_mirror(
        settings,
        api,
        "warm",
        "Warmed=False WarmRegistryNotMirrored",
        |m| condition(m, "Warmed").is_some_and(|c| c["reason"] == "WarmRegistryNotMirrored"),
    )
    .await?;
    let cond = condition(&invalid, "Warmed").context("Warmed")?;
    assert!(
        cond["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("spec.warm[0]: `quay.io/org/app:1` is in registry `quay.io`"),
        "{cond}"
    );
    Ok(())
}
