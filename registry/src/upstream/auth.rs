//! Upstream authentication: `WWW-Authenticate` challenge parsing (pure), credentials read from
//! files (a mounted Secret: username/password files or a docker `config.json`), and a cache of
//! bearer tokens per scope that keeps each token until shortly before it expires.
//!
//! Credentials follow their files: [`CredentialFiles`] looks at the files' identity (inode, size,
//! modification time) whenever credentials are needed and reads them again when it changed, so a
//! rotated Secret (the kubelet swaps the mounted files atomically) takes effect without a restart.
//! A rotation that cannot be read (a torn or invalid file) keeps the last good credentials.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::config;

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadCredentialsError {
    #[error("cannot read credentials file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("docker config {path} is not valid JSON: {source}")]
    DockerConfig {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("docker config {path} has no usable entry for registry `{registry}`")]
    NoEntry { path: PathBuf, registry: String },
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses a `WWW-Authenticate` header value (`Bearer realm="…",service="…",scope="…"`).
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, params) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(params);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `key="quoted, value",key2=token` → map. Commas inside quotes belong to the value.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut escaped = false;
            for c in chars.by_ref() {
                match (escaped, c) {
                    (false, '\\') => escaped = true,
                    (false, '"') => break,
                    _ => {
                        value.push(c);
                        escaped = false;
                    }
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    out
}

/// Username and password for an upstream.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BasicCredentials({}, <redacted>)", self.username)
    }
}

fn read_secret(path: &Path) -> Result<String, LoadCredentialsError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
        .map_err(|source| LoadCredentialsError::Read {
            path: path.to_owned(),
            source,
        })
}

/// The keys a docker `config.json` may use for `registry`.
fn docker_config_keys(registry: &str) -> Vec<String> {
    let mut keys = vec![
        registry.to_owned(),
        format!("https://{registry}"),
        format!("http://{registry}"),
    ];
    if registry == config::DOCKER_HUB {
        keys.extend(
            [
                "https://index.docker.io/v1/",
                "index.docker.io",
                "registry-1.docker.io",
            ]
            .map(str::to_owned),
        );
    }
    keys
}

/// Loads the credentials configured for `registry`, if any.
pub fn load_credentials(
    creds: Option<&config::Credentials>,
    registry: &str,
) -> Result<Option<BasicCredentials>, LoadCredentialsError> {
    let Some(creds) = creds else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&creds.username_file, &creds.password_file) {
        return Ok(Some(BasicCredentials {
            username: read_secret(u)?,
            password: read_secret(p)?,
        }));
    }
    let Some(path) = &creds.docker_config_file else {
        return Ok(None);
    };
    let text = read_secret(path)?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| LoadCredentialsError::DockerConfig {
            path: path.clone(),
            source,
        })?;
    let no_entry = || LoadCredentialsError::NoEntry {
        path: path.clone(),
        registry: registry.to_owned(),
    };
    let auths = doc.get("auths").ok_or_else(no_entry)?;
    for key in docker_config_keys(registry) {
        let Some(entry) = auths.get(&key) else {
            continue;
        };
        if let (Some(u), Some(p)) = (
            entry.get("username").and_then(|v| v.as_str()),
            entry.get("password").and_then(|v| v.as_str()),
        ) {
            return Ok(Some(BasicCredentials {
                username: u.to_owned(),
                password: p.to_owned(),
            }));
        }
        let decoded = entry
            .get("auth")
            .and_then(|v| v.as_str())
            .and_then(|a| base64::engine::general_purpose::STANDARD.decode(a).ok())
            .and_then(|b| String::from_utf8(b).ok());
        if let Some((u, p)) = decoded.as_deref().and_then(|d| d.split_once(':')) {
            return Ok(Some(BasicCredentials {
                username: u.to_owned(),
                password: p.to_owned(),
            }));
        }
    }
    Err(no_entry())
}

/// The identity of the credentials files at one moment: a change means they were rewritten.
type FilesStamp = Vec<Option<(u64, u64, i64, i64)>>;

fn stamp(paths: &[&Path]) -> FilesStamp {
    use std::os::unix::fs::MetadataExt as _;
    paths
        .iter()
        .map(|p| {
            // `metadata` follows the kubelet's `..data` symlinks to the current file.
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
        })
        .collect()
}

/// The configured credentials of one upstream, read from their files and re-read when the files
/// change.
#[derive(Debug)]
pub struct CredentialFiles {
    registry: String,
    config: Option<config::Credentials>,
    loaded: Mutex<(FilesStamp, Option<BasicCredentials>)>,
}

impl CredentialFiles {
    /// Reads the credentials once; a missing or invalid file is an error at start-up.
    ///
    /// # Errors
    /// [`LoadCredentialsError`].
    pub fn load(
        config: Option<&config::Credentials>,
        registry: &str,
    ) -> Result<Self, LoadCredentialsError> {
        let files = Self {
            registry: registry.to_owned(),
            config: config.cloned(),
            loaded: Mutex::new((Vec::new(), None)),
        };
        let stamp = files.stamp();
        let credentials = load_credentials(files.config.as_ref(), registry)?;
        *files.loaded.lock().unwrap_or_else(|e| e.into_inner()) = (stamp, credentials);
        Ok(files)
    }

    fn stamp(&self) -> FilesStamp {
        let Some(c) = &self.config else {
            return Vec::new();
        };
        let paths: Vec<&Path> = [&c.username_file, &c.password_file, &c.docker_config_file]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect();
        stamp(&paths)
    }

    /// Whether any credentials are configured.
    #[must_use]
    pub fn configured(&self) -> bool {
        self.config.is_some()
    }

    /// The current credentials and whether they changed since the last call that saw them.
    pub fn current(&self) -> (Option<BasicCredentials>, bool) {
        if self.config.is_none() {
            return (None, false);
        }
        let now = self.stamp();
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.0 == now {
            return (loaded.1.clone(), false);
        }
        match load_credentials(self.config.as_ref(), &self.registry) {
            Ok(fresh) => {
                let changed = fresh != loaded.1;
                *loaded = (now, fresh);
                if changed {
                    tracing::info!(registry = %self.registry, "upstream credentials changed on disk; using them from now on");
                }
                (loaded.1.clone(), changed)
            }
            Err(error) => {
                // Keep the last good credentials; the stamp is not updated, so the next call
                // tries again (the kubelet may be half-way through its swap).
                tracing::warn!(registry = %self.registry, %error, "cannot re-read upstream credentials; keeping the previous ones");
                (loaded.1.clone(), false)
            }
        }
    }
}

/// Bearer tokens by scope, each kept until shortly before it expires.
#[derive(Debug, Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

/// Tokens are dropped this long before their stated expiry so a request never carries one that
/// expires in flight.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

impl TokenCache {
    pub fn get(&self, scope: &str, now: Instant) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(scope)
            .filter(|(_, expires)| now < *expires)
            .map(|(t, _)| t.clone())
    }

    pub fn put(&self, scope: &str, token: String, expires_in: Duration, now: Instant) {
        let lifetime = expires_in.saturating_sub(EXPIRY_MARGIN);
        if lifetime.is_zero() {
            return;
        }
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: scopes are per repository; drop expired ones before growing.
        if tokens.len() >= 4096 {
            tokens.retain(|_, (_, exp)| now < *exp);
        }
        tokens.insert(scope.to_owned(), (token, now + lifetime));
    }

    /// Forgets every token (the credentials they were issued for changed).
    pub fn clear(&self) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Token lifetimes beyond this are not believed (and `Instant` arithmetic stays in range).
const MAX_TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// The JSON a token endpoint answers with.
#[derive(Debug, serde::Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and its lifetime (60 s when unstated, as the token spec says; at most a day,
    /// whatever the answer claims). An empty token is no token.
    pub fn into_token(self) -> Option<(String, Duration)> {
        let token = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        let expires_in = self.expires_in.unwrap_or(60).min(MAX_TOKEN_LIFETIME_SECS);
        Some((token, Duration::from_secs(expires_in)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn docker_hub_challenge_parses_with_commas_inside_quotes() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:library/a:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:library/a:pull,push".into()),
            }
        );
        assert_eq!(parse_challenge("Basic realm=\"x\""), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(
            parse_challenge("Bearer service=\"x\""),
            None,
            "realm is required"
        );
    }

    #[test]
    fn credentials_come_from_files_or_a_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let u = dir.path().join("u");
        let p = dir.path().join("p");
        std::fs::write(&u, "alice\n").unwrap();
        std::fs::write(&p, "s3cret\n").unwrap();
        let files = config::Credentials {
            username_file: Some(u),
            password_file: Some(p),
            docker_config_file: None,
        };
        let c = load_credentials(Some(&files), "docker.io")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );

        let cfg = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:pw");
        std::fs::write(
            &cfg,
            format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        let docker = config::Credentials {
            docker_config_file: Some(cfg),
            ..config::Credentials::default()
        };
        let c = load_credentials(Some(&docker), "docker.io")
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "bob");
        assert!(matches!(
            load_credentials(Some(&docker), "quay.io"),
            Err(LoadCredentialsError::NoEntry { .. })
        ));
        assert!(format!("{c:?}").contains("redacted") && !format!("{c:?}").contains("pw"));
    }

    #[test]
    fn tokens_are_cached_per_scope_until_near_expiry() {
        let cache = TokenCache::default();
        let t0 = Instant::now();
        cache.put(
            "repository:a:pull",
            "tok".into(),
            Duration::from_secs(300),
            t0,
        );
        assert_eq!(cache.get("repository:a:pull", t0).as_deref(), Some("tok"));
        assert_eq!(cache.get("repository:b:pull", t0), None);
        assert_eq!(
            cache.get("repository:a:pull", t0 + Duration::from_secs(295)),
            None
        );
    }

    #[test]
    fn absurd_token_lifetimes_are_capped_at_a_day() {
        let response: TokenResponse =
            serde_json::from_str(r#"{"token":"t","expires_in":18446744073709551615}"#).unwrap();
        let (_, lifetime) = response.into_token().unwrap();
        assert_eq!(lifetime, Duration::from_secs(24 * 3600));
        TokenCache::default().put("s", "t".into(), lifetime, Instant::now());
    }
}
