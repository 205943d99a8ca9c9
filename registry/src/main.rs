//! `cachalot-registry` binary entry point.
fn main() {}
