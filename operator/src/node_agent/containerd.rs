//! Read-only checks of containerd's `config.toml`: does containerd read the certs.d directory
//! the agent writes to? The agent never edits this file and never restarts containerd; it only
//! reports machine-readable reasons.
//!
//! Key names per containerd's docs/hosts.md: v3 and v4 (containerd 2.x; 2.4 writes v4)
//! `plugins."io.containerd.cri.v1.images".registry.config_path`; v2 (1.x, also read by 2.x)
//! `plugins."io.containerd.grpc.v1.cri".registry.config_path`; v1 (no `version`)
//! `plugins.cri.registry.config_path`.
//!
//! `imports` are applied as containerd applies them, which differs by major version (checked
//! against the real `containerd config dump` of 1.7.35 and 2.x): containerd 1.x replaces each
//! whole `plugins."<id>"` section an imported file defines; containerd 2.x merges tables key by
//! key and replaces every other value (a string, an array, even `''`). A v3/v4 file is only read
//! by 2.x; a v2 file may be read by either, so it is judged by the 1.x rule (the stricter one) and
//! the message says when 2.x would keep `config_path`.

use toml::{Table, Value};

use super::protocol::{ContainerdStatus, Problem, Reason};

/// The CRI registry table path for a config version.
fn registry_table_path(version: i64) -> [&'static str; 3] {
    match version {
        v if v >= 3 => ["plugins", IMAGES_PLUGIN, "registry"],
        2 => ["plugins", V2_CRI_PLUGIN, "registry"],
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
/// rather than the transfer service (one directory): `use_local_image_pull = true`, or one of the
/// settings that containerd 2.1+ (`CheckLocalImagePullConfigs`, unchanged up to 2.4) says the
/// transfer service does not support and so falls back to the local pull for:
/// `disable_snapshot_annotations = false`, `discard_unpacked_layers = true` (containerd issue
/// 12415), `max_concurrent_downloads` other than 3, `image_pull_with_sync_fs = true`, or
/// non-empty `registry.mirrors`, `registry.configs` or `registry.auths`. An absent key has
/// containerd's default, which never falls back. Pure.
fn local_image_pull(table: &Table) -> bool {
    let Some(images) = lookup(table, &["plugins", IMAGES_PLUGIN]).and_then(Value::as_table) else {
        return false;
    };
    let flag = |name: &str| images.get(name).and_then(Value::as_bool);
    let registry_set = |name: &str| {
        images
            .get("registry")
            .and_then(|r| r.get(name))
            .and_then(Value::as_table)
            .is_some_and(|t| !t.is_empty())
    };
    flag("use_local_image_pull") == Some(true)
        || flag("disable_snapshot_annotations") == Some(false)
        || flag("discard_unpacked_layers") == Some(true)
        || images
            .get("max_concurrent_downloads")
            .and_then(Value::as_integer)
            .is_some_and(|n| n != 3)
        || flag("image_pull_with_sync_fs") == Some(true)
        || ["mirrors", "configs", "auths"]
            .into_iter()
            .any(registry_set)
}

/// How containerd applies an imported file's `plugins` onto the configuration read so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ImportMerge {
    /// containerd 1.x: each `plugins."<id>"` section the import defines replaces the one so far.
    ReplaceSection,
    /// containerd 2.x: tables merged key by key, any other value replaced (even by `''` or `[]`).
    MergeKeys,
}

impl ImportMerge {
    /// The rule for a main config of this `version`: v3 and later are read by containerd 2.x
    /// only; v2 and v1 are judged by the 1.x rule, which drops more. Pure.
    #[must_use]
    fn for_version(version: i64) -> Self {
        if version >= 3 {
            Self::MergeKeys
        } else {
            Self::ReplaceSection
        }
    }
}

/// Applies the imported files' `plugins` to `table`, in order, by `how`. Other top-level keys of
/// an import are not applied: the checks read nothing else. Pure.
fn apply_imports(table: &mut Table, imported: &[Table], how: ImportMerge) {
    for file in imported {
        let Some(Value::Table(plugins)) = file.get("plugins") else {
            continue;
        };
        let into = table
            .entry("plugins")
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(into) = into else {
            // `plugins` that is not a table: containerd would not start; nothing to merge into.
            continue;
        };
        match how {
            ImportMerge::ReplaceSection => {
                for (id, section) in plugins {
                    into.insert(id.clone(), section.clone());
                }
            }
            ImportMerge::MergeKeys => merge_keys(into, plugins),
        }
    }
}

/// Merges `from` into `into` key by key: a table into a table recursively, anything else
/// replaces. Recursion depth is bounded by the nesting of the parsed file.
fn merge_keys(into: &mut Table, from: &Table) {
    for (key, value) in from {
        match (into.get_mut(key), value) {
            (Some(Value::Table(existing)), Value::Table(incoming)) => {
                merge_keys(existing, incoming)
            }
            _ => {
                into.insert(key.clone(), value.clone());
            }
        }
    }
}

/// The plugin id containerd 2.x moved the CRI image settings to, and the one they had before.
const IMAGES_PLUGIN: &str = "io.containerd.cri.v1.images";
const V2_CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";

/// A config file's `version`; 1 when absent (containerd reads a file without one as v1).
fn config_version(table: &Table) -> i64 {
    table
        .get("version")
        .and_then(Value::as_integer)
        .unwrap_or(1)
}

/// How a containerd reads a main file and its imports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Reading {
    merge: ImportMerge,
    /// containerd 2.3+ migrates every file older than config version 4 on its own before
    /// merging it: the CRI `registry` of `plugins."io.containerd.grpc.v1.cri"` (or v1's
    /// `plugins.cri`) moves to `plugins."io.containerd.cri.v1.images"`. 2.0 to 2.2 do not, and
    /// ignore that key in a v3 file.
    migrate_registry: bool,
}

impl Reading {
    /// The reading a main file of `version` gets for the verdict: v2 and v1 as containerd 1.x;
    /// v3 as containerd 2.0 to 2.2 (stricter than 2.3+); v4, written only for 2.3+, as 2.3+.
    fn for_version(version: i64) -> Self {
        Self {
            merge: ImportMerge::for_version(version),
            migrate_registry: version >= 4,
        }
    }

    /// The other containerd that may read a main file of `version`, and its name, to explain
    /// a verdict it would not share.
    fn other_containerd(version: i64) -> Option<(Self, &'static str)> {
        match version {
            v if v >= 4 => None,
            3 => Some((
                Self {
                    merge: ImportMerge::MergeKeys,
                    migrate_registry: true,
                },
                "containerd 2.3+ (which moves a `plugins.\"io.containerd.grpc.v1.cri\".registry` \
                 of a file older than version 4 to the images plugin)",
            )),
            _ => Some((
                Self {
                    merge: ImportMerge::MergeKeys,
                    migrate_registry: false,
                },
                "containerd 2.x (which merges imported files key by key)",
            )),
        }
    }
}

/// The configuration a containerd reading `main` and `imported` (in order) by `reading` ends up
/// with, as far as the checks look: the top-level keys of `main` and the merged `plugins`. Pure.
fn read_as(main: &Table, imported: &[Table], reading: Reading) -> Table {
    let migrated = |file: &Table| {
        let mut file = file.clone();
        if reading.migrate_registry && config_version(&file) < 4 {
            migrate_registry(&mut file);
        }
        file
    };
    let mut table = migrated(main);
    let imported: Vec<Table> = imported.iter().map(migrated).collect();
    apply_imports(&mut table, &imported, reading.merge);
    table
}

/// containerd 2.3+'s migration of one file older than config version 4, for the CRI registry
/// only: the `registry` table of the v2 CRI plugin (`plugins.cri` in a v1 file) replaces the
/// file's `plugins."io.containerd.cri.v1.images".registry`. Pure.
fn migrate_registry(file: &mut Table) {
    let short_names = config_version(file) < 2;
    let Some(Value::Table(plugins)) = file.get_mut("plugins") else {
        return;
    };
    // A v1 file may name the plugin by its short id, which migration renames first.
    let Some(registry) = plugins
        .get("cri")
        .filter(|_| short_names)
        .or_else(|| plugins.get(V2_CRI_PLUGIN))
        .and_then(|cri| cri.get("registry"))
        .cloned()
    else {
        return;
    };
    let images = plugins
        .entry(IMAGES_PLUGIN)
        .or_insert_with(|| Value::Table(Table::new()));
    if let Value::Table(images) = images {
        images.insert("registry".to_owned(), registry);
    }
}

/// What containerd 2.2+ uses (on Linux) when the images plugin's `config_path` is empty and no
/// legacy `mirrors` are set.
const DEFAULT_CONFIG_PATH_2_2: &str = "/etc/containerd/certs.d:/etc/docker/certs.d";

/// Whether containerd reads hosts.toml from [`DEFAULT_CONFIG_PATH_2_2`] although `config_path`
/// is empty: only a v4 file says containerd is 2.3+ (2.0 and 2.1 have no default, and a v3 file
/// may be read by them), and only the local pull reads that list (the transfer service takes it
/// as one directory, which does not exist, and reads no hosts.toml). Pure.
fn defaults_config_path(version: i64, written: &str, mirrors: bool, merged: &Table) -> bool {
    version >= 4 && written.is_empty() && !mirrors && local_image_pull(merged)
}

/// The path of the last imported file that replaces what the main file says at `registry`
/// (the CRI registry table's path): by `merge`, one that defines the plugin's section at all
/// (1.x), or one that sets `config_path` in it (2.x). Pure.
fn last_import_defining<'a>(
    imported: &'a [(String, Result<String, String>)],
    registry: &[&str; 3],
    merge: ImportMerge,
) -> Option<&'a str> {
    imported.iter().rev().find_map(|(path, read)| {
        let file: Table = read.as_ref().ok()?.parse().ok()?;
        let defines = match merge {
            ImportMerge::ReplaceSection => lookup(&file, &registry[..2]).is_some(),
            ImportMerge::MergeKeys => lookup(&file, registry)
                .and_then(|r| r.get("config_path"))
                .is_some(),
        };
        defines.then_some(path.as_str())
    })
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
/// order, each given by its path and its text (or why it could not be read), by the rule of
/// [`ImportMerge::for_version`]: under containerd 1.x an import that defines the CRI section
/// without `config_path` switches certs.d off; under 2.x only an import that sets `config_path`
/// itself (to `''` or another directory) changes it. An imported file that cannot be read or
/// parsed is reported (`ContainerdConfigUnreadable`). Pure.
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
    let main: Table = match text.parse() {
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
    let version = config_version(&main);
    let path = registry_table_path(version);
    let imported_tables: Vec<Table> = imported
        .iter()
        .filter_map(|(_, read)| read.as_ref().ok().and_then(|t| t.parse::<Table>().ok()))
        .collect();
    let reading = Reading::for_version(version);
    let table = read_as(&main, &imported_tables, reading);
    let key = format!("plugins.\"{}\".registry", path[1]);
    let registry = lookup(&table, &path).and_then(Value::as_table);
    let mut problems = Vec::new();

    let mirrors = registry
        .and_then(|r| r.get("mirrors"))
        .and_then(Value::as_table)
        .filter(|m| !m.is_empty());
    let written = registry
        .and_then(|r| r.get("config_path"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let defaulted = defaults_config_path(version, written, mirrors.is_some(), &table);
    let config_path = if defaulted {
        DEFAULT_CONFIG_PATH_2_2
    } else {
        written
    };
    let shown = if defaulted {
        format!("{config_path:?} (containerd's default for an empty config_path)")
    } else {
        format!("{config_path:?}")
    };
    if config_path.is_empty() {
        let mut hint = match (imported.is_empty(), reading.merge) {
            (true, _) => String::new(),
            (false, ImportMerge::MergeKeys) => format!(
                " (after its {} imported file(s), merged key by key as containerd 2.x does)",
                imported.len()
            ),
            (false, ImportMerge::ReplaceSection) => format!(
                " (after its {} imported file(s); containerd 1.x replaces each plugin section an \
                 imported file defines whole)",
                imported.len()
            ),
        };
        if version >= 4 && mirrors.is_none() {
            hint.push_str(&format!(
                "; containerd 2.2+ then uses {DEFAULT_CONFIG_PATH_2_2:?}, which its transfer-service \
                 pull takes as one directory (only the local pull, use_local_image_pull = true, \
                 reads it as a list)"
            ));
        }
        if let Some((other, who)) = Reading::other_containerd(version) {
            let other_table = read_as(&main, &imported_tables, other);
            let kept = lookup(&other_table, &path)
                .and_then(Value::as_table)
                .and_then(|r| r.get("config_path"))
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty());
            if let Some(kept) = kept {
                hint.push_str(&format!(
                    "; {who} would read config_path = {kept:?}, but the fix works for every version"
                ));
            }
        }
        let dir = expected_dir.unwrap_or("/etc/containerd/certs.d");
        // Set in the main file, the line would be replaced again by the import that drops it.
        let place = match last_import_defining(imported, &path, reading.merge) {
            Some(import) => format!(" in {import}, the last imported file that defines it"),
            None => String::new(),
        };
        problems.push(problem(
            Reason::ConfigPathNotSet,
            format!(
                "containerd config version {version}: {key}.config_path is not set, so certs.d is \
                 never read{hint}. Fix: config_path = {dir:?} under [{key}]{place}, then restart \
                 containerd"
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
                    format!("{key}.config_path = {shown} does not include {expected:?}"),
                ));
            }
        }
    }
    if let Some(mirrors) = mirrors {
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

    /// The first problem's message contains `needle` (the message is shown when it does not).
    fn assert_first_problem_mentions(status: &ContainerdStatus, needle: &str) {
        let message = &status.problems[0].message;
        assert!(message.contains(needle), "{message}");
    }

    /// `text` read from `/etc/containerd/conf.d/x.toml`, as an imported file.
    fn ok(text: &str) -> (String, Result<String, String>) {
        (
            "/etc/containerd/conf.d/x.toml".to_string(),
            Ok(text.to_string()),
        )
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
            s.problems[0].message.contains(
                "under [plugins.\"io.containerd.grpc.v1.cri\".registry] in /etc/containerd/conf.d/x.toml, the last imported file that defines it"
            ),
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
    fn a_v3_import_is_merged_key_by_key_as_containerd_2_does() {
        let main = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        // The images section again, without registry: containerd 2.x keeps config_path.
        let other = ok("[plugins.\"io.containerd.cri.v1.images\"]\nsnapshotter = \"native\"\n");
        let s = check_containerd_config_with_imports(main, &[other], None);
        assert_eq!(reasons(&s), []);
        // config_path = '' in an import replaces it, as any value does.
        let empty = ok("[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"\"\n");
        let s = check_containerd_config_with_imports(main, &[empty], None);
        assert_eq!(reasons(&s), [Reason::ConfigPathNotSet]);
        assert_first_problem_mentions(&s, "in /etc/containerd/conf.d/x.toml, the last");
        // An import that does not touch config_path is not named as the place to fix.
        let s = check_containerd_config_with_imports(
            "version = 3\n",
            &[ok(
                "[plugins.\"io.containerd.cri.v1.images\"]\nsnapshotter = \"native\"\n",
            )],
            None,
        );
        assert!(
            s.problems[0]
                .message
                .ends_with("registry], then restart containerd"),
            "{}",
            s.problems[0].message
        );
        assert_first_problem_mentions(&s, "merged key by key");
        // use_local_image_pull from an import reaches the merged images section.
        let list = main.replace("certs.d\"", "certs.d:/etc/docker/certs.d\"");
        let local = ok("[plugins.\"io.containerd.cri.v1.images\"]\nuse_local_image_pull = true\n");
        assert_eq!(
            reasons(&check_containerd_config_with_imports(&list, &[], None)),
            [Reason::ConfigPathList]
        );
        assert_eq!(
            reasons(&check_containerd_config_with_imports(&list, &[local], None)),
            []
        );
    }

    #[test]
    fn a_v2_import_that_drops_config_path_under_1_x_says_2_x_would_read_it() {
        let cri = ok("[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"pause:3.9\"\n");
        let s = check_containerd_config_with_imports(V2_GOOD, &[cri], None);
        assert_eq!(reasons(&s), [Reason::ConfigPathNotSet]);
        assert_first_problem_mentions(&s, "containerd 1.x replaces");
        assert_first_problem_mentions(&s, "containerd 2.x (which merges imported files key by key) would read config_path = \"/etc/containerd/certs.d\"");
    }

    #[test]
    fn the_v2_registry_key_counts_in_files_older_than_v4_only_when_the_main_file_is_v4() {
        let v2_key = "[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        // Main v4 (containerd 2.3+): an import without version is migrated before the merge.
        let s = check_containerd_config_with_imports("version = 4\n", &[ok(v2_key)], None);
        assert_eq!(reasons(&s), []);
        // Also with the v1 short plugin id.
        let short = "[plugins.cri.registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        let s = check_containerd_config_with_imports("version = 4\n", &[ok(short)], None);
        assert_eq!(reasons(&s), []);
        // An import that says version 4 is not migrated: the v2 key there is ignored.
        let s = check_containerd_config_with_imports(
            "version = 4\n",
            &[ok(&format!("version = 4\n{v2_key}"))],
            None,
        );
        assert_eq!(reasons(&s), [Reason::ConfigPathNotSet]);
        // Main v3: containerd 2.0 to 2.2 ignore it (the verdict), 2.3+ would read it (the hint).
        let s = check_containerd_config_with_imports("version = 3\n", &[ok(v2_key)], None);
        assert_eq!(reasons(&s), [Reason::ConfigPathNotSet]);
        assert_first_problem_mentions(&s, "containerd 2.3+");
        assert_first_problem_mentions(&s, "would read config_path = \"/etc/containerd/certs.d\"");
        let s = check_containerd_config(&format!("version = 3\n{v2_key}"), None);
        assert_first_problem_mentions(&s, "containerd 2.3+");
        // Without anything that sets it, no such hint.
        let s = check_containerd_config("version = 3\n", None);
        assert!(
            !s.problems[0].message.contains("would read"),
            "{}",
            s.problems[0].message
        );
    }

    #[test]
    fn merging_by_keys_recurses_into_tables_and_replaces_everything_else() {
        let mut into: Table = "[a]\nkeep = 1\nlist = [\"b\"]\n[a.inner]\nx = \"set\"\ny = 2\n"
            .parse()
            .unwrap();
        let from: Table = "[a]\nlist = [\"a\"]\n[a.inner]\nx = \"\"\n[b]\nnew = true\n"
            .parse()
            .unwrap();
        merge_keys(&mut into, &from);
        let expected: Table =
            "[a]\nkeep = 1\nlist = [\"a\"]\n[a.inner]\nx = \"\"\ny = 2\n[b]\nnew = true\n"
                .parse()
                .unwrap();
        assert_eq!(into, expected);
        assert_eq!(ImportMerge::for_version(4), ImportMerge::MergeKeys);
        assert_eq!(ImportMerge::for_version(3), ImportMerge::MergeKeys);
        assert_eq!(ImportMerge::for_version(2), ImportMerge::ReplaceSection);
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
        assert_first_problem_mentions(&s, "a.toml: permission denied");
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
        assert_first_problem_mentions(&s, "use_local_image_pull = true");
        assert_first_problem_mentions(&s, "config_path = \"/other\"");
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
    fn every_setting_that_makes_containerd_2_fall_back_to_the_local_pull_is_seen() {
        let list = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n";
        for (setting, local) in [
            ("use_local_image_pull = true", true),
            ("use_local_image_pull = false", false),
            ("disable_snapshot_annotations = false", true),
            ("disable_snapshot_annotations = true", false),
            ("discard_unpacked_layers = true", true),
            ("max_concurrent_downloads = 5", true),
            ("max_concurrent_downloads = 3", false),
            ("image_pull_with_sync_fs = true", true),
            ("image_pull_with_sync_fs = false", false),
        ] {
            let text = format!("{list}[plugins.\"io.containerd.cri.v1.images\"]\n{setting}\n");
            let got = reasons(&check_containerd_config(&text, None));
            let want: &[Reason] = if local {
                &[]
            } else {
                &[Reason::ConfigPathList]
            };
            assert_eq!(got, want, "{setting}");
        }
        let auths = format!(
            "{list}[plugins.\"io.containerd.cri.v1.images\".registry.auths.\"r.example\"]\nusername = \"u\"\n"
        );
        assert_eq!(reasons(&check_containerd_config(&auths, None)), []);
        let empty_auths =
            format!("{list}[plugins.\"io.containerd.cri.v1.images\".registry.auths]\n");
        assert_eq!(
            reasons(&check_containerd_config(&empty_auths, None)),
            [Reason::ConfigPathList]
        );
    }

    #[test]
    fn an_empty_config_path_in_a_v4_file_is_containerds_default_list_under_the_local_pull() {
        let local =
            "version = 4\n[plugins.\"io.containerd.cri.v1.images\"]\nuse_local_image_pull = true\n";
        let s = check_containerd_config(local, Some("/etc/containerd/certs.d"));
        assert_eq!(reasons(&s), []);
        let s = check_containerd_config(
            local,
            Some("/var/lib/rancher/k3s/agent/etc/containerd/certs.d"),
        );
        assert_eq!(reasons(&s), [Reason::ConfigPathMismatch]);
        assert_first_problem_mentions(&s, "containerd's default for an empty config_path");
        // The transfer service takes the default list as one directory.
        let s = check_containerd_config("version = 4\n", Some("/etc/containerd/certs.d"));
        assert_eq!(reasons(&s), [Reason::ConfigPathNotSet]);
        assert_first_problem_mentions(&s, "takes as one directory");
        // A v3 file may be read by containerd 2.0 or 2.1, which have no default.
        let v3 = local.replace("version = 4", "version = 3");
        assert_eq!(
            reasons(&check_containerd_config(
                &v3,
                Some("/etc/containerd/certs.d")
            )),
            [Reason::ConfigPathNotSet]
        );
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
