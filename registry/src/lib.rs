//! cachalot-registry: a pull-through caching OCI registry.
