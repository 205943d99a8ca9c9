//! Manifest media types this registry understands, and the `Accept` list it sends upstream.
//!
//! The proxy always asks the upstream with the full list below, whatever the client sent, so a tag
//! maps to one representation in the cache (an index stays an index; clients pick their platform by
//! digest afterwards, which is what containerd, skopeo and podman do).

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The `Accept` header sent to upstreams for manifest requests.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The largest manifest accepted from an upstream (the distribution spec's recommended limit).
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
