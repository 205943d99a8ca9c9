//! The committed CRD must be exactly what the Rust types generate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cachalot_operator::crd::{committed_crd_path, render_crd_yaml};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

#[test]
fn committed_crd_matches_the_rust_types() {
    let generated = render_crd_yaml().unwrap();
    let path = committed_crd_path();
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        committed == generated,
        "{} is out of date with operator/src/api; regenerate it with \
         `cargo run -p cachalot-operator --bin crdgen` and commit the result",
        path.display()
    );
}

#[test]
fn generated_crd_is_namespaced_with_status_subresource_and_printer_columns() {
    let yaml = render_crd_yaml().unwrap();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("registrymirrors.cachalot.dev")
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(
        crd.spec.names.short_names,
        Some(vec!["rmirror".to_string()])
    );
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version
        .subresources
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .is_some());
    let columns: Vec<String> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.to_uppercase())
        .collect();
    assert_eq!(
        columns,
        [
            "READY",
            "ENDPOINT",
            "NODES",
            "HIT-RATIO",
            "BUDGET",
            "WARM",
            "AGE"
        ]
    );
}

#[test]
fn generated_crd_carries_cel_rules_and_enum_constraints() {
    let yaml = render_crd_yaml().unwrap();
    assert!(yaml.contains("x-kubernetes-validations"));
    assert!(yaml.contains("each registry may appear only once"));
    assert!(yaml.contains("- PersistentVolumeClaim"));
    assert!(yaml.contains("- NodePort"));
    // Structural schemas forbid oneOf/anyOf at the type level; kube rewrites them, check it did.
    assert!(!yaml.contains("anyOf"), "CRD schema is not structural");
    assert!(!yaml.contains("oneOf"), "CRD schema is not structural");
}
