//! cachalot-standin: a stand-in for the kubelet and kube-proxy of the fake nodes of a test cluster
//! whose control plane is real (kube-apiserver, etcd, controller manager, scheduler).
//!
//! Nothing runs containers on the test machine, so the `kubelet` command runs what each pod
//! would run as host processes (one network namespace per pod, a private mount namespace and a
//! chroot per container, uid/gid/capabilities through `setpriv`) and reports status like a
//! kubelet; `proxy` forwards Service ClusterIPs the way kube-proxy would; `forward` is a byte
//! pipe that bridges network namespaces through unix sockets. See `standin/README.md` for what is
//! emulated and what is not.
//!
//! Layering: pure modules (`ipam`, `services`, `pods::env`, `pods::volumes` projection,
//! `pods::launch`, `pods::status`, `pods::image` references and policies) hold every decision
//! and are unit tested; the I/O modules (`netns`, `host_command`, `node`, `pods::worker`,
//! `pods::manager`, `proxy`, `forward`, `kubelet_api`) execute them.

pub mod api_client;
pub mod cli;
pub mod forward;
pub mod host_command;
pub mod ipam;
pub mod kubelet;
pub mod kubelet_api;
pub mod netns;
pub mod node;
pub mod pods;
pub mod proxy;
pub mod services;
pub mod shutdown;
pub mod telemetry;
