//! A secret held in a file (a mounted Secret): a bearer token, read at start and re-read when
//! the file changes, keeping the last good value when it turns bad. Used by the pull API's
//! client authentication and by a spoke for its parent.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the token file is looked at again.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Why the token file could not be read at start.
#[derive(Debug, thiserror::Error)]
pub enum LoadTokenError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token file {path} is empty")]
    Empty { path: PathBuf },
}

/// Reads a token file: its contents without surrounding white space, never empty.
pub fn read_token(path: &Path) -> Result<String, LoadTokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadTokenError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(LoadTokenError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

/// A token file, re-read when it changes; the last good token is kept when it turns bad.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<TokenState>,
}

#[derive(Debug)]
struct TokenState {
    token: String,
    checked: Instant,
    /// The file's contents last seen (good or bad), so one bad version is reported once.
    last_seen: Option<String>,
}

impl TokenFile {
    /// Reads the file once; an error here stops the start.
    pub fn load(path: &Path) -> Result<Self, LoadTokenError> {
        let token = read_token(path)?;
        Ok(TokenFile {
            path: path.to_owned(),
            state: Mutex::new(TokenState {
                last_seen: Some(token.clone()),
                token,
                checked: Instant::now(),
            }),
        })
    }

    /// The current token (the file is re-read when the last look is older than [`RECHECK`]).
    pub fn current(&self) -> String {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            let seen = std::fs::read_to_string(&self.path).ok();
            if seen != state.last_seen {
                match read_token(&self.path) {
                    Ok(token) => {
                        if token != state.token {
                            tracing::info!(path = %self.path.display(), "token file changed; using the new token");
                        }
                        state.token = token;
                    }
                    Err(error) => tracing::warn!(
                        %error,
                        "cannot use the changed token file; keeping the last good token"
                    ),
                }
                state.last_seen = seen;
            }
        }
        state.token.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn token_file_keeps_the_last_good_token_when_the_file_turns_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "one\n").unwrap();
        let file = TokenFile::load(&path).unwrap();
        assert_eq!(file.current(), "one");
        let recheck = |file: &TokenFile| {
            file.state.lock().unwrap().checked = Instant::now() - RECHECK;
            file.current()
        };
        std::fs::write(&path, "two").unwrap();
        assert_eq!(recheck(&file), "two");
        std::fs::write(&path, "  \n").unwrap();
        assert_eq!(recheck(&file), "two");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(recheck(&file), "two");
        assert!(matches!(
            TokenFile::load(&path),
            Err(LoadTokenError::Read { .. })
        ));
    }
}
