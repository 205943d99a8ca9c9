//! Runs a host program (`ip`, `ctr`, `nsenter`) to completion with a deadline.
//!
//! Invariants: the child never outlives the deadline (it is killed on drop); stdin is closed;
//! stdout and stderr are captured (and cut at [`MAX_OUTPUT`] in error messages), so a failing
//! command's error says what the program printed.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// The part of a failing command's stderr kept in its error message.
pub const MAX_OUTPUT: usize = 2048;

/// Why a host command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunHostCommandError {
    /// The program could not be started.
    #[error("start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// The program did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?}")]
    Timeout {
        /// The command line.
        command: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The program exited non-zero.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr (cut).
        stderr: String,
    },
}

/// Output of a successful command.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// `program args…` as one line, for messages.
pub fn display(program: &str, args: &[String]) -> String {
    let mut line = program.to_owned();
    for arg in args {
        line.push(' ');
        line.push_str(arg);
    }
    line
}

/// Cuts `text` to at most [`MAX_OUTPUT`] bytes on a character boundary, trimmed.
pub fn cut(text: &str) -> String {
    let text = text.trim();
    if text.len() <= MAX_OUTPUT {
        return text.to_owned();
    }
    let mut end = MAX_OUTPUT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Runs `program args…` and waits for it at most `timeout`; non-zero exit is an error.
pub async fn run(
    program: &str,
    args: &[String],
    timeout: Duration,
) -> Result<CommandOutput, RunHostCommandError> {
    let command = display(program, args);
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RunHostCommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(source)) => return Err(RunHostCommandError::Spawn { command, source }),
        Err(_) => return Err(RunHostCommandError::Timeout { command, timeout }),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(RunHostCommandError::Failed {
            command,
            status: output.status,
            stderr: cut(&stderr),
        });
    }
    Ok(CommandOutput { stdout, stderr })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn cut_keeps_short_text_and_shortens_long_text_on_a_char_boundary() {
        assert_eq!(cut("  hello \n"), "hello");
        let long = "é".repeat(MAX_OUTPUT);
        let short = cut(&long);
        assert!(short.len() <= MAX_OUTPUT + "…".len());
        assert!(short.ends_with('…'));
    }

    #[tokio::test]
    async fn a_failing_command_reports_its_stderr() {
        let err = run(
            "/bin/sh",
            &["-c".to_owned(), "echo nope >&2; exit 3".to_owned()],
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[tokio::test]
    async fn a_command_past_its_deadline_is_a_timeout() {
        let err = run(
            "/bin/sh",
            &["-c".to_owned(), "exec sleep 5".to_owned()],
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RunHostCommandError::Timeout { .. }), "{err}");
    }
}
