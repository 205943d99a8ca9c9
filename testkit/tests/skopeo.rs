//! skopeo, a real client, copies and inspects the generated images from the real distribution.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::image::{self, docker_image, oci_image, oci_index, TestImage};
use cachalot_testkit::skopeo::{
    copy_to_oci_dir, copy_to_oci_dir_with, inspect, inspect_raw, oci_layout_has_blob,
    oci_layout_manifests, CopyOptions, RunSkopeoError,
};

async fn seeded(repo: &str, tag: &str, image: &TestImage) -> Distribution {
    let registry = Distribution::start().await.unwrap();
    image::push(&registry.url(), repo, tag, image)
        .await
        .unwrap();
    registry
}

#[tokio::test]
async fn skopeo_copies_an_oci_image_keeping_every_digest() {
    let img = oci_image(31, &[300_000, 600_000]).unwrap();
    let registry = seeded("library/oci", "1", &img).await;
    let dest = tempfile::tempdir().unwrap();
    copy_to_oci_dir_with(
        &format!("{}/library/oci:1", registry.host()),
        dest.path(),
        CopyOptions {
            preserve_digests: true,
            ..CopyOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        oci_layout_manifests(dest.path()).unwrap(),
        vec![img.manifest_digest.clone()]
    );
    for blob in img.all_blobs() {
        assert!(
            oci_layout_has_blob(dest.path(), &blob.digest),
            "missing {}",
            blob.digest
        );
    }
}

#[tokio::test]
async fn skopeo_copies_a_docker_image_with_its_layer_digests() {
    let img = docker_image(32, &[1 << 20, 2 << 20, 3 << 20]).unwrap();
    let registry = seeded("library/docker", "2", &img).await;
    let dest = tempfile::tempdir().unwrap();
    copy_to_oci_dir(
        &format!("{}/library/docker:2", registry.host()),
        dest.path(),
    )
    .await
    .unwrap();
    // skopeo rewrites Docker media types for an OCI layout, but the layer bytes are unchanged.
    for layer in img.layers() {
        assert!(
            oci_layout_has_blob(dest.path(), &layer.digest),
            "missing {}",
            layer.digest
        );
    }
}

#[tokio::test]
async fn skopeo_copies_every_platform_of_an_oci_index() {
    let index = oci_index(33, &[100_000]).unwrap();
    let registry = seeded("library/multi", "3", &index).await;
    let dest = tempfile::tempdir().unwrap();
    copy_to_oci_dir_with(
        &format!("{}/library/multi:3", registry.host()),
        dest.path(),
        CopyOptions {
            all_platforms: true,
            preserve_digests: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        oci_layout_manifests(dest.path()).unwrap(),
        vec![index.manifest_digest.clone()]
    );
    for child in &index.children {
        assert!(oci_layout_has_blob(dest.path(), &child.manifest_digest));
        assert!(oci_layout_has_blob(dest.path(), &child.layers()[0].digest));
    }
}

#[tokio::test]
async fn skopeo_inspect_reports_the_pushed_digest_and_layers() {
    let img = docker_image(34, &[10_000, 20_000]).unwrap();
    let registry = seeded("library/inspected", "4", &img).await;
    let reference = format!("{}/library/inspected:4", registry.host());
    let info = inspect(&reference).await.unwrap();
    assert_eq!(info["Digest"], img.manifest_digest.as_str());
    let layers: Vec<&str> = info["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let expected: Vec<&str> = img.layers().iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(layers, expected);
    assert_eq!(
        inspect_raw(&reference).await.unwrap(),
        img.manifest_bytes.to_vec()
    );
}

#[tokio::test]
async fn skopeo_copy_of_an_absent_image_is_an_error_with_skopeos_message() {
    let registry = Distribution::start().await.unwrap();
    let dest = tempfile::tempdir().unwrap();
    let err = copy_to_oci_dir(
        &format!("{}/library/absent:1", registry.host()),
        dest.path(),
    )
    .await
    .unwrap_err();
    let RunSkopeoError::Failed { stderr, .. } = err else {
        panic!("expected Failed, got {err:?}");
    };
    assert!(stderr.contains("manifest unknown"), "{stderr}");
}
