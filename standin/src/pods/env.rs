//! A container's environment and the `$(VAR)` expansion of its command, args and env values,
//! the way the kubelet builds them (pure).
//!
//! Order, as in the kubelet: `envFrom` sources first, then `env` entries in order (each value
//! expanded against the variables defined before it, then the service variables); service
//! variables (`KUBERNETES_SERVICE_*`) fill in names not set otherwise; the runtime defaults
//! (`PATH`, `HOSTNAME`, `HOME`) come last and never override. Command and args are expanded
//! against the final environment.
//!
//! Invariants: `$$` is a literal `$`; `$(NAME)` of an unknown name stays literal, as does an
//! unterminated `$(`; `valueFrom` values are not expanded. `resourceFieldRef` is not supported
//! (an error, which keeps the container in `CreateContainerConfigError`).

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};

/// The `PATH` of a container whose spec sets none (the usual image default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a container's environment is built from besides its spec.
#[derive(Debug, Clone)]
pub struct EnvInputs<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// The pod IP (the node IP for host-network pods), once known.
    pub pod_ip: Option<String>,
    /// The node IP.
    pub host_ip: String,
    /// The `kubernetes` Service address (`KUBERNETES_SERVICE_HOST/PORT`).
    pub kubernetes_service: SocketAddrV4,
    /// `HOSTNAME`: the pod's hostname, or the node name for host-network pods.
    pub hostname: String,
    /// `HOME`, from the user the container runs as.
    pub home: String,
}

/// Looks up ConfigMaps and Secrets of the pod's namespace by name.
pub trait SourceLookup {
    /// The ConfigMap `name`, if it exists.
    fn config_map(&self, name: &str) -> Option<ConfigMap>;
    /// The Secret `name`, if it exists.
    fn secret(&self, name: &str) -> Option<Secret>;
}

/// Why a container's environment cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildEnvError {
    /// A non-optional ConfigMap is missing.
    #[error("configmap \"{0}\" not found")]
    ConfigMapMissing(String),
    /// A non-optional Secret is missing.
    #[error("secret \"{0}\" not found")]
    SecretMissing(String),
    /// A non-optional key is missing.
    #[error("couldn't find key {key} in {kind} {name}")]
    KeyMissing {
        /// `ConfigMap` or `Secret`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The key.
        key: String,
    },
    /// A `fieldRef` path that is not supported.
    #[error("unsupported fieldRef {0}")]
    UnsupportedField(String),
    /// `resourceFieldRef` (not supported by the stand-in).
    #[error("env {0}: resourceFieldRef is not supported by cachalot-standin")]
    ResourceFieldRef(String),
    /// A `valueFrom` with no source.
    #[error("env {0}: valueFrom names no source")]
    EmptyValueFrom(String),
}

/// Expands `$(NAME)` references in `input` with `lookup`, exactly like Kubernetes: `$$` is a
/// literal `$`, unknown names and an unterminated `$(` stay literal, a `$` before anything else
/// stays as it is.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let mut chars = after.chars();
        match chars.next() {
            None => {
                // A trailing `$` is kept.
                out.push('$');
                rest = after;
            }
            Some('$') => {
                out.push('$');
                rest = &after[1..];
            }
            Some('(') => match after[1..].find(')') {
                Some(close) => {
                    let name = &after[1..1 + close];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &after[close + 2..];
                }
                None => {
                    out.push_str("$(");
                    rest = &after[1..];
                }
            },
            Some(other) => {
                out.push('$');
                out.push(other);
                rest = chars.as_str();
            }
        }
    }
    out.push_str(rest);
    out
}

fn label_key(path: &str, prefix: &str) -> Option<String> {
    let inner = path.strip_prefix(prefix)?.strip_suffix("']")?;
    Some(inner.to_owned())
}

/// The value of a downward-API `fieldPath` of `inputs.pod` (shared with downwardAPI volumes).
pub fn field_value(
    path: &str,
    pod: &Pod,
    pod_ip: Option<&str>,
    host_ip: &str,
) -> Result<String, BuildEnvError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        "status.podIP" | "status.podIPs" => pod_ip.unwrap_or_default().to_owned(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_owned(),
        "metadata.labels" => render_map(meta.labels.as_ref()),
        "metadata.annotations" => render_map(meta.annotations.as_ref()),
        other => {
            if let Some(key) = label_key(other, "metadata.labels['") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(&key).cloned())
                    .unwrap_or_default()
            } else if let Some(key) = label_key(other, "metadata.annotations['") {
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(&key).cloned())
                    .unwrap_or_default()
            } else {
                return Err(BuildEnvError::UnsupportedField(other.to_owned()));
            }
        }
    };
    Ok(value)
}

/// `key="value"` lines, sorted, as the downward API renders labels and annotations.
pub fn render_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.map(|m| {
        m.iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    })
    .unwrap_or_default()
}

fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, String> {
    let mut data = cm.data.clone().unwrap_or_default();
    for (key, value) in cm.binary_data.iter().flatten() {
        data.insert(key.clone(), String::from_utf8_lossy(&value.0).into_owned());
    }
    data
}

fn secret_data(secret: &Secret) -> BTreeMap<String, String> {
    let mut data: BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    for (key, value) in secret.string_data.iter().flatten() {
        data.insert(key.clone(), value.clone());
    }
    data
}

fn value_from(
    var: &EnvVar,
    inputs: &EnvInputs<'_>,
    sources: &dyn SourceLookup,
) -> Result<Option<String>, BuildEnvError> {
    let Some(from) = &var.value_from else {
        return Ok(None);
    };
    if let Some(field) = &from.field_ref {
        return field_value(
            &field.field_path,
            inputs.pod,
            inputs.pod_ip.as_deref(),
            &inputs.host_ip,
        )
        .map(Some);
    }
    if from.resource_field_ref.is_some() {
        return Err(BuildEnvError::ResourceFieldRef(var.name.clone()));
    }
    if let Some(sel) = &from.config_map_key_ref {
        let optional = sel.optional.unwrap_or(false);
        let Some(cm) = sources.config_map(&sel.name) else {
            return if optional {
                Ok(None)
            } else {
                Err(BuildEnvError::ConfigMapMissing(sel.name.clone()))
            };
        };
        return match config_map_data(&cm).remove(&sel.key) {
            Some(value) => Ok(Some(value)),
            None if optional => Ok(None),
            None => Err(BuildEnvError::KeyMissing {
                kind: "ConfigMap",
                name: sel.name.clone(),
                key: sel.key.clone(),
            }),
        };
    }
    if let Some(sel) = &from.secret_key_ref {
        let optional = sel.optional.unwrap_or(false);
        let Some(secret) = sources.secret(&sel.name) else {
            return if optional {
                Ok(None)
            } else {
                Err(BuildEnvError::SecretMissing(sel.name.clone()))
            };
        };
        return match secret_data(&secret).remove(&sel.key) {
            Some(value) => Ok(Some(value)),
            None if optional => Ok(None),
            None => Err(BuildEnvError::KeyMissing {
                kind: "Secret",
                name: sel.name.clone(),
                key: sel.key.clone(),
            }),
        };
    }
    Err(BuildEnvError::EmptyValueFrom(var.name.clone()))
}

/// The service variables the kubelet injects for the `kubernetes` Service.
pub fn service_env(kubernetes: SocketAddrV4) -> BTreeMap<String, String> {
    let host = kubernetes.ip().to_string();
    let port = kubernetes.port().to_string();
    let url = format!("tcp://{host}:{port}");
    BTreeMap::from([
        ("KUBERNETES_SERVICE_HOST".to_owned(), host.clone()),
        ("KUBERNETES_SERVICE_PORT".to_owned(), port.clone()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".to_owned(), port.clone()),
        ("KUBERNETES_PORT".to_owned(), url.clone()),
        (format!("KUBERNETES_PORT_{port}_TCP"), url),
        (
            format!("KUBERNETES_PORT_{port}_TCP_PROTO"),
            "tcp".to_owned(),
        ),
        (format!("KUBERNETES_PORT_{port}_TCP_PORT"), port.clone()),
        (format!("KUBERNETES_PORT_{port}_TCP_ADDR"), host),
    ])
}

/// The environment of `container` (sorted by name).
pub fn container_env(
    container: &Container,
    inputs: &EnvInputs<'_>,
    sources: &dyn SourceLookup,
) -> Result<BTreeMap<String, String>, BuildEnvError> {
    let services = service_env(inputs.kubernetes_service);
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(cm_ref) = &from.config_map_ref {
            match sources.config_map(&cm_ref.name) {
                Some(cm) => config_map_data(&cm),
                None if cm_ref.optional.unwrap_or(false) => continue,
                None => return Err(BuildEnvError::ConfigMapMissing(cm_ref.name.clone())),
            }
        } else if let Some(secret_ref) = &from.secret_ref {
            match sources.secret(&secret_ref.name) {
                Some(secret) => secret_data(&secret),
                None if secret_ref.optional.unwrap_or(false) => continue,
                None => return Err(BuildEnvError::SecretMissing(secret_ref.name.clone())),
            }
        } else {
            continue;
        };
        for (key, value) in data {
            // The kubelet skips keys that are not valid variable names (with an event).
            if key.is_empty() || key.contains('=') {
                continue;
            }
            env.insert(format!("{prefix}{key}"), value);
        }
    }
    for var in container.env.iter().flatten() {
        let value = if var.value_from.is_some() {
            match value_from(var, inputs, sources)? {
                Some(value) => value,
                None => continue,
            }
        } else {
            let lookup = |name: &str| env.get(name).or_else(|| services.get(name)).cloned();
            expand(var.value.as_deref().unwrap_or_default(), &lookup)
        };
        env.insert(var.name.clone(), value);
    }
    for (key, value) in services {
        env.entry(key).or_insert(value);
    }
    env.entry("PATH".to_owned())
        .or_insert_with(|| DEFAULT_PATH.to_owned());
    env.entry("HOSTNAME".to_owned())
        .or_insert_with(|| inputs.hostname.clone());
    env.entry("HOME".to_owned())
        .or_insert_with(|| inputs.home.clone());
    Ok(env)
}

/// `command` followed by `args`, each expanded against `env`.
pub fn expanded_argv(container: &Container, env: &BTreeMap<String, String>) -> Vec<String> {
    let lookup = |name: &str| env.get(name).cloned();
    container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(|word| expand(word, &lookup))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVarSource, ObjectFieldSelector,
        PodSpec, ResourceFieldSelector, SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::ByteString;

    use super::*;

    fn lookup_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let lookup = lookup_of(&[("A", "x"), ("B", "y$(A)")]);
        let cases = [
            ("$(A)", "x"),
            ("pre-$(A)-post", "pre-x-post"),
            ("$(B)", "y$(A)"),
            ("$$(A)", "$(A)"),
            ("$$$(A)", "$x"),
            ("$(UNKNOWN)", "$(UNKNOWN)"),
            ("$(A", "$(A"),
            ("$A", "$A"),
            ("a$", "a$"),
            ("$", "$"),
            ("$$", "$"),
            ("$()", "$()"),
            ("$(A)$(A)", "xx"),
            ("é$(A)é", "éxé"),
            ("$é", "$é"),
            ("no refs", "no refs"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, &lookup), want, "input {input:?}");
        }
    }

    struct Sources {
        cms: Vec<ConfigMap>,
        secrets: Vec<Secret>,
    }

    impl SourceLookup for Sources {
        fn config_map(&self, name: &str) -> Option<ConfigMap> {
            self.cms
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(name))
                .cloned()
        }
        fn secret(&self, name: &str) -> Option<Secret> {
            self.secrets
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(name))
                .cloned()
        }
    }

    fn sources() -> Sources {
        Sources {
            cms: vec![ConfigMap {
                metadata: ObjectMeta {
                    name: Some("cfg".into()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([
                    ("MODE".to_owned(), "fast".to_owned()),
                    ("bad=key".to_owned(), "skip".to_owned()),
                ])),
                ..Default::default()
            }],
            secrets: vec![Secret {
                metadata: ObjectMeta {
                    name: Some("sec".into()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(
                    "password".to_owned(),
                    ByteString(b"hunter2".to_vec()),
                )])),
                ..Default::default()
            }],
        }
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("ns1".into()),
                uid: Some("u-1".into()),
                labels: Some(BTreeMap::from([("app".to_owned(), "web".to_owned())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn field(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn value(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            ..Default::default()
        }
    }

    fn inputs(pod: &Pod) -> EnvInputs<'_> {
        EnvInputs {
            pod,
            pod_ip: Some("10.240.1.2".into()),
            host_ip: "10.240.0.11".into(),
            kubernetes_service: "10.96.0.1:443".parse().unwrap(),
            hostname: "web-0".into(),
            home: "/root".into(),
        }
    }

    #[test]
    fn env_combines_sources_fields_values_and_service_variables() {
        let pod = pod();
        let container = Container {
            name: "c".into(),
            env_from: Some(vec![EnvFromSource {
                prefix: Some("CFG_".into()),
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cfg".into(),
                    optional: None,
                }),
                ..Default::default()
            }]),
            env: Some(vec![
                field("POD", "metadata.name"),
                field("NS", "metadata.namespace"),
                field("IP", "status.podIP"),
                field("HOST_IP", "status.hostIP"),
                field("APP", "metadata.labels['app']"),
                field("NODE", "spec.nodeName"),
                value(
                    "GREETING",
                    "hi $(POD) on $(KUBERNETES_SERVICE_HOST) $(LATER)",
                ),
                value("LATER", "later"),
                value("MODE_COPY", "$(CFG_MODE)"),
                EnvVar {
                    name: "PASSWORD".into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "sec".into(),
                            key: "password".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "MAYBE".into(),
                    value_from: Some(EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "absent".into(),
                            key: "k".into(),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            command: Some(vec!["/bin/sh".into(), "-c".into()]),
            args: Some(vec!["echo $(POD) $$(POD) $(NOPE)".into()]),
            ..Default::default()
        };
        let env = container_env(&container, &inputs(&pod), &sources()).unwrap();
        assert_eq!(env["POD"], "web-0");
        assert_eq!(env["NS"], "ns1");
        assert_eq!(env["IP"], "10.240.1.2");
        assert_eq!(env["HOST_IP"], "10.240.0.11");
        assert_eq!(env["APP"], "web");
        assert_eq!(env["NODE"], "n1");
        assert_eq!(env["GREETING"], "hi web-0 on 10.96.0.1 $(LATER)");
        assert_eq!(env["MODE_COPY"], "fast");
        assert_eq!(env["CFG_MODE"], "fast");
        assert!(!env.keys().any(|k| k.contains('=')));
        assert_eq!(env["PASSWORD"], "hunter2");
        assert!(!env.contains_key("MAYBE"));
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.96.0.1");
        assert_eq!(env["KUBERNETES_SERVICE_PORT"], "443");
        assert_eq!(env["KUBERNETES_SERVICE_PORT_HTTPS"], "443");
        assert_eq!(env["HOSTNAME"], "web-0");
        assert_eq!(env["PATH"], DEFAULT_PATH);
        assert_eq!(
            expanded_argv(&container, &env),
            ["/bin/sh", "-c", "echo web-0 $(POD) $(NOPE)"]
        );
    }

    #[test]
    fn spec_values_override_defaults_and_services() {
        let pod = pod();
        let container = Container {
            env: Some(vec![
                value("PATH", "/custom"),
                value("KUBERNETES_SERVICE_HOST", "example"),
            ]),
            ..Default::default()
        };
        let env = container_env(&container, &inputs(&pod), &sources()).unwrap();
        assert_eq!(env["PATH"], "/custom");
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "example");
    }

    #[test]
    fn missing_sources_and_keys_and_resource_fields_are_errors() {
        let pod = pod();
        let missing_key = Container {
            env: Some(vec![EnvVar {
                name: "X".into(),
                value_from: Some(EnvVarSource {
                    config_map_key_ref: Some(ConfigMapKeySelector {
                        name: "cfg".into(),
                        key: "nope".into(),
                        optional: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(matches!(
            container_env(&missing_key, &inputs(&pod), &sources()),
            Err(BuildEnvError::KeyMissing { .. })
        ));
        let missing_secret = Container {
            env_from: Some(vec![EnvFromSource {
                secret_ref: Some(k8s_openapi::api::core::v1::SecretEnvSource {
                    name: "absent".into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(
            container_env(&missing_secret, &inputs(&pod), &sources()),
            Err(BuildEnvError::SecretMissing("absent".into()))
        );
        let resource = Container {
            env: Some(vec![EnvVar {
                name: "CPU".into(),
                value_from: Some(EnvVarSource {
                    resource_field_ref: Some(ResourceFieldSelector {
                        resource: "limits.cpu".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(
            container_env(&resource, &inputs(&pod), &sources()),
            Err(BuildEnvError::ResourceFieldRef("CPU".into()))
        );
    }
}
