//! CRD types of `cachalot.dev/v1alpha1`: the `RegistryMirror` spec and status.
