//! Apply decision: whether an owned object must be written, decided from the desired object and
//! the live one in the operator's cache, so that a pass over an unchanged world writes nothing.
//!
//! An object is applied when it is `missing` from the cache, when the live object's
//! [`APPLIED_HASH_ANNOTATION`] differs from the hash of the desired body (`changed`: the spec or
//! the operator changed what it wants, including a field it no longer sets, which server-side
//! apply then removes), or when some field of the desired body differs from the live value
//! (`drifted`: someone edited, scaled or patched the object).
//!
//! Invariants:
//! - Pure: no client, no clock. [`desired_hash`] hashes the typed object's JSON serialisation,
//!   which is deterministic (k8s-openapi serialises struct fields in a fixed order and maps are
//!   `BTreeMap`s), before the annotation is added; the annotation goes on the object's own
//!   metadata, never on a pod template, so it rolls no pods.
//! - The drift check is "desired ⊆ live": maps key by key recursively, lists element-wise with
//!   equal length, scalars equal. Fields only the live object has (defaults, allocations such as
//!   a cluster IP, status, other managers' annotations) are ignored.
//! - Two server-side normalisations are not drift: a desired empty value (`{}`, `[]`, `null`,
//!   `""`, `false`, `0`) matches an absent live field (Go's `omitempty` drops it), and resource
//!   quantities (under `requests`, `limits`, or a `sizeLimit`) are compared by value, because the
//!   API server stores them in canonical form (`0.5` becomes `500m`, `1024Mi` becomes `1Gi`).
//!   Without these an object would look drifted forever and be re-applied every pass.

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Annotation on every owned object: the hash of the desired body last applied.
pub const APPLIED_HASH_ANNOTATION: &str = "cachalot.dev/applied-hash";

/// Why an owned object is written. The `as_str` values are metric labels and log fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyReason {
    /// Not in the cache: never applied, deleted by someone, or the cache has not seen it yet.
    Missing,
    /// The desired body changed since the last apply (its hash differs from the annotation).
    Changed,
    /// The live object differs from the desired body in a field the operator sets.
    Drifted,
}

impl ApplyReason {
    /// `missing`, `changed` or `drifted`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Changed => "changed",
            Self::Drifted => "drifted",
        }
    }
}

/// Hex SHA-256 of the JSON serialisation of `desired` (which must not carry the annotation yet).
///
/// # Errors
/// When serialisation fails (never for k8s-openapi types).
pub fn desired_hash<K: Serialize>(desired: &K) -> Result<String, serde_json::Error> {
    let bytes = serde_json::to_vec(desired)?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Whether `desired` (with its [`APPLIED_HASH_ANNOTATION`] set to `hash`) must be applied over
/// `live`; `None` when the live object already is what the operator wants.
#[must_use]
pub fn apply_reason(desired: &Value, hash: &str, live: Option<&Value>) -> Option<ApplyReason> {
    let Some(live) = live else {
        return Some(ApplyReason::Missing);
    };
    let live_hash = live
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(APPLIED_HASH_ANNOTATION))
        .and_then(Value::as_str);
    if live_hash != Some(hash) {
        return Some(ApplyReason::Changed);
    }
    if !is_subset(desired, live) {
        return Some(ApplyReason::Drifted);
    }
    None
}

/// Whether every field of `desired` has the same value in `live` (see the module invariants).
#[must_use]
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    subset_at(None, desired, Some(live))
}

/// `key` is the map key `desired` sits under, `parent` the key of the enclosing map; both decide
/// whether strings are quantities.
fn subset_at(context: Option<(&str, Option<&str>)>, desired: &Value, live: Option<&Value>) -> bool {
    let Some(live) = live.filter(|l| !l.is_null()) else {
        return is_empty(desired);
    };
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => map_subset(context.map(|(k, _)| k), d, l),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len()
                && d.iter()
                    .zip(l)
                    .all(|(d, l)| subset_at(context.map(|(k, _)| (k, None)), d, Some(l)))
        }
        (Value::String(d), Value::String(l)) => {
            d == l || (context.is_some_and(holds_quantity) && quantities_equal(d, l))
        }
        (d, l) => d == l || (is_empty(d) && is_empty(l)),
    }
}

fn map_subset(key: Option<&str>, desired: &Map<String, Value>, live: &Map<String, Value>) -> bool {
    desired
        .iter()
        .all(|(k, d)| subset_at(Some((k.as_str(), key)), d, live.get(k)))
}

/// Where Kubernetes stores quantities in the objects the operator builds: the values of
/// `requests` and `limits` maps (container resources, claim templates) and `sizeLimit`.
fn holds_quantity((key, parent): (&str, Option<&str>)) -> bool {
    key == "sizeLimit" || matches!(parent, Some("requests" | "limits"))
}

/// A Go zero value or empty collection, which the API server drops from what it stores.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_i64() == Some(0) || n.as_u64() == Some(0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Whether two Kubernetes quantity strings denote the same value (`0.5` and `500m`, `1Gi` and
/// `1024Mi`); false when either does not parse.
#[must_use]
pub fn quantities_equal(a: &str, b: &str) -> bool {
    match (Quantity::parse(a), Quantity::parse(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A quantity's exact value as `sign × odd_part × 2^twos × 5^fives`, with `odd_part` prime to
/// 10, so equal values have equal representations whatever their notation.
#[derive(Debug, PartialEq, Eq)]
struct Quantity {
    negative: bool,
    odd_part: u128,
    twos: i64,
    fives: i64,
}

impl Quantity {
    fn parse(text: &str) -> Option<Self> {
        let (negative, rest) = match text.as_bytes().first()? {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(number_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let (mut twos, mut tens) = suffix_exponents(suffix)?;
        let mut digits: u128 = 0;
        for c in whole.bytes().chain(fraction.bytes()) {
            digits = digits
                .checked_mul(10)?
                .checked_add(u128::from(c.checked_sub(b'0')?))?;
        }
        tens -= i64::try_from(fraction.len()).ok()?;
        if digits == 0 {
            return Some(Self {
                negative: false,
                odd_part: 0,
                twos: 0,
                fives: 0,
            });
        }
        let mut fives = tens;
        twos += tens;
        while digits.is_multiple_of(2) {
            digits /= 2;
            twos += 1;
        }
        while digits.is_multiple_of(5) {
            digits /= 5;
            fives += 1;
        }
        Some(Self {
            negative,
            odd_part: digits,
            twos,
            fives,
        })
    }
}

/// `(power of two, power of ten)` of a quantity suffix: binary SI, decimal SI or an exponent.
fn suffix_exponents(suffix: &str) -> Option<(i64, i64)> {
    let found = match suffix {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            (0, exponent.parse::<i64>().ok()?)
        }
    };
    Some(found)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn annotated(hash: &str) -> Value {
        json!({"metadata": {"name": "x", "annotations": {APPLIED_HASH_ANNOTATION: hash}},
               "data": {"config.yaml": "a: 1\n"}})
    }

    #[test]
    fn a_live_object_with_extra_fields_contains_the_desired_one() {
        let desired = json!({"spec": {"type": "ClusterIP", "ports": [{"port": 5000}]}});
        let live = json!({"spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1",
                                   "ports": [{"port": 5000, "protocol": "TCP"}]},
                          "status": {"loadBalancer": {}}});
        assert!(is_subset(&desired, &live));
    }

    #[test]
    fn a_changed_scalar_a_missing_key_or_another_list_length_is_drift() {
        let desired = json!({"data": {"k": "v"}, "list": [1, 2]});
        assert!(!is_subset(
            &desired,
            &json!({"data": {"k": "w"}, "list": [1, 2]})
        ));
        assert!(!is_subset(&desired, &json!({"data": {}, "list": [1, 2]})));
        assert!(!is_subset(
            &desired,
            &json!({"data": {"k": "v"}, "list": [1]})
        ));
        assert!(!is_subset(
            &desired,
            &json!({"data": {"k": "v"}, "list": [1, 2, 3]})
        ));
        assert!(!is_subset(
            &desired,
            &json!({"data": {"k": "v"}, "list": [2, 1]})
        ));
        assert!(!is_subset(&json!({"replicas": 3}), &json!({"replicas": 1})));
    }

    #[test]
    fn list_elements_are_compared_as_subsets_too() {
        let desired = json!({"containers": [{"name": "c", "ports": [{"containerPort": 5000}]}]});
        let live = json!({"containers": [{"name": "c", "imagePullPolicy": "IfNotPresent",
                                          "ports": [{"containerPort": 5000, "protocol": "TCP"}]}]});
        assert!(is_subset(&desired, &live));
        let edited = json!({"containers": [{"name": "c", "ports": [{"containerPort": 5001}]}]});
        assert!(!is_subset(&desired, &edited));
    }

    #[test]
    fn empty_desired_values_match_fields_the_server_omits() {
        let desired = json!({"a": {}, "b": [], "c": null, "d": "", "e": false, "f": 0, "g": "x"});
        assert!(is_subset(&desired, &json!({"g": "x"})));
        assert!(!is_subset(&json!({"e": true}), &json!({})));
        assert!(!is_subset(&json!({"a": {"k": "v"}}), &json!({})));
    }

    #[test]
    fn quantities_in_resources_are_compared_by_value() {
        let desired = json!({"resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"},
                                           "limits": {"memory": "1e3"}},
                             "emptyDir": {"sizeLimit": "1000M"}});
        let live = json!({"resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                                        "limits": {"memory": "1k"}},
                          "emptyDir": {"sizeLimit": "1G"}});
        assert!(is_subset(&desired, &live));
        let smaller = json!({"resources": {"requests": {"cpu": "400m", "memory": "1Gi"},
                                           "limits": {"memory": "1k"}},
                             "emptyDir": {"sizeLimit": "1G"}});
        assert!(!is_subset(&desired, &smaller));
    }

    #[test]
    fn strings_outside_quantity_fields_are_compared_as_written() {
        assert!(!is_subset(
            &json!({"image": "1000m"}),
            &json!({"image": "1"})
        ));
        assert!(!is_subset(
            &json!({"annotations": {"a": "0.5"}}),
            &json!({"annotations": {"a": "500m"}})
        ));
    }

    #[test]
    fn quantity_notations_of_one_value_are_equal_and_others_are_not() {
        for (a, b) in [
            ("0.5", "500m"),
            ("1Gi", "1024Mi"),
            ("1G", "1000M"),
            ("1e3", "1k"),
            ("1.5Gi", "1536Mi"),
            ("100m", "0.1"),
            ("0", "0m"),
            ("+2", "2"),
            ("2E-3", "2m"),
        ] {
            assert!(quantities_equal(a, b), "{a} == {b}");
        }
        for (a, b) in [
            ("1G", "1Gi"),
            ("100m", "1"),
            ("-1", "1"),
            ("1Ki", "1k"),
            ("abc", "abc"),
            ("", ""),
            ("1x", "1x"),
        ] {
            assert!(!quantities_equal(a, b), "{a} != {b}");
        }
    }

    #[test]
    fn an_object_missing_from_the_cache_is_applied() {
        assert_eq!(
            apply_reason(&annotated("h1"), "h1", None),
            Some(ApplyReason::Missing)
        );
    }

    #[test]
    fn a_live_object_with_another_or_no_hash_is_applied_as_changed() {
        let desired = annotated("h2");
        assert_eq!(
            apply_reason(&desired, "h2", Some(&annotated("h1"))),
            Some(ApplyReason::Changed)
        );
        let unannotated = json!({"metadata": {"name": "x"}, "data": {"config.yaml": "a: 1\n"}});
        assert_eq!(
            apply_reason(&desired, "h2", Some(&unannotated)),
            Some(ApplyReason::Changed)
        );
    }

    #[test]
    fn a_live_object_with_the_hash_but_edited_data_is_applied_as_drifted() {
        let mut live = annotated("h1");
        live["data"]["config.yaml"] = json!("a: 2\n");
        assert_eq!(
            apply_reason(&annotated("h1"), "h1", Some(&live)),
            Some(ApplyReason::Drifted)
        );
    }

    #[test]
    fn a_live_object_with_the_hash_and_the_desired_fields_is_left_alone() {
        let mut live = annotated("h1");
        live["metadata"]["resourceVersion"] = json!("42");
        live["metadata"]["annotations"]["other"] = json!("kept");
        assert_eq!(apply_reason(&annotated("h1"), "h1", Some(&live)), None);
    }

    #[test]
    fn the_hash_is_deterministic_and_follows_the_body() {
        let a = json!({"b": 1, "a": [1, 2]});
        assert_eq!(desired_hash(&a).unwrap(), desired_hash(&a.clone()).unwrap());
        assert_ne!(
            desired_hash(&a).unwrap(),
            desired_hash(&json!({"b": 2, "a": [1, 2]})).unwrap()
        );
        assert_eq!(desired_hash(&a).unwrap().len(), 64);
    }
}
