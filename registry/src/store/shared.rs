//! The shared tier: content every replica of a mirror can read, on S3-compatible object storage
//! (or any other `object_store` backend: the conformance tests run the same suite on a local
//! directory and on a real S3 server).
//!
//! Layout under the configured prefix, the same names as the disk cache uses:
//! - `blobs/<alg>/<hex>`: blob bytes;
//! - `manifests/<alg>/<hex>`: the media type, a newline, then the manifest bytes (one object, so
//!   a manifest can never be visible without its type; no backend needs object attributes);
//! - `repositories/<registry>/<name>/_tags/<tag>.json`: tag records ([`TagRecord`]);
//! - `_cachalot/owner`: which mirror claimed the prefix.
//!
//! Invariant: an object appears under `blobs/` or `manifests/` only with bytes that matched its
//! digest. Blobs are uploaded from the verified local file, as one PUT or as a multipart upload
//! that is completed only after every part went up (a failed upload is aborted, so nothing
//! partial is ever readable); manifests are verified by the caller before they are written.
//! Readers re-verify anyway: a manifest whose bytes do not match its name is reported corrupt,
//! and blob readers hash what they stream (see `proxy::blobs`). Correctness never depends on
//! conditional writes (Garage ignores them): every object under a content address has one
//! possible value, and a tag record written twice is just written twice.

use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart,
};

use super::{StoredManifest, TagRecord};
use crate::config::S3Config;
use crate::oci::{Digest, DigestHasher, RepositoryName, Tag};

/// Blobs at least this large go up as multipart uploads, in parts of this size.
pub const MULTIPART_PART: usize = 8 * 1024 * 1024;

/// Parts of one multipart upload in flight at once.
const UPLOAD_CONCURRENCY: usize = 4;

/// A failed shared-storage operation, named by what was being done.
#[derive(Debug, thiserror::Error)]
pub enum SharedStoreError {
    #[error("cannot read the S3 credentials file {path}: {source}")]
    Credentials {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up the S3 client: {0}")]
    Build(#[source] object_store::Error),
    #[error("object storage: cannot {action} {key}: {source}")]
    Request {
        action: &'static str,
        key: String,
        source: object_store::Error,
    },
    #[error("object storage: {key} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error("object storage prefix `{prefix}` belongs to mirror `{owner}`, not `{wanted}`: give each mirror its own prefix")]
    Claimed {
        prefix: String,
        owner: String,
        wanted: String,
    },
    #[error("cannot read the verified local file {path} to upload it: {source}")]
    ReadLocal {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SharedStoreError {
    fn request(action: &'static str, key: &Path) -> impl Fn(object_store::Error) -> Self {
        let key = key.to_string();
        move |source| SharedStoreError::Request {
            action,
            key: key.clone(),
            source,
        }
    }
}

/// A blob being read from the shared tier.
pub struct SharedBlob {
    /// The whole object's size.
    pub size: u64,
    /// The bytes of the requested range (the whole object without one).
    pub body: BoxStream<'static, Result<Bytes, SharedStoreError>>,
}

impl std::fmt::Debug for SharedBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBlob")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// One object of the shared tier, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedObject {
    /// The key below the prefix (`blobs/sha256/<hex>`).
    pub key: String,
    pub size: u64,
    /// Unix seconds of the last write.
    pub modified: u64,
}

/// The shared tier of one mirror: an object store and the prefix of its keys.
#[derive(Debug, Clone)]
pub struct SharedStore {
    objects: Arc<dyn ObjectStore>,
    prefix: String,
}

/// The key of a blob below the prefix. Pure.
pub fn blob_key(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex())
}

/// The key of a manifest below the prefix. Pure.
pub fn manifest_key(digest: &Digest) -> String {
    format!("manifests/{}/{}", digest.algorithm().as_str(), digest.hex())
}

/// The key of a tag record below the prefix. Pure.
pub fn tag_key(registry: &str, name: &RepositoryName, tag: &Tag) -> String {
    format!(
        "{}/_tags/{}.json",
        repository_key(registry, name),
        tag.as_str()
    )
}

fn repository_key(registry: &str, name: &RepositoryName) -> String {
    format!("repositories/{registry}/{name}")
}

/// The stored form of a manifest: its media type, a newline, its bytes. Pure.
pub fn encode_manifest(media_type: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(media_type.len() + 1 + bytes.len());
    out.extend_from_slice(media_type.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(bytes);
    out
}

/// Splits a stored manifest and checks its bytes against `digest`. Pure.
pub fn decode_manifest(digest: &Digest, stored: &Bytes) -> Result<StoredManifest, String> {
    let newline = stored
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no media type line")?;
    let media_type =
        std::str::from_utf8(&stored[..newline]).map_err(|_| "media type is not UTF-8")?;
    if media_type.is_empty() || media_type.len() > 255 {
        return Err("media type missing or too long".into());
    }
    let bytes = stored.slice(newline + 1..);
    let mut hasher = DigestHasher::new(digest.algorithm());
    hasher.update(&bytes);
    let actual = hasher.finish();
    if &actual != digest {
        return Err(format!("bytes hash to {actual}"));
    }
    Ok(StoredManifest {
        bytes,
        media_type: media_type.to_owned(),
    })
}

fn read_key_file(path: &FsPath) -> Result<String, SharedStoreError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| SharedStoreError::Credentials {
            path: path.to_owned(),
            source,
        })
}

impl SharedStore {
    /// A shared tier on `objects`, below `prefix` (empty, or ending in `/`).
    pub fn new(objects: Arc<dyn ObjectStore>, prefix: &str) -> SharedStore {
        SharedStore {
            objects,
            prefix: prefix.to_owned(),
        }
    }

    /// The S3 client a validated config describes: path-style requests, plain HTTP allowed for
    /// an `http://` endpoint, keys from their files or the AWS environment, and bounded waits
    /// ([`client_options`], [`retry_config`]) so an unreachable endpoint is an error within
    /// seconds. Sends no request.
    pub fn from_config(s3: &S3Config) -> Result<SharedStore, SharedStoreError> {
        Ok(SharedStore::new(Arc::new(amazon_s3(s3)?), &s3.prefix))
    }

    fn path(&self, key: &str) -> Path {
        Path::from(format!("{}{key}", self.prefix))
    }

    /// The prefix this store's keys live under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Checks the bucket answers with these keys and claims the prefix for `owner`: the first
    /// mirror on a prefix writes `_cachalot/owner`; any other owner is refused. Run at startup,
    /// so a missing bucket, wrong keys or an unreachable endpoint stop the process with one line.
    pub async fn claim(&self, owner: &str) -> Result<(), SharedStoreError> {
        let path = self.path("_cachalot/owner");
        match self.objects.get(&path).await {
            Ok(found) => {
                let bytes = found
                    .bytes()
                    .await
                    .map_err(SharedStoreError::request("read", &path))?;
                let claimed = String::from_utf8_lossy(&bytes).trim().to_owned();
                if claimed == owner {
                    Ok(())
                } else {
                    Err(SharedStoreError::Claimed {
                        prefix: self.prefix.clone(),
                        owner: claimed,
                        wanted: owner.to_owned(),
                    })
                }
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.objects
                    .put(&path, PutPayload::from(owner.as_bytes().to_vec()))
                    .await
                    .map_err(SharedStoreError::request("claim", &path))?;
                Ok(())
            }
            Err(source) => Err(SharedStoreError::Request {
                action: "read",
                key: path.to_string(),
                source,
            }),
        }
    }

    /// The size of a blob in the shared tier, if it is there.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, SharedStoreError> {
        let path = self.path(&blob_key(digest));
        match self.objects.head(&path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(SharedStoreError::request("look up", &path)(e)),
        }
    }

    /// Streams a blob (or `range` of it), if it is there. The bytes are not verified here.
    pub async fn get_blob(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<Option<SharedBlob>, SharedStoreError> {
        let path = self.path(&blob_key(digest));
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let result = match self.objects.get_opts(&path, options).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(SharedStoreError::request("read", &path)(e)),
        };
        let size = result.meta.size;
        let key = path.to_string();
        let body = result
            .into_stream()
            .map_err(move |source| SharedStoreError::Request {
                action: "read",
                key: key.clone(),
                source,
            })
            .boxed();
        Ok(Some(SharedBlob { size, body }))
    }

    /// Uploads a verified blob from the local file at `path` (`size` bytes). Small blobs go up
    /// in one PUT; larger ones as a multipart upload completed only when every part is up, and
    /// aborted on any failure, so the blob is visible whole or not at all.
    pub async fn put_blob_file(
        &self,
        digest: &Digest,
        file: &FsPath,
        size: u64,
    ) -> Result<(), SharedStoreError> {
        let path = self.path(&blob_key(digest));
        let read_err = |source| SharedStoreError::ReadLocal {
            path: file.to_owned(),
            source,
        };
        if size < MULTIPART_PART as u64 {
            let bytes = tokio::fs::read(file).await.map_err(read_err)?;
            self.objects
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(SharedStoreError::request("upload", &path))?;
            return Ok(());
        }
        let upload = self
            .objects
            .put_multipart(&path)
            .await
            .map_err(SharedStoreError::request("start uploading", &path))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART);
        let mut reader = tokio::fs::File::open(file).await.map_err(read_err)?;
        let outcome = async {
            use tokio::io::AsyncReadExt as _;
            let mut buffer = vec![0u8; MULTIPART_PART];
            let mut sent = 0u64;
            loop {
                let n = reader.read(&mut buffer).await.map_err(read_err)?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(UPLOAD_CONCURRENCY)
                    .await
                    .map_err(SharedStoreError::request("upload a part of", &path))?;
                writer.write(&buffer[..n]);
                sent += n as u64;
            }
            if sent != size {
                return Err(SharedStoreError::ReadLocal {
                    path: file.to_owned(),
                    source: std::io::Error::other(format!("has {sent} of {size} bytes")),
                });
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                writer
                    .finish()
                    .await
                    .map_err(SharedStoreError::request("complete the upload of", &path))?;
                Ok(())
            }
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(key = %path, error = %abort, "cannot abort a failed multipart upload; the engine's lifecycle rule must reclaim it");
                }
                Err(e)
            }
        }
    }

    /// Reads a manifest, verified against its digest.
    pub async fn read_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, SharedStoreError> {
        let path = self.path(&manifest_key(digest));
        let Some(stored) = self.get_small(&path).await? else {
            return Ok(None);
        };
        decode_manifest(digest, &stored)
            .map(Some)
            .map_err(|message| SharedStoreError::Corrupt {
                key: path.to_string(),
                message,
            })
    }

    /// Writes verified manifest bytes under their digest (one PUT: all or nothing).
    pub async fn write_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), SharedStoreError> {
        let path = self.path(&manifest_key(digest));
        self.objects
            .put(&path, PutPayload::from(encode_manifest(media_type, bytes)))
            .await
            .map_err(SharedStoreError::request("write", &path))?;
        Ok(())
    }

    /// Reads what a tag pointed at, as the last replica that confirmed it wrote.
    pub async fn read_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
    ) -> Result<Option<TagRecord>, SharedStoreError> {
        let path = self.path(&tag_key(registry, name, tag));
        let Some(bytes) = self.get_small(&path).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SharedStoreError::Corrupt {
                key: path.to_string(),
                message: e.to_string(),
            })
    }

    /// Records what a tag points at.
    pub async fn write_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
        record: &TagRecord,
    ) -> Result<(), SharedStoreError> {
        let path = self.path(&tag_key(registry, name, tag));
        let bytes = serde_json::to_vec(record).map_err(|e| SharedStoreError::Corrupt {
            key: path.to_string(),
            message: e.to_string(),
        })?;
        self.objects
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(SharedStoreError::request("write", &path))?;
        Ok(())
    }

    /// The repositories of `registry` with at least one tag record, sorted.
    pub async fn repositories(&self, registry: &str) -> Result<Vec<String>, SharedStoreError> {
        let base = format!("repositories/{registry}/");
        let mut found: Vec<String> = self
            .list(&base)
            .await?
            .into_iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(&base)?;
                let (repository, _) = rest.split_once("/_tags/")?;
                Some(repository.to_owned())
            })
            .collect();
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// Expires every tag record of `registry` in the bucket (`checkedAt` 0, see
    /// `Store::expire_tags`): one list, then one read and one write per record. Returns how
    /// many were expired; records that do not parse are left alone.
    pub async fn expire_tags(&self, registry: &str) -> Result<u64, SharedStoreError> {
        let base = format!("repositories/{registry}/");
        let mut expired = 0;
        for object in self.list(&base).await? {
            let Some((repository, tag)) = object
                .key
                .strip_prefix(&base)
                .and_then(|rest| rest.split_once("/_tags/"))
                .and_then(|(r, t)| Some((r, t.strip_suffix(".json")?)))
            else {
                continue;
            };
            let (Ok(name), Ok(tag)) = (repository.parse::<RepositoryName>(), tag.parse::<Tag>())
            else {
                continue;
            };
            let Some(mut record) = self.read_tag(registry, &name, &tag).await? else {
                continue;
            };
            if record.checked_at == 0 {
                continue;
            }
            record.checked_at = 0;
            self.write_tag(registry, &name, &tag, &record).await?;
            expired += 1;
        }
        Ok(expired)
    }

    /// Every object below `key_prefix` (relative to the store's prefix).
    pub async fn list(&self, key_prefix: &str) -> Result<Vec<SharedObject>, SharedStoreError> {
        let path = self.path(key_prefix);
        let strip = self.prefix.clone();
        self.objects
            .list(Some(&path))
            .map_err(SharedStoreError::request("list", &path))
            .map_ok(|meta| SharedObject {
                key: meta
                    .location
                    .as_ref()
                    .strip_prefix(strip.as_str())
                    .unwrap_or(meta.location.as_ref())
                    .to_owned(),
                size: meta.size,
                modified: u64::try_from(meta.last_modified.timestamp()).unwrap_or(0),
            })
            .try_collect()
            .await
    }

    /// Deletes the object at `key` (relative to the prefix); a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), SharedStoreError> {
        let path = self.path(key);
        match self.objects.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(SharedStoreError::request("delete", &path)(e)),
        }
    }

    /// Reads a small object whole; `None` when it is not there.
    async fn get_small(&self, path: &Path) -> Result<Option<Bytes>, SharedStoreError> {
        match self.objects.get(path).await {
            Ok(found) => found
                .bytes()
                .await
                .map(Some)
                .map_err(SharedStoreError::request("read", path)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(SharedStoreError::request("read", path)(e)),
        }
    }
}

/// Small bookkeeping objects of the shared tier (`_cachalot/…`), read and written whole by key.
impl SharedStore {
    /// Reads the small object at `key` (relative to the prefix) whole; `None` when it is not
    /// there.
    pub async fn read_object(&self, key: &str) -> Result<Option<Bytes>, SharedStoreError> {
        self.get_small(&self.path(key)).await
    }

    /// Writes `bytes` as the object at `key` (relative to the prefix): one PUT, all or nothing.
    pub async fn write_object(&self, key: &str, bytes: Vec<u8>) -> Result<(), SharedStoreError> {
        let path = self.path(key);
        self.objects
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(SharedStoreError::request("write", &path))?;
        Ok(())
    }
}

// ---- bounded waits of the S3 client (`from_config`) ----

/// How long to wait for a TCP (and TLS) connection to the object store.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a request may wait for its response to start, or for the next bytes of its body,
/// before it fails (and is retried). There is deliberately no bound on a whole request: a blob
/// streamed to a slow client may take minutes, and `object_store` resumes a broken body only
/// within [`RETRY_TIMEOUT`] of its first attempt, so a total timeout would cut every long stream.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Retries of a failed request (5xx, connection errors, timeouts of safe requests).
pub const MAX_RETRIES: usize = 2;
/// No retry starts later than this after the first attempt, so an outage becomes an error (a
/// 503) in seconds.
pub const RETRY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The S3 client of [`SharedStore::from_config`] (also what signs the requests of
/// `s3_uploads`). Sends no request.
pub fn amazon_s3(s3: &S3Config) -> Result<object_store::aws::AmazonS3, SharedStoreError> {
    // Installing the process-wide TLS provider twice is harmless; the first one stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(&s3.bucket)
        .with_region(s3.region.as_deref().unwrap_or("us-east-1"))
        .with_client_options(client_options())
        .with_retry(retry_config());
    if let Some(endpoint) = &s3.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    if let (Some(id), Some(secret)) = (&s3.access_key_id_file, &s3.secret_access_key_file) {
        builder = builder
            .with_access_key_id(read_key_file(id)?)
            .with_secret_access_key(read_key_file(secret)?);
    }
    builder.build().map_err(SharedStoreError::Build)
}

/// The HTTP client settings of [`SharedStore::from_config`]: a short connect timeout and a
/// stall timeout instead of `object_store`'s 30 s bound on whole requests. Pure.
pub fn client_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout_disabled()
        .with_read_timeout(READ_TIMEOUT)
}

/// The retry policy of [`SharedStore::from_config`]: an outage of the object store surfaces as
/// an error after a few seconds (`object_store`'s default retries for three minutes). Pure.
pub fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: MAX_RETRIES,
        retry_timeout: RETRY_TIMEOUT,
        ..object_store::RetryConfig::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn manifests_round_trip_through_their_stored_form_and_corruption_is_caught() {
        let body = br#"{"schemaVersion":2}"#;
        let digest = Digest::sha256_of(body);
        let stored = Bytes::from(encode_manifest("application/x-test", body));
        let m = decode_manifest(&digest, &stored).unwrap();
        assert_eq!(&m.bytes[..], body);
        assert_eq!(m.media_type, "application/x-test");
        let mut flipped = stored.to_vec();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        assert!(decode_manifest(&digest, &Bytes::from(flipped))
            .unwrap_err()
            .contains("hash"));
        assert!(decode_manifest(&digest, &Bytes::from_static(b"no newline")).is_err());
    }

    #[test]
    fn keys_mirror_the_disk_layout() {
        let digest = Digest::sha256_of(b"x");
        assert_eq!(blob_key(&digest), format!("blobs/sha256/{}", digest.hex()));
        let name: RepositoryName = "library/alpine".parse().unwrap();
        let tag: Tag = "3.19".parse().unwrap();
        assert_eq!(
            tag_key("docker.io", &name, &tag),
            "repositories/docker.io/library/alpine/_tags/3.19.json"
        );
    }
}
