//! How a container is started as a host process: the identity it runs as, the root filesystem
//! it sees, and the launcher command line (pure), plus the spawn itself.
//!
//! The command line is `nsenter --net=/run/netns/<pod netns>` (left out for host-network pods,
//! whose processes start in the node namespace the stand-in runs in) `unshare --mount
//! --propagation private -- /bin/sh -c <script> standin-launch <command> <args>…`. The script,
//! inside the private mount namespace, builds the root filesystem under
//! `<run-dir>/pods/<uid>/<container>/rootfs`: read-only binds of the host's `/usr` (the
//! merged-usr `/bin`, `/sbin`, `/lib*` are relative symlinks, or read-only binds where the host
//! has real directories), `/dev` (recursive), a fresh `/proc`, `/sys` read-only, a tmpfs `/tmp`,
//! `/etc/ssl` read-only, the image directory's files at `/usr/local/bin` (each file bound on its
//! own, resolved first, so symlinks to the host's build output work inside the chroot), then
//! every volume mount (parents before children, `readOnly` honoured, `subPath` already resolved
//! to its source), and with `readOnlyRootFilesystem` the root itself read-only. Then it execs
//! `chroot <rootfs> setpriv --reuid --regid --groups|--clear-groups --no-new-privs
//! [--inh-caps=-all --bounding-set=-all] -- <command> <args>`, with a `/bin/sh -c 'cd …'` hop
//! for a `workingDir` other than `/`. The command and args are passed as positional parameters,
//! never spliced into the script; every path in the script is single-quoted.
//!
//! Invariants: the process is the container's main process (every step execs), in its own
//! process group; its stdout and stderr go to the container log; its environment is exactly the
//! container's (the launcher uses absolute paths only). A mount point that would have to be
//! created inside a read-only host bind (`/usr/…` that the host lacks) makes the script fail
//! before the exec, with the reason in the log.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use k8s_openapi::api::core::v1::{PodSecurityContext, SecurityContext};
use tokio::process::{Child, Command};

/// The uid/gid/groups/capabilities a container process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups (fsGroup, supplementalGroups), sorted.
    pub groups: Vec<u32>,
    /// `capabilities.drop` contains `ALL`.
    pub drop_all_capabilities: bool,
}

/// Why a container's security context cannot be honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveIdentityError {
    /// `runAsNonRoot` with uid 0 (the kubelet's message).
    #[error("container has runAsNonRoot and image will run as root")]
    RunsAsRoot,
    /// A negative or too large id.
    #[error("invalid {what} {value}")]
    InvalidId {
        /// Which id.
        what: &'static str,
        /// The value.
        value: i64,
    },
}

fn id(what: &'static str, value: i64) -> Result<u32, ResolveIdentityError> {
    u32::try_from(value).map_err(|_| ResolveIdentityError::InvalidId { what, value })
}

/// The identity of a container: container-level settings override pod-level ones; without a
/// `runAsUser` the process runs as root (the image's `USER` is not known to the stand-in).
pub fn resolve_identity(
    pod: Option<&PodSecurityContext>,
    container: Option<&SecurityContext>,
) -> Result<Identity, ResolveIdentityError> {
    let uid = container
        .and_then(|c| c.run_as_user)
        .or_else(|| pod.and_then(|p| p.run_as_user))
        .map_or(Ok(0), |v| id("runAsUser", v))?;
    let gid = container
        .and_then(|c| c.run_as_group)
        .or_else(|| pod.and_then(|p| p.run_as_group))
        .map_or(Ok(0), |v| id("runAsGroup", v))?;
    let non_root = container
        .and_then(|c| c.run_as_non_root)
        .or_else(|| pod.and_then(|p| p.run_as_non_root))
        .unwrap_or(false);
    if non_root && uid == 0 {
        return Err(ResolveIdentityError::RunsAsRoot);
    }
    let mut groups = BTreeSet::new();
    if let Some(pod) = pod {
        if let Some(fs_group) = pod.fs_group {
            groups.insert(id("fsGroup", fs_group)?);
        }
        for group in pod.supplemental_groups.iter().flatten() {
            groups.insert(id("supplementalGroups", *group)?);
        }
    }
    let drop_all_capabilities = container
        .and_then(|c| c.capabilities.as_ref())
        .and_then(|c| c.drop.as_ref())
        .is_some_and(|d| d.iter().any(|c| c == "ALL"));
    Ok(Identity {
        uid,
        gid,
        groups: groups.into_iter().collect(),
        drop_all_capabilities,
    })
}

/// `HOME` of `uid` in the generated `/etc/passwd`.
pub fn home_of(uid: u32) -> &'static str {
    match uid {
        0 => "/root",
        65532 => "/home/nonroot",
        _ => "/",
    }
}

/// `/etc/passwd` of a container running as `identity`.
pub fn passwd(identity: &Identity) -> String {
    let mut text = String::from(
        "root:x:0:0:root:/root:/bin/sh\n\
         nonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    );
    if ![0, 65532, 65534].contains(&identity.uid) {
        text.push_str(&format!(
            "user{uid}:x:{uid}:{gid}:user{uid}:/:/usr/sbin/nologin\n",
            uid = identity.uid,
            gid = identity.gid
        ));
    }
    text
}

/// `/etc/group` of a container running as `identity`.
pub fn group(identity: &Identity) -> String {
    let mut text = String::from("root:x:0:\nnonroot:x:65532:\nnobody:x:65534:\n");
    let mut extra: BTreeSet<u32> = identity.groups.iter().copied().collect();
    extra.insert(identity.gid);
    for gid in extra {
        if ![0, 65532, 65534].contains(&gid) {
            text.push_str(&format!("group{gid}:x:{gid}:\n"));
        }
    }
    text
}

/// `/etc/hosts` of a pod.
pub fn hosts(hostname: &str, ip: &str) -> String {
    format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{hostname}\n")
}

/// `/etc/nsswitch.conf`.
pub const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n";

/// A volume bound into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeBind {
    /// On the host (a volume directory, or a `subPath` inside it).
    pub source: PathBuf,
    /// `mountPath` (absolute in the container).
    pub target: String,
    /// `readOnly`.
    pub read_only: bool,
    /// The source is a file (the mount point is created as a file).
    pub is_file: bool,
}

/// Everything the launcher needs (pure input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// The pod's network namespace file; `None` for host-network pods.
    pub netns: Option<PathBuf>,
    /// The container's root directory on the host.
    pub rootfs: PathBuf,
    /// Top-level host directories bound read-only besides `/usr` (`/lib64` where the host has no
    /// merged-usr symlink).
    pub host_dirs: Vec<String>,
    /// Bind the host's `/etc/ssl` read-only.
    pub bind_ssl: bool,
    /// Image files for `/usr/local/bin`: name and resolved host file.
    pub image_files: Vec<(String, PathBuf)>,
    /// Volume mounts, in any order.
    pub volumes: Vec<VolumeBind>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// Who the process runs as.
    pub identity: Identity,
    /// `workingDir` (`/` when unset).
    pub working_dir: String,
    /// Command and args, expanded.
    pub argv: Vec<String>,
}

/// `text` as one single-quoted shell word.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn inside(rootfs: &Path, target: &str) -> String {
    quote(&format!(
        "{}/{}",
        rootfs.to_string_lossy().trim_end_matches('/'),
        target.trim_start_matches('/')
    ))
}

fn depth(target: &str) -> usize {
    target.split('/').filter(|c| !c.is_empty()).count()
}

/// The launcher script (see the module doc).
pub fn script(plan: &LaunchPlan) -> String {
    let root = &plan.rootfs;
    let r = |target: &str| inside(root, target);
    let host = |path: &Path| quote(&path.to_string_lossy());
    let mut lines = vec![
        "set -e".to_owned(),
        format!("/bin/mount --bind {} {}", r("/"), r("/")),
        format!("/bin/mount -o bind,ro /usr {}", r("/usr")),
    ];
    for dir in &plan.host_dirs {
        lines.push(format!("/bin/mkdir -p {}", r(dir)));
        lines.push(format!("/bin/mount -o bind,ro {} {}", quote(dir), r(dir)));
    }
    lines.push(format!("/bin/mount --rbind /dev {}", r("/dev")));
    lines.push(format!("/bin/mount -t proc proc {}", r("/proc")));
    lines.push(format!("/bin/mount -o bind,ro /sys {}", r("/sys")));
    lines.push(format!(
        "/bin/mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {}",
        r("/tmp")
    ));
    if plan.bind_ssl {
        lines.push(format!("/bin/mount -o bind,ro /etc/ssl {}", r("/etc/ssl")));
    }
    if !plan.image_files.is_empty() {
        lines.push(format!(
            "/bin/mount -t tmpfs -o mode=0755 tmpfs {}",
            r("/usr/local/bin")
        ));
        for (name, source) in &plan.image_files {
            let target = format!("/usr/local/bin/{name}");
            lines.push(format!("/usr/bin/touch {}", r(&target)));
            lines.push(format!(
                "/bin/mount -o bind,ro {} {}",
                host(source),
                r(&target)
            ));
        }
    }
    let mut volumes: Vec<&VolumeBind> = plan.volumes.iter().collect();
    volumes.sort_by_key(|v| depth(&v.target));
    for volume in volumes {
        let target = r(&volume.target);
        if volume.is_file {
            let parent = Path::new(&volume.target)
                .parent()
                .map_or_else(|| "/".to_owned(), |p| p.to_string_lossy().into_owned());
            lines.push(format!("/bin/mkdir -p {}", r(&parent)));
            lines.push(format!("[ -e {target} ] || /usr/bin/touch {target}"));
        } else {
            lines.push(format!("/bin/mkdir -p {target}"));
        }
        lines.push(format!(
            "/bin/mount --bind {} {target}",
            host(&volume.source)
        ));
        if volume.read_only {
            lines.push(format!("/bin/mount -o remount,bind,ro {target}"));
        }
    }
    if plan.read_only_root {
        lines.push(format!("/bin/mount -o remount,bind,ro {}", r("/")));
    }
    let id = &plan.identity;
    let mut exec = format!(
        "exec /usr/sbin/chroot {} /usr/bin/setpriv --reuid={} --regid={}",
        quote(&root.to_string_lossy()),
        id.uid,
        id.gid
    );
    if id.groups.is_empty() {
        exec.push_str(" --clear-groups");
    } else {
        let groups: Vec<String> = id.groups.iter().map(u32::to_string).collect();
        exec.push_str(&format!(" --groups={}", groups.join(",")));
    }
    exec.push_str(" --no-new-privs");
    if id.drop_all_capabilities {
        exec.push_str(" --inh-caps=-all --bounding-set=-all");
    }
    exec.push_str(" --");
    if !plan.working_dir.is_empty() && plan.working_dir != "/" {
        exec.push_str(&format!(
            " /bin/sh -c {} {}",
            quote("cd -- \"$0\" && exec \"$@\""),
            quote(&plan.working_dir)
        ));
    }
    exec.push_str(" \"$@\"");
    lines.push(exec);
    lines.join("\n")
}

/// The full command line: program first.
pub fn command_line(plan: &LaunchPlan) -> Vec<String> {
    let mut argv = Vec::new();
    if let Some(netns) = &plan.netns {
        argv.push("/usr/bin/nsenter".to_owned());
        argv.push(format!("--net={}", netns.to_string_lossy()));
    }
    argv.extend(
        [
            "/usr/bin/unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
        ]
        .map(str::to_owned),
    );
    argv.push(script(plan));
    argv.push("standin-launch".to_owned());
    argv.extend(plan.argv.iter().cloned());
    argv
}

/// The command line of an `exec` probe inside the container whose main process is `pid`.
pub fn exec_probe_command_line(pid: u32, identity: &Identity, argv: &[String]) -> Vec<String> {
    let mut line = vec![
        "/usr/bin/nsenter".to_owned(),
        format!("--target={pid}"),
        "--mount".to_owned(),
        "--net".to_owned(),
        "--root".to_owned(),
        "--wd".to_owned(),
        format!("--setuid={}", identity.uid),
        format!("--setgid={}", identity.gid),
        "--".to_owned(),
    ];
    line.extend(argv.iter().cloned());
    line
}

/// Files and directories of the root filesystem that exist before the launcher runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsFiles {
    /// `/etc/passwd`.
    pub passwd: String,
    /// `/etc/group`.
    pub group: String,
    /// `/etc/hosts`.
    pub hosts: String,
    /// `/etc/hostname`.
    pub hostname: String,
    /// Relative symlinks (`bin` → `usr/bin`) copied from the host's merged-usr layout.
    pub symlinks: Vec<(String, PathBuf)>,
}

/// Why the root filesystem could not be prepared or the process started.
#[derive(Debug, thiserror::Error)]
pub enum StartContainerProcessError {
    /// A file of the root filesystem or the log could not be written.
    #[error("prepare {path}: {source}")]
    Prepare {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The launcher could not be spawned.
    #[error("start the launcher: {0}")]
    Spawn(std::io::Error),
}

fn prepare_error(path: &Path) -> impl FnOnce(std::io::Error) -> StartContainerProcessError {
    let path = path.to_path_buf();
    move |source| StartContainerProcessError::Prepare { path, source }
}

/// Which of the host's top-level library and binary directories are symlinks (copied as such)
/// and which are real directories (bound read-only).
pub fn host_layout() -> (Vec<(String, PathBuf)>, Vec<String>) {
    let mut symlinks = Vec::new();
    let mut dirs = Vec::new();
    for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let path = Path::new("/").join(name);
        match std::fs::read_link(&path) {
            Ok(target) if target.is_relative() => symlinks.push((name.to_owned(), target)),
            Ok(target) => symlinks.push((
                name.to_owned(),
                PathBuf::from(target.to_string_lossy().trim_start_matches('/')),
            )),
            Err(_) if path.is_dir() => dirs.push(format!("/{name}")),
            Err(_) => {}
        }
    }
    (symlinks, dirs)
}

/// Creates the root directory, its mount points and its `/etc` files.
pub fn prepare_rootfs(
    rootfs: &Path,
    files: &RootfsFiles,
) -> Result<(), StartContainerProcessError> {
    for dir in [
        "",
        "usr",
        "dev",
        "proc",
        "sys",
        "tmp",
        "etc",
        "etc/ssl",
        "root",
        "home/nonroot",
        "var/tmp",
        "run",
    ] {
        let path = rootfs.join(dir);
        std::fs::create_dir_all(&path).map_err(prepare_error(&path))?;
    }
    for (name, target) in &files.symlinks {
        let link = rootfs.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(target, &link).map_err(prepare_error(&link))?;
        }
    }
    let etc = rootfs.join("etc");
    for (name, content) in [
        ("passwd", files.passwd.as_str()),
        ("group", files.group.as_str()),
        ("hosts", files.hosts.as_str()),
        ("hostname", files.hostname.as_str()),
        ("resolv.conf", ""),
        ("nsswitch.conf", NSSWITCH),
    ] {
        let path = etc.join(name);
        std::fs::write(&path, content).map_err(prepare_error(&path))?;
    }
    Ok(())
}

/// Starts the launcher for `plan` with exactly `env`, output appended to `log`.
pub fn spawn(
    plan: &LaunchPlan,
    env: &[(String, String)],
    log: &Path,
) -> Result<Child, StartContainerProcessError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(prepare_error(log))?;
    let err = file.try_clone().map_err(prepare_error(log))?;
    let line = command_line(plan);
    let (program, args) = line.split_first().ok_or_else(|| {
        StartContainerProcessError::Spawn(std::io::Error::other("empty command line"))
    })?;
    Command::new(program)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .process_group(0)
        .spawn()
        .map_err(StartContainerProcessError::Spawn)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use k8s_openapi::api::core::v1::Capabilities;

    use super::*;

    #[test]
    fn container_settings_override_pod_settings() {
        let pod = PodSecurityContext {
            run_as_user: Some(1000),
            run_as_group: Some(1000),
            fs_group: Some(2000),
            supplemental_groups: Some(vec![3000, 2000]),
            ..Default::default()
        };
        let container = SecurityContext {
            run_as_user: Some(65532),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        };
        assert_eq!(
            resolve_identity(Some(&pod), Some(&container)),
            Ok(Identity {
                uid: 65532,
                gid: 1000,
                groups: vec![2000, 3000],
                drop_all_capabilities: true
            })
        );
        assert_eq!(
            resolve_identity(None, None),
            Ok(Identity {
                uid: 0,
                gid: 0,
                groups: vec![],
                drop_all_capabilities: false
            })
        );
    }

    #[test]
    fn run_as_non_root_refuses_uid_zero() {
        let pod = PodSecurityContext {
            run_as_non_root: Some(true),
            ..Default::default()
        };
        assert_eq!(
            resolve_identity(Some(&pod), None),
            Err(ResolveIdentityError::RunsAsRoot)
        );
        let container = SecurityContext {
            run_as_user: Some(10),
            ..Default::default()
        };
        assert!(resolve_identity(Some(&pod), Some(&container)).is_ok());
        let negative = SecurityContext {
            run_as_user: Some(-1),
            ..Default::default()
        };
        assert!(matches!(
            resolve_identity(None, Some(&negative)),
            Err(ResolveIdentityError::InvalidId { .. })
        ));
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    fn plan() -> LaunchPlan {
        LaunchPlan {
            netns: Some(PathBuf::from("/run/netns/ck-pabc")),
            rootfs: PathBuf::from("/run/s/pods/u/c/rootfs"),
            host_dirs: vec![],
            bind_ssl: true,
            image_files: vec![(
                "cachalot-registry".into(),
                PathBuf::from("/t/debug/cachalot-registry"),
            )],
            volumes: vec![
                VolumeBind {
                    source: PathBuf::from("/run/s/pods/u/volumes/token"),
                    target: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
                    read_only: true,
                    is_file: false,
                },
                VolumeBind {
                    source: PathBuf::from("/run/s/pods/u/volumes/data"),
                    target: "/data".into(),
                    read_only: false,
                    is_file: false,
                },
                VolumeBind {
                    source: PathBuf::from("/run/s/pods/u/volumes/cfg/app.conf"),
                    target: "/etc/app/app.conf".into(),
                    read_only: false,
                    is_file: true,
                },
            ],
            read_only_root: true,
            identity: Identity {
                uid: 65532,
                gid: 65532,
                groups: vec![65532],
                drop_all_capabilities: true,
            },
            working_dir: "/data".into(),
            argv: vec!["/usr/local/bin/cachalot-registry".into(), "serve".into()],
        }
    }

    #[test]
    fn the_command_line_enters_the_pod_netns_and_passes_argv_as_parameters() {
        let line = command_line(&plan());
        assert_eq!(line[0], "/usr/bin/nsenter");
        assert_eq!(line[1], "--net=/run/netns/ck-pabc");
        assert_eq!(
            &line[2..9],
            [
                "/usr/bin/unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c"
            ]
        );
        assert_eq!(
            &line[10..],
            [
                "standin-launch",
                "/usr/local/bin/cachalot-registry",
                "serve"
            ]
        );
        let host_network = LaunchPlan {
            netns: None,
            ..plan()
        };
        assert_eq!(command_line(&host_network)[0], "/usr/bin/unshare");
    }

    #[test]
    fn the_script_mounts_parents_first_and_ends_read_only_then_execs_setpriv() {
        let text = script(&plan());
        let lines: Vec<&str> = text.lines().collect();
        let position = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle} not in\n{text}"))
        };
        assert_eq!(lines[0], "set -e");
        assert!(
            position("--bind '/run/s/pods/u/volumes/data' '/run/s/pods/u/c/rootfs/data'")
                < position("'/run/s/pods/u/c/rootfs/var/run/secrets/kubernetes.io/serviceaccount'")
        );
        assert!(text.contains("/bin/mount -o remount,bind,ro '/run/s/pods/u/c/rootfs/var/run/secrets/kubernetes.io/serviceaccount'"));
        assert!(!text.contains("remount,bind,ro '/run/s/pods/u/c/rootfs/data'"));
        assert!(text.contains("[ -e '/run/s/pods/u/c/rootfs/etc/app/app.conf' ] || /usr/bin/touch"));
        assert!(text.contains("/bin/mount -o bind,ro '/t/debug/cachalot-registry' '/run/s/pods/u/c/rootfs/usr/local/bin/cachalot-registry'"));
        assert!(position("remount,bind,ro '/run/s/pods/u/c/rootfs/'") > position("app.conf' ] ||"));
        let exec = lines.last().unwrap();
        assert_eq!(
            *exec,
            "exec /usr/sbin/chroot '/run/s/pods/u/c/rootfs' /usr/bin/setpriv --reuid=65532 --regid=65532 --groups=65532 --no-new-privs --inh-caps=-all --bounding-set=-all -- /bin/sh -c 'cd -- \"$0\" && exec \"$@\"' '/data' \"$@\""
        );
        let root = LaunchPlan {
            identity: Identity {
                uid: 0,
                gid: 0,
                groups: vec![],
                drop_all_capabilities: false,
            },
            working_dir: "/".into(),
            read_only_root: false,
            ..plan()
        };
        let root_script = script(&root);
        assert!(
            root_script.ends_with("--reuid=0 --regid=0 --clear-groups --no-new-privs -- \"$@\"")
        );
        assert!(!root_script.contains("remount,bind,ro '/run/s/pods/u/c/rootfs/'"));
    }

    #[test]
    fn etc_files_know_nonroot_and_the_pod() {
        let id = Identity {
            uid: 1234,
            gid: 55,
            groups: vec![65532, 77],
            drop_all_capabilities: false,
        };
        assert!(passwd(&id).contains("nonroot:x:65532:65532:"));
        assert!(passwd(&id).contains("user1234:x:1234:55:"));
        assert!(group(&id).contains("group55:x:55:"));
        assert!(group(&id).contains("group77:x:77:"));
        assert!(hosts("web-0", "10.240.1.2").contains("10.240.1.2\tweb-0"));
        assert_eq!(home_of(65532), "/home/nonroot");
    }

    #[test]
    fn exec_probes_enter_the_container_namespaces_and_root() {
        let id = Identity {
            uid: 7,
            gid: 8,
            groups: vec![],
            drop_all_capabilities: false,
        };
        assert_eq!(
            exec_probe_command_line(42, &id, &["cat".into(), "/tmp/ready".into()]).join(" "),
            "/usr/bin/nsenter --target=42 --mount --net --root --wd --setuid=7 --setgid=8 -- cat /tmp/ready"
        );
    }
}
