//! Docker Engine: the mirror as the first of `registry-mirrors` in dockerd's `daemon.json`.
//!
//! Docker only mirrors Docker Hub, through mirror URLs without a path, so a node running
//! dockerd pulls `docker.io` images through the mirror's default registry and everything else
//! directly. The administrator owns `daemon.json`: the agent merges its one entry into the
//! file and takes it out again, keeping every other key and value (the file is rewritten
//! pretty-printed, keys in sorted order, only when something changes). A file that is not a
//! JSON object, or whose `registry-mirrors` is not a list of strings, is never written and is
//! reported. Taking the entry out leaves the rest as the administrator has it then; a list
//! left empty stays as `"registry-mirrors": []` rather than going, because dockerd's reload
//! keeps the mirrors it has when the key is absent (found with a real dockerd 20.10: the mirror
//! stayed in use until a restart). An empty list means what no key means at start-up.
//!
//! dockerd reads `registry-mirrors` again on `SIGHUP` (a reload, no restart: running containers
//! are untouched), which [`super::reload`] sends.
//!
//! Pure.

use serde_json::Value;

use super::protocol::{DesiredState, Reason, RegistryState, RegistryStatus};

/// The only registry Docker Engine mirrors.
pub const DOCKER_HUB: &str = "docker.io";

/// The key dockerd reads its Docker Hub mirrors from.
pub const MIRRORS_KEY: &str = "registry-mirrors";

/// Why `daemon.json` cannot be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeDaemonJsonError {
    #[error("daemon.json is not valid JSON ({0}); it was left untouched")]
    NotJson(String),
    #[error("daemon.json is not a JSON object; it was left untouched")]
    NotAnObject,
    #[error("daemon.json: `registry-mirrors` is not a list of strings; it was left untouched")]
    MirrorsNotAList,
    #[error("Docker mirrors cannot have a path, query or fragment: `{0}` (give the mirror without one; its defaultRegistry must be docker.io)")]
    EndpointWithPath(String),
}

/// The new `daemon.json` after a merge or an unmerge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to change: the file is left byte for byte as it is.
    Unchanged,
    /// Write this content.
    Write(String),
}

/// `endpoint` as dockerd compares mirrors: with a trailing slash. Refused with a path. Pure.
pub fn mirror_url(endpoint: &str) -> Result<String, MergeDaemonJsonError> {
    let url = reqwest::Url::parse(endpoint)
        .map_err(|_| MergeDaemonJsonError::EndpointWithPath(endpoint.to_owned()))?;
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(MergeDaemonJsonError::EndpointWithPath(endpoint.to_owned()));
    }
    let host = url
        .host_str()
        .ok_or_else(|| MergeDaemonJsonError::EndpointWithPath(endpoint.to_owned()))?;
    Ok(match url.port() {
        Some(port) => format!("{}://{host}:{port}/", url.scheme()),
        None => format!("{}://{host}/", url.scheme()),
    })
}

fn same_mirror(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// A parsed `daemon.json`: the whole object, and its mirror list (`None`: no key).
type Parsed = (serde_json::Map<String, Value>, Option<Vec<String>>);

/// Parses `existing` into its object and its mirror list.
fn parse(existing: Option<&str>) -> Result<Parsed, MergeDaemonJsonError> {
    let Some(text) = existing.filter(|t| !t.trim().is_empty()) else {
        return Ok((serde_json::Map::new(), None));
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| MergeDaemonJsonError::NotJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(MergeDaemonJsonError::NotAnObject);
    };
    let mirrors = match map.get(MIRRORS_KEY) {
        None => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(MergeDaemonJsonError::MirrorsNotAList)?,
        ),
        Some(_) => return Err(MergeDaemonJsonError::MirrorsNotAList),
    };
    Ok((map, mirrors))
}

fn render(map: serde_json::Map<String, Value>) -> String {
    // A map of JSON values always serialises.
    let mut text = serde_json::to_string_pretty(&Value::Object(map)).unwrap_or_default();
    text.push('\n');
    text
}

/// Puts `endpoint` first in `registry-mirrors` of `existing` (`None`: no file), keeping every
/// other key and mirror. Pure.
pub fn merge(existing: Option<&str>, endpoint: &str) -> Result<Outcome, MergeDaemonJsonError> {
    let url = mirror_url(endpoint)?;
    let (mut map, mirrors) = parse(existing)?;
    let mut mirrors = mirrors.unwrap_or_default();
    if mirrors.first().is_some_and(|m| same_mirror(m, &url)) {
        return Ok(Outcome::Unchanged);
    }
    mirrors.retain(|m| !same_mirror(m, &url));
    mirrors.insert(0, url);
    map.insert(
        MIRRORS_KEY.to_owned(),
        Value::Array(mirrors.into_iter().map(Value::String).collect()),
    );
    Ok(Outcome::Write(render(map)))
}

/// Takes `endpoint` out of `registry-mirrors` of `existing` again, keeping everything else as
/// it is now (an emptied list stays, see the module header). Pure.
pub fn unmerge(existing: Option<&str>, endpoint: &str) -> Result<Outcome, MergeDaemonJsonError> {
    if existing.is_none() {
        return Ok(Outcome::Unchanged);
    }
    let (mut map, mirrors) = parse(existing)?;
    let Some(mut mirrors) = mirrors else {
        return Ok(Outcome::Unchanged);
    };
    let count = mirrors.len();
    mirrors.retain(|m| !same_mirror(m, endpoint));
    if mirrors.len() == count {
        return Ok(Outcome::Unchanged);
    }
    map.insert(
        MIRRORS_KEY.to_owned(),
        Value::Array(mirrors.into_iter().map(Value::String).collect()),
    );
    Ok(Outcome::Write(render(map)))
}

/// What the agent does with `daemon.json` in one round, and what it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerPlan {
    /// The new content of `daemon.json`.
    pub outcome: Outcome,
    /// The mirror entry the file holds for this mirror afterwards (kept beside the file, so
    /// that a changed endpoint's old entry is taken out next time); `None`: none.
    pub entry: Option<String>,
    /// Per desired registry, in desired order.
    pub registries: Vec<RegistryStatus>,
}

/// Plans one round for a Docker Engine node: `daemon.json` holds `existing` (`None`: no file)
/// and, from an earlier round, this mirror's `previous` entry; `live` are the endpoints that
/// passed the gate. `docker.io` goes through its first live endpoint; another registry cannot
/// (Docker mirrors only Docker Hub) and is reported `Blocked`; with no live endpoint, or when
/// the mirror is being removed, the entry is taken out (dockerd would go to Docker Hub past a
/// dead mirror anyway, one timeout later). A file that cannot be merged is left untouched and
/// reported. Pure.
pub fn plan_docker(
    desired: &DesiredState,
    existing: Option<&str>,
    previous: Option<&str>,
    live: &std::collections::BTreeSet<String>,
) -> DockerPlan {
    let status = |registry: &str, state, reason, message: String| RegistryStatus {
        registry: registry.to_owned(),
        state,
        reason,
        message,
    };
    let hub = desired.registries.iter().find(|r| r.registry == DOCKER_HUB);
    let wanted = match hub {
        Some(r) if !desired.removing => r.endpoints.iter().find(|e| live.contains(*e)),
        _ => None,
    };
    let plan = (|| {
        let mut text = existing.map(str::to_owned);
        let mut changed = false;
        if let Some(old) = previous.filter(|old| wanted.is_none_or(|w| !same_mirror(old, w))) {
            if let Outcome::Write(t) = unmerge(text.as_deref(), old)? {
                text = Some(t);
                changed = true;
            }
        }
        let entry = match wanted {
            Some(endpoint) => {
                if let Outcome::Write(t) = merge(text.as_deref(), endpoint)? {
                    text = Some(t);
                    changed = true;
                }
                Some(mirror_url(endpoint)?)
            }
            None => None,
        };
        let outcome = match (changed, text) {
            (true, Some(t)) => Outcome::Write(t),
            _ => Outcome::Unchanged,
        };
        Ok::<_, MergeDaemonJsonError>((outcome, entry))
    })();
    let (outcome, entry, hub_status) = match plan {
        Ok((outcome, entry)) => {
            let hub_status = match (&entry, desired.removing) {
                (_, true) => (
                    RegistryState::Removed,
                    None,
                    "taken out of daemon.json".to_owned(),
                ),
                (Some(url), false) => (
                    RegistryState::Configured,
                    None,
                    format!("daemon.json registry-mirrors starts with {url}"),
                ),
                (None, false) => (
                    RegistryState::Unreachable,
                    Some(Reason::MirrorUnreachable),
                    "no mirror endpoint answers; dockerd pulls from Docker Hub directly".to_owned(),
                ),
            };
            (outcome, entry, hub_status)
        }
        Err(e) => (
            Outcome::Unchanged,
            previous.map(str::to_owned),
            (
                RegistryState::Blocked,
                Some(Reason::DaemonJsonInvalid),
                e.to_string(),
            ),
        ),
    };
    let registries = desired
        .registries
        .iter()
        .map(|r| {
            if r.registry == DOCKER_HUB {
                let (state, reason, message) = hub_status.clone();
                status(&r.registry, state, reason, message)
            } else {
                status(
                    &r.registry,
                    RegistryState::Blocked,
                    Some(Reason::RuntimeUnsupported),
                    format!(
                        "Docker Engine mirrors Docker Hub only; {} is pulled directly",
                        r.registry
                    ),
                )
            }
        })
        .collect();
    DockerPlan {
        outcome,
        entry,
        registries,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const M: &str = "http://10.96.0.12:5000";

    fn written(o: Outcome) -> Value {
        match o {
            Outcome::Write(t) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a write, got {other:?}"),
        }
    }

    #[test]
    fn no_file_becomes_a_file_with_only_the_mirror() {
        assert_eq!(
            written(merge(None, M).unwrap()),
            serde_json::json!({"registry-mirrors": ["http://10.96.0.12:5000/"]})
        );
    }

    #[test]
    fn the_admins_keys_and_mirrors_are_kept_and_ours_goes_first() {
        let admin = r#"{"log-level": "warn", "registry-mirrors": ["https://mirror.corp.example"],
                        "default-ulimits": {"nofile": {"Name": "nofile", "Hard": 64000, "Soft": 64000}}}"#;
        assert_eq!(
            written(merge(Some(admin), M).unwrap()),
            serde_json::json!({
                "log-level": "warn",
                "registry-mirrors": ["http://10.96.0.12:5000/", "https://mirror.corp.example"],
                "default-ulimits": {"nofile": {"Name": "nofile", "Hard": 64000, "Soft": 64000}}
            })
        );
    }

    #[test]
    fn merging_twice_changes_nothing_and_a_misplaced_entry_moves_first() {
        let Outcome::Write(once) = merge(Some(r#"{"debug": true}"#), M).unwrap() else {
            panic!()
        };
        assert_eq!(merge(Some(&once), M).unwrap(), Outcome::Unchanged);
        let misplaced = r#"{"registry-mirrors": ["https://a.example", "http://10.96.0.12:5000"]}"#;
        assert_eq!(
            written(merge(Some(misplaced), M).unwrap())[MIRRORS_KEY],
            serde_json::json!(["http://10.96.0.12:5000/", "https://a.example"])
        );
    }

    #[test]
    fn bad_files_are_never_written() {
        for (text, want) in [
            ("{not json", "not valid JSON"),
            ("[1, 2]", "not a JSON object"),
            (
                r#"{"registry-mirrors": "http://x"}"#,
                "not a list of strings",
            ),
            (r#"{"registry-mirrors": [1]}"#, "not a list of strings"),
        ] {
            let e = merge(Some(text), M).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
            let e = unmerge(Some(text), M).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_mirror_with_a_path_is_refused() {
        for bad in [
            "http://10.96.0.12:5000/docker.io",
            "http://m:5000/?ns=docker.io",
            "not a url",
        ] {
            assert!(matches!(
                merge(None, bad),
                Err(MergeDaemonJsonError::EndpointWithPath(_))
            ));
        }
        assert_eq!(mirror_url("http://m:5000").unwrap(), "http://m:5000/");
        assert_eq!(mirror_url("https://m/").unwrap(), "https://m/");
    }

    #[test]
    fn unmerging_takes_only_ours_out_and_keeps_the_admins_later_changes() {
        let admin = r#"{"log-level": "warn"}"#;
        let Outcome::Write(merged) = merge(Some(admin), M).unwrap() else {
            panic!()
        };
        let mut v: Value = serde_json::from_str(&merged).unwrap();
        v["debug"] = Value::Bool(true);
        v[MIRRORS_KEY]
            .as_array_mut()
            .unwrap()
            .push("https://b.example".into());
        assert_eq!(
            written(unmerge(Some(&v.to_string()), M).unwrap()),
            serde_json::json!({"log-level": "warn", "debug": true, "registry-mirrors": ["https://b.example"]})
        );
        // Ours alone: the list stays, empty, so that a reload drops the mirror.
        assert_eq!(
            written(unmerge(Some(&merged), M).unwrap()),
            serde_json::json!({"log-level": "warn", "registry-mirrors": []})
        );
        // Ours already gone (the admin took it out), or no file: nothing to do.
        assert_eq!(unmerge(Some(admin), M).unwrap(), Outcome::Unchanged);
        assert_eq!(unmerge(None, M).unwrap(), Outcome::Unchanged);
    }

    fn desired(registries: &[(&str, &[&str])], removing: bool) -> DesiredState {
        serde_json::from_value(serde_json::json!({
            "mirror": "ns/m",
            "generation": "g",
            "removing": removing,
            "runtime": "Docker",
            "registries": registries
                .iter()
                .map(|(r, e)| serde_json::json!({"registry": r, "endpoints": e}))
                .collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    fn live(endpoints: &[&str]) -> std::collections::BTreeSet<String> {
        endpoints.iter().map(|e| (*e).to_owned()).collect()
    }

    #[test]
    fn docker_hub_goes_through_the_first_live_endpoint_and_other_registries_are_blocked() {
        let d = desired(
            &[("docker.io", &["http://a:5000", M]), ("ghcr.io", &[M])],
            false,
        );
        let plan = plan_docker(&d, Some(r#"{"debug": true}"#), None, &live(&[M]));
        assert_eq!(
            written(plan.outcome),
            serde_json::json!({"debug": true, "registry-mirrors": ["http://10.96.0.12:5000/"]})
        );
        assert_eq!(plan.entry.as_deref(), Some("http://10.96.0.12:5000/"));
        let states: Vec<_> = plan
            .registries
            .iter()
            .map(|r| (r.registry.as_str(), r.state, r.reason))
            .collect();
        assert_eq!(
            states,
            vec![
                ("docker.io", RegistryState::Configured, None),
                (
                    "ghcr.io",
                    RegistryState::Blocked,
                    Some(Reason::RuntimeUnsupported)
                ),
            ]
        );
    }

    #[test]
    fn a_changed_endpoint_replaces_the_old_entry_and_a_dead_one_is_taken_out() {
        let d = desired(&[("docker.io", &[M])], false);
        let old = r#"{"registry-mirrors": ["http://old:5000/", "https://theirs.example"]}"#;
        let plan = plan_docker(&d, Some(old), Some("http://old:5000/"), &live(&[M]));
        assert_eq!(
            written(plan.outcome)[MIRRORS_KEY],
            serde_json::json!(["http://10.96.0.12:5000/", "https://theirs.example"])
        );
        // Nothing answers: out, and reported unreachable.
        let Outcome::Write(ours) = merge(None, M).unwrap() else {
            panic!()
        };
        let plan = plan_docker(&d, Some(&ours), Some("http://10.96.0.12:5000/"), &live(&[]));
        assert_eq!(written(plan.outcome)[MIRRORS_KEY], serde_json::json!([]));
        assert_eq!(plan.entry, None);
        assert_eq!(plan.registries[0].state, RegistryState::Unreachable);
        // Planned again on its own result: nothing to do.
        let again = plan_docker(
            &d,
            Some(&ours),
            Some("http://10.96.0.12:5000/"),
            &live(&[M]),
        );
        assert_eq!(again.outcome, Outcome::Unchanged);
    }

    #[test]
    fn removing_takes_the_entry_out_and_an_invalid_file_is_reported_not_written() {
        let Outcome::Write(ours) = merge(Some(r#"{"debug": true}"#), M).unwrap() else {
            panic!()
        };
        let d = desired(&[("docker.io", &[M])], true);
        let plan = plan_docker(&d, Some(&ours), Some(M), &live(&[M]));
        assert_eq!(
            written(plan.outcome),
            serde_json::json!({"debug": true, "registry-mirrors": []})
        );
        assert_eq!(plan.registries[0].state, RegistryState::Removed);
        let d = desired(&[("docker.io", &[M])], false);
        let plan = plan_docker(&d, Some("{oops"), None, &live(&[M]));
        assert_eq!(plan.outcome, Outcome::Unchanged);
        assert_eq!(plan.registries[0].state, RegistryState::Blocked);
        assert_eq!(plan.registries[0].reason, Some(Reason::DaemonJsonInvalid));
        assert!(plan.registries[0].message.contains("not valid JSON"));
    }
}
