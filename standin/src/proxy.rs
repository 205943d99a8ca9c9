//! TCP listeners that forward to a changing set of backends (shared by the ClusterIP proxy and
//! the kubelet's NodePorts), the reflectors feeding them, and `cachalot-standin proxy`.
//!
//! `proxy` runs in the gateway namespace (`<P>-net`): for every Service cluster IP it adds the
//! address as a /32 on `lo` (idempotent `ip addr replace`), listens on `clusterIP:port` for each
//! TCP port and forwards each connection to a ready endpoint, round-robin, trying the next one
//! when a connect fails and closing the client when none is left. `--external IP:PORT=unix:PATH`
//! adds a listener whose backend is a unix socket (how in-cluster processes reach something the
//! fixture serves from the host). Changes apply within a second: new connections use the new
//! set, established ones are left alone.
//!
//! Invariants: one listener per address; a listener that cannot be bound (address not yet on
//! `lo`, port taken) is retried on the next pass; addresses and listeners of deleted Services are
//! removed; each listener pipes at most [`crate::forward::MAX_CONNECTIONS`] connections at once;
//! shutdown closes every listener and removes every address this process added.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::forward::{connect, pipe, Endpoint, MAX_CONNECTIONS};
use crate::host_command;
use crate::services::{self, fallback_order, Mode};

/// Period of the full comparison when nothing changes.
pub const RESYNC: Duration = Duration::from_secs(1);
/// How long a command waits for its reflectors to list everything once.
pub const SYNC_DEADLINE: Duration = Duration::from_secs(60);

/// Listen address → backends.
pub type Targets = BTreeMap<SocketAddr, Vec<Endpoint>>;

struct Entry {
    backends: watch::Sender<Vec<Endpoint>>,
    task: JoinHandle<()>,
}

/// The running listeners.
#[derive(Default)]
pub struct ListenerSet {
    entries: HashMap<SocketAddr, Entry>,
}

impl std::fmt::Debug for ListenerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerSet")
            .field("listening", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ListenerSet {
    /// Makes the listeners match `desired`; binding failures are logged and retried next time.
    pub async fn apply(&mut self, desired: &Targets) {
        self.entries.retain(|addr, entry| {
            let keep = desired.contains_key(addr);
            if !keep {
                entry.task.abort();
                info!(%addr, "listener removed");
            }
            keep
        });
        for (addr, backends) in desired {
            if let Some(entry) = self.entries.get(addr) {
                entry.backends.send_if_modified(|current| {
                    let changed = current != backends;
                    if changed {
                        current.clone_from(backends);
                        info!(%addr, backends = backends.len(), "backends changed");
                    }
                    changed
                });
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    let (tx, rx) = watch::channel(backends.clone());
                    let task = tokio::spawn(serve(listener, rx));
                    info!(%addr, backends = backends.len(), "listening");
                    self.entries.insert(*addr, Entry { backends: tx, task });
                }
                Err(error) => debug!(%addr, %error, "cannot listen yet; retrying"),
            }
        }
    }

    /// Closes every listener.
    pub fn clear(&mut self) {
        for (_, entry) in self.entries.drain() {
            entry.task.abort();
        }
    }

    /// Whether `addr` has a listener.
    pub fn is_listening(&self, addr: &SocketAddr) -> bool {
        self.entries.contains_key(addr)
    }
}

impl Drop for ListenerSet {
    fn drop(&mut self) {
        self.clear();
    }
}

async fn serve(listener: TcpListener, backends: watch::Receiver<Vec<Endpoint>>) {
    let counter = Arc::new(AtomicUsize::new(0));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let order = fallback_order(&backends.borrow(), counter.fetch_add(1, Ordering::Relaxed));
        tokio::spawn(async move {
            let _permit = permit;
            for backend in &order {
                match connect(backend).await {
                    Ok(upstream) => {
                        pipe(Box::new(client), upstream).await;
                        return;
                    }
                    Err(error) => debug!(%error, "backend refused; trying the next"),
                }
            }
            debug!(%peer, "no backend reachable; closing the client");
        });
    }
}

/// Converts service listeners to proxy targets.
pub fn tcp_targets(listeners: services::Listeners) -> Targets {
    listeners
        .into_iter()
        .map(|(addr, backends)| {
            (
                addr,
                backends
                    .into_iter()
                    .map(|b| Endpoint::Tcp(b.to_string()))
                    .collect(),
            )
        })
        .collect()
}

/// Starts a reflector for `api` that notifies `changed` on every event; returns its store.
pub fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    cancel: CancellationToken,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                item = stream.next() => match item {
                    Some(Ok(event)) => {
                        debug!(kind = %K::kind(&K::DynamicType::default()), event = %describe(&event), "watch event");
                        changed.notify_one();
                    }
                    Some(Err(error)) => warn!(kind = %K::kind(&K::DynamicType::default()), %error, "watch error; the watcher backs off and retries"),
                    None => return,
                },
            }
        }
    });
    store
}

/// One line for a watch event: `apply <namespace>/<name> rv=<resourceVersion>` and the like (pure).
/// At debug level the stand-ins log every event, so a log shows which objects a watch delivered
/// and when (how the ClusterIP flake was told apart from a slow controller).
pub fn describe<K: Resource>(event: &watcher::Event<K>) -> String {
    let object = |verb: &str, o: &K| {
        let meta = o.meta();
        let namespace = meta
            .namespace
            .as_deref()
            .map(|n| format!("{n}/"))
            .unwrap_or_default();
        format!(
            "{verb} {namespace}{} rv={}",
            meta.name.as_deref().unwrap_or_default(),
            meta.resource_version.as_deref().unwrap_or_default()
        )
    };
    match event {
        watcher::Event::Apply(o) => object("apply", o),
        watcher::Event::Delete(o) => object("delete", o),
        watcher::Event::InitApply(o) => object("listed", o),
        watcher::Event::Init => "list started".to_owned(),
        watcher::Event::InitDone => "list done".to_owned(),
    }
}

/// Why the reflectors did not sync.
#[derive(Debug, thiserror::Error)]
#[error("the {what} watch did not list within {SYNC_DEADLINE:?}")]
pub struct SyncWatchError {
    /// Which watch.
    pub what: &'static str,
}

/// Waits for `store` to have listed once, within [`SYNC_DEADLINE`].
pub async fn wait_synced<K>(store: &Store<K>, what: &'static str) -> Result<(), SyncWatchError>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    match tokio::time::timeout(SYNC_DEADLINE, store.wait_until_ready()).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(SyncWatchError { what }),
    }
}

/// Serves NodePorts of every Service on this node until `cancel` (the kubelet's kube-proxy part).
pub async fn run_node_ports(
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    changed: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut set = ListenerSet::default();
    loop {
        let desired = tcp_targets(services::listeners(
            Mode::NodePort,
            &services.state(),
            &slices.state(),
        ));
        set.apply(&desired).await;
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
    set.clear();
}

/// `--external IP:PORT=unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct External {
    /// The address in-cluster processes dial.
    pub listen: SocketAddrV4,
    /// Where connections go.
    pub target: Endpoint,
}

/// Why an `--external` value is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not IP:PORT=unix:PATH (or =tcp:HOST:PORT)")]
pub struct ParseExternalError(String);

impl FromStr for External {
    type Err = ParseExternalError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParseExternalError(text.to_owned());
        let (listen, target) = text.split_once('=').ok_or_else(error)?;
        Ok(Self {
            listen: listen.parse().map_err(|_| error())?,
            target: target.parse().map_err(|_| error())?,
        })
    }
}

/// `cachalot-standin proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Kubeconfig of the cluster (watch Services and EndpointSlices).
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// `IP:PORT=unix:PATH`: own IP on `lo`, listen on IP:PORT and pipe each connection to the
    /// unix socket (repeatable).
    #[arg(long = "external")]
    pub externals: Vec<External>,
    /// Written (empty) once the first set of listeners is up.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// Why `proxy` failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No API client.
    #[error(transparent)]
    Connect(#[from] crate::api_client::ConnectApiError),
    /// A watch did not sync.
    #[error(transparent)]
    Sync(#[from] SyncWatchError),
    /// The ready file could not be written.
    #[error("write ready file {path}: {source}")]
    ReadyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Owns /32 addresses on `lo`.
#[derive(Debug, Default)]
struct LoopbackAddresses {
    owned: BTreeSet<Ipv4Addr>,
}

const IP: &str = "/usr/sbin/ip";
const IP_TIMEOUT: Duration = Duration::from_secs(10);

impl LoopbackAddresses {
    async fn apply(&mut self, desired: &BTreeSet<Ipv4Addr>) {
        for ip in desired.difference(&self.owned.clone()) {
            let args = ["addr", "replace", &format!("{ip}/32"), "dev", "lo"].map(str::to_owned);
            match host_command::run(IP, &args, IP_TIMEOUT).await {
                Ok(_) => {
                    self.owned.insert(*ip);
                }
                Err(error) => warn!(%error, "cannot add address to lo"),
            }
        }
        for ip in self.owned.clone().difference(desired) {
            self.remove(*ip).await;
        }
    }

    async fn remove(&mut self, ip: Ipv4Addr) {
        let args = ["addr", "del", &format!("{ip}/32"), "dev", "lo"].map(str::to_owned);
        if let Err(error) = host_command::run(IP, &args, IP_TIMEOUT).await {
            warn!(%error, "cannot remove address from lo");
        }
        self.owned.remove(&ip);
    }

    async fn clear(&mut self) {
        for ip in self.owned.clone() {
            self.remove(ip).await;
        }
    }
}

/// Runs the ClusterIP proxy until `cancel`.
pub async fn run(args: ProxyArgs, cancel: CancellationToken) -> Result<(), ProxyError> {
    let client: Client = crate::api_client::from_kubeconfig(&args.kubeconfig).await?;
    let changed = Arc::new(Notify::new());
    let services: Store<Service> = reflect(
        Api::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        cancel.clone(),
    );
    let slices: Store<EndpointSlice> = reflect(
        Api::all(client),
        watcher::Config::default(),
        changed.clone(),
        cancel.clone(),
    );
    wait_synced(&services, "Service").await?;
    wait_synced(&slices, "EndpointSlice").await?;
    let mut addresses = LoopbackAddresses::default();
    let mut listeners = ListenerSet::default();
    let mut ready_written = args.ready_file.is_none();
    loop {
        let services_now = services.state();
        let mut ips = services::cluster_ips(&services_now);
        ips.extend(args.externals.iter().map(|e| *e.listen.ip()));
        addresses.apply(&ips).await;
        let mut desired = tcp_targets(services::listeners(
            Mode::ClusterIp,
            &services_now,
            &slices.state(),
        ));
        for external in &args.externals {
            desired.insert(
                SocketAddr::V4(external.listen),
                vec![external.target.clone()],
            );
        }
        listeners.apply(&desired).await;
        if !ready_written && desired.keys().all(|a| listeners.is_listening(a)) {
            if let Some(path) = &args.ready_file {
                crate::forward::write_file_atomically(path, b"").map_err(|source| {
                    ProxyError::ReadyFile {
                        path: path.clone(),
                        source,
                    }
                })?;
                info!(path = %path.display(), "ready");
            }
            ready_written = true;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
    listeners.clear();
    addresses.clear().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn watch_events_are_described_by_verb_object_and_resource_version() {
        let slice = EndpointSlice {
            metadata: kube::api::ObjectMeta {
                name: Some("web-abc".into()),
                namespace: Some("default".into()),
                resource_version: Some("253".into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: None,
            ports: None,
        };
        assert_eq!(
            describe(&watcher::Event::Apply(slice.clone())),
            "apply default/web-abc rv=253"
        );
        assert_eq!(
            describe(&watcher::Event::Delete(slice.clone())),
            "delete default/web-abc rv=253"
        );
        assert_eq!(
            describe(&watcher::Event::InitApply(slice)),
            "listed default/web-abc rv=253"
        );
        assert_eq!(
            describe::<EndpointSlice>(&watcher::Event::InitDone),
            "list done"
        );
    }

    #[test]
    fn externals_parse() {
        let external: External = "10.250.0.1:5000=unix:/tmp/up.sock".parse().unwrap();
        assert_eq!(external.listen, "10.250.0.1:5000".parse().unwrap());
        assert_eq!(external.target, Endpoint::Unix("/tmp/up.sock".into()));
        assert!("10.250.0.1=unix:/x".parse::<External>().is_err());
        assert!("10.250.0.1:5000".parse::<External>().is_err());
    }
}
