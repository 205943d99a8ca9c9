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
    check_containerd_config_with_imports(text, &[], expected_dir)
}

/// The `imports` of containerd's config text, as written (host paths, relative to the config's
/// directory, `*` globs); none when the text is not valid TOML. Pure.
#[must_use]
pub fn imports(text: &str) -> Vec<String> {
    text.parse::<Table>()
        .ok()
        .and_then(|t| t.get("imports").cloned())
        .and_then(|v| match v {
            Value::Array(items) => Some(
                items
                    .into_iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

/// Checks the configuration containerd runs with: `text` with the `imported` files applied in
/// order, each given by its path and its text (or why it could not be read). containerd merges
/// an imported file by replacing each whole `plugins."<id>"` section the file defines (1.x
/// copies the plugin sections; 2.x merges maps by key and replaces their values entirely), so
/// an import that defines the CRI section without `config_path` switches certs.d off. An
/// imported file that cannot be read or parsed is reported (`ContainerdConfigUnreadable`).
/// Pure.
#[must_use]
pub fn check_containerd_config_with_imports(
    text: &str,
    imported: &[(String, Result<String, String>)],
    expected_dir: Option<&str>,
) -> ContainerdStatus {
    let mut status = check_merged(text, imported, expected_dir);
    for (path, read) in imported {
        let message = match read {
            Err(e) => Some(format!("imported containerd config {path}: {e}")),
            Ok(t) => t.parse::<Table>().err().map(|e| {
                format!(
                    "imported containerd config {path} is not valid TOML: {}",
                    e.message()
                )
            }),
        };
        if let Some(message) = message {
            status
                .problems
                .push(problem(Reason::ContainerdConfigUnreadable, message));
        }
    }
    status
}

fn check_merged(
    text: &str,
    imported: &[(String, Result<String, String>)],
    expected_dir: Option<&str>,
) -> ContainerdStatus {
    let mut table: Table = match text.parse() {
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
    for (_, read) in imported {
        let Some(file) = read.as_ref().ok().and_then(|t| t.parse::<Table>().ok()) else {
            continue;
        };
        if let Some(Value::Table(plugins)) = file.get("plugins") {
            let into = table
                .entry("plugins")
                .or_insert_with(|| Value::Table(Table::new()));
            if let Value::Table(into) = into {
                for (id, section) in plugins {
                    into.insert(id.clone(), section.clone());
                }
            }
        }
    }
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
        let hint = if imported.is_empty() {
            String::new()
        } else {
            format!(
                " (after its {} imported file(s); an imported file that defines this plugin's section replaces it whole)",
                imported.len()
            )
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

/// Whether a file name matches an `imports` pattern's last component, where `*` stands for any
/// run of characters (as Go's `filepath.Glob` does within one component). Pure.
#[must_use]
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut remaining) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = rest.split('*').collect();
    let Some((last, middle)) = parts.split_last() else {
        return true;
    };
    for part in middle {
        match remaining.find(part) {
            Some(i) => remaining = &remaining[i + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
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

    const V2_GOOD: &str = "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";

    #[test]
    fn imports_are_listed_as_written() {
        assert_eq!(imports(V2_GOOD), vec!["/etc/containerd/conf.d/*.toml"]);
        assert!(imports("version = 2").is_empty());
        assert!(imports("not toml [").is_empty());
    }

    #[test]
    fn an_import_that_redefines_the_cri_section_without_config_path_switches_certs_d_off() {
        let ok = |t: &str| {
            (
                "/etc/containerd/conf.d/x.toml".to_string(),
                Ok(t.to_string()),
            )
        };
        // Another plugin's section: config_path stays.
        let other =
            ok("[plugins.\"io.containerd.snapshotter.v1.overlayfs\"]\nmount_options = []\n");
        let s = check_containerd_config_with_imports(V2_GOOD, &[other], None);
        assert_eq!(reasons(&s), []);
        // The CRI section again, without registry: containerd replaces the section whole.
        let cri = ok("[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"pause:3.9\"\n");
        let s = check_containerd_config_with_imports(V2_GOOD, std::slice::from_ref(&cri), None);
        assert_eq!(reasons(&s), [Reason::ConfigPathNotSet]);
        assert!(
            s.problems[0].message.contains("imported file"),
            "{}",
            s.problems[0].message
        );
        // A later import that sets it again wins.
        let fixed = ok("[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n");
        let s = check_containerd_config_with_imports(V2_GOOD, &[cri, fixed], None);
        assert_eq!(reasons(&s), []);
        // An import that sets config_path on a main file without it.
        let bare = "version = 2\n";
        let fixed = ok("[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n");
        assert_eq!(
            reasons(&check_containerd_config_with_imports(bare, &[fixed], None)),
            []
        );
    }

    #[test]
    fn an_unreadable_or_broken_import_is_reported() {
        let imported = [
            (
                "/etc/containerd/conf.d/a.toml".to_string(),
                Err("permission denied".to_string()),
            ),
            (
                "/etc/containerd/conf.d/b.toml".to_string(),
                Ok("[oops".to_string()),
            ),
        ];
        let s = check_containerd_config_with_imports(V2_GOOD, &imported, None);
        assert_eq!(
            reasons(&s),
            [
                Reason::ContainerdConfigUnreadable,
                Reason::ContainerdConfigUnreadable
            ]
        );
        assert!(s.problems[0].message.contains("a.toml: permission denied"));
        assert!(s.problems[1].message.contains("b.toml is not valid TOML"));
    }

    #[test]
    fn import_globs_match_within_one_component() {
        assert!(glob_matches("*.toml", "10-mirror.toml"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("10-*.toml", "10-a.toml"));
        assert!(glob_matches("a*b*c", "aXbYc"));
        assert!(!glob_matches("*.toml", "x.toml.bak"));
        assert!(!glob_matches("10-*.toml", "20-a.toml"));
        assert!(!glob_matches("a*b*c", "aXcYb"));
        assert!(glob_matches("plain.toml", "plain.toml"));
        assert!(glob_matches("*.toml", ".toml"), "`*` matches nothing too");
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
