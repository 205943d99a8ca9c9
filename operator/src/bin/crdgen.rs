//! `crdgen`: prints or writes the `RegistryMirror` CRD generated from the Rust types.
//!
//! `cargo run -p cachalot-operator --bin crdgen` writes `crds/registrymirrors.cachalot.dev.yaml`
//! at the workspace root; `--stdout` prints it instead. The drift test (`tests/crd_drift.rs`)
//! compares the committed file with [`cachalot_operator::crd::render_crd_yaml`].

use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match cachalot_operator::crd::render_crd_yaml() {
        Ok(yaml) => yaml,
        Err(error) => {
            eprintln!("crdgen: {error}");
            return ExitCode::FAILURE;
        }
    };
    if std::env::args().any(|a| a == "--stdout") {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    let path = cachalot_operator::crd::committed_crd_path();
    match std::fs::write(&path, yaml) {
        Ok(()) => {
            eprintln!("crdgen: wrote {}", path.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("crdgen: cannot write {}: {error}", path.display());
            ExitCode::FAILURE
        }
    }
}
