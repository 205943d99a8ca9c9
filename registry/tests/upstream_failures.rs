//! Keeping pulls working when the upstream's token service fails, its HEADs hang, clients ask
//! for what does not exist, or they list tags: each test drives a real distribution upstream
//! behind the fault proxy, and fails without the behaviour it names.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use cachalot_registry::config::{Config, Credentials, FreshnessRule};
use cachalot_testkit::fault::{Fault, FaultRule, Kind, TokenAuth};
use cachalot_testkit::image::{docker_image, TestImage};
use common::{client, eventually, fresh_for, get_manifest, Cachalot, Rig};
use http::Method;

/// Makes a cached tag look as if it was last checked long ago (what passing time would do).
fn age_tag(cachalot: &Cachalot, repo: &str, tag: &str) {
    let path = tag_file(cachalot, repo, tag);
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    record["checkedAt"] = serde_json::json!(0);
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
}

fn tag_file(cachalot: &Cachalot, repo: &str, tag: &str) -> std::path::PathBuf {
    cachalot
        .storage
        .join("repositories/docker.io")
        .join(repo)
        .join("_tags")
        .join(format!("{tag}.json"))
}

/// The digest the cached tag record points at.
fn cached_digest(cachalot: &Cachalot, repo: &str, tag: &str) -> Option<String> {
    let bytes = std::fs::read(tag_file(cachalot, repo, tag)).ok()?;
    let record: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    record["digest"].as_str().map(str::to_owned)
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Status, OCI error code and message of an error answer.
async fn oci_error(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (
        status,
        body["errors"][0]["code"].as_str().unwrap().to_owned(),
        body["errors"][0]["message"].as_str().unwrap().to_owned(),
    )
}

fn token_rule(fault: Fault) -> FaultRule {
    FaultRule::new(fault).kind(Kind::Token)
}

/// Pushes `img` as `repo:tag` and caches it through cachalot.
async fn cached(rig: &Rig, repo: &str, tag: &str, img: &TestImage) {
    rig.push(repo, tag, img).await;
    let m = get_manifest(&rig.cachalot.url(), repo, tag).await;
    assert_eq!(m.status(), 200, "{:?}", m.text().await);
}

/// Failure tests wait for the outcome of each failure, not for the revalidation budget, and keep
/// the circuit closed so every case reaches the token service.
fn patient(c: &mut Config) {
    c.upstream.revalidate_wait = Duration::from_secs(60);
    c.upstream.response_timeout = Duration::from_secs(1);
    c.upstream.circuit_failure_threshold = 1000;
    c.upstream.retries = 0;
}

#[tokio::test]
async fn token_service_outages_serve_cached_tags_stale_and_fail_uncached_ones_in_oci_form() {
    let rig = Rig::start_with(patient).await;
    rig.faults().enable_token_auth(TokenAuth::default());
    let img = docker_image(301, &[1024]).unwrap();
    cached(&rig, "library/cached", "latest", &img).await;
    rig.push("library/uncached", "latest", &img).await;
    let url = rig.cachalot.url();
    let closed_port = cachalot_testkit::wait::free_port().unwrap();

    // (what the token service does, the realm it is reached at, status and code for an
    // uncached tag)
    let refused_realm = format!("http://127.0.0.1:{closed_port}/token");
    let cases = [
        (
            "503",
            Some(Fault::Status(503)),
            None,
            502,
            "UPSTREAM_UNAVAILABLE",
        ),
        (
            "429",
            Some(Fault::Status(429)),
            None,
            429,
            "TOOMANYREQUESTS",
        ),
        (
            "hang",
            Some(Fault::Delay(Duration::from_secs(30))),
            None,
            504,
            "UPSTREAM_UNAVAILABLE",
        ),
        (
            "refused",
            None,
            Some(refused_realm),
            502,
            "UPSTREAM_UNAVAILABLE",
        ),
    ];
    let mut limited_since_429 = false;
    for (what, fault, realm, status, code) in cases {
        rig.faults().clear_faults();
        // Every token cachalot holds is refused from now on, so it must ask for a new one.
        rig.faults().revoke_tokens();
        rig.faults().set_token_realm(realm);
        if let Some(fault) = fault {
            rig.faults().add_fault(token_rule(fault));
        }
        age_tag(&rig.cachalot, "library/cached", "latest");
        let m = get_manifest(&url, "library/cached", "latest").await;
        assert_eq!(m.status(), 200, "{what}: {:?}", m.text().await);
        assert_eq!(header(&m, "x-cache"), "STALE", "{what}");
        assert_eq!(
            header(&m, "docker-content-digest"),
            img.manifest_digest,
            "{what}"
        );
        let (got_status, got_code, message) =
            oci_error(get_manifest(&url, "library/uncached", "latest").await).await;
        assert_eq!(
            (got_status, got_code.as_str()),
            (status, code),
            "{what}: {message}"
        );
        assert!(message.contains("token"), "{what}: {message}");
        // A token 429 is reported like the registry's own, for a minute without Retry-After.
        limited_since_429 |= what == "429";
        let rate_limited = rig.cachalot.stats().await.registries["docker.io"].rate_limited;
        assert_eq!(
            rate_limited.is_some(),
            limited_since_429,
            "{what}: {rate_limited:?}"
        );
    }
    // A refusal of the credentials is an answer, not an outage: no stale copy hides it.
    rig.faults().clear_faults();
    rig.faults().set_token_realm(None);
    rig.faults().revoke_tokens();
    rig.faults().add_fault(token_rule(Fault::Status(401)));
    age_tag(&rig.cachalot, "library/cached", "latest");
    let (status, code, _) = oci_error(get_manifest(&url, "library/cached", "latest").await).await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
}

#[tokio::test]
async fn concurrent_cold_requests_share_one_token_request() {
    let rig = Rig::start().await;
    let img = docker_image(311, &[1024]).unwrap();
    let tags: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
    for tag in &tags {
        rig.push("library/crowd", tag, &img).await;
    }
    rig.faults().enable_token_auth(TokenAuth::default());
    // A slow token service, so that every request needs the token while it is being issued.
    rig.faults()
        .add_fault(token_rule(Fault::Delay(Duration::from_millis(300))));
    let url = rig.cachalot.url();
    let requests: Vec<_> = tags
        .iter()
        .map(|tag| {
            let (url, tag) = (url.clone(), tag.clone());
            tokio::spawn(async move { get_manifest(&url, "library/crowd", &tag).await.status() })
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
    let tokens = rig.faults().token_requests();
    assert_eq!(
        tokens.values().sum::<u64>(),
        1,
        "one token request for 50 requests of one scope: {tokens:?}"
    );
    assert!(rig.faults().counts().get("GET", Kind::Manifest) >= 50);
}

#[tokio::test]
async fn a_cached_tag_is_answered_within_the_revalidate_wait_while_its_head_hangs() {
    let rig = Rig::start_with(|c| {
        c.upstream.revalidate_wait = Duration::from_millis(200);
        c.registries.get_mut("docker.io").unwrap().freshness =
            vec![fresh_for("stable", Duration::from_secs(3600))];
    })
    .await;
    let old = docker_image(321, &[1024]).unwrap();
    let new = docker_image(322, &[1024]).unwrap();
    cached(&rig, "library/slow", "stable", &old).await;
    rig.push("library/slow", "stable", &new).await;
    age_tag(&rig.cachalot, "library/slow", "stable");
    rig.faults().reset_counts();
    rig.faults().add_fault(
        FaultRule::new(Fault::Delay(Duration::from_secs(3)))
            .kind(Kind::Manifest)
            .method(Method::HEAD)
            .times(1),
    );
    let url = rig.cachalot.url();
    let requests: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let m = get_manifest(&url, "library/slow", "stable").await;
                let elapsed = started.elapsed();
                (
                    m.status(),
                    header(&m, "x-cache"),
                    header(&m, "docker-content-digest"),
                    elapsed,
                )
            })
        })
        .collect();
    for r in requests {
        let (status, cache, digest, elapsed) = r.await.unwrap();
        assert_eq!((status.as_u16(), cache.as_str()), (200, "STALE"));
        assert_eq!(digest, old.manifest_digest, "the cached answer");
        assert!(
            elapsed < Duration::from_millis(1500),
            "answered after {elapsed:?}, the HEAD takes 3 s"
        );
    }
    // The HEAD finishes in the background; the moved tag gets its one GET there.
    let cachalot = &rig.cachalot;
    eventually(
        Duration::from_secs(20),
        "the moved tag to be cached",
        || async {
            cached_digest(cachalot, "library/slow", "stable").as_deref()
                == Some(new.manifest_digest.as_str())
        },
    )
    .await;
    let m = get_manifest(&url, "library/slow", "stable").await;
    assert_eq!(header(&m, "x-cache"), "HIT");
    assert_eq!(header(&m, "docker-content-digest"), new.manifest_digest);
    let counts = rig.faults().counts();
    assert_eq!(
        (
            counts.get("HEAD", Kind::Manifest),
            counts.get("GET", Kind::Manifest)
        ),
        (1, 1),
        "one shared HEAD, one GET for the new digest"
    );
}

#[tokio::test]
async fn upstream_404s_are_remembered_and_answered_with_the_same_error() {
    let rig = Rig::start_with(|c| {
        c.registries.get_mut("docker.io").unwrap().freshness = vec![FreshnessRule {
            not_found_max_age: Some(Duration::ZERO),
            ..fresh_for("volatile-*", Duration::from_secs(60))
        }];
    })
    .await;
    let url = rig.cachalot.url();
    let unknown = format!("sha256:{}", "ab".repeat(32));
    let ask = |path: String| {
        let url = url.clone();
        async move {
            let r = client()
                .get(format!("{url}{path}"))
                .header("accept", cachalot_registry::oci::media::MANIFEST_ACCEPT)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    for (path, kind, code) in [
        (
            "/v2/library/ghost/manifests/missing".to_owned(),
            Kind::Manifest,
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("/v2/library/ghost/manifests/{unknown}"),
            Kind::Manifest,
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("/v2/library/ghost/blobs/{unknown}"),
            Kind::Blob,
            "BLOB_UNKNOWN",
        ),
        (
            "/v2/library/ghost/tags/list".to_owned(),
            Kind::Tags,
            "NAME_UNKNOWN",
        ),
    ] {
        rig.faults().reset_counts();
        let first = ask(path.clone()).await;
        let second = ask(path.clone()).await;
        assert_eq!(first.0, 404, "{path}");
        assert!(first.1.contains(code), "{path}: {}", first.1);
        assert_eq!(first, second, "{path}: the same answer");
        assert_eq!(
            rig.faults().counts().kind_total(kind),
            1,
            "{path}: asked once"
        );
    }
    // A rule's notFoundMaxAge of 0s turns the memory off for its tags.
    rig.faults().reset_counts();
    for _ in 0..2 {
        assert_eq!(
            ask("/v2/library/ghost/manifests/volatile-1".into()).await.0,
            404
        );
    }
    assert_eq!(rig.faults().counts().kind_total(Kind::Manifest), 2);
    let metrics = rig.cachalot.metrics().await;
    for (kind, n) in [("tag", 1), ("digest", 2), ("tags", 1)] {
        let line = format!(
            r#"cachalot_registry_negative_cache_hits_total{{registry="docker.io",kind="{kind}"}} {n}"#
        );
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
}

#[tokio::test]
async fn remembered_404s_expire_however_often_they_are_asked_for() {
    let rig = Rig::start_with(|c| {
        let registry = c.registries.get_mut("docker.io").unwrap();
        registry.not_found_max_age = Some(Duration::from_secs(1));
        registry.digest_not_found_max_age = Some(Duration::from_secs(1));
    })
    .await;
    let url = rig.cachalot.url();
    let img = docker_image(331, &[1024]).unwrap();
    let layer = img.layers()[0].digest.clone();
    let blob = |url: String, layer: String| async move {
        client()
            .get(format!("{url}/v2/library/late/blobs/{layer}"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(get_manifest(&url, "library/late", "1").await.status(), 404);
    assert_eq!(blob(url.clone(), layer.clone()).await, 404);
    rig.push("library/late", "1", &img).await;
    rig.faults().reset_counts();
    assert_eq!(
        get_manifest(&url, "library/late", "1").await.status(),
        404,
        "still remembered"
    );
    assert_eq!(
        blob(url.clone(), layer.clone()).await,
        404,
        "still remembered"
    );
    assert_eq!(rig.faults().counts().total(), 0);
    // Asked for again and again, the answers still expire.
    eventually(
        Duration::from_secs(10),
        "the tag's 404 to expire",
        || async { get_manifest(&url, "library/late", "1").await.status() == 200 },
    )
    .await;
    eventually(Duration::from_secs(10), "the blob's 404 to expire", || {
        let (url, layer) = (url.clone(), layer.clone());
        async move { blob(url, layer).await == 200 }
    })
    .await;
}

#[tokio::test]
async fn tags_list_is_cached_single_flighted_paginated_and_served_stale() {
    let rig = Rig::start_with(|c| {
        // The list is trusted for the shortest maxAge of the rules: here one second.
        c.registries.get_mut("docker.io").unwrap().freshness =
            vec![fresh_for("nightly-*", Duration::from_secs(1))];
    })
    .await;
    let img = docker_image(341, &[1024]).unwrap();
    for tag in ["e", "a", "c", "b", "d"] {
        rig.push("library/tagged", tag, &img).await;
    }
    rig.faults().reset_counts();
    rig.faults().add_fault(
        FaultRule::new(Fault::Delay(Duration::from_millis(300)))
            .kind(Kind::Tags)
            .times(1),
    );
    let url = rig.cachalot.url();
    let list = |query: &str| {
        let target = format!("{url}/v2/tagged/tags/list{query}");
        async move { client().get(target).send().await.unwrap() }
    };
    let all: Vec<_> = (0..20).map(|_| tokio::spawn(list(""))).collect();
    for r in all {
        let r = r.await.unwrap();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            body,
            serde_json::json!({"name": "library/tagged", "tags": ["a", "b", "c", "d", "e"]})
        );
    }
    assert_eq!(
        rig.faults().counts().kind_total(Kind::Tags),
        1,
        "one shared fetch"
    );

    // Pages from the cached list, as the distribution spec has them.
    let mut query = "?n=2".to_owned();
    let mut pages = Vec::new();
    loop {
        let r = list(&query).await;
        assert_eq!(r.status(), 200);
        let link = header(&r, "link");
        let body: serde_json::Value = r.json().await.unwrap();
        pages.push(body["tags"].clone());
        if link.is_empty() {
            break;
        }
        let next = link
            .strip_prefix("</v2/tagged/tags/list")
            .and_then(|l| l.strip_suffix(">; rel=\"next\""))
            .unwrap_or_else(|| panic!("{link}"));
        query = next.to_owned();
    }
    assert_eq!(
        pages,
        [
            serde_json::json!(["a", "b"]),
            serde_json::json!(["c", "d"]),
            serde_json::json!(["e"])
        ]
    );
    assert_eq!(query, "?n=2&last=d");
    assert_eq!(
        rig.faults().counts().kind_total(Kind::Tags),
        1,
        "pages come from the cache"
    );
    let (status, code, _) = oci_error(list("?n=lots").await).await;
    assert_eq!((status, code.as_str()), (400, "PAGINATION_NUMBER_INVALID"));

    // Once the list is older than its maxAge and the upstream is down: the cached list, stale.
    rig.faults().set_down(true);
    eventually(Duration::from_secs(10), "a stale tag list", || async {
        let r = list("?n=1&last=d").await;
        if r.status() != 200 || header(&r, "x-cache") != "STALE" {
            return false;
        }
        let body: serde_json::Value = r.json().await.unwrap();
        body["tags"] == serde_json::json!(["e"])
    })
    .await;
}

#[tokio::test]
async fn bad_token_answers_are_upstream_failures_with_a_clear_message() {
    let rig = Rig::start_with(patient).await;
    rig.faults().enable_token_auth(TokenAuth::default());
    let img = docker_image(351, &[1024]).unwrap();
    cached(&rig, "library/cached", "latest", &img).await;
    rig.push("library/uncached", "latest", &img).await;
    let url = rig.cachalot.url();
    let respond = |content_type: &str, body: &str| Fault::Respond {
        status: 200,
        content_type: content_type.to_owned(),
        body: body.to_owned(),
    };
    for (fault, says) in [
        (
            respond(
                "text/html",
                "<html><body>Sign in to the proxy</body></html>",
            ),
            "HTML page",
        ),
        (
            respond("application/json", r#"{"details":"ok"}"#),
            "neither `token`",
        ),
        (
            respond("application/octet-stream", "\u{1}\u{2}garbage"),
            "not JSON",
        ),
        (
            Fault::EndlessBody {
                content_type: "application/json".to_owned(),
            },
            "larger than 64 KiB",
        ),
    ] {
        rig.faults().clear_faults();
        rig.faults().revoke_tokens();
        rig.faults().add_fault(token_rule(fault));
        let (status, code, message) =
            oci_error(get_manifest(&url, "library/uncached", "latest").await).await;
        assert_eq!(
            (status, code.as_str()),
            (502, "UPSTREAM_INVALID"),
            "{message}"
        );
        assert!(message.contains(says), "{says}: {message}");
        age_tag(&rig.cachalot, "library/cached", "latest");
        let m = get_manifest(&url, "library/cached", "latest").await;
        assert_eq!(header(&m, "x-cache"), "STALE", "{says}");
    }
}

#[tokio::test]
async fn credentials_go_to_a_token_realm_on_another_host_only_when_it_is_allowed() {
    let secrets = tempfile::tempdir().unwrap();
    let (user_file, password_file) = (
        secrets.path().join("username"),
        secrets.path().join("password"),
    );
    std::fs::write(&user_file, "puller\n").unwrap();
    std::fs::write(&password_file, "s3cret\n").unwrap();
    let with_credentials = move |token_hosts: Vec<String>| {
        let (u, p) = (user_file.clone(), password_file.clone());
        move |c: &mut Config| {
            let registry = c.registries.get_mut("docker.io").unwrap();
            registry.credentials = Some(Credentials {
                username_file: Some(u),
                password_file: Some(p),
                docker_config_file: None,
            });
            registry.token_hosts = token_hosts;
        }
    };
    let rig = Rig::start_with(with_credentials(Vec::new())).await;
    let img = docker_image(361, &[1024]).unwrap();
    rig.push("library/private", "1", &img).await;
    rig.faults().enable_token_auth(TokenAuth {
        credentials: Some(("puller".to_owned(), "s3cret".to_owned())),
        ..TokenAuth::default()
    });
    // The same token service, reached by another host name than the registry's 127.0.0.1.
    rig.faults().set_token_realm(Some(format!(
        "http://localhost:{}/token",
        rig.fault.addr().port()
    )));
    let (status, code, message) =
        oci_error(get_manifest(&rig.cachalot.url(), "library/private", "1").await).await;
    assert_eq!(
        (status, code.as_str()),
        (502, "UPSTREAM_INVALID"),
        "{message}"
    );
    assert!(
        message.contains("localhost") && message.contains("registries.docker.io.tokenHosts"),
        "{message}"
    );
    assert_eq!(
        rig.faults().counts().kind_total(Kind::Token),
        0,
        "the credentials were never sent"
    );

    let allowed = Cachalot::start(
        rig.dir.path().join("allowed"),
        &rig.fault.url(),
        with_credentials(vec!["localhost".to_owned()]),
    )
    .await;
    let m = get_manifest(&allowed.url(), "library/private", "1").await;
    assert_eq!(m.status(), 200, "{:?}", m.text().await);
    assert_eq!(rig.faults().counts().kind_total(Kind::Token), 1);

    // Without credentials there is nothing to leak: any realm will do.
    rig.faults().enable_token_auth(TokenAuth::default());
    let anonymous =
        Cachalot::start(rig.dir.path().join("anonymous"), &rig.fault.url(), |_| {}).await;
    let m = get_manifest(&anonymous.url(), "library/private", "1").await;
    assert_eq!(m.status(), 200, "{:?}", m.text().await);
}
