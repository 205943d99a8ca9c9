//! What the proxies listen on and forward to, from Services and EndpointSlices (pure).
//!
//! ClusterIP mode: every Service with a cluster IP (not headless, not `ExternalName`) gets one
//! listener per TCP port on `clusterIP:port`. NodePort mode: every `nodePort` of a `NodePort` or
//! `LoadBalancer` Service gets a listener on `0.0.0.0:nodePort`. The backends of a listener are
//! the ready endpoint addresses of the Service's slices (`kubernetes.io/service-name` label, same
//! namespace) with the slice port whose name equals the Service port's name, as kube-proxy
//! matches them. UDP and SCTP ports are ignored (documented).
//!
//! Invariants: the result is sorted and free of duplicates, so equal inputs give equal maps and
//! the runtime can diff them; an endpoint whose `ready` condition is unset counts as ready (the
//! API's rule), one with `ready: false` (including terminating ones) never receives traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Which listeners to derive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `clusterIP:port` (the cluster proxy in the gateway namespace).
    ClusterIp,
    /// `0.0.0.0:nodePort` (each node's kubelet).
    NodePort,
}

/// Listen address → backends.
pub type Listeners = BTreeMap<SocketAddr, Vec<SocketAddr>>;

fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

/// The cluster IP of `service`, if it has one the proxy serves.
pub fn cluster_ip(service: &Service) -> Option<Ipv4Addr> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    spec.cluster_ip.as_deref()?.parse().ok()
}

fn backends(
    service: &Service,
    port: &ServicePort,
    slices: &[Arc<EndpointSlice>],
) -> Vec<SocketAddr> {
    let name = service.metadata.name.as_deref();
    let namespace = service.metadata.namespace.as_deref();
    let port_name = port.name.as_deref().unwrap_or_default();
    let mut found = BTreeSet::new();
    for slice in slices {
        let owned = slice.metadata.namespace.as_deref() == namespace
            && slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str)
                == name;
        if !owned || slice.address_type != "IPv4" {
            continue;
        }
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name && is_tcp(p.protocol.as_deref())
        }) else {
            continue;
        };
        let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<Ipv4Addr>() {
                    found.insert(SocketAddr::new(IpAddr::V4(ip), target_port));
                }
            }
        }
    }
    found.into_iter().collect()
}

/// The listeners of `mode` for `services` and `slices`.
pub fn listeners(
    mode: Mode,
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
) -> Listeners {
    let mut result = Listeners::new();
    for service in services {
        let Some(ip) = cluster_ip(service) else {
            continue;
        };
        let Some(spec) = service.spec.as_ref() else {
            continue;
        };
        let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        for port in spec.ports.iter().flatten() {
            if !is_tcp(port.protocol.as_deref()) {
                continue;
            }
            let listen = match mode {
                Mode::ClusterIp => u16::try_from(port.port)
                    .ok()
                    .map(|p| SocketAddr::new(IpAddr::V4(ip), p)),
                Mode::NodePort if node_ports => port
                    .node_port
                    .and_then(|p| u16::try_from(p).ok())
                    .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p)),
                Mode::NodePort => None,
            };
            if let Some(listen) = listen {
                result.insert(listen, backends(service, port, slices));
            }
        }
    }
    result
}

/// The cluster IPs to own (as /32 on `lo`) for `services`.
pub fn cluster_ips(services: &[Arc<Service>]) -> BTreeSet<Ipv4Addr> {
    services.iter().filter_map(|s| cluster_ip(s)).collect()
}

/// The backend for the `counter`-th connection and the order to fall back in: round-robin from
/// `counter`, then the others in order (pure).
pub fn fallback_order<T: Clone>(backends: &[T], counter: usize) -> Vec<T> {
    if backends.is_empty() {
        return Vec::new();
    }
    let start = counter % backends.len();
    backends[start..]
        .iter()
        .chain(&backends[..start])
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn service(name: &str, type_: &str, ip: &str, ports: Vec<ServicePort>) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                cluster_ip: Some(ip.into()),
                ports: Some(ports),
                ..Default::default()
            }),
            status: None,
        })
    }

    fn port(name: Option<&str>, port: i32, node_port: Option<i32>) -> ServicePort {
        ServicePort {
            name: name.map(str::to_owned),
            port,
            node_port,
            ..Default::default()
        }
    }

    fn endpoint(ip: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(
        service: &str,
        ports: Vec<(Option<&str>, i32)>,
        endpoints: Vec<Endpoint>,
    ) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{service}-abc")),
                namespace: Some("ns".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(endpoints),
            ports: Some(
                ports
                    .into_iter()
                    .map(|(name, port)| EndpointPort {
                        name: name.map(str::to_owned),
                        port: Some(port),
                        ..Default::default()
                    })
                    .collect(),
            ),
        })
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn cluster_ips_listen_per_port_and_forward_to_ready_endpoints_of_the_named_port() {
        let services = [service(
            "web",
            "ClusterIP",
            "10.96.0.20",
            vec![
                port(Some("http"), 80, None),
                port(Some("metrics"), 9090, None),
            ],
        )];
        let slices = [slice(
            "web",
            vec![(Some("http"), 8080), (Some("metrics"), 9100)],
            vec![
                endpoint("10.240.1.3", Some(true)),
                endpoint("10.240.1.2", None),
                endpoint("10.240.2.2", Some(false)),
            ],
        )];
        let got = listeners(Mode::ClusterIp, &services, &slices);
        assert_eq!(
            got[&addr("10.96.0.20:80")],
            [addr("10.240.1.2:8080"), addr("10.240.1.3:8080")]
        );
        assert_eq!(
            got[&addr("10.96.0.20:9090")],
            [addr("10.240.1.2:9100"), addr("10.240.1.3:9100")]
        );
        assert!(listeners(Mode::NodePort, &services, &slices).is_empty());
    }

    #[test]
    fn unnamed_ports_match_unnamed_slice_ports_and_other_services_slices_are_ignored() {
        let services = [service(
            "a",
            "NodePort",
            "10.96.0.21",
            vec![port(None, 80, Some(30080))],
        )];
        let slices = [
            slice(
                "a",
                vec![(None, 5000)],
                vec![endpoint("10.240.1.2", Some(true))],
            ),
            slice(
                "b",
                vec![(None, 6000)],
                vec![endpoint("10.240.1.9", Some(true))],
            ),
        ];
        let node_ports = listeners(Mode::NodePort, &services, &slices);
        assert_eq!(
            node_ports[&addr("0.0.0.0:30080")],
            [addr("10.240.1.2:5000")]
        );
        let cluster = listeners(Mode::ClusterIp, &services, &slices);
        assert_eq!(cluster[&addr("10.96.0.21:80")], [addr("10.240.1.2:5000")]);
    }

    #[test]
    fn headless_and_external_name_services_get_no_listener() {
        let services = [
            service("h", "ClusterIP", "None", vec![port(None, 80, None)]),
            service("e", "ExternalName", "", vec![port(None, 80, None)]),
        ];
        assert!(listeners(Mode::ClusterIp, &services, &[]).is_empty());
        assert!(cluster_ips(&services).is_empty());
    }

    #[test]
    fn a_service_without_endpoints_still_listens() {
        let services = [service(
            "a",
            "ClusterIP",
            "10.96.0.22",
            vec![port(None, 80, None)],
        )];
        let got = listeners(Mode::ClusterIp, &services, &[]);
        assert_eq!(got[&addr("10.96.0.22:80")], Vec::<SocketAddr>::new());
        assert_eq!(
            cluster_ips(&services),
            BTreeSet::from([Ipv4Addr::new(10, 96, 0, 22)])
        );
    }

    #[test]
    fn round_robin_starts_at_the_counter_and_falls_back_to_the_rest() {
        let backends = [addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("10.0.0.3:1")];
        assert_eq!(fallback_order(&backends, 0), backends);
        assert_eq!(
            fallback_order(&backends, 4),
            [addr("10.0.0.2:1"), addr("10.0.0.3:1"), addr("10.0.0.1:1")]
        );
        assert!(fallback_order::<SocketAddr>(&[], 3).is_empty());
    }
}
