//! Freshness policy: how long a cached tag is trusted before it is revalidated upstream, by tag
//! (and optionally repository) glob. First matching rule wins; the built-in defaults come last:
//! `latest` 1 minute, version-like tags (`1.25`, `v2.3.1`, `3.19-alpine`) 5 minutes, any other
//! tag 1 minute. Digest references are immutable by nature and never consult this policy.
//!
//! The same rules say how long a 404 for a tag is remembered (a rule's `notFoundMaxAge`, else the
//! registry's), and how long a repository's `tags/list` is trusted: the shortest `maxAge` of the
//! rules that can apply to the repository, so a new or moved tag shows in the list no later than
//! it would be seen by a pull.

use std::time::Duration;

use globset::{Glob, GlobMatcher};

use crate::config::FreshnessRule;

/// What the policy says about one tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Trust a cached answer for this long after it was last confirmed upstream.
    MaxAge(Duration),
    /// Never revalidate once cached.
    Immutable,
}

impl Freshness {
    /// Whether an answer confirmed at `checked_at` (unix seconds) is still fresh at `now`.
    pub fn is_fresh(self, checked_at: u64, now: u64) -> bool {
        match self {
            Freshness::Immutable => true,
            Freshness::MaxAge(age) => now.saturating_sub(checked_at) < age.as_secs().max(1),
        }
    }
}

#[derive(Debug)]
struct Rule {
    tag: GlobMatcher,
    repository: Option<GlobMatcher>,
    freshness: Freshness,
    not_found: Option<Duration>,
}

/// A compiled list of rules.
#[derive(Debug)]
pub struct FreshnessPolicy {
    rules: Vec<Rule>,
}

const DEFAULTS: [(&str, u64); 4] = [("latest", 60), ("[0-9]*", 300), ("v[0-9]*", 300), ("*", 60)];

impl FreshnessPolicy {
    /// Compiles the configured rules followed by the defaults. The config was validated, so a glob
    /// error here means a bug; it is still reported rather than panicking.
    pub fn new(configured: &[FreshnessRule]) -> Result<FreshnessPolicy, globset::Error> {
        let mut rules = Vec::with_capacity(configured.len() + DEFAULTS.len());
        for r in configured {
            rules.push(Rule {
                tag: Glob::new(&r.pattern)?.compile_matcher(),
                repository: r
                    .repository
                    .as_deref()
                    .map(|g| Glob::new(g).map(|g| g.compile_matcher()))
                    .transpose()?,
                freshness: match (r.immutable, r.max_age) {
                    (true, _) => Freshness::Immutable,
                    (false, Some(age)) => Freshness::MaxAge(age),
                    (false, None) => Freshness::MaxAge(Duration::from_secs(60)),
                },
                not_found: r.not_found_max_age,
            });
        }
        for (pattern, secs) in DEFAULTS {
            rules.push(Rule {
                tag: Glob::new(pattern)?.compile_matcher(),
                repository: None,
                freshness: Freshness::MaxAge(Duration::from_secs(secs)),
                not_found: None,
            });
        }
        Ok(FreshnessPolicy { rules })
    }

    fn rule_for(&self, repository: &str, tag: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            r.tag.is_match(tag) && r.repository.as_ref().is_none_or(|m| m.is_match(repository))
        })
    }

    /// The freshness of `repository:tag`.
    pub fn lookup(&self, repository: &str, tag: &str) -> Freshness {
        self.rule_for(repository, tag)
            .map(|r| r.freshness)
            .unwrap_or(Freshness::MaxAge(Duration::from_secs(60)))
    }

    /// How long a 404 for `repository:tag` is remembered, when the first matching rule says.
    pub fn not_found_for(&self, repository: &str, tag: &str) -> Option<Duration> {
        self.rule_for(repository, tag).and_then(|r| r.not_found)
    }

    /// How long the repository's `tags/list` is trusted: the shortest `maxAge` among the rules
    /// that can apply to it (immutable rules never revalidate, so they do not count).
    pub fn tags_list_max_age(&self, repository: &str) -> Duration {
        self.rules
            .iter()
            .filter(|r| r.repository.as_ref().is_none_or(|m| m.is_match(repository)))
            .filter_map(|r| match r.freshness {
                Freshness::MaxAge(age) => Some(age),
                Freshness::Immutable => None,
            })
            .min()
            .unwrap_or(Duration::from_secs(60))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_trust_version_tags_longer_than_moving_tags() {
        let p = FreshnessPolicy::new(&[]).unwrap();
        let minute = Freshness::MaxAge(Duration::from_secs(60));
        let five = Freshness::MaxAge(Duration::from_secs(300));
        assert_eq!(p.lookup("library/nginx", "latest"), minute);
        assert_eq!(p.lookup("library/nginx", "stable"), minute);
        assert_eq!(p.lookup("library/nginx", "1.25-alpine"), five);
        assert_eq!(p.lookup("library/nginx", "v2.3.1"), five);
    }

    #[test]
    fn configured_rules_come_first_and_can_be_scoped_to_repositories() {
        let rules = vec![
            FreshnessRule {
                pattern: "v*".into(),
                repository: Some("myorg/*".into()),
                max_age: None,
                immutable: true,
                not_found_max_age: None,
            },
            FreshnessRule {
                pattern: "stable".into(),
                repository: None,
                max_age: Some(Duration::from_secs(10)),
                immutable: false,
                not_found_max_age: None,
            },
        ];
        let p = FreshnessPolicy::new(&rules).unwrap();
        assert_eq!(p.lookup("myorg/app", "v1"), Freshness::Immutable);
        assert_ne!(p.lookup("other/app", "v1"), Freshness::Immutable);
        assert_eq!(
            p.lookup("x", "stable"),
            Freshness::MaxAge(Duration::from_secs(10))
        );
    }

    #[test]
    fn not_found_ages_and_the_tags_list_age_follow_the_rules() {
        let rules = vec![
            FreshnessRule {
                pattern: "nightly".into(),
                repository: Some("myorg/*".into()),
                max_age: Some(Duration::from_secs(10)),
                immutable: false,
                not_found_max_age: Some(Duration::ZERO),
            },
            FreshnessRule {
                pattern: "v*".into(),
                repository: None,
                max_age: None,
                immutable: true,
                not_found_max_age: Some(Duration::from_secs(300)),
            },
        ];
        let p = FreshnessPolicy::new(&rules).unwrap();
        assert_eq!(
            p.not_found_for("myorg/app", "nightly"),
            Some(Duration::ZERO)
        );
        assert_eq!(
            p.not_found_for("myorg/app", "v1"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(p.not_found_for("myorg/app", "latest"), None);
        assert_eq!(p.tags_list_max_age("myorg/app"), Duration::from_secs(10));
        assert_eq!(p.tags_list_max_age("other/app"), Duration::from_secs(60));
    }

    #[test]
    fn freshness_expires_after_max_age_but_immutable_never_does() {
        let f = Freshness::MaxAge(Duration::from_secs(60));
        assert!(f.is_fresh(1000, 1059));
        assert!(!f.is_fresh(1000, 1060));
        assert!(Freshness::Immutable.is_fresh(0, u64::MAX));
    }
}
