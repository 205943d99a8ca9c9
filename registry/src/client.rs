//! The admin client behind `cachalot-registry warm | purge | stats`: talks to a running mirror's
//! admin endpoints (`/admin/warm`, `/admin/purge`, `/stats`) and renders what they say for a
//! person. Rendering is pure ([`render_done`], [`render_summary`], [`render_stats`],
//! [`human_bytes`]); the `run_*` functions do the I/O and return the process exit status:
//! 0 done, 1 something failed (an item, the purge, the server), 2 bad input.

use std::io::{IsTerminal as _, Write as _};
use std::path::Path;
use std::time::Duration;

use futures::StreamExt as _;

use crate::api::admin::{Outcome, PurgeRequest, WarmEvent, WarmRequest};
use crate::oci::ImageRef;
use crate::proxy::purge::{PurgeReport, ReplicaOutcome};
use crate::proxy::warm::Platform;
use crate::telemetry::StatsSnapshot;

/// The admin listener's address when `--server` is not given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:5001";

/// The longest line of the warm stream accepted.
const MAX_LINE: usize = 64 * 1024;

/// Exit status: something failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit status: the command line or its input was wrong.
pub const EXIT_BAD_INPUT: u8 = 2;

/// A failed admin request.
#[derive(Debug, thiserror::Error)]
pub enum AdminRequestError {
    #[error("cannot reach {server}: {source}")]
    Connect {
        server: String,
        source: reqwest::Error,
    },
    #[error("{server} answered {status}: {message}")]
    Status {
        server: String,
        status: u16,
        message: String,
    },
    #[error("reading the answer of {server}: {message}")]
    Read { server: String, message: String },
}

/// References from a file: one a line; blank lines and `#` comments are skipped. Pure.
pub fn refs_from_text(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `1536` → `1.5 KiB`. Pure.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// One line for an item's outcome; `None` for other events. Pure.
pub fn render_done(event: &WarmEvent) -> Option<String> {
    let WarmEvent::Done {
        reference,
        outcome,
        manifests,
        blobs,
        bytes,
        fetched_bytes,
        error,
        ..
    } = event
    else {
        return None;
    };
    Some(match outcome {
        Outcome::Ok => format!(
            "ok      {reference}: {manifests} manifest(s), {blobs} blob(s), {} ({} fetched)",
            human_bytes(*bytes),
            human_bytes(*fetched_bytes)
        ),
        Outcome::Failed => format!(
            "FAILED  {reference}: {}",
            error.as_deref().unwrap_or("unknown error")
        ),
    })
}

/// The closing line of a warm. Pure.
pub fn render_summary(event: &WarmEvent) -> Option<String> {
    let WarmEvent::Summary {
        items,
        ok,
        failed,
        bytes,
        fetched_bytes,
    } = event
    else {
        return None;
    };
    Some(format!(
        "warmed {ok} of {items} image(s), {failed} failed; {} in the cache for them, {} fetched",
        human_bytes(*bytes),
        human_bytes(*fetched_bytes)
    ))
}

/// A person's summary of `/stats`. Pure.
pub fn render_stats(server: &str, s: &StatsSnapshot) -> String {
    let mut out = format!("cachalot-registry at {server}\n");
    let ratio = s
        .hit_ratio()
        .map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0));
    out.push_str(&format!(
        "  requests   {} hits, {} misses, {} stale, {} errors (hit ratio {ratio})\n",
        s.hits, s.misses, s.stale, s.errors
    ));
    out.push_str(&format!(
        "  bytes      {} served, {} from upstreams\n",
        human_bytes(s.served_bytes),
        human_bytes(s.upstream_bytes)
    ));
    out.push_str(&format!(
        "  cache      {} ({} pinned), {} evictions\n",
        human_bytes(s.cache_size_bytes),
        human_bytes(s.pinned_bytes),
        s.evictions
    ));
    for (name, r) in &s.registries {
        out.push_str(&format!(
            "  {name}: {} hits, {} misses, {} stale, {} errors",
            r.hits, r.misses, r.stale, r.errors
        ));
        match &r.budget {
            Some(b) if b.expired => out.push_str("; budget unknown (last figure expired)"),
            Some(b) => {
                out.push_str(&format!("; budget {} left", b.remaining));
                if let Some(limit) = b.limit {
                    out.push_str(&format!(" of {limit}"));
                }
                if let Some(source) = &b.source {
                    out.push_str(&format!(" (source {source})"));
                }
            }
            None => out.push_str("; budget not reported"),
        }
        if r.circuit_open {
            out.push_str("; circuit OPEN");
        }
        if let Some(limited) = &r.rate_limited {
            out.push_str(&format!("; rate-limited until {}", limited.until));
        }
        out.push('\n');
    }
    if let Some(log) = &s.purge_log {
        out.push_str(&format!(
            "  purge log  {}:{} ({} kept for spokes)\n",
            log.epoch, log.seq, log.entries
        ));
    }
    if let Some(p) = &s.parent_purges {
        out.push_str(&format!(
            "  parent     purges applied up to {}:{} ({} applied, {} gap(s), {} failed round(s))",
            p.epoch.as_deref().unwrap_or("-"),
            p.applied_seq,
            p.applied,
            p.resets,
            p.failures
        ));
        if let Some(e) = &p.last_error {
            out.push_str(&format!("; last error: {e}"));
        }
        out.push('\n');
    }
    out
}

fn http_client(timeout: Option<Duration>) -> Result<reqwest::Client, AdminRequestError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
    if let Some(t) = timeout {
        builder = builder.timeout(t);
    }
    builder
        .build()
        .map_err(|source| AdminRequestError::Connect {
            server: String::new(),
            source,
        })
}

fn url(server: &str, path: &str) -> String {
    format!("{}{path}", server.trim_end_matches('/'))
}

/// The error of a non-2xx answer: the OCI envelope's message, else the body's start.
async fn status_error(server: &str, response: reqwest::Response) -> AdminRequestError {
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(200).collect());
    AdminRequestError::Status {
        server: server.to_owned(),
        status,
        message,
    }
}

async fn send(
    server: &str,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, AdminRequestError> {
    let response = request
        .send()
        .await
        .map_err(|source| AdminRequestError::Connect {
            server: server.to_owned(),
            source,
        })?;
    if !response.status().is_success() {
        return Err(status_error(server, response).await);
    }
    Ok(response)
}

fn json_post(
    client: &reqwest::Client,
    server: &str,
    path: &str,
    body: &impl serde::Serialize,
) -> reqwest::RequestBuilder {
    // Plain structs of strings always serialise.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    client
        .post(url(server, path))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(bytes)
}

async fn read_json<T: serde::de::DeserializeOwned>(
    server: &str,
    response: reqwest::Response,
) -> Result<T, AdminRequestError> {
    let read_error = |message: String| AdminRequestError::Read {
        server: server.to_owned(),
        message,
    };
    let bytes = response
        .bytes()
        .await
        .map_err(|e| read_error(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| read_error(e.to_string()))
}

/// What a warm stream ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmResult {
    pub failed: usize,
    pub summary: Option<WarmEvent>,
}

/// Sends a warm and follows its stream: `on_event` sees every event as it arrives.
pub async fn warm(
    server: &str,
    request: &WarmRequest,
    mut on_event: impl FnMut(&WarmEvent),
) -> Result<WarmResult, AdminRequestError> {
    let client = http_client(None)?;
    let response = send(server, json_post(&client, server, "/admin/warm", request)).await?;
    let read_error = |message: String| AdminRequestError::Read {
        server: server.to_owned(),
        message,
    };
    let mut stream = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let mut result = WarmResult {
        failed: 0,
        summary: None,
    };
    loop {
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let event: WarmEvent = serde_json::from_slice(&line)
                .map_err(|e| read_error(format!("unreadable progress line: {e}")))?;
            if matches!(
                event,
                WarmEvent::Done {
                    outcome: Outcome::Failed,
                    ..
                }
            ) {
                result.failed += 1;
            }
            on_event(&event);
            if matches!(event, WarmEvent::Summary { .. }) {
                result.summary = Some(event);
            }
        }
        if buffer.len() > MAX_LINE {
            return Err(read_error("a progress line is too long".into()));
        }
        match stream.next().await {
            Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
            Some(Err(e)) => return Err(read_error(e.to_string())),
            None => break,
        }
    }
    if result.summary.is_none() {
        return Err(read_error(
            "the stream ended before its summary (the server stopped?)".into(),
        ));
    }
    Ok(result)
}

/// Purges one reference.
pub async fn purge(server: &str, reference: &str) -> Result<PurgeReport, AdminRequestError> {
    let client = http_client(Some(Duration::from_secs(300)))?;
    let body = PurgeRequest {
        reference: reference.to_owned(),
    };
    let response = send(server, json_post(&client, server, "/admin/purge", &body)).await?;
    read_json(server, response).await
}

/// The mirror's `/stats`.
pub async fn stats(server: &str) -> Result<StatsSnapshot, AdminRequestError> {
    let client = http_client(Some(Duration::from_secs(30)))?;
    let response = send(server, client.get(url(server, "/stats"))).await?;
    read_json(server, response).await
}

fn fail(message: impl std::fmt::Display, status: u8) -> u8 {
    eprintln!("cachalot-registry: {message}");
    status
}

/// `warm`: checks the references (and reads `file`), then warms them, with a progress bar when
/// stderr is a terminal and one line per item otherwise. Returns the exit status.
pub async fn run_warm(
    server: &str,
    mut refs: Vec<String>,
    file: Option<&Path>,
    platform: Option<String>,
) -> u8 {
    if let Some(file) = file {
        match std::fs::read_to_string(file) {
            Ok(text) => refs.extend(refs_from_text(&text)),
            Err(e) => {
                return fail(
                    format!("cannot read {}: {e}", file.display()),
                    EXIT_BAD_INPUT,
                )
            }
        }
    }
    if refs.is_empty() {
        return fail(
            "name at least one image (REF... or --file FILE)",
            EXIT_BAD_INPUT,
        );
    }
    for r in &refs {
        if let Err(e) = r.parse::<ImageRef>() {
            return fail(e, EXIT_BAD_INPUT);
        }
    }
    if let Some(p) = &platform {
        if let Err(e) = p.parse::<Platform>() {
            return fail(e, EXIT_BAD_INPUT);
        }
    }
    let request = WarmRequest {
        refs: refs.clone(),
        platform,
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(refs.len() as u64);
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} [{bar:30}] {pos}/{len} images  {msg}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut done_bytes = 0u64;
    let mut stdout = std::io::stdout();
    let result = warm(server, &request, |event| {
        if let Some(text) = render_done(event) {
            if let WarmEvent::Done { bytes, .. } = event {
                done_bytes += bytes;
            }
            match &bar {
                Some(bar) => {
                    bar.println(text);
                    bar.inc(1);
                }
                None => {
                    let _ = writeln!(stdout, "{text}");
                }
            }
        }
        if let Some(bar) = &bar {
            match event {
                WarmEvent::Start { reference, .. } => {
                    bar.set_message(format!("{} {reference}", human_bytes(done_bytes)));
                }
                WarmEvent::Bytes { bytes, .. } => {
                    bar.set_message(human_bytes(done_bytes + bytes));
                }
                _ => {}
            }
        }
    })
    .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(result) => {
            if let Some(text) = result.summary.as_ref().and_then(render_summary) {
                let _ = writeln!(stdout, "{text}");
            }
            if result.failed > 0 {
                EXIT_FAILED
            } else {
                0
            }
        }
        Err(e) => fail(e, EXIT_FAILED),
    }
}

/// `purge`: returns the exit status.
pub async fn run_purge(server: &str, reference: &str) -> u8 {
    if let Err(e) = reference.parse::<ImageRef>() {
        return fail(e, EXIT_BAD_INPUT);
    }
    match purge(server, reference).await {
        Ok(report) => {
            print!("{}", render_purge(&report));
            if report.incomplete() {
                fail(
                    "the purge did not reach every replica (see above)",
                    EXIT_FAILED,
                )
            } else {
                0
            }
        }
        Err(e) => fail(e, EXIT_FAILED),
    }
}

/// A purge's answer for a person: one line, then one per replica when there are several.
/// Pure.
pub fn render_purge(report: &PurgeReport) -> String {
    let mut out = format!(
        "purged {}: {} tag(s), {} manifest(s), {} blob(s) ({} kept: still used), {} freed\n",
        report.reference,
        report.tags.len(),
        report.manifests.len(),
        report.blobs,
        report.blobs_kept,
        human_bytes(report.bytes_freed)
    );
    for r in &report.replicas {
        let line = match r.outcome {
            ReplicaOutcome::Purged => format!(
                "purged ({} blob(s), {} freed)",
                r.blobs,
                human_bytes(r.bytes_freed)
            ),
            ReplicaOutcome::NotCached => "not cached".to_owned(),
            ReplicaOutcome::Failed => format!("FAILED: {}", r.message),
            ReplicaOutcome::Unreachable => format!("UNREACHABLE: {}", r.message),
        };
        out.push_str(&format!("  replica {}: {line}\n", r.replica));
    }
    if let Some(position) = &report.purge_log_position {
        out.push_str(&format!(
            "  spokes: drop it on their next request to this mirror (purge log {position})\n"
        ));
    }
    out
}

/// `stats`: returns the exit status.
pub async fn run_stats(server: &str) -> u8 {
    match stats(server).await {
        Ok(s) => {
            print!("{}", render_stats(server, &s));
            0
        }
        Err(e) => fail(e, EXIT_FAILED),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::telemetry::{Budget, RegistryStats};

    #[test]
    fn a_refs_file_skips_blank_lines_and_comments() {
        let text = "nginx:stable\n\n  # the base images\nredis:7  # cache\n";
        assert_eq!(refs_from_text(text), vec!["nginx:stable", "redis:7"]);
    }

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(200 * 1024 * 1024), "200.0 MiB");
    }

    #[test]
    fn outcomes_and_summary_read_as_one_line_each() {
        let ok = WarmEvent::Done {
            item: 0,
            reference: "docker.io/library/a:1".into(),
            outcome: Outcome::Ok,
            manifests: 3,
            blobs: 4,
            bytes: 2048,
            fetched_bytes: 1024,
            error: None,
        };
        assert_eq!(
            render_done(&ok).unwrap(),
            "ok      docker.io/library/a:1: 3 manifest(s), 4 blob(s), 2.0 KiB (1.0 KiB fetched)"
        );
        let failed = WarmEvent::Done {
            item: 0,
            reference: "docker.io/library/a:1".into(),
            outcome: Outcome::Failed,
            manifests: 0,
            blobs: 0,
            bytes: 0,
            fetched_bytes: 0,
            error: Some("no such tag".into()),
        };
        assert_eq!(
            render_done(&failed).unwrap(),
            "FAILED  docker.io/library/a:1: no such tag"
        );
        let summary = WarmEvent::Summary {
            items: 2,
            ok: 1,
            failed: 1,
            bytes: 2048,
            fetched_bytes: 0,
        };
        assert_eq!(
            render_summary(&summary).unwrap(),
            "warmed 1 of 2 image(s), 1 failed; 2.0 KiB in the cache for them, 0 B fetched"
        );
        assert!(render_done(&summary).is_none());
    }

    #[test]
    fn a_purge_over_replicas_lists_each_and_names_the_unreachable() {
        use crate::proxy::purge::ReplicaPurge;
        let replica = |url: &str, outcome, message: &str| ReplicaPurge {
            replica: url.into(),
            outcome,
            blobs: 2,
            bytes_freed: 2048,
            message: message.into(),
        };
        let report = PurgeReport {
            reference: "docker.io/library/a:1".into(),
            tags: vec!["library/a:1".into()],
            replicas: vec![
                replica("http://a:5000", ReplicaOutcome::Purged, ""),
                replica("http://b:5000", ReplicaOutcome::NotCached, ""),
                replica(
                    "http://c:5000",
                    ReplicaOutcome::Unreachable,
                    "connection refused",
                ),
            ],
            ..PurgeReport::default()
        };
        assert_eq!(
            render_purge(&report),
            "purged docker.io/library/a:1: 1 tag(s), 0 manifest(s), 0 blob(s) (0 kept: still used), 0 B freed\n\
             \x20 replica http://a:5000: purged (2 blob(s), 2.0 KiB freed)\n\
             \x20 replica http://b:5000: not cached\n\
             \x20 replica http://c:5000: UNREACHABLE: connection refused\n"
        );
        assert!(report.incomplete());
    }

    #[test]
    fn the_stats_summary_shows_the_purge_log_and_how_far_a_spoke_applied_its_parents() {
        let s = StatsSnapshot {
            purge_log: Some(crate::purge_log::PurgeLogStats {
                epoch: "00000000000000aa".into(),
                seq: 7,
                entries: 3,
            }),
            parent_purges: Some(crate::purge_sync::ParentPurgeStats {
                epoch: Some("00000000000000bb".into()),
                applied_seq: 12,
                applied: 4,
                resets: 1,
                failures: 2,
                last_error: Some("cannot reach".into()),
                ..Default::default()
            }),
            ..StatsSnapshot::default()
        };
        let text = render_stats("http://m:5001", &s);
        assert!(
            text.contains("  purge log  00000000000000aa:7 (3 kept for spokes)\n"),
            "{text}"
        );
        assert!(
            text.contains("  parent     purges applied up to 00000000000000bb:12 (4 applied, 1 gap(s), 2 failed round(s)); last error: cannot reach\n"),
            "{text}"
        );
    }

    #[test]
    fn the_stats_summary_names_ratio_cache_and_each_registry_budget() {
        let mut s = StatsSnapshot {
            hits: 3,
            misses: 1,
            cache_size_bytes: 3 * 1024 * 1024,
            ..StatsSnapshot::default()
        };
        s.registries.insert(
            "docker.io".into(),
            RegistryStats {
                hits: 3,
                misses: 1,
                budget: Some(Budget {
                    limit: Some(100),
                    remaining: 76,
                    source: Some("192.0.2.1".into()),
                    ..Budget::default()
                }),
                ..RegistryStats::default()
            },
        );
        let text = render_stats("http://127.0.0.1:5001", &s);
        assert!(text.contains("hit ratio 75.0%"), "{text}");
        assert!(text.contains("cache      3.0 MiB"), "{text}");
        assert!(
            text.contains("docker.io: 3 hits, 1 misses, 0 stale, 0 errors; budget 76 left of 100 (source 192.0.2.1)"),
            "{text}"
        );
    }
}
