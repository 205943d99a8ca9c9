//! Path-prefix routing (`/v2/<registry>/<repository>/...`) for clients that cannot send `ns`:
//! two real distribution upstreams behind counting proxies, one cachalot, clients reqwest and
//! skopeo. The prefix reaches the same cache, counters and upstream as `ns`; a prefix that is not
//! on the allowlist or is malformed is refused without any upstream request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cachalot_registry::config::RegistryConfig;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::FaultProxy;
use cachalot_testkit::image::docker_image;
use common::{client, get_manifest, pull_verified, Rig, MIB};

/// The second registry's key: a host-like name, as image references name registries.
const GHCR: &str = "ghcr.io";

struct TwoRegistries {
    rig: Rig,
    second: Distribution,
    second_fault: FaultProxy,
}

async fn two_registries() -> TwoRegistries {
    let second = Distribution::start().await.unwrap();
    let second_fault = FaultProxy::start(&second.url()).await.unwrap();
    let url = second_fault.url();
    let rig = Rig::start_with(move |config| {
        config.registries.insert(
            GHCR.into(),
            RegistryConfig {
                url: Some(url),
                ..RegistryConfig::default()
            },
        );
    })
    .await;
    TwoRegistries {
        rig,
        second,
        second_fault,
    }
}

async fn oci_error(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (
        status,
        body["errors"][0]["code"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn prefixed_paths_pull_each_registry_from_its_own_upstream_and_share_the_ns_cache() {
    let t = two_registries().await;
    let hub_img = docker_image(301, &[MIB]).unwrap();
    let ghcr_img = docker_image(302, &[MIB / 2]).unwrap();
    t.rig.push("library/alpine", "1", &hub_img).await;
    cachalot_testkit::image::push(&t.second.url(), "org/app", "1", &ghcr_img)
        .await
        .unwrap();
    let base = t.rig.cachalot.url();

    let caches = pull_verified(&base, "ghcr.io/org/app", &ghcr_img).await;
    assert!(caches.iter().all(|c| c == "MISS"), "{caches:?}");
    // Docker Hub's one-component names get `library/` behind a prefix too.
    let caches = pull_verified(&base, "docker.io/alpine", &hub_img).await;
    assert!(caches.iter().all(|c| c == "MISS"), "{caches:?}");
    assert!(t.second_fault.handle().counts().total() >= 3);

    // The same content through `ns` is the same cache: hits, no upstream request.
    t.rig.faults().reset_counts();
    t.second_fault.handle().reset_counts();
    let m = client()
        .get(format!("{base}/v2/org/app/manifests/1?ns={GHCR}"))
        .header("accept", cachalot_registry::oci::media::MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(m.status(), 200);
    assert_eq!(m.headers()["x-cache"], "HIT");
    let caches = pull_verified(&base, "library/alpine", &hub_img).await;
    assert!(caches.iter().all(|c| c == "HIT"), "{caches:?}");
    assert_eq!(t.second_fault.handle().counts().total(), 0);
    assert_eq!(t.rig.faults().counts().total(), 0);

    // Counted per registry, whichever way the client addressed it.
    let stats = t.rig.cachalot.stats().await;
    let ghcr_requests = 1 + ghcr_img.all_blobs().len() as u64;
    let hub_requests = 1 + hub_img.all_blobs().len() as u64;
    assert_eq!(stats.registries[GHCR].misses, ghcr_requests, "{stats:?}");
    assert_eq!(stats.registries[GHCR].hits, 1, "{stats:?}");
    assert_eq!(
        stats.registries["docker.io"].misses, hub_requests,
        "{stats:?}"
    );
    assert_eq!(
        stats.registries["docker.io"].hits, hub_requests,
        "{stats:?}"
    );
}

#[tokio::test]
async fn tags_and_catalog_answer_in_the_clients_own_namespace() {
    let t = two_registries().await;
    let img = docker_image(303, &[64 * 1024]).unwrap();
    for tag in ["a", "b", "c"] {
        cachalot_testkit::image::push(&t.second.url(), "org/app", tag, &img)
            .await
            .unwrap();
    }
    t.rig.push("library/alpine", "1", &img).await;
    let base = t.rig.cachalot.url();
    assert_eq!(
        get_manifest(&base, "ghcr.io/org/app", "a").await.status(),
        200
    );
    assert_eq!(
        get_manifest(&base, "library/alpine", "1").await.status(),
        200
    );

    let r = client()
        .get(format!("{base}/v2/ghcr.io/org/app/tags/list?n=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let link = r.headers()["link"].to_str().unwrap().to_owned();
    assert_eq!(
        link,
        "</v2/ghcr.io/org/app/tags/list?n=2&last=b>; rel=\"next\""
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["name"], "ghcr.io/org/app");
    assert_eq!(body["tags"], serde_json::json!(["a", "b"]));
    // The same list through `ns` keeps the registry's own name.
    let body: serde_json::Value = client()
        .get(format!("{base}/v2/org/app/tags/list?ns={GHCR}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["name"], "org/app");

    // Without ns the catalog lists what this endpoint serves without ns: the default registry
    // bare, the others behind their prefix; with ns, one registry in its own names.
    let catalog: serde_json::Value = client()
        .get(format!("{base}/v2/_catalog"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        catalog["repositories"],
        serde_json::json!(["ghcr.io/org/app", "library/alpine"])
    );
    let catalog: serde_json::Value = client()
        .get(format!("{base}/v2/_catalog?ns={GHCR}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["org/app"]));
}

#[tokio::test]
async fn unlisted_or_malformed_prefixes_are_refused_without_an_upstream_request() {
    let t = two_registries().await;
    let base = t.rig.cachalot.url();
    t.rig.faults().reset_counts();
    t.second_fault.handle().reset_counts();
    let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    for path in [
        "quay.io/org/app/manifests/1".to_owned(),
        format!("quay.io/org/app/blobs/{d}"),
        "localhost:5000/x/tags/list".to_owned(),
    ] {
        let r = client()
            .get(format!("{base}/v2/{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(oci_error(r).await, (404, "NAME_UNKNOWN".into()), "{path}");
    }
    for path in [
        "a..b/x/manifests/1",
        "x.io:99999/x/manifests/1",
        "-x.io/y/tags/list",
    ] {
        let r = client()
            .get(format!("{base}/v2/{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(oci_error(r).await, (400, "NAME_INVALID".into()), "{path}");
    }
    assert_eq!(t.rig.faults().counts().total(), 0);
    assert_eq!(t.second_fault.handle().counts().total(), 0);
}

#[tokio::test]
async fn skopeo_copies_images_of_two_registries_through_their_prefixes() {
    let t = two_registries().await;
    let hub_img = docker_image(304, &[MIB]).unwrap();
    let ghcr_img = docker_image(305, &[MIB, MIB / 4]).unwrap();
    t.rig.push("library/busybox", "v1", &hub_img).await;
    cachalot_testkit::image::push(&t.second.url(), "team/tool", "v1", &ghcr_img)
        .await
        .unwrap();
    let host = t.rig.cachalot.host();
    for (reference, img, dir) in [
        (
            format!("{host}/docker.io/library/busybox:v1"),
            &hub_img,
            "hub",
        ),
        (format!("{host}/ghcr.io/team/tool:v1"), &ghcr_img, "ghcr"),
    ] {
        let dest = t.rig.dir.path().join(dir);
        cachalot_testkit::skopeo::copy_to_oci_dir(&reference, &dest)
            .await
            .unwrap();
        for layer in img.layers() {
            assert!(
                cachalot_testkit::skopeo::oci_layout_has_blob(&dest, &layer.digest),
                "{reference}: {}",
                layer.digest
            );
        }
    }
    let stats = t.rig.cachalot.stats().await;
    assert!(stats.registries[GHCR].misses >= 3, "{stats:?}");
    assert!(stats.registries["docker.io"].misses >= 3, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
}
