//! The OCI distribution vocabulary: digests, repository names, references, the typed request path,
//! media types and the error envelope. Everything here is pure and validates untrusted input once, at
//! the edge, so the rest of the registry only ever sees well-formed values.

pub mod digest;
pub mod error;
pub mod media;
pub mod name;
pub mod path;

pub use digest::{Algorithm, Digest, DigestHasher};
pub use error::{ErrorCode, OciError};
pub use name::{ImageRef, ParseImageRefError, Reference, RepositoryName, Tag};
pub use path::{Addressed, Kind, Route};
