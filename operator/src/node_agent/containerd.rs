//! Read-only checks of containerd's `config.toml`: does containerd read the certs.d directory
//! the agent writes to? The agent never edits this file and never restarts containerd; it only
//! reports machine-readable reasons.
//!
//! Key names per containerd's docs/hosts.md: v3 (containerd 2.x)
//! `plugins."io.containerd.cri.v1.images".registry.config_path`; v2 (1.x)
//! `plugins."io.containerd.grpc.v1.cri".registry.config_path`; v1 (no `version`)
//! `plugins.cri.registry.config_path`.

use toml::{Table, Value};

use super::protocol::{ContainerdStatus, Problem, Reason};

/// The CRI registry table path for a config version.
fn registry_table_path(version: i64) -> [&'static str; 3] {
    match version {
        v if v >= 3 => ["plugins", "io.containerd.cri.v1.images", "registry"],
        2 => ["plugins", "io.containerd.grpc.v1.cri", "registry"],
        _ => ["plugins", "cri", "registry"],
    }
}

fn lookup<'a>(table: &'a Table, path: &[&str]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let value = table.get(*first)?;
    if rest.is_empty() {
        return Some(value);
    }
    lookup(value.as_table()?, rest)
}

/// Whether containerd 2.x's CRI pulls with the local client (which reads `config_path` as a list)
/// rather than the transfer service (one directory): `use_local_image_pull = true`, or
/// `discard_unpacked_layers = true`, which the transfer service does not support and which makes
/// containerd fall back to the local pull (containerd issue 12415). Other settings that force the
/// fallback are not inspected.
fn local_image_pull(table: &Table) -> bool {
    let images =
        lookup(table, &["plugins", "io.containerd.cri.v1.images"]).and_then(Value::as_table);
    let flag = |name: &str| {
        images
            .and_then(|t| t.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    flag("use_local_image_pull") || flag("discard_unpacked_layers")
}

fn problem(reason: Reason, message: String) -> Problem {
    Problem { reason, message }
}

/// Checks containerd's config text. `expected_dir` is the certs.d path as containerd sees it on
/// the host (when the operator passes it); a `config_path` naming another directory is reported.
#[must_use]
pub fn check_containerd_config(text: &str, expected_dir: Option<&str>) -> ContainerdStatus {
    let table: Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            let e: toml::de::Error = e;
            return ContainerdStatus {
                config_version: None,
                problems: vec![problem(
                    Reason::ContainerdConfigUnreadable,
                    format!("containerd config.toml is not valid TOML: {}", e.message()),
                )],
            };
        }
    };
    let version = table
        .get("version")
        .and_then(Value::as_integer)
        .unwrap_or(1);
    let path = registry_table_path(version);
    let key = format!("plugins.\"{}\".registry", path[1]);
    let registry = lookup(&table, &path).and_then(Value::as_table);
    let mut problems = Vec::new();

    let config_path = registry
        .and_then(|r| r.get("config_path"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if config_path.is_empty() {
        let imports = table
            .get("imports")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        let hint = if imports {
            " (imported config files were not inspected)"
        } else {
            ""
        };
        let dir = expected_dir.unwrap_or("/etc/containerd/certs.d");
        problems.push(problem(
            Reason::ConfigPathNotSet,
            format!(
                "containerd config version {version}: {key}.config_path is not set, so certs.d is \
                 never read{hint}. Fix: config_path = {dir:?} under [{key}], then restart containerd"
            ),
        ));
    } else if config_path.contains(':') && version >= 3 {
        // The local pull of containerd 2.x reads the list like 1.x does: nothing to report then.
        if !local_image_pull(&table) {
            let single = expected_dir.unwrap_or("/etc/containerd/certs.d");
            problems.push(problem(
                Reason::ConfigPathList,
                format!(
                    "{key}.config_path = {config_path:?} is a ':'-separated list, and containerd \
                     2.1+ pulls through the transfer service (use_local_image_pull is not set), \
                     which takes config_path as one directory: no hosts.toml is read. Fix: \
                     config_path = {single:?}, or use_local_image_pull = true in \
                     [plugins.\"io.containerd.cri.v1.images\"]"
                ),
            ));
        }
    } else if config_path.contains(':') {
        problems.push(problem(
            Reason::ConfigPathList,
            format!(
                "{key}.config_path = {config_path:?} is a ':'-separated list; containerd 1.x reads \
                 it as a list, containerd 2.1+'s transfer service would take it as one directory"
            ),
        ));
    } else if let Some(expected) = expected_dir {
        if config_path.trim_end_matches('/') != expected.trim_end_matches('/') {
            problems.push(problem(
                Reason::ConfigPathMismatch,
                format!("{key}.config_path = {config_path:?} but the agent writes to {expected:?}"),
            ));
        }
    }
    if config_path.contains(':') {
        if let Some(expected) = expected_dir {
            if !config_path
                .split(':')
                .any(|p| p.trim_end_matches('/') == expected.trim_end_matches('/'))
            {
                problems.push(problem(
                    Reason::ConfigPathMismatch,
                    format!("{key}.config_path = {config_path:?} does not include {expected:?}"),
                ));
            }
        }
    }
    let mirrors = registry
        .and_then(|r| r.get("mirrors"))
        .and_then(Value::as_table);
    if let Some(mirrors) = mirrors.filter(|m| !m.is_empty()) {
        let names: Vec<&str> = mirrors.keys().map(String::as_str).collect();
        problems.push(problem(
            Reason::LegacyMirrorsConfigured,
            format!(
                "legacy {key}.mirrors are set for {}; containerd refuses mirrors together with \
                 config_path, and ignores hosts.toml without config_path",
                names.join(", ")
            ),
        ));
    }
    ContainerdStatus {
        config_version: Some(version),
        problems,
    }
}

/// Whether a problem keeps the node from using the mirror. A `:`-list still works with the CRI
/// plugin of containerd 1.x (config v2), so it only blocks from v3 on (where it is reported only
/// when the transfer service pulls, see [`check_containerd_config`]).
#[must_use]
pub fn is_blocking(problem: &Problem, config_version: Option<i64>) -> bool {
    match problem.reason {
        Reason::ConfigPathList => config_version.is_none_or(|v| v >= 3),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn reasons(status: &ContainerdStatus) -> Vec<Reason> {
        status.problems.iter().map(|p| p.reason).collect()
    }

    #[test]
    fn v2_config_with_config_path_has_no_problem() {
        let s = check_containerd_config(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
            Some("/etc/containerd/certs.d"),
        );
        assert_eq!(s.config_version, Some(2));
        assert_eq!(reasons(&s), []);
    }

    #[test]
    fn v3_config_reads_the_images_plugin_key() {
        let good = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        assert_eq!(reasons(&check_containerd_config(good, None)), []);
        // The v2 key in a v3 file is not read by containerd 2.x.
        let wrong = "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        let s = check_containerd_config(wrong, None);
        assert_eq!(s.config_version, Some(3));
        assert_eq!(reasons(&s), [Reason::ConfigPathNotSet]);
    }

    #[test]
    fn missing_config_path_is_reported() {
        assert_eq!(
            reasons(&check_containerd_config("version = 2\n", None)),
            [Reason::ConfigPathNotSet]
        );
    }

    #[test]
    fn colon_list_config_path_is_reported_and_blocks_only_on_v3() {
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n";
        let s = check_containerd_config(v2, Some("/etc/containerd/certs.d"));
        assert_eq!(reasons(&s), [Reason::ConfigPathList]);
        assert!(!is_blocking(&s.problems[0], s.config_version));
        let v3 = v2
            .replace("version = 2", "version = 3")
            .replace("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images");
        let s = check_containerd_config(&v3, Some("/other"));
        assert_eq!(
            reasons(&s),
            [Reason::ConfigPathList, Reason::ConfigPathMismatch]
        );
        assert!(is_blocking(&s.problems[0], s.config_version));
        assert!(s.problems[0]
            .message
            .contains("use_local_image_pull = true"));
        assert!(s.problems[0].message.contains("config_path = \"/other\""));
    }

    #[test]
    fn a_colon_list_on_v3_with_local_image_pull_is_read_as_a_list_and_not_reported() {
        for flag in ["use_local_image_pull", "discard_unpacked_layers"] {
            let text = format!(
                "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\n{flag} = true\n\
                 [plugins.\"io.containerd.cri.v1.images\".registry]\n\
                 config_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n"
            );
            let s = check_containerd_config(&text, Some("/etc/containerd/certs.d"));
            assert_eq!(reasons(&s), [], "{flag}");
            let s = check_containerd_config(&text.replace("true", "false"), None);
            assert_eq!(reasons(&s), [Reason::ConfigPathList], "{flag} = false");
        }
    }

    #[test]
    fn legacy_mirrors_alongside_config_path_are_reported() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n\
                    [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"https://m\"]\n";
        assert_eq!(
            reasons(&check_containerd_config(text, None)),
            [Reason::LegacyMirrorsConfigured]
        );
    }

    #[test]
    fn config_path_for_another_directory_is_a_mismatch() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/docker/certs.d\"\n";
        assert_eq!(
            reasons(&check_containerd_config(
                text,
                Some("/etc/containerd/certs.d/")
            )),
            [Reason::ConfigPathMismatch]
        );
    }

    #[test]
    fn garbage_config_is_unreadable_not_a_panic() {
        let s = check_containerd_config("version = = 2", None);
        assert_eq!(s.config_version, None);
        assert_eq!(reasons(&s), [Reason::ContainerdConfigUnreadable]);
    }

    #[test]
    fn v1_config_uses_the_short_plugin_name() {
        let text = "[plugins.cri.registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        let s = check_containerd_config(text, None);
        assert_eq!(s.config_version, Some(1));
        assert_eq!(reasons(&s), []);
    }
}
