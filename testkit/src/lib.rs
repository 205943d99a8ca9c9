//! Hermetic test harness for cachalot: a real distribution upstream, a private containerd,
//! deterministic generated images, a fault-injecting proxy and skopeo, all on 127.0.0.1.
//!
//! Everything here is for tests and benchmarks: nothing talks to a host other than 127.0.0.1,
//! every child process is killed when its handle drops, and every wait has a deadline.
//!
//! - [`distribution`]: the real upstream (and reference proxy), Debian `docker-registry`;
//! - [`image`]: deterministic images (Docker, OCI, indexes, big layers) and pushing them;
//! - [`fault`]: `FaultProxy`, Docker Hub rate limits, token auth and network faults;
//! - [`containerd`]: a private containerd driven with `ctr`, and hosts.toml helpers;
//! - [`skopeo`]: skopeo copy and inspect;
//! - [`s3`]: a real S3-compatible object store (Garage, built by `scripts/s3-server`);
//! - [`round_robin`]: a round-robin TCP proxy, the Service in front of a mirror's replicas;
//! - [`process`]: child processes with a private dir, a log file, a bounded start-up wait and
//!   kill on drop;
//! - [`cluster`]: a real Kubernetes control plane (built by `scripts/control-plane`) with fake
//!   nodes (kubelet stand-ins, a real containerd each) in network namespaces of its own;
//! - [`wait`]: bounded polling and free ports; [`client`]: the loopback HTTP client;
//! - [`certs`]: a test CA and the server and client certificates it signs (rcgen);
//! - [`prerequisites`]: skip a test whose real components are missing, or fail under CI.
//!
//! See `docs/testkit.md` for the behaviour observed in the real components.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cachalot_testkit::{distribution::Distribution, image};
//! let upstream = Distribution::start().await?;
//! let img = image::ImageBuilder::new(1).layer(1 << 20).build()?;
//! image::push(&upstream.url(), "library/demo", "latest", &img).await?;
//! # Ok(()) }
//! ```

pub mod certs;
pub mod client;
pub mod cluster;
pub mod containerd;
pub mod distribution;
pub mod fault;
pub mod image;
pub mod prerequisites;
pub mod process;
pub mod round_robin;
pub mod s3;
pub mod skopeo;
pub mod wait;
