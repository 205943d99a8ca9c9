//! Deterministic test images generated offline, and pushing them through the registry HTTP API.
//!
//! Invariants:
//! - The same inputs (seed, sizes, format, platform, compression level) give byte-identical
//!   layers, configs and manifests, hence the same digests on every run: layer bytes come from a
//!   ChaCha8 stream seeded by `(seed, layer index)`, tar headers use mtime 0, uid/gid 0 and fixed
//!   names, the gzip header carries mtime 0, and JSON is serialised from structs in field order.
//! - Different seeds give different content (the seed is also a config label), which is how a
//!   test pushes "the same tag twice with different content".
//! - Layers above [`SPILL_THRESHOLD`] are streamed to a temp file while being generated and
//!   pushed from that file in chunks, so a big image needs no more than a few MiB of RAM.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use futures::StreamExt;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::client::{http_client, BuildClientError};

/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (multi-platform).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip'd layer.
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index (multi-platform).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip'd layer.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Every manifest media type, for `Accept` headers.
pub const MANIFEST_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

/// Layers larger than this are generated into a temp file instead of memory.
pub const SPILL_THRESHOLD: u64 = 16 * 1024 * 1024;

/// Manifest flavour of a generated image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Docker schema 2 manifests and manifest lists.
    Docker,
    /// OCI manifests and indexes.
    Oci,
}

impl Format {
    fn manifest_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_MANIFEST,
            Self::Oci => OCI_MANIFEST,
        }
    }
    fn index_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_MANIFEST_LIST,
            Self::Oci => OCI_INDEX,
        }
    }
    fn config_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_CONFIG,
            Self::Oci => OCI_CONFIG,
        }
    }
    fn layer_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_LAYER,
            Self::Oci => OCI_LAYER,
        }
    }
}

/// An image platform, as written in configs and index entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v8` for arm64), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// `linux/amd64`.
    #[must_use]
    pub fn linux_amd64() -> Self {
        Self {
            architecture: "amd64".to_owned(),
            os: "linux".to_owned(),
            variant: None,
        }
    }
    /// `linux/arm64/v8`.
    #[must_use]
    pub fn linux_arm64() -> Self {
        Self {
            architecture: "arm64".to_owned(),
            os: "linux".to_owned(),
            variant: Some("v8".to_owned()),
        }
    }
}

/// Why an image could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum BuildImageError {
    /// Writing a layer (to memory or to its temp file) failed.
    #[error("write layer {index}")]
    WriteLayer {
        /// Layer index.
        index: usize,
        /// The I/O error.
        source: io::Error,
    },
    /// The temp directory for big layers could not be created.
    #[error("create temp dir for big layers")]
    CreateTempDir {
        /// The I/O error.
        source: io::Error,
    },
    /// JSON serialisation failed (not expected for these types).
    #[error("serialise {what}")]
    Serialize {
        /// Which document.
        what: &'static str,
        /// The serde error.
        source: serde_json::Error,
    },
    /// An index needs at least one platform.
    #[error("an index needs at least one platform")]
    NoPlatforms,
    /// The blocking generation task failed.
    #[error("image generation task failed")]
    Join {
        /// The join error.
        source: tokio::task::JoinError,
    },
}

#[derive(Debug, Clone)]
enum BlobData {
    Memory(Bytes),
    File {
        path: PathBuf,
        // Keeps the directory alive as long as any clone of the blob exists.
        _dir: Arc<tempfile::TempDir>,
    },
}

/// A content-addressed blob (config or layer) of a generated image.
#[derive(Debug, Clone)]
pub struct Blob {
    /// `sha256:<hex>` of the bytes.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Media type used in the manifest descriptor.
    pub media_type: String,
    data: BlobData,
}

impl Blob {
    /// A blob held in memory; the digest is computed here.
    #[must_use]
    pub fn in_memory(media_type: &str, bytes: Bytes) -> Self {
        Self {
            digest: sha256_digest(&bytes),
            size: bytes.len() as u64,
            media_type: media_type.to_owned(),
            data: BlobData::Memory(bytes),
        }
    }

    /// The bytes if the blob is held in memory (small blobs).
    #[must_use]
    pub fn bytes(&self) -> Option<&Bytes> {
        match &self.data {
            BlobData::Memory(bytes) => Some(bytes),
            BlobData::File { .. } => None,
        }
    }

    /// The file holding the blob if it was spilled to disk (big blobs).
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        match &self.data {
            BlobData::Memory(_) => None,
            BlobData::File { path, .. } => Some(path),
        }
    }

    /// All bytes, reading the file if needed. Meant for small blobs.
    ///
    /// # Errors
    /// The I/O error if the spill file cannot be read.
    pub fn read_all(&self) -> io::Result<Bytes> {
        match &self.data {
            BlobData::Memory(bytes) => Ok(bytes.clone()),
            BlobData::File { path, .. } => std::fs::read(path).map(Bytes::from),
        }
    }

    /// A descriptor for a manifest.
    fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            size: self.size,
            digest: self.digest.clone(),
            platform: None,
        }
    }
}

/// A generated image: a manifest with its blobs, or an index with its child manifests.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// The manifest (or index) exactly as pushed.
    pub manifest_bytes: Bytes,
    /// `sha256:<hex>` of `manifest_bytes`.
    pub manifest_digest: String,
    /// The manifest's media type (its `Content-Type` when pushed and served).
    pub media_type: String,
    /// For a manifest: the config first, then the layers in order. Empty for an index.
    pub blobs: Vec<Blob>,
    /// For an index: the child manifests in index order. Empty for a manifest.
    pub children: Vec<TestImage>,
    /// The platform of a single-platform manifest.
    pub platform: Option<Platform>,
}

impl TestImage {
    /// True for an OCI index or Docker manifest list.
    #[must_use]
    pub fn is_index(&self) -> bool {
        !self.children.is_empty()
    }

    /// The config blob of a manifest.
    #[must_use]
    pub fn config(&self) -> Option<&Blob> {
        self.blobs.first()
    }

    /// The layers of a manifest, in order.
    #[must_use]
    pub fn layers(&self) -> &[Blob] {
        self.blobs.get(1..).unwrap_or(&[])
    }

    /// Every blob of this image and its children, each digest once.
    #[must_use]
    pub fn all_blobs(&self) -> Vec<&Blob> {
        let mut out: Vec<&Blob> = Vec::new();
        for child in &self.children {
            for blob in child.all_blobs() {
                if !out.iter().any(|b| b.digest == blob.digest) {
                    out.push(blob);
                }
            }
        }
        for blob in &self.blobs {
            if !out.iter().any(|b| b.digest == blob.digest) {
                out.push(blob);
            }
        }
        out
    }

    /// Total bytes of the manifest and every distinct blob (what a full pull downloads).
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        let manifests: u64 = self.manifest_bytes.len() as u64
            + self
                .children
                .iter()
                .map(|c| c.manifest_bytes.len() as u64)
                .sum::<u64>();
        manifests + self.all_blobs().iter().map(|b| b.size).sum::<u64>()
    }

    /// The child manifest for a platform architecture (`amd64`, `arm64`).
    #[must_use]
    pub fn child_for(&self, architecture: &str) -> Option<&TestImage> {
        self.children.iter().find(|c| {
            c.platform
                .as_ref()
                .is_some_and(|p| p.architecture == architecture)
        })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    size: u64,
    digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    schema_version: u32,
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexDoc {
    schema_version: u32,
    media_type: String,
    manifests: Vec<Descriptor>,
}

#[derive(Serialize)]
struct ConfigDoc {
    architecture: String,
    os: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
    created: &'static str,
    config: ConfigSection,
    rootfs: RootFs,
    history: Vec<History>,
}

#[derive(Serialize)]
struct ConfigSection {
    #[serde(rename = "Env")]
    env: Vec<String>,
    #[serde(rename = "Cmd")]
    cmd: Vec<String>,
    #[serde(rename = "Labels")]
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct History {
    created: &'static str,
    created_by: String,
}

const EPOCH: &str = "1970-01-01T00:00:00Z";

/// Builds one single-platform image.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    seed: u64,
    format: Format,
    platform: Platform,
    layers: Vec<u64>,
    compression: u32,
}

impl ImageBuilder {
    /// A Docker schema-2, linux/amd64 image with no layers yet, gzip level 1.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            format: Format::Docker,
            platform: Platform::linux_amd64(),
            layers: Vec::new(),
            compression: 1,
        }
    }

    /// Sets the manifest format.
    #[must_use]
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Sets the platform written into the config.
    #[must_use]
    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// Adds a layer holding `size` pseudo-random bytes (the gzip'd blob is slightly larger).
    #[must_use]
    pub fn layer(mut self, size: u64) -> Self {
        self.layers.push(size);
        self
    }

    /// Adds several layers.
    #[must_use]
    pub fn layers(mut self, sizes: &[u64]) -> Self {
        self.layers.extend_from_slice(sizes);
        self
    }

    /// gzip level 0 (stored, fastest) to 9. Random bytes do not compress, so 0 or 1 is plenty.
    #[must_use]
    pub fn compression(mut self, level: u32) -> Self {
        self.compression = level.min(9);
        self
    }

    /// Generates the layers, config and manifest. CPU-bound: for big layers call it from
    /// [`tokio::task::spawn_blocking`] or use [`ImageBuilder::build_async`].
    ///
    /// # Errors
    /// See [`BuildImageError`].
    pub fn build(&self) -> Result<TestImage, BuildImageError> {
        let mut spill_dir: Option<Arc<tempfile::TempDir>> = None;
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut diff_ids = Vec::with_capacity(self.layers.len());
        for (index, &size) in self.layers.iter().enumerate() {
            let (blob, diff_id) = if size > SPILL_THRESHOLD {
                let dir = match &spill_dir {
                    Some(dir) => dir.clone(),
                    None => {
                        let dir = Arc::new(
                            tempfile::Builder::new()
                                .prefix("cachalot-image-")
                                .tempdir()
                                .map_err(|source| BuildImageError::CreateTempDir { source })?,
                        );
                        spill_dir = Some(dir.clone());
                        dir
                    }
                };
                self.layer_to_file(index, size, dir)?
            } else {
                self.layer_to_memory(index, size)?
            };
            layers.push(blob);
            diff_ids.push(diff_id);
        }
        let config = ConfigDoc {
            architecture: self.platform.architecture.clone(),
            os: self.platform.os.clone(),
            variant: self.platform.variant.clone(),
            created: EPOCH,
            config: ConfigSection {
                env: vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
                ],
                cmd: vec!["/bin/true".to_owned()],
                labels: [(
                    "dev.cachalot.testkit.seed".to_owned(),
                    self.seed.to_string(),
                )]
                .into_iter()
                .collect(),
            },
            rootfs: RootFs {
                kind: "layers",
                diff_ids,
            },
            history: (0..layers.len())
                .map(|i| History {
                    created: EPOCH,
                    created_by: format!("cachalot-testkit layer {i}"),
                })
                .collect(),
        };
        let config_bytes =
            serde_json::to_vec(&config).map_err(|source| BuildImageError::Serialize {
                what: "config",
                source,
            })?;
        let config_blob = Blob::in_memory(self.format.config_type(), Bytes::from(config_bytes));
        let manifest = ManifestDoc {
            schema_version: 2,
            media_type: self.format.manifest_type().to_owned(),
            config: config_blob.descriptor(),
            layers: layers.iter().map(Blob::descriptor).collect(),
        };
        let manifest_bytes = Bytes::from(serde_json::to_vec(&manifest).map_err(|source| {
            BuildImageError::Serialize {
                what: "manifest",
                source,
            }
        })?);
        let mut blobs = vec![config_blob];
        blobs.extend(layers);
        Ok(TestImage {
            manifest_digest: sha256_digest(&manifest_bytes),
            manifest_bytes,
            media_type: self.format.manifest_type().to_owned(),
            blobs,
            children: Vec::new(),
            platform: Some(self.platform.clone()),
        })
    }

    /// [`ImageBuilder::build`] on the blocking thread pool.
    ///
    /// # Errors
    /// See [`BuildImageError`].
    pub async fn build_async(self) -> Result<TestImage, BuildImageError> {
        tokio::task::spawn_blocking(move || self.build())
            .await
            .map_err(|source| BuildImageError::Join { source })?
    }

    fn layer_to_memory(&self, index: usize, size: u64) -> Result<(Blob, String), BuildImageError> {
        let (buffer, digests) = write_layer(Vec::new(), self.seed, index, size, self.compression)
            .map_err(|source| BuildImageError::WriteLayer { index, source })?;
        let bytes = Bytes::from(buffer);
        Ok((
            Blob {
                digest: digests.compressed,
                size: bytes.len() as u64,
                media_type: self.format.layer_type().to_owned(),
                data: BlobData::Memory(bytes),
            },
            digests.diff_id,
        ))
    }

    fn layer_to_file(
        &self,
        index: usize,
        size: u64,
        dir: Arc<tempfile::TempDir>,
    ) -> Result<(Blob, String), BuildImageError> {
        let path = dir
            .path()
            .join(format!("layer-{}-{index}.tar.gz", self.seed));
        let file =
            File::create(&path).map_err(|source| BuildImageError::WriteLayer { index, source })?;
        let (writer, digests) = write_layer(
            BufWriter::with_capacity(1 << 20, file),
            self.seed,
            index,
            size,
            self.compression,
        )
        .map_err(|source| BuildImageError::WriteLayer { index, source })?;
        writer
            .into_inner()
            .map_err(|e| BuildImageError::WriteLayer {
                index,
                source: e.into_error(),
            })?
            .sync_all()
            .map_err(|source| BuildImageError::WriteLayer { index, source })?;
        Ok((
            Blob {
                digest: digests.compressed,
                size: digests.compressed_size,
                media_type: self.format.layer_type().to_owned(),
                data: BlobData::File { path, _dir: dir },
            },
            digests.diff_id,
        ))
    }
}

/// Builds a multi-platform image: an OCI index ([`Format::Oci`]) or a Docker manifest list
/// ([`Format::Docker`]) over one child manifest per platform. Each child gets its own layers
/// (seeded from `seed` and the child's position).
///
/// # Errors
/// See [`BuildImageError`].
pub fn build_index(
    format: Format,
    seed: u64,
    layer_sizes: &[u64],
    platforms: &[Platform],
) -> Result<TestImage, BuildImageError> {
    if platforms.is_empty() {
        return Err(BuildImageError::NoPlatforms);
    }
    let children = platforms
        .iter()
        .enumerate()
        .map(|(i, platform)| {
            ImageBuilder::new(child_seed(seed, i))
                .format(format)
                .platform(platform.clone())
                .layers(layer_sizes)
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let index = IndexDoc {
        schema_version: 2,
        media_type: format.index_type().to_owned(),
        manifests: children
            .iter()
            .map(|c| Descriptor {
                media_type: c.media_type.clone(),
                size: c.manifest_bytes.len() as u64,
                digest: c.manifest_digest.clone(),
                platform: c.platform.clone(),
            })
            .collect(),
    };
    let manifest_bytes =
        Bytes::from(
            serde_json::to_vec(&index).map_err(|source| BuildImageError::Serialize {
                what: "index",
                source,
            })?,
        );
    Ok(TestImage {
        manifest_digest: sha256_digest(&manifest_bytes),
        manifest_bytes,
        media_type: format.index_type().to_owned(),
        blobs: Vec::new(),
        children,
        platform: None,
    })
}

/// Seed of the `i`-th child of an index: distinct per child and per parent seed.
fn child_seed(seed: u64, i: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i as u64 + 1)
}

/// A Docker schema-2 linux/amd64 image with the given layer sizes.
///
/// # Errors
/// See [`BuildImageError`].
pub fn docker_image(seed: u64, layer_sizes: &[u64]) -> Result<TestImage, BuildImageError> {
    ImageBuilder::new(seed).layers(layer_sizes).build()
}

/// An OCI linux/amd64 image with the given layer sizes.
///
/// # Errors
/// See [`BuildImageError`].
pub fn oci_image(seed: u64, layer_sizes: &[u64]) -> Result<TestImage, BuildImageError> {
    ImageBuilder::new(seed)
        .format(Format::Oci)
        .layers(layer_sizes)
        .build()
}

/// An OCI index over linux/amd64 and linux/arm64 OCI manifests.
///
/// # Errors
/// See [`BuildImageError`].
pub fn oci_index(seed: u64, layer_sizes: &[u64]) -> Result<TestImage, BuildImageError> {
    build_index(
        Format::Oci,
        seed,
        layer_sizes,
        &[Platform::linux_amd64(), Platform::linux_arm64()],
    )
}

/// A Docker manifest list over linux/amd64 and linux/arm64 schema-2 manifests.
///
/// # Errors
/// See [`BuildImageError`].
pub fn docker_manifest_list(seed: u64, layer_sizes: &[u64]) -> Result<TestImage, BuildImageError> {
    build_index(
        Format::Docker,
        seed,
        layer_sizes,
        &[Platform::linux_amd64(), Platform::linux_arm64()],
    )
}

/// A Docker schema-2 image with one layer of `size` random bytes, stored (gzip level 0) in a
/// temp file, generated on the blocking pool. For throughput tests (`size` >= 100 MiB).
///
/// # Errors
/// See [`BuildImageError`].
pub async fn big_image(seed: u64, size: u64) -> Result<TestImage, BuildImageError> {
    ImageBuilder::new(seed)
        .compression(0)
        .layer(size)
        .build_async()
        .await
}

/// `sha256:<hex>` of some bytes.
#[must_use]
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

struct LayerDigests {
    compressed: String,
    compressed_size: u64,
    diff_id: String,
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `size` bytes of a ChaCha8 stream selected by `(seed, stream)`.
struct SeededBytes {
    rng: ChaCha8Rng,
    remaining: u64,
}

impl Read for SeededBytes {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        self.rng.fill_bytes(&mut buf[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Writes one gzip'd tar layer (a directory and one file of `size` seeded bytes) into `out`.
fn write_layer<W: Write>(
    out: W,
    seed: u64,
    index: usize,
    size: u64,
    level: u32,
) -> io::Result<(W, LayerDigests)> {
    let compressed = HashingWriter::new(out);
    let gzip: GzEncoder<HashingWriter<W>> = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(compressed, Compression::new(level));
    let uncompressed = HashingWriter::new(BufWriter::with_capacity(256 * 1024, gzip));
    let mut tar = tar::Builder::new(uncompressed);
    tar.mode(tar::HeaderMode::Deterministic);

    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    fixed_header(&mut dir, 0o755, 0);
    tar.append_data(&mut dir, "cachalot/", io::empty())?;

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    fixed_header(&mut file, 0o644, size);
    tar.append_data(
        &mut file,
        format!("cachalot/layer-{index}.bin"),
        SeededBytes {
            rng,
            remaining: size,
        },
    )?;

    let uncompressed = tar.into_inner()?;
    let (buffered, diff_id, _) = uncompressed.finish();
    let gzip = buffered
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    let compressed = gzip.finish()?;
    let (out, digest, compressed_size) = compressed.finish();
    Ok((
        out,
        LayerDigests {
            compressed: digest,
            compressed_size,
            diff_id,
        },
    ))
}

fn fixed_header(header: &mut tar::Header, mode: u32, size: u64) {
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(size);
    // Names are fixed so no host user name can leak into the bytes.
    let _ = header.set_username("root");
    let _ = header.set_groupname("root");
}

/// Why pushing an image failed.
#[derive(Debug, thiserror::Error)]
pub enum PushImageError {
    /// The HTTP client could not be built.
    #[error(transparent)]
    BuildClient(#[from] BuildClientError),
    /// The registry URL or a Location header did not parse.
    #[error("parse URL {url}")]
    ParseUrl {
        /// The text.
        url: String,
        /// The parse error.
        source: url::ParseError,
    },
    /// An HTTP request failed to complete.
    #[error("{action} {url}")]
    Request {
        /// What was being done.
        action: &'static str,
        /// The URL.
        url: String,
        /// The reqwest error.
        source: reqwest::Error,
    },
    /// The registry answered with an unexpected status.
    #[error("{action} {url}: unexpected status {status}: {body}")]
    UnexpectedStatus {
        /// What was being done.
        action: &'static str,
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// The response body (truncated).
        body: String,
    },
    /// The upload start answered without a Location header.
    #[error("POST {url} answered without a Location header")]
    MissingLocation {
        /// The URL.
        url: String,
    },
    /// A spilled blob could not be opened.
    #[error("open blob file {path}")]
    OpenBlob {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The registry computed another digest for a manifest than we did.
    #[error("registry stored manifest as {got}, expected {expected}")]
    DigestMismatch {
        /// Our digest.
        expected: String,
        /// `Docker-Content-Digest` from the registry.
        got: String,
    },
}

/// Pushes images through the registry HTTP API with one reused client.
#[derive(Debug, Clone)]
pub struct Pusher {
    client: reqwest::Client,
    base: reqwest::Url,
}

impl Pusher {
    /// A pusher for `registry_url` (`http://127.0.0.1:PORT`).
    ///
    /// # Errors
    /// Client construction or URL parsing.
    pub fn new(registry_url: &str) -> Result<Self, PushImageError> {
        let base = registry_url
            .parse()
            .map_err(|source| PushImageError::ParseUrl {
                url: registry_url.to_owned(),
                source,
            })?;
        Ok(Self {
            client: http_client()?,
            base,
        })
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, PushImageError> {
        self.base
            .join(path)
            .map_err(|source| PushImageError::ParseUrl {
                url: path.to_owned(),
                source,
            })
    }

    /// Pushes an image and tags it: for an index, every child manifest (by digest) first.
    ///
    /// # Errors
    /// See [`PushImageError`].
    pub async fn push(
        &self,
        repo: &str,
        tag: &str,
        image: &TestImage,
    ) -> Result<(), PushImageError> {
        for child in &image.children {
            Box::pin(self.push_untagged(repo, child)).await?;
        }
        for blob in &image.blobs {
            self.push_blob(repo, blob).await?;
        }
        self.push_manifest(
            repo,
            tag,
            &image.media_type,
            image.manifest_bytes.clone(),
            &image.manifest_digest,
        )
        .await
    }

    async fn push_untagged(&self, repo: &str, image: &TestImage) -> Result<(), PushImageError> {
        for blob in &image.blobs {
            self.push_blob(repo, blob).await?;
        }
        self.push_manifest(
            repo,
            &image.manifest_digest,
            &image.media_type,
            image.manifest_bytes.clone(),
            &image.manifest_digest,
        )
        .await
    }

    /// Uploads a blob unless the registry already has it (HEAD, then POST + monolithic PUT).
    /// Spilled blobs are streamed from their file.
    ///
    /// # Errors
    /// See [`PushImageError`].
    pub async fn push_blob(&self, repo: &str, blob: &Blob) -> Result<(), PushImageError> {
        let head_url = self.url(&format!("/v2/{repo}/blobs/{}", blob.digest))?;
        let head = self
            .client
            .head(head_url.clone())
            .send()
            .await
            .map_err(|source| PushImageError::Request {
                action: "HEAD blob",
                url: head_url.to_string(),
                source,
            })?;
        if head.status().is_success() {
            return Ok(());
        }
        let start_url = self.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        let start = self
            .client
            .post(start_url.clone())
            .header(http::header::CONTENT_LENGTH, "0")
            .send()
            .await
            .map_err(|source| PushImageError::Request {
                action: "start upload",
                url: start_url.to_string(),
                source,
            })?;
        let start = expect_status(start, 202, "start upload", &start_url).await?;
        let location = start
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| PushImageError::MissingLocation {
                url: start_url.to_string(),
            })?
            .to_owned();
        let mut put_url = start_url
            .join(&location)
            .map_err(|source| PushImageError::ParseUrl {
                url: location.clone(),
                source,
            })?;
        put_url
            .query_pairs_mut()
            .append_pair("digest", &blob.digest);
        let body = match &blob.data {
            BlobData::Memory(bytes) => reqwest::Body::from(bytes.clone()),
            BlobData::File { path, .. } => {
                let file = tokio::fs::File::open(path).await.map_err(|source| {
                    PushImageError::OpenBlob {
                        path: path.clone(),
                        source,
                    }
                })?;
                reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                    file,
                    256 * 1024,
                ))
            }
        };
        let put = self
            .client
            .put(put_url.clone())
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .header(http::header::CONTENT_LENGTH, blob.size)
            .body(body)
            .send()
            .await
            .map_err(|source| PushImageError::Request {
                action: "upload blob",
                url: put_url.to_string(),
                source,
            })?;
        expect_status(put, 201, "upload blob", &put_url).await?;
        Ok(())
    }

    /// PUTs a manifest under `reference` (tag or digest) with `Content-Type: media_type` and checks
    /// the registry's `Docker-Content-Digest` against `digest`.
    ///
    /// # Errors
    /// See [`PushImageError`].
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
        digest: &str,
    ) -> Result<(), PushImageError> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let response = self
            .client
            .put(url.clone())
            .header(http::header::CONTENT_TYPE, media_type)
            .body(bytes)
            .send()
            .await
            .map_err(|source| PushImageError::Request {
                action: "put manifest",
                url: url.to_string(),
                source,
            })?;
        let response = expect_status(response, 201, "put manifest", &url).await?;
        if let Some(got) = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            if got != digest {
                return Err(PushImageError::DigestMismatch {
                    expected: digest.to_owned(),
                    got: got.to_owned(),
                });
            }
        }
        Ok(())
    }
}

async fn expect_status(
    response: reqwest::Response,
    expected: u16,
    action: &'static str,
    url: &reqwest::Url,
) -> Result<reqwest::Response, PushImageError> {
    if response.status().as_u16() == expected {
        return Ok(response);
    }
    let status = response.status().as_u16();
    let mut body = response.text().await.unwrap_or_default();
    body.truncate(1024);
    Err(PushImageError::UnexpectedStatus {
        action,
        url: url.to_string(),
        status,
        body,
    })
}

/// Pushes `image` to `registry_url` as `repo:tag` (children of an index first).
///
/// # Errors
/// See [`PushImageError`].
pub async fn push(
    registry_url: &str,
    repo: &str,
    tag: &str,
    image: &TestImage,
) -> Result<(), PushImageError> {
    Pusher::new(registry_url)?.push(repo, tag, image).await
}

/// A manifest as a registry served it.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// `Docker-Content-Digest`, if any.
    pub digest_header: Option<String>,
    /// The body.
    pub bytes: Bytes,
}

/// What a streamed blob download hashed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedBlob {
    /// HTTP status.
    pub status: u16,
    /// `sha256:<hex>` of the body received.
    pub digest: String,
    /// Bytes received.
    pub size: u64,
}

/// Why reading from a registry failed at the transport level.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request or the body stream failed.
    #[error("GET {url}")]
    Request {
        /// The URL.
        url: String,
        /// The reqwest error.
        source: reqwest::Error,
    },
}

/// GETs `/v2/{repo}/manifests/{reference}` accepting every manifest type.
///
/// # Errors
/// [`FetchError::Request`] when the request or body fails (an HTTP error status is not an error).
pub async fn fetch_manifest(
    client: &reqwest::Client,
    registry_url: &str,
    repo: &str,
    reference: &str,
) -> Result<FetchedManifest, FetchError> {
    let url = format!("{registry_url}/v2/{repo}/manifests/{reference}");
    let fail = |source| FetchError::Request {
        url: url.clone(),
        source,
    };
    let response = client
        .get(&url)
        .header(http::header::ACCEPT, MANIFEST_ACCEPT)
        .send()
        .await
        .map_err(fail)?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header("content-type");
    let digest_header = header("docker-content-digest");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.map_err(fail)?;
    Ok(FetchedManifest {
        status,
        content_type,
        digest_header,
        bytes,
    })
}

/// GETs `/v2/{repo}/blobs/{digest}` and hashes the body as it streams (no buffering).
///
/// # Errors
/// [`FetchError::Request`] when the request or the body stream fails (including truncation).
pub async fn fetch_blob(
    client: &reqwest::Client,
    registry_url: &str,
    repo: &str,
    digest: &str,
) -> Result<FetchedBlob, FetchError> {
    let url = format!("{registry_url}/v2/{repo}/blobs/{digest}");
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|source| FetchError::Request {
            url: url.clone(),
            source,
        })?;
    let status = response.status().as_u16();
    let mut hasher = Sha256::new();
    let mut size = 0_u64;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| FetchError::Request {
            url: url.clone(),
            source,
        })?;
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok(FetchedBlob {
        status,
        digest: format!("sha256:{}", hex::encode(hasher.finalize())),
        size,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_digests() {
        let a = docker_image(7, &[1000, 20_000]).unwrap();
        let b = docker_image(7, &[1000, 20_000]).unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_eq!(a.manifest_bytes, b.manifest_bytes);
    }

    #[test]
    fn a_different_seed_gives_different_layers_and_manifest() {
        let a = docker_image(7, &[1000]).unwrap();
        let b = docker_image(8, &[1000]).unwrap();
        assert_ne!(a.manifest_digest, b.manifest_digest);
        assert_ne!(a.layers()[0].digest, b.layers()[0].digest);
    }

    #[test]
    fn layer_digest_matches_the_bytes_and_the_tar_holds_the_seeded_file() {
        let image = oci_image(3, &[5000]).unwrap();
        let layer = &image.layers()[0];
        let bytes = layer.read_all().unwrap();
        assert_eq!(sha256_digest(&bytes), layer.digest);
        assert_eq!(layer.media_type, OCI_LAYER);
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        let entries: Vec<(String, u64, u64)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.size().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                ("cachalot/".to_owned(), 0, 0),
                ("cachalot/layer-0.bin".to_owned(), 5000, 0)
            ]
        );
    }

    #[test]
    fn config_diff_ids_are_the_uncompressed_tar_digests() {
        let image = docker_image(4, &[3000]).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&image.config().unwrap().read_all().unwrap()).unwrap();
        let layer = image.layers()[0].read_all().unwrap();
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&layer[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256_digest(&tar));
        assert_eq!(config["architecture"], "amd64");
    }

    #[test]
    fn manifest_references_config_and_layers_with_their_media_types() {
        let image = docker_image(5, &[10, 20, 30]).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&image.manifest_bytes).unwrap();
        assert_eq!(manifest["mediaType"], DOCKER_MANIFEST);
        assert_eq!(manifest["config"]["mediaType"], DOCKER_CONFIG);
        assert_eq!(
            manifest["config"]["digest"],
            image.config().unwrap().digest.as_str()
        );
        assert_eq!(manifest["layers"].as_array().unwrap().len(), 3);
        assert_eq!(
            manifest["layers"][2]["digest"],
            image.layers()[2].digest.as_str()
        );
        assert_eq!(manifest["layers"][2]["size"], image.layers()[2].size);
    }

    #[test]
    fn an_index_lists_amd64_and_arm64_children_by_digest() {
        for (image, child_type) in [
            (oci_index(9, &[100]).unwrap(), OCI_MANIFEST),
            (docker_manifest_list(9, &[100]).unwrap(), DOCKER_MANIFEST),
        ] {
            let index: serde_json::Value = serde_json::from_slice(&image.manifest_bytes).unwrap();
            let entries = index["manifests"].as_array().unwrap();
            assert_eq!(entries.len(), 2);
            assert_eq!(entries[0]["platform"]["architecture"], "amd64");
            assert_eq!(entries[1]["platform"]["architecture"], "arm64");
            assert_eq!(
                entries[1]["digest"],
                image.child_for("arm64").unwrap().manifest_digest.as_str()
            );
            assert_eq!(entries[0]["mediaType"], child_type);
            assert_ne!(
                image.children[0].layers()[0].digest,
                image.children[1].layers()[0].digest
            );
        }
    }

    #[test]
    fn an_index_without_platforms_is_an_error() {
        assert!(matches!(
            build_index(Format::Oci, 1, &[1], &[]),
            Err(BuildImageError::NoPlatforms)
        ));
    }

    #[test]
    fn layers_above_the_threshold_are_spilled_to_a_file() {
        let image = ImageBuilder::new(1)
            .compression(0)
            .layer(SPILL_THRESHOLD + 1)
            .build()
            .unwrap();
        let layer = &image.layers()[0];
        let path = layer.path().unwrap().to_owned();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), layer.size);
        assert!(layer.size > SPILL_THRESHOLD);
        drop(image);
        assert!(!path.exists(), "spill file outlived the image");
    }
}
