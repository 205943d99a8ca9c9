//! Go-style duration strings (`"500ms"`, `"3s"`, `"1m30s"`, `"1h"`), the syntax containerd uses
//! for `dial_timeout` and the protocol uses for every duration.
//!
//! Invariant: a string accepted here is also accepted by Go's `time.ParseDuration` (we accept a
//! subset: non-negative integers with units `ms`, `s`, `m`, `h`), so what we pass through to
//! containerd can never make it reject hosts.toml.

use std::time::Duration;

/// A duration string could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: {why} (expected e.g. \"500ms\", \"3s\", \"1m30s\")")]
pub struct ParseDurationError {
    /// The rejected text.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Parses a Go-style duration made of `<digits><unit>` groups, units `ms`, `s`, `m`, `h`.
///
/// # Errors
/// Empty input, a missing or unknown unit, a missing number, or overflow.
pub fn parse_duration(input: &str) -> Result<Duration, ParseDurationError> {
    let err = |why| ParseDurationError {
        input: input.to_string(),
        why,
    };
    if input.is_empty() {
        return Err(err("empty"));
    }
    let bytes = input.as_bytes();
    let mut total_ms: u64 = 0;
    let mut i = 0;
    // Bounded: every iteration consumes at least one byte.
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(err("a number must precede each unit"));
        }
        let number: u64 = input[start..i]
            .parse()
            .map_err(|_| err("number too large"))?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let factor_ms: u64 = match &input[unit_start..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "" => return Err(err("missing unit")),
            _ => return Err(err("unknown unit")),
        };
        let part = number
            .checked_mul(factor_ms)
            .ok_or_else(|| err("too large"))?;
        total_ms = total_ms.checked_add(part).ok_or_else(|| err("too large"))?;
    }
    Ok(Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn go_style_durations_parse_to_their_value() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
    }

    #[test]
    fn malformed_durations_are_rejected_with_a_reason() {
        for bad in [
            "",
            "3",
            "s",
            "3x",
            "-3s",
            "1.5s",
            "3s ",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
