//! Abandoned multipart uploads of the shared tier on S3: listed and aborted.
//!
//! A replica killed in the middle of a multipart upload leaves its parts in the bucket, invisible
//! (nothing is readable at the key before the upload completes) but stored and billed until a
//! lifecycle rule or an abort removes them. `object_store` can abort only an upload it still
//! holds, and has no ListMultipartUploads, so this module sends the two S3 requests itself:
//! `GET /<bucket>?uploads&prefix=<prefix>` and `DELETE /<bucket>/<key>?uploadId=<id>`, path-style,
//! signed with SigV4 by `object_store`'s own signer (`AwsAuthorizer`) with the credentials of the
//! same client [`SharedStore::from_config`](super::shared::SharedStore::from_config) builds.
//!
//! Only uploads below the store's prefix and started longer than `older_than` ago are aborted:
//! a blob upload in progress on another replica takes seconds to minutes, so `older_than` must
//! be well above the longest upload (an hour is a safe choice). Aborting an upload in progress
//! only fails that upload; the blob is then uploaded again on a later request.

use std::time::Duration;

use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::{HttpRequest, HttpRequestBody};

use super::shared::{amazon_s3, SharedStoreError};
use crate::config::S3Config;

/// Pages of ListMultipartUploads read in one pass (1000 uploads each).
const MAX_PAGES: usize = 100;

/// A failed step of listing or aborting multipart uploads, named by what was being done.
#[derive(Debug, thiserror::Error)]
pub enum AbortStaleUploadsError {
    #[error(transparent)]
    Client(#[from] SharedStoreError),
    #[error("cannot build the HTTP client for multipart uploads: {0}")]
    BuildHttp(#[source] reqwest::Error),
    #[error("cannot get S3 credentials: {0}")]
    Credentials(#[source] object_store::Error),
    #[error("cannot sign {what}: {source}")]
    Sign {
        what: String,
        source: object_store::Error,
    },
    #[error("cannot {what}: {source}")]
    Send {
        what: String,
        source: reqwest::Error,
    },
    #[error("cannot {what}: the server answered {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("cannot list multipart uploads: unreadable answer: {0}")]
    Parse(String),
}

/// A multipart upload the bucket holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// The object key, prefix included.
    pub key: String,
    pub upload_id: String,
    /// Unix seconds of its start.
    pub initiated: u64,
}

/// One page of a ListMultipartUploads answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadsPage {
    pub uploads: Vec<PendingUpload>,
    /// The markers of the next page, when the answer is truncated.
    pub next: Option<(String, String)>,
}

/// Lists and aborts the multipart uploads below one store prefix.
#[derive(Debug)]
pub struct MultipartUploads {
    http: reqwest::Client,
    credentials: object_store::aws::AwsCredentialProvider,
    /// `http://host:port/bucket` (path-style), no trailing slash.
    bucket_url: String,
    region: String,
    prefix: String,
}

/// Percent-encodes `text` as SigV4 wants it: unreserved characters as they are, `/` too when
/// `keep_slash`, every other byte as `%XX`. Pure.
pub fn uri_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text of the first `<tag>…</tag>` in `xml`, entities decoded. Pure.
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(&xml[start..end])
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Unix seconds of an S3 timestamp (`2024-05-01T12:34:56.789Z`); fractions are dropped. Pure.
pub fn parse_timestamp(text: &str) -> Option<u64> {
    let text = text.trim().strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut t = time.split(':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), proleptic Gregorian.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).ok()
}

/// Parses one ListMultipartUploads answer. Pure.
pub fn parse_uploads_page(xml: &str) -> Result<UploadsPage, String> {
    if !xml.contains("<ListMultipartUploadsResult") {
        return Err("no ListMultipartUploadsResult".into());
    }
    let mut page = UploadsPage::default();
    let mut rest = xml;
    // Each round consumes one `<Upload>` element, so the loop ends.
    while let Some(start) = rest.find("<Upload>") {
        let after = &rest[start + "<Upload>".len()..];
        let end = after.find("</Upload>").ok_or("unterminated <Upload>")?;
        let upload = &after[..end];
        let field = |tag| {
            element(upload, tag)
                .map(unescape)
                .ok_or(format!("<Upload> without <{tag}>"))
        };
        let initiated = field("Initiated")?;
        page.uploads.push(PendingUpload {
            key: field("Key")?,
            upload_id: field("UploadId")?,
            initiated: parse_timestamp(&initiated).ok_or(format!("bad <Initiated> {initiated}"))?,
        });
        rest = &after[end + "</Upload>".len()..];
    }
    if element(xml, "IsTruncated") == Some("true") {
        let key = element(xml, "NextKeyMarker")
            .map(unescape)
            .unwrap_or_default();
        let id = element(xml, "NextUploadIdMarker")
            .map(unescape)
            .unwrap_or_default();
        if key.is_empty() && id.is_empty() {
            return Err("truncated without next markers".into());
        }
        page.next = Some((key, id));
    }
    Ok(page)
}

impl MultipartUploads {
    /// The uploads below the prefix of the bucket a validated config describes, with the
    /// credentials and client settings of the shared tier. Sends no request.
    pub fn from_config(s3: &S3Config) -> Result<MultipartUploads, AbortStaleUploadsError> {
        let client = amazon_s3(s3)?;
        let region = s3.region.clone().unwrap_or_else(|| "us-east-1".to_owned());
        let endpoint = s3
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let http = reqwest::Client::builder()
            .connect_timeout(super::shared::CONNECT_TIMEOUT)
            .read_timeout(super::shared::READ_TIMEOUT)
            .build()
            .map_err(AbortStaleUploadsError::BuildHttp)?;
        Ok(MultipartUploads {
            http,
            credentials: client.credentials().clone(),
            bucket_url: format!(
                "{}/{}",
                endpoint.trim_end_matches('/'),
                uri_encode(&s3.bucket, false)
            ),
            region,
            prefix: s3.prefix.clone(),
        })
    }

    /// Sends one signed request without a body; returns the answer's body.
    async fn send(
        &self,
        credential: &AwsCredential,
        method: http::Method,
        url: String,
        what: &str,
    ) -> Result<String, AbortStaleUploadsError> {
        let mut request: HttpRequest = http::Request::builder()
            .method(method.clone())
            .uri(&url)
            .body(HttpRequestBody::empty())
            .map_err(|e| AbortStaleUploadsError::Sign {
                what: what.to_owned(),
                source: object_store::Error::Generic {
                    store: "S3",
                    source: Box::new(e),
                },
            })?;
        AwsAuthorizer::new(credential, "s3", &self.region)
            .try_authorize(&mut request, None)
            .map_err(|source| AbortStaleUploadsError::Sign {
                what: what.to_owned(),
                source,
            })?;
        let mut builder = self.http.request(method, &url);
        for (name, value) in request.headers() {
            builder = builder.header(name, value);
        }
        let send_err = |source| AbortStaleUploadsError::Send {
            what: what.to_owned(),
            source,
        };
        let response = builder.send().await.map_err(send_err)?;
        let status = response.status();
        let body = response.text().await.map_err(send_err)?;
        if !status.is_success() {
            return Err(AbortStaleUploadsError::Status {
                what: what.to_owned(),
                status: status.as_u16(),
                body,
            });
        }
        Ok(body)
    }

    async fn credential(&self) -> Result<std::sync::Arc<AwsCredential>, AbortStaleUploadsError> {
        self.credentials
            .get_credential()
            .await
            .map_err(AbortStaleUploadsError::Credentials)
    }

    /// Every multipart upload below the prefix (at most `MAX_PAGES` pages).
    pub async fn list(&self) -> Result<Vec<PendingUpload>, AbortStaleUploadsError> {
        let credential = self.credential().await?;
        let mut uploads = Vec::new();
        let mut marker: Option<(String, String)> = None;
        for _ in 0..MAX_PAGES {
            let mut url = format!(
                "{}?uploads=&prefix={}",
                self.bucket_url,
                uri_encode(&self.prefix, false)
            );
            if let Some((key, id)) = &marker {
                url.push_str(&format!(
                    "&key-marker={}&upload-id-marker={}",
                    uri_encode(key, false),
                    uri_encode(id, false)
                ));
            }
            let body = self
                .send(
                    &credential,
                    http::Method::GET,
                    url,
                    "list multipart uploads",
                )
                .await?;
            let page = parse_uploads_page(&body).map_err(AbortStaleUploadsError::Parse)?;
            uploads.extend(page.uploads);
            match page.next {
                Some(next) => marker = Some(next),
                None => break,
            }
        }
        Ok(uploads)
    }

    /// Aborts one multipart upload (its parts are deleted).
    pub async fn abort(&self, upload: &PendingUpload) -> Result<(), AbortStaleUploadsError> {
        let credential = self.credential().await?;
        let url = format!(
            "{}/{}?uploadId={}",
            self.bucket_url,
            uri_encode(&upload.key, true),
            uri_encode(&upload.upload_id, false)
        );
        let what = format!("abort the multipart upload of {}", upload.key);
        self.send(&credential, http::Method::DELETE, url, &what)
            .await
            .map(drop)
    }

    /// Aborts the uploads below the prefix started more than `older_than` before `now` (unix
    /// seconds); returns how many.
    pub async fn abort_stale_uploads(
        &self,
        older_than: Duration,
        now: u64,
    ) -> Result<u64, AbortStaleUploadsError> {
        let mut aborted = 0;
        for upload in self.list().await? {
            if now.saturating_sub(upload.initiated) >= older_than.as_secs() {
                self.abort(&upload).await?;
                aborted += 1;
            }
        }
        Ok(aborted)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn timestamps_parse_to_unix_seconds() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_timestamp("2024-02-29T12:34:56.789Z"),
            Some(1_709_210_096)
        );
        assert_eq!(
            parse_timestamp("2000-03-01T00:00:00.000Z"),
            Some(951_868_800)
        );
        assert_eq!(parse_timestamp("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn keys_and_query_values_are_encoded_for_signing() {
        assert_eq!(
            uri_encode("mirrors/a/blobs/sha256/ab", true),
            "mirrors/a/blobs/sha256/ab"
        );
        assert_eq!(uri_encode("mirrors/a/", false), "mirrors%2Fa%2F");
        assert_eq!(uri_encode("a b+c~", false), "a%20b%2Bc~");
    }

    #[test]
    fn an_uploads_page_lists_key_id_and_start_and_the_next_markers() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Bucket>b</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
<NextKeyMarker>p/k2</NextKeyMarker><NextUploadIdMarker>id&amp;2</NextUploadIdMarker>
<Prefix>p/</Prefix><MaxUploads>2</MaxUploads><IsTruncated>true</IsTruncated>
<Upload><Key>p/k1</Key><UploadId>id1</UploadId><Initiated>1970-01-01T00:01:00.000Z</Initiated></Upload>
<Upload><Key>p/k&amp;2</Key><UploadId>id&amp;2</UploadId><Initiated>1970-01-01T00:02:00Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let page = parse_uploads_page(xml).unwrap();
        assert_eq!(
            page.uploads,
            [
                PendingUpload {
                    key: "p/k1".into(),
                    upload_id: "id1".into(),
                    initiated: 60
                },
                PendingUpload {
                    key: "p/k&2".into(),
                    upload_id: "id&2".into(),
                    initiated: 120
                },
            ]
        );
        assert_eq!(page.next, Some(("p/k2".into(), "id&2".into())));
        let last = xml.replace("<IsTruncated>true", "<IsTruncated>false");
        assert_eq!(parse_uploads_page(&last).unwrap().next, None);
        assert!(parse_uploads_page("<Error><Code>AccessDenied</Code></Error>").is_err());
        assert!(parse_uploads_page(&xml.replace("<UploadId>id1</UploadId>", "")).is_err());
    }
}
