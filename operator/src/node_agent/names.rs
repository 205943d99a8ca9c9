//! Validation of every name the agent turns into a path or writes into a file: registry host
//! names (which become `certs.d/<registry>/`), mirror names (which go into the marker and the
//! CRI-O drop-in file name) and endpoint URLs.
//!
//! Invariant: a registry name accepted here is a single path component that cannot be `.`/`..`,
//! contains no separator or NUL, and so can never make a path escape the certs directory.

use reqwest::Url;

/// containerd's catch-all host namespace directory.
pub const DEFAULT_NAMESPACE: &str = "_default";

/// A name in the desired state is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidateNameError {
    /// The registry is not `host`, `host:port` or `_default`.
    #[error("registry name {name:?} is invalid: {why}")]
    Registry {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The mirror is not `<namespace>/<name>` with Kubernetes name characters.
    #[error("mirror {name:?} is invalid: expected <namespace>/<name> of [a-z0-9.-]")]
    Mirror {
        /// The rejected name.
        name: String,
    },
    /// An endpoint or server is not an absolute http(s) URL without query or fragment.
    #[error("URL {url:?} is invalid: {why}")]
    Url {
        /// The rejected URL.
        url: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Checks a registry host namespace: `_default`, or a host of `[A-Za-z0-9.-]` (no leading or
/// trailing `.`/`-`, no `..`) with an optional `:port` (1–65535).
///
/// # Errors
/// [`ValidateNameError::Registry`] naming what is wrong.
pub fn validate_registry(name: &str) -> Result<(), ValidateNameError> {
    let bad = |why| ValidateNameError::Registry {
        name: name.to_string(),
        why,
    };
    if name == DEFAULT_NAMESPACE {
        return Ok(());
    }
    if name.is_empty() || name.len() > 253 {
        return Err(bad("must be 1 to 253 characters"));
    }
    let (host, port) = match name.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (name, None),
    };
    if host.is_empty() {
        return Err(bad("host is empty"));
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        return Err(bad(
            "only letters, digits, '.', '-' and an optional ':port' are allowed",
        ));
    }
    if host.starts_with(['.', '-']) || host.ends_with(['.', '-']) || host.contains("..") {
        return Err(bad(
            "host must not start or end with '.' or '-' nor contain '..'",
        ));
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65_535).contains(&p));
        if !valid {
            return Err(bad("port must be a number from 1 to 65535"));
        }
    }
    Ok(())
}

/// Checks a mirror reference `<namespace>/<name>` (Kubernetes object name characters), which is
/// embedded in markers and file names.
///
/// # Errors
/// [`ValidateNameError::Mirror`].
pub fn validate_mirror(mirror: &str) -> Result<(), ValidateNameError> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 253
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
    };
    match mirror.split_once('/') {
        Some((ns, name)) if part_ok(ns) && part_ok(name) => Ok(()),
        _ => Err(ValidateNameError::Mirror {
            name: mirror.to_string(),
        }),
    }
}

/// Parses an endpoint or server URL: absolute `http` or `https`, with a host, without
/// credentials, query or fragment.
///
/// # Errors
/// [`ValidateNameError::Url`].
pub fn parse_endpoint(url: &str) -> Result<Url, ValidateNameError> {
    let bad = |why: String| ValidateNameError::Url {
        url: url.to_string(),
        why,
    };
    let parsed = Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("scheme must be http or https".to_string()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("host is missing".to_string()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("credentials do not belong in a URL".to_string()));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("query and fragment are not allowed".to_string()));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn registry_names_that_are_hosts_ports_or_default_are_accepted() {
        for ok in [
            "docker.io",
            "ghcr.io",
            "registry.local:5000",
            "127.0.0.1:5000",
            "_default",
            "a",
        ] {
            assert_eq!(validate_registry(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn registry_names_that_could_escape_the_certs_dir_are_rejected() {
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "/etc",
            "docker.io/../../x",
            "a/b",
            "a\\b",
            "a\0b",
            "..docker.io",
            "docker.io.",
            "-x",
            "x:",
            "x:0",
            "x:65536",
            "x:5a",
            "x:1:2",
            ":5000",
            "_default2",
            "host name",
            "日本.jp",
        ] {
            assert!(validate_registry(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn mirror_must_be_namespace_slash_name() {
        assert!(validate_mirror("cachalot/hub").is_ok());
        for bad in ["hub", "a/b/c", "/x", "x/", "A/b", "a/b\n# x", "a/../b"] {
            assert!(validate_mirror(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn endpoints_must_be_plain_http_urls() {
        assert!(parse_endpoint("http://10.96.0.12:5000").is_ok());
        assert!(parse_endpoint("https://hub.example:5000/prefix/v2").is_ok());
        for bad in [
            "10.96.0.12:5000",
            "ftp://x",
            "http://",
            "http://u:p@x",
            "http://x/?a=b",
            "http://x/#f",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?}");
        }
    }
}
