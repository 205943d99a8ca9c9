//! Hermetic test harness for cachalot: a real distribution upstream, a private containerd,
//! deterministic generated images, a fault-injecting proxy and skopeo, all on 127.0.0.1.
//!
//! Everything here is for tests and benchmarks: nothing talks to a host other than 127.0.0.1,
//! every child process is killed when its handle drops, and every wait has a deadline.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cachalot_testkit::{distribution::Distribution, image};
//! let upstream = Distribution::start().await?;
//! let img = image::ImageBuilder::new(1).layer(1 << 20).build()?;
//! image::push(&upstream.url(), "library/demo", "latest", &img).await?;
//! # Ok(()) }
//! ```

pub mod client;
pub mod containerd;
pub mod distribution;
pub mod fault;
pub mod image;
pub mod skopeo;
pub mod wait;
