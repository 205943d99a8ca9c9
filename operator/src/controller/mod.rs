//! The reconcile pipeline for `RegistryMirror`: fetch → validate → build (pure) → apply (SSA) → status.
