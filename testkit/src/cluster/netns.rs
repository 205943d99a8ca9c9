//! The test cluster's network: Linux network namespaces joined by one bridge, so that pod IPs,
//! node IPs and ClusterIPs from private ranges exist only inside namespaces the tests create and
//! never in the machine's own namespace (which talks to 127.0.0.0/8 only).
//!
//! Layout of a cluster with prefix `P` (all addresses private, all inside `P-*` namespaces):
//!
//! | namespace | address | role |
//! |---|---|---|
//! | `P-net` | 10.240.0.1/16 on bridge `br0` (MAC fixed: [`GATEWAY_MAC`]) | the gateway of every other namespace; owns ClusterIPs (10.96.0.0/24) and external addresses (10.250.0.0/24) as /32s on `lo`, where the proxy stand-in listens |
//! | `P-cp` | 10.240.0.2 | etcd, kube-apiserver (:6443), kube-controller-manager, kube-scheduler |
//! | `P-n<i>` | 10.240.0.(10+i), pod CIDR 10.240.i.0/24 | node i: its containerd, its kubelet stand-in, hostNetwork pods |
//! | `P-p…` | a pod IP | one per pod, created by the kubelet stand-in |
//!
//! Invariants: every namespace of a cluster starts with its prefix, and the prefix carries the
//! creating process's pid, so [`sweep_stale`] can remove what a killed test run left behind;
//! [`Network`]'s drop kills every process still inside its namespaces before deleting them.

use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Address of the bridge in `P-net`: every namespace's default gateway.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);
/// Address of the control-plane namespace (the API server's advertise address).
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 2);
/// MAC address of the bridge in `P-net` (the gateway), set when the bridge is made. Linux gives a
/// bridge without one the lowest MAC of its ports, so each pod veth that joins could change it;
/// peers that cached the old one (the API server's namespace, answering the proxy stand-in's
/// watches) then had their frames dropped until their ARP entry expired, stalling established
/// connections for 50-120 s. `02:42` and the gateway's IP, like a pod's `eth0`.
pub const GATEWAY_MAC: &str = "02:42:0a:f0:00:01";
/// Prefix length of the bridge network.
pub const BRIDGE_PREFIX_LEN: u8 = 16;
/// The Service ClusterIP range.
pub const SERVICE_CIDR: &str = "10.96.0.0/24";
/// The `kubernetes` Service's ClusterIP (the first address of [`SERVICE_CIDR`]).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// First address handed to things outside the cluster that pods may reach (the upstream
/// registry on the host's loopback, another cluster's mirror).
pub const FIRST_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 10);

/// Address of node `index` (1-based).
#[must_use]
pub fn node_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 240, 0, 10 + index)
}

/// Pod CIDR of node `index` (1-based).
#[must_use]
pub fn pod_cidr(index: u8) -> String {
    format!("10.240.{index}.0/24")
}

/// Why the network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetUpNetworkError {
    /// `ip` could not be run.
    #[error("run {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `ip` failed.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its stderr.
        stderr: String,
    },
    /// Network namespaces need root.
    #[error("the test cluster needs root (network namespaces); running as uid {uid}")]
    NotRoot {
        /// The effective uid.
        uid: String,
    },
}

fn run(args: &[&str]) -> Result<Output, SetUpNetworkError> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SetUpNetworkError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(SetUpNetworkError::Failed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

/// Fails unless the process runs as root.
///
/// # Errors
/// [`SetUpNetworkError::NotRoot`].
pub fn require_root() -> Result<(), SetUpNetworkError> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if uid == "0" {
        Ok(())
    } else {
        Err(SetUpNetworkError::NotRoot { uid })
    }
}

/// A fresh prefix for a cluster of this process: `ck<pid hex>-<n>`.
#[must_use]
pub fn new_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "ck{:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid encoded in a namespace name made by [`new_prefix`], if it is one.
#[must_use]
pub fn prefix_pid(netns: &str) -> Option<u32> {
    let rest = netns.strip_prefix("ck")?;
    let (pid, rest) = rest.split_once('-')?;
    let (n, _) = rest.split_once('-')?;
    n.parse::<u32>().ok()?;
    u32::from_str_radix(pid, 16).ok()
}

/// Names of all network namespaces on the machine.
#[must_use]
pub fn list_netns() -> Vec<String> {
    run(&["netns", "list"])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process inside `netns` and deletes it (best effort).
pub fn destroy_netns(netns: &str) {
    if let Ok(out) = run(&["netns", "pids", netns]) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill")
                .args(["-KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
    }
    let _ = run(&["netns", "del", netns]);
}

/// Removes the namespaces of clusters whose creating process is gone (a test run that was
/// killed before its drop ran). Returns how many were removed.
pub fn sweep_stale() -> usize {
    let stale: Vec<String> = list_netns()
        .into_iter()
        .filter(|ns| {
            prefix_pid(ns)
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect();
    for ns in &stale {
        destroy_netns(ns);
    }
    stale.len()
}

/// The namespaces of one cluster; deleted (with every process inside) on drop.
#[derive(Debug)]
pub struct Network {
    prefix: String,
    nodes: u8,
}

impl Network {
    /// Creates `P-net` with its bridge, `P-cp`, and `nodes` node namespaces, all attached.
    ///
    /// # Errors
    /// [`SetUpNetworkError`]; what was created is removed again.
    pub fn create(prefix: &str, nodes: u8) -> Result<Self, SetUpNetworkError> {
        require_root()?;
        let network = Self {
            prefix: prefix.to_owned(),
            nodes,
        };
        network.set_up()?;
        Ok(network)
    }

    fn set_up(&self) -> Result<(), SetUpNetworkError> {
        let net = self.net();
        run(&["netns", "add", &net])?;
        run(&["-n", &net, "link", "set", "lo", "up"])?;
        // A fixed address: the bridge must not take a joining pod veth's (see GATEWAY_MAC).
        run(&[
            "-n",
            &net,
            "link",
            "add",
            "br0",
            "address",
            GATEWAY_MAC,
            "type",
            "bridge",
        ])?;
        let gateway = format!("{GATEWAY_IP}/{BRIDGE_PREFIX_LEN}");
        run(&["-n", &net, "addr", "add", &gateway, "dev", "br0"])?;
        run(&["-n", &net, "link", "set", "br0", "up"])?;
        self.attach(&self.control_plane(), CONTROL_PLANE_IP, "vcp")?;
        for i in 1..=self.nodes {
            self.attach(&self.node(i), node_ip(i), &format!("vn{i}"))?;
        }
        Ok(())
    }

    fn attach(
        &self,
        netns: &str,
        ip: Ipv4Addr,
        bridge_side: &str,
    ) -> Result<(), SetUpNetworkError> {
        let net = self.net();
        run(&["netns", "add", netns])?;
        run(&[
            "-n",
            &net,
            "link",
            "add",
            bridge_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        ])?;
        run(&[
            "-n",
            &net,
            "link",
            "set",
            bridge_side,
            "master",
            "br0",
            "up",
        ])?;
        run(&["-n", netns, "link", "set", "lo", "up"])?;
        let addr = format!("{ip}/{BRIDGE_PREFIX_LEN}");
        run(&["-n", netns, "addr", "add", &addr, "dev", "eth0"])?;
        run(&["-n", netns, "link", "set", "eth0", "up"])?;
        run(&[
            "-n",
            netns,
            "route",
            "add",
            "default",
            "via",
            &GATEWAY_IP.to_string(),
        ])?;
        Ok(())
    }

    /// The cluster's prefix.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The gateway namespace (`P-net`).
    #[must_use]
    pub fn net(&self) -> String {
        format!("{}-net", self.prefix)
    }

    /// The control-plane namespace (`P-cp`).
    #[must_use]
    pub fn control_plane(&self) -> String {
        format!("{}-cp", self.prefix)
    }

    /// Node `index`'s namespace (`P-n<index>`, 1-based).
    #[must_use]
    pub fn node(&self, index: u8) -> String {
        format!("{}-n{index}", self.prefix)
    }

    /// A command that runs `program` inside `netns` (network namespace only: the mount namespace
    /// stays the machine's, so the program can create namespaces of its own).
    #[must_use]
    pub fn command_in(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(program);
        command
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let own = format!("{}-", self.prefix);
        // Pods' namespaces first (they hang off the bridge), the gateway last.
        let mut namespaces: Vec<String> = list_netns()
            .into_iter()
            .filter(|ns| ns.starts_with(&own))
            .collect();
        namespaces.sort_by_key(|ns| ns == &self.net());
        for ns in namespaces {
            destroy_netns(&ns);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_new_prefix_carries_this_process_pid() {
        let prefix = new_prefix();
        assert_eq!(
            prefix_pid(&format!("{prefix}-n1")),
            Some(std::process::id())
        );
        assert_ne!(new_prefix(), prefix);
    }

    #[test]
    fn other_namespaces_are_not_taken_for_a_cluster() {
        assert_eq!(prefix_pid("cni-1234"), None);
        assert_eq!(prefix_pid("ckzz-1-net"), None);
        assert_eq!(prefix_pid("ck12-x-net"), None);
        assert_eq!(prefix_pid("ck1f-3-p0af00105"), Some(0x1f));
    }

    #[test]
    fn the_gateway_mac_is_a_local_unicast_address_made_like_a_pods() {
        let octets: Vec<u8> = GATEWAY_MAC
            .split(':')
            .map(|o| u8::from_str_radix(o, 16).unwrap())
            .collect();
        let [a, b, c, d] = GATEWAY_IP.octets();
        assert_eq!(octets, [0x02, 0x42, a, b, c, d]);
        assert_eq!(octets[0] & 0b11, 0b10, "locally administered, unicast");
    }

    #[test]
    fn nodes_and_their_pod_ranges_do_not_overlap_the_control_plane() {
        assert_eq!(node_ip(1), Ipv4Addr::new(10, 240, 0, 11));
        assert_eq!(pod_cidr(2), "10.240.2.0/24");
        assert_ne!(node_ip(1), CONTROL_PLANE_IP);
    }
}
