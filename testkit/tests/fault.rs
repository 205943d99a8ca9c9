//! Every FaultProxy mode, observed through a plain HTTP client in front of the real distribution.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use cachalot_testkit::client::http_client;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{
    too_many_requests_body, Fault, FaultProxy, FaultRule, Kind, RateLimit, TokenAuth,
};
use cachalot_testkit::image::{self, docker_image, fetch_blob, TestImage, MANIFEST_ACCEPT};
use http::Method;

const REPO: &str = "library/faulty";

struct Setup {
    _upstream: Distribution,
    proxy: FaultProxy,
    image: TestImage,
    client: reqwest::Client,
}

async fn setup() -> Setup {
    let upstream = Distribution::start().await.unwrap();
    let image = docker_image(77, &[300_000]).unwrap();
    image::push(&upstream.url(), REPO, "v1", &image)
        .await
        .unwrap();
    let proxy = FaultProxy::start(&upstream.url()).await.unwrap();
    Setup {
        _upstream: upstream,
        proxy,
        image,
        client: http_client().unwrap(),
    }
}

impl Setup {
    fn manifest_url(&self) -> String {
        format!("{}/v2/{REPO}/manifests/v1", self.proxy.url())
    }
    fn layer_url(&self) -> String {
        format!(
            "{}/v2/{REPO}/blobs/{}",
            self.proxy.url(),
            self.image.layers()[0].digest
        )
    }
    async fn get_manifest(&self) -> reqwest::Response {
        self.client
            .get(self.manifest_url())
            .header("accept", MANIFEST_ACCEPT)
            .send()
            .await
            .unwrap()
    }
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn manifest_gets_are_counted_and_answered_429_after_the_limit_while_heads_stay_free() {
    let s = setup().await;
    s.proxy.set_rate_limit(Some(RateLimit {
        limit: 2,
        retry_after_secs: 30,
    }));
    let head = s
        .client
        .head(s.manifest_url())
        .header("accept", MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "ratelimit-limit"), "2;w=21600");
    assert_eq!(header(&head, "ratelimit-remaining"), "2;w=21600");
    assert_eq!(header(&head, "docker-ratelimit-source"), "127.0.0.1");
    for remaining in [1, 0] {
        let ok = s.get_manifest().await;
        assert_eq!(ok.status(), 200);
        assert_eq!(
            header(&ok, "ratelimit-remaining"),
            format!("{remaining};w=21600")
        );
        assert_eq!(ok.bytes().await.unwrap(), s.image.manifest_bytes);
    }
    let limited = s.get_manifest().await;
    assert_eq!(limited.status(), 429);
    assert_eq!(header(&limited, "retry-after"), "30");
    assert_eq!(header(&limited, "ratelimit-remaining"), "0;w=21600");
    let body: serde_json::Value = serde_json::from_slice(&limited.bytes().await.unwrap()).unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
    assert_eq!(
        body,
        serde_json::from_str::<serde_json::Value>(&too_many_requests_body()).unwrap()
    );
    // HEAD and blobs are not counted against the pull limit.
    let head = s.client.head(s.manifest_url()).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        s.client.get(s.layer_url()).send().await.unwrap().status(),
        200
    );

    let counts = s.proxy.counts();
    assert_eq!(counts.counted_manifest_gets(), 3);
    assert_eq!(counts.with_status("GET", Kind::Manifest, 429), 1);
    assert_eq!(counts.get("HEAD", Kind::Manifest), 2);
    assert_eq!(counts.get("GET", Kind::Blob), 1);
    assert_eq!(s.proxy.rate_limit_remaining(), Some(0));
}

#[tokio::test]
async fn the_abuse_limit_answers_a_bare_429_to_every_request() {
    let s = setup().await;
    s.proxy.set_abuse_limit(true);
    for url in [
        format!("{}/v2/", s.proxy.url()),
        s.manifest_url(),
        s.layer_url(),
    ] {
        let response = s.client.head(&url).send().await.unwrap();
        assert_eq!(response.status(), 429, "{url}");
        let response = s.client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 429, "{url}");
        assert!(response.bytes().await.unwrap().is_empty());
    }
    s.proxy.set_abuse_limit(false);
    assert_eq!(s.get_manifest().await.status(), 200);
}

#[tokio::test]
async fn a_truncated_blob_keeps_the_upstream_content_length_and_closes_early() {
    let s = setup().await;
    s.proxy
        .add_fault(FaultRule::new(Fault::Truncate { after: 1000 }).kind(Kind::Blob));
    let response = s.client.get(s.layer_url()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.content_length(),
        Some(s.image.layers()[0].size),
        "Content-Length must be the full size"
    );
    let mut received = 0_u64;
    let mut failed = false;
    let mut response = response;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received += chunk.len() as u64,
            Ok(None) => break,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must end with an error, not a clean EOF");
    assert_eq!(received, 1000);
    assert_eq!(s.proxy.body_bytes().get(&Kind::Blob), Some(&1000));
    // Manifests are untouched by a blob-only fault.
    assert_eq!(
        s.get_manifest().await.bytes().await.unwrap(),
        s.image.manifest_bytes
    );
}

#[tokio::test]
async fn a_corrupted_blob_has_its_length_but_not_its_digest_until_the_fault_is_removed() {
    let s = setup().await;
    let layer = &s.image.layers()[0];
    let id = s
        .proxy
        .add_fault(FaultRule::new(Fault::Corrupt { at: 12_345 }).kind(Kind::Blob));
    let corrupted = fetch_blob(&s.client, &s.proxy.url(), REPO, &layer.digest)
        .await
        .unwrap();
    assert_eq!(corrupted.status, 200);
    assert_eq!(corrupted.size, layer.size);
    assert_ne!(corrupted.digest, layer.digest);
    s.proxy.remove_fault(id);
    let clean = fetch_blob(&s.client, &s.proxy.url(), REPO, &layer.digest)
        .await
        .unwrap();
    assert_eq!(clean.digest, layer.digest);
}

#[tokio::test]
async fn an_injected_status_applies_only_to_the_next_n_matching_requests() {
    let s = setup().await;
    s.proxy.add_fault(
        FaultRule::new(Fault::Status(503))
            .kind(Kind::Manifest)
            .method(Method::GET)
            .times(2),
    );
    assert_eq!(s.get_manifest().await.status(), 503);
    assert_eq!(
        s.client
            .head(s.manifest_url())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(s.get_manifest().await.status(), 503);
    assert_eq!(s.get_manifest().await.status(), 200);
    assert_eq!(s.proxy.counts().with_status("GET", Kind::Manifest, 503), 2);
}

#[tokio::test]
async fn a_reset_drops_the_connection_without_a_response() {
    let s = setup().await;
    s.proxy
        .add_fault(FaultRule::new(Fault::Reset).kind(Kind::Blob));
    let result = s.client.get(s.layer_url()).send().await;
    assert!(
        result.is_err(),
        "expected a transport error, got {result:?}"
    );
    let counts = s.proxy.counts();
    assert_eq!(
        counts.entries.get(&("GET".to_owned(), Kind::Blob, None)),
        Some(&1)
    );
    s.proxy.clear_faults();
    assert_eq!(
        s.client.get(s.layer_url()).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn a_delay_holds_the_response_back_at_least_that_long() {
    let s = setup().await;
    s.proxy
        .add_fault(FaultRule::new(Fault::Delay(Duration::from_millis(300))).kind(Kind::Manifest));
    let started = Instant::now();
    assert_eq!(s.get_manifest().await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(
        s.client.get(s.layer_url()).send().await.unwrap().status(),
        200
    );
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn down_mode_aborts_every_request_until_switched_off() {
    let s = setup().await;
    s.proxy.set_down(true);
    assert!(s
        .client
        .get(format!("{}/v2/", s.proxy.url()))
        .send()
        .await
        .is_err());
    assert!(s.client.get(s.manifest_url()).send().await.is_err());
    s.proxy.set_down(false);
    assert_eq!(s.get_manifest().await.status(), 200);
}

#[tokio::test]
async fn the_ns_query_values_a_client_sent_are_recorded() {
    let s = setup().await;
    let url = format!("{}?ns=docker.io", s.manifest_url());
    assert_eq!(
        s.client
            .get(&url)
            .header("accept", MANIFEST_ACCEPT)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        s.client
            .get(format!("{}?ns=quay.io", s.layer_url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ns = s.proxy.ns_seen();
    assert_eq!(ns.get("docker.io"), Some(&1));
    assert_eq!(ns.get("quay.io"), Some(&1));
    assert_eq!(s.proxy.requests()[0].query.as_deref(), Some("ns=docker.io"));
}

async fn fetch_token(s: &Setup, scope: &str, basic: Option<(&str, &str)>) -> reqwest::Response {
    let mut request = s.client.get(format!(
        "{}/token?service=test-registry&scope={}",
        s.proxy.url(),
        scope.replace(':', "%3A").replace('/', "%2F")
    ));
    if let Some((user, password)) = basic {
        request = request.basic_auth(user, Some(password));
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn token_auth_challenges_issues_scoped_tokens_and_counts_token_requests() {
    let s = setup().await;
    s.proxy.enable_token_auth(TokenAuth::default());
    let denied = s.get_manifest().await;
    assert_eq!(denied.status(), 401);
    assert_eq!(
        header(&denied, "www-authenticate"),
        format!(
            "Bearer realm=\"{}/token\",service=\"test-registry\",scope=\"repository:{REPO}:pull\"",
            s.proxy.url()
        )
    );
    let scope = format!("repository:{REPO}:pull");
    let token_response = fetch_token(&s, &scope, None).await;
    assert_eq!(token_response.status(), 200);
    let token: serde_json::Value =
        serde_json::from_slice(&token_response.bytes().await.unwrap()).unwrap();
    assert_eq!(token["expires_in"], 300);
    assert!(token["issued_at"].as_str().unwrap().ends_with('Z'));
    let token = token["token"].as_str().unwrap().to_owned();

    let allowed = s
        .client
        .get(s.manifest_url())
        .header("accept", MANIFEST_ACCEPT)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    // The token does not open another repository.
    let other = s
        .client
        .get(format!("{}/v2/library/other/manifests/v1", s.proxy.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 401);
    s.proxy.revoke_tokens();
    let revoked = s
        .client
        .get(s.manifest_url())
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 401);
    assert_eq!(s.proxy.token_requests().get(&scope), Some(&1));
}

#[tokio::test]
async fn the_token_endpoint_requires_the_configured_basic_credentials() {
    let s = setup().await;
    s.proxy.enable_token_auth(TokenAuth {
        credentials: Some(("alice".to_owned(), "s3cret".to_owned())),
        ..TokenAuth::default()
    });
    let scope = format!("repository:{REPO}:pull");
    assert_eq!(fetch_token(&s, &scope, None).await.status(), 401);
    assert_eq!(
        fetch_token(&s, &scope, Some(("alice", "wrong")))
            .await
            .status(),
        401
    );
    let ok = fetch_token(&s, &scope, Some(("alice", "s3cret"))).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(s.proxy.token_requests().get(&scope), Some(&3));
}

#[tokio::test]
async fn token_faults_apply_to_the_token_endpoint_and_the_realm_can_name_another_host() {
    let s = setup().await;
    s.proxy.enable_token_auth(TokenAuth::default());
    let scope = format!("repository:{REPO}:pull");
    // A kind-less rule keeps applying to registry requests only.
    s.proxy
        .add_fault(FaultRule::new(Fault::Status(500)).kind(Kind::Base).times(1));
    s.proxy.add_fault(
        FaultRule::new(Fault::Status(503))
            .kind(Kind::Token)
            .times(1),
    );
    s.proxy.add_fault(
        FaultRule::new(Fault::Respond {
            status: 200,
            content_type: "text/html".to_owned(),
            body: "<html>sign in</html>".to_owned(),
        })
        .kind(Kind::Token)
        .times(1),
    );
    s.proxy.add_fault(
        FaultRule::new(Fault::EndlessBody {
            content_type: "application/json".to_owned(),
        })
        .kind(Kind::Token)
        .times(1),
    );
    assert_eq!(fetch_token(&s, &scope, None).await.status(), 503);
    let html = fetch_token(&s, &scope, None).await;
    assert_eq!(header(&html, "content-type"), "text/html");
    assert_eq!(html.text().await.unwrap(), "<html>sign in</html>");
    let mut endless = fetch_token(&s, &scope, None).await;
    assert_eq!(endless.status(), 200);
    assert!(endless.headers().get("content-length").is_none());
    let mut read = 0;
    while read < 1024 * 1024 {
        read += endless.chunk().await.unwrap().unwrap().len();
    }
    drop(endless);
    // The faults are used up: tokens are issued again, and every request was counted.
    assert_eq!(fetch_token(&s, &scope, None).await.status(), 200);
    assert_eq!(s.proxy.token_requests().get(&scope), Some(&4));

    let realm = format!("http://localhost:{}/token", s.proxy.addr().port());
    s.proxy.set_token_realm(Some(realm.clone()));
    let denied = s.get_manifest().await;
    assert!(
        header(&denied, "www-authenticate").starts_with(&format!("Bearer realm=\"{realm}\"")),
        "{:?}",
        denied.headers()
    );
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let s = setup().await;
    s.proxy.enable_token_auth(TokenAuth {
        expires_in_secs: 0,
        ..TokenAuth::default()
    });
    let response = fetch_token(&s, &format!("repository:{REPO}:pull"), None).await;
    let token: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    let response = s
        .client
        .get(s.manifest_url())
        .bearer_auth(token["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn a_big_blob_streams_through_the_proxy_intact() {
    let upstream = Distribution::start().await.unwrap();
    let big = image::big_image(78, 110 * 1024 * 1024).await.unwrap();
    image::push(&upstream.url(), "library/big", "1", &big)
        .await
        .unwrap();
    let proxy = FaultProxy::start(&upstream.url()).await.unwrap();
    let layer = &big.layers()[0];
    let fetched = fetch_blob(
        &http_client().unwrap(),
        &proxy.url(),
        "library/big",
        &layer.digest,
    )
    .await
    .unwrap();
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.size, layer.size);
    assert_eq!(fetched.digest, layer.digest);
    assert_eq!(proxy.body_bytes().get(&Kind::Blob), Some(&layer.size));
}

#[tokio::test]
async fn the_pull_limit_is_exact_under_concurrent_clients() {
    let s = setup().await;
    s.proxy.set_rate_limit(Some(RateLimit {
        limit: 100,
        retry_after_secs: 5,
    }));
    let mut pulls = tokio::task::JoinSet::new();
    for _ in 0..108 {
        let client = s.client.clone();
        let url = s.manifest_url();
        pulls.spawn(async move {
            client
                .get(url)
                .header("accept", MANIFEST_ACCEPT)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
    }
    let mut statuses = Vec::new();
    while let Some(status) = pulls.join_next().await {
        statuses.push(status.unwrap());
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 100);
    assert_eq!(statuses.iter().filter(|&&s| s == 429).count(), 8);
    assert_eq!(s.proxy.counts().counted_manifest_gets(), 108);
    assert_eq!(s.proxy.rate_limit_remaining(), Some(0));
}
