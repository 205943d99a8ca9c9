//! cachalot-registry: a pull-through caching OCI registry, the data plane of cachalot.
//!
//! Layering, from the edge inwards: `api` (HTTP routing and responses) → `proxy` (pull-through
//! logic: freshness, single-flight, stale-if-error) → `upstream` (remote registries, auth, budget,
//! circuit) and `store` (content-addressed disk cache). `oci` holds the pure protocol vocabulary,
//! `config` the startup configuration, `telemetry` the metrics and stats, `fleet` what a hub and
//! its spokes tell each other, `purge_log` and `purge_sync` how a purge reaches the spokes, `client` the admin commands (`warm`, `purge`, `stats`) run against a
//! running mirror, `tls` the public listener's TLS.

pub mod api;
pub mod client;
pub mod config;
pub mod fleet;
pub mod oci;
pub mod proxy;
pub mod purge_log;
pub mod purge_sync;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token_file;
pub mod upstream;
