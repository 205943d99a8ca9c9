//! HTTP `Range` for blob GETs: a single byte range (`bytes=a-b`, `bytes=a-`, `bytes=-n`).
//! Pure parsing and resolution against the blob size.

/// A parsed, not yet resolved, range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=start-` or `bytes=start-end` (end inclusive).
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// Why a `Range` header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("malformed Range header; expected bytes=START-END, bytes=START- or bytes=-LENGTH")]
    Malformed,
    #[error("multiple ranges are not supported")]
    Multiple,
    #[error("range not satisfiable for a blob of {size} bytes")]
    Unsatisfiable { size: u64 },
}

/// Parses a `Range` header value.
pub fn parse(value: &str) -> Result<ByteRange, RangeError> {
    let spec = value
        .trim()
        .strip_prefix("bytes=")
        .ok_or(RangeError::Malformed)?;
    if spec.contains(',') {
        return Err(RangeError::Multiple);
    }
    let (a, b) = spec.split_once('-').ok_or(RangeError::Malformed)?;
    let num = |s: &str| -> Result<u64, RangeError> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(RangeError::Malformed);
        }
        s.parse().map_err(|_| RangeError::Malformed)
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return Ok(ByteRange::Suffix(num(b)?));
    }
    let start = num(a)?;
    let end = if b.is_empty() { None } else { Some(num(b)?) };
    if end.is_some_and(|e| e < start) {
        return Err(RangeError::Malformed);
    }
    Ok(ByteRange::From { start, end })
}

/// Resolves a range against a size into `[start, end)`.
pub fn resolve(range: ByteRange, size: u64) -> Result<(u64, u64), RangeError> {
    match range {
        ByteRange::From { start, end } => {
            if start >= size {
                return Err(RangeError::Unsatisfiable { size });
            }
            let end = end.map_or(size, |e| e.saturating_add(1).min(size));
            Ok((start, end))
        }
        ByteRange::Suffix(0) => Err(RangeError::Unsatisfiable { size }),
        ByteRange::Suffix(n) => {
            if size == 0 {
                return Err(RangeError::Unsatisfiable { size });
            }
            Ok((size.saturating_sub(n), size))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn single_ranges_resolve_to_half_open_intervals() {
        assert_eq!(resolve(parse("bytes=0-9").unwrap(), 100).unwrap(), (0, 10));
        assert_eq!(
            resolve(parse("bytes=90-").unwrap(), 100).unwrap(),
            (90, 100)
        );
        assert_eq!(
            resolve(parse("bytes=95-200").unwrap(), 100).unwrap(),
            (95, 100)
        );
        assert_eq!(
            resolve(parse("bytes=-10").unwrap(), 100).unwrap(),
            (90, 100)
        );
        assert_eq!(
            resolve(parse("bytes=-500").unwrap(), 100).unwrap(),
            (0, 100)
        );
    }

    #[test]
    fn unsatisfiable_and_malformed_ranges_are_told_apart() {
        assert_eq!(
            resolve(parse("bytes=100-").unwrap(), 100),
            Err(RangeError::Unsatisfiable { size: 100 })
        );
        assert!(resolve(parse("bytes=-0").unwrap(), 100).is_err());
        for bad in [
            "bytes=",
            "bytes=a-b",
            "items=0-1",
            "bytes=5-1",
            "bytes=--1",
            "bytes=1",
        ] {
            assert_eq!(parse(bad), Err(RangeError::Malformed), "{bad}");
        }
        assert_eq!(parse("bytes=0-1,5-6"), Err(RangeError::Multiple));
    }
}
