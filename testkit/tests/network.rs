//! The cluster network against itself: the gateway bridge keeps one MAC address for its whole
//! life, so a peer that cached it (the API server's namespace, whose replies to the proxy
//! stand-in's watches go to the gateway) still reaches the gateway after a pod's veth with a
//! lower MAC joins the bridge.
//!
//! Without a fixed address Linux gives a bridge the lowest MAC of its ports, so a pod's veth could
//! change it; frames to the old address were then dropped until the peer's ARP entry expired, and
//! an established TCP connection stalled for 50-120 s (the ClusterIP flake of session 6: the
//! proxy's EndpointSlice watch got no events while the kubelets' watches did).
//!
//! Needs root (network namespaces), `python3` and `curl`; without them the test says why it
//! skips, unless `CACHALOT_E2E_LOCAL=required` (CI), where that is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::Duration;

use cachalot_testkit::cluster::netns::{self, Network, CONTROL_PLANE_IP, GATEWAY_IP, GATEWAY_MAC};
use cachalot_testkit::prerequisites;
use cachalot_testkit::process::LoggedChild;
use cachalot_testkit::wait::wait_for;

const PORT: u16 = 8081;
/// MACs of two pod veths, lower than any the kernel picks at random (those have the
/// locally-administered bit set), the second lower than the first.
const POD_MACS: [&str; 2] = ["00:00:00:00:00:02", "00:00:00:00:00:01"];

fn prerequisites_or_skip(test: &str) -> bool {
    let missing = netns::require_root()
        .err()
        .map(|e| e.to_string())
        .or_else(|| {
            ["python3", "curl"]
                .into_iter()
                .find(|tool| {
                    !Command::new(tool)
                        .arg("--version")
                        .output()
                        .is_ok_and(|o| o.status.success())
                })
                .map(|tool| format!("{tool} is not installed"))
        });
    prerequisites::run_or_skip(test, missing)
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mac_of(netns: &str, link: &str) -> String {
    let shown = ip(&["-n", netns, "link", "show", link]);
    shown
        .split_whitespace()
        .skip_while(|word| *word != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {shown}"))
        .to_owned()
}

/// Adds a veth pair in `net` whose end `name` (with `mac`) joins `br0`, as a pod's does.
fn join_bridge(net: &str, name: &str, mac: &str) {
    let peer = format!("{name}p");
    ip(&[
        "-n", net, "link", "add", name, "address", mac, "type", "veth", "peer", "name", &peer,
    ]);
    ip(&["-n", net, "link", "set", name, "master", "br0", "up"]);
}

/// One HTTP GET of the gateway's server from the control-plane namespace: the status code.
fn get_from_control_plane(network: &Network) -> String {
    let out = Network::command_in(&network.control_plane(), "curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"])
        .arg(format!("http://{GATEWAY_IP}:{PORT}/"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_keeps_its_mac_when_a_pod_veth_with_a_lower_one_joins_and_stays_reachable() {
    if !prerequisites_or_skip("the_gateway_keeps_its_mac") {
        return;
    }
    let network = Network::create(&netns::new_prefix(), 1).unwrap();
    let net = network.net();
    assert_eq!(mac_of(&net, "br0"), GATEWAY_MAC);
    // A pod's veth joins the bridge. (Without a fixed address the bridge would now take this
    // port's MAC, one that the control plane's frames do not enter through.)
    join_bridge(&net, "vpod1", POD_MACS[0]);

    // A server on the gateway address, reached once from the control plane: its namespace now
    // has the gateway's MAC in its neighbour table (as the API server has after answering the
    // proxy stand-in).
    let dir = tempfile::tempdir().unwrap();
    let mut server = Network::command_in(&net, "python3");
    server
        .args(["-m", "http.server", &PORT.to_string()])
        .args(["--bind", &GATEWAY_IP.to_string(), "--directory"])
        .arg(dir.path());
    let _server = LoggedChild::spawn(&mut server, &dir.path().join("server.log")).unwrap();
    wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        let code = get_from_control_plane(&network);
        async move { (code == "200").then_some(()) }
    })
    .await
    .expect("the gateway's server answers the control plane");
    let cached = ip(&[
        "-n",
        &network.control_plane(),
        "neigh",
        "show",
        &GATEWAY_IP.to_string(),
    ]);
    assert!(cached.contains(GATEWAY_MAC), "cached: {cached}");

    // A second pod's veth, with a MAC lower than every other port's, joins the bridge.
    join_bridge(&net, "vpod2", POD_MACS[1]);
    assert_eq!(mac_of(&net, "br0"), GATEWAY_MAC, "the bridge kept its MAC");

    // The control plane still reaches the gateway at once, through the MAC it cached.
    assert_eq!(
        get_from_control_plane(&network),
        "200",
        "GET from {CONTROL_PLANE_IP} right after the port joined"
    );
}
