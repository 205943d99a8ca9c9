//! Pod network namespaces: names, and the `ip` commands that create and remove them.
//!
//! A pod's namespace is `<prefix>-p<12 hex of its uid>`; its veth pair has `eth0` (the pod IP,
//! the bridge network's prefix length, `lo` up, default route via the gateway,
//! a MAC derived from the IP, see [`mac_address`]) inside, and
//! `v<8 hex of the pod IP>` attached to `br0` in the bridge namespace (≤ 15 characters, and
//! unique on the bridge because pod IPs are unique in the cluster).
//!
//! Invariants: creation first removes a stale namespace of the same name (a previous run's), and
//! a failed creation removes what it made; removing a namespace also removes its veth pair.
//! Every `ip` call has a deadline. This runs in the node's network namespace and the host's
//! mount namespace (`ip netns add` must see `/run/netns`).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use crate::host_command::{self, RunHostCommandError};

/// Deadline of one `ip` command.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// The `ip` executable.
const IP: &str = "/usr/sbin/ip";

/// Where a pod's network lives and how it is wired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    /// Network namespace name (a file in `/run/netns`).
    pub netns: String,
    /// Name of the veth end attached to the bridge.
    pub veth: String,
    /// The pod IP.
    pub ip: Ipv4Addr,
}

/// How pod namespaces attach to the cluster network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wiring {
    /// Namespace holding `br0`.
    pub bridge_netns: String,
    /// Bridge device in it.
    pub bridge: String,
    /// Default gateway of pods.
    pub gateway: Ipv4Addr,
    /// Prefix length of the pod address on `eth0` (the bridge network's).
    pub prefix_len: u8,
}

/// The namespace name of the pod with `uid`.
pub fn pod_netns_name(prefix: &str, uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(12)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("{prefix}-p{hex}")
}

/// The bridge-side veth name of the pod with `ip`.
pub fn veth_name(ip: Ipv4Addr) -> String {
    format!("v{:08x}", u32::from(ip))
}

/// The MAC address of a pod's `eth0`: `02:42` and the four bytes of its IP (as Docker does).
/// Deterministic, so a namespace recreated for the same IP (a restarted stand-in) keeps the
/// address its neighbours have cached; a fresh random MAC would leave them sending to the old
/// one until their ARP entries go stale (about 30 s of timeouts).
pub fn mac_address(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// The file `nsenter --net=` takes for `netns`.
pub fn netns_path(netns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(netns)
}

impl PodNetwork {
    /// The network of a pod with `uid` and `ip`.
    pub fn new(prefix: &str, uid: &str, ip: Ipv4Addr) -> Self {
        Self {
            netns: pod_netns_name(prefix, uid),
            veth: veth_name(ip),
            ip,
        }
    }
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

/// The `ip` argument lists that create `net` (pure).
pub fn setup_commands(net: &PodNetwork, wiring: &Wiring) -> Vec<Vec<String>> {
    let address = format!("{}/{}", net.ip, wiring.prefix_len);
    let mac = mac_address(net.ip);
    let gateway = wiring.gateway.to_string();
    vec![
        args(&["netns", "add", &net.netns]),
        args(&[
            "-n",
            &wiring.bridge_netns,
            "link",
            "add",
            &net.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &mac,
            "netns",
            &net.netns,
        ]),
        args(&[
            "-n",
            &wiring.bridge_netns,
            "link",
            "set",
            &net.veth,
            "master",
            &wiring.bridge,
            "up",
        ]),
        args(&["-n", &net.netns, "link", "set", "lo", "up"]),
        args(&["-n", &net.netns, "addr", "add", &address, "dev", "eth0"]),
        args(&["-n", &net.netns, "link", "set", "eth0", "up"]),
        args(&["-n", &net.netns, "route", "add", "default", "via", &gateway]),
    ]
}

/// Why a pod network could not be created or removed.
#[derive(Debug, thiserror::Error)]
pub enum PodNetworkError {
    /// An `ip` command failed.
    #[error("set up network namespace {netns}: {source}")]
    Create {
        /// The namespace.
        netns: String,
        /// Why.
        source: RunHostCommandError,
    },
    /// `ip netns del` failed.
    #[error("remove network namespace {netns}: {source}")]
    Remove {
        /// The namespace.
        netns: String,
        /// Why.
        source: RunHostCommandError,
    },
}

/// Creates `net` (replacing a stale namespace of the same name).
pub async fn create(net: &PodNetwork, wiring: &Wiring) -> Result<(), PodNetworkError> {
    remove(net).await?;
    for command in setup_commands(net, wiring) {
        if let Err(source) = host_command::run(IP, &command, IP_TIMEOUT).await {
            let _ = remove(net).await;
            return Err(PodNetworkError::Create {
                netns: net.netns.clone(),
                source,
            });
        }
    }
    Ok(())
}

/// Removes the namespace of `net` (and so its veth pair); absent is fine.
pub async fn remove(net: &PodNetwork) -> Result<(), PodNetworkError> {
    if !netns_path(&net.netns).exists() {
        return Ok(());
    }
    host_command::run(IP, &args(&["netns", "del", &net.netns]), IP_TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|source| PodNetworkError::Remove {
            netns: net.netns.clone(),
            source,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn names_are_short_and_derived_from_uid_and_ip() {
        assert_eq!(
            pod_netns_name("ck1", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            "ck1-p0f1e2d3c4b5a"
        );
        let veth = veth_name(Ipv4Addr::new(10, 240, 1, 2));
        assert_eq!(veth, "v0af00102");
        assert!(veth.len() <= 15);
    }

    #[test]
    fn setup_wires_the_veth_to_the_bridge_and_routes_through_the_gateway() {
        let net = PodNetwork::new("ck1", "abcdef012345-x", Ipv4Addr::new(10, 240, 1, 2));
        let wiring = Wiring {
            bridge_netns: "ck1-net".to_owned(),
            bridge: "br0".to_owned(),
            gateway: Ipv4Addr::new(10, 240, 0, 1),
            prefix_len: 16,
        };
        let lines: Vec<String> = setup_commands(&net, &wiring)
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert_eq!(
            lines,
            [
                "netns add ck1-pabcdef012345",
                "-n ck1-net link add v0af00102 type veth peer name eth0 address 02:42:0a:f0:01:02 netns ck1-pabcdef012345",
                "-n ck1-net link set v0af00102 master br0 up",
                "-n ck1-pabcdef012345 link set lo up",
                "-n ck1-pabcdef012345 addr add 10.240.1.2/16 dev eth0",
                "-n ck1-pabcdef012345 link set eth0 up",
                "-n ck1-pabcdef012345 route add default via 10.240.0.1",
            ]
        );
    }
}
