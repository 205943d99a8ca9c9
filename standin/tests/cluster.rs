//! The kubelet and proxy stand-ins against a real control plane in throwaway network namespaces:
//! the Node registers and goes Ready, a pod runs with a ConfigMap volume and env, goes Ready, sees
//! a ConfigMap update in place, is reachable through its Service's ClusterIP from the node, and a
//! plain delete (no force) removes it together with its network namespace.
//!
//! Needs root, `openssl`, and `CACHALOT_CONTROL_PLANE_BIN` (a directory with `kube-apiserver`,
//! `kube-controller-manager`, `kube-scheduler`, `etcd-embed`); skips with a printed reason
//! otherwise. The test process itself only dials 127.0.0.1: the API server is reached through a
//! pair of `cachalot-standin forward` processes bridging the control-plane namespace over a unix
//! socket; traffic to 10.240.x.x is sent from inside the namespaces (`nsenter` + curl).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

const BIN: &str = env!("CARGO_BIN_EXE_cachalot-standin");

/// Brings up etcd, kube-apiserver, kcm and scheduler in `$P-cp`, the bridge in `$P-net` and one
/// node namespace `$P-n1`; certificates and kubeconfigs in `$D` (adapted from the dev script).
const UP: &str = r#"
set -euo pipefail
P=$1 D=$2 B=$3
cd "$D"
x(){ openssl x509 -req -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "$@" 2>/dev/null; }
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-ca -addext basicConstraints=critical,CA:TRUE -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout apiserver.key -out apiserver.csr 2>/dev/null
x -in apiserver.csr -out apiserver.crt -extfile <(printf 'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:10.240.0.2,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth')
openssl req -newkey rsa:2048 -nodes -subj '/O=system:masters/CN=admin' -keyout admin.key -out admin.csr 2>/dev/null
x -in admin.csr -out admin.crt -extfile <(printf 'extendedKeyUsage=clientAuth'); openssl genrsa -out sa.key 2048 2>/dev/null
ip netns add $P-net; ip netns add $P-cp; ip netns add $P-n1
ip -n $P-net link set lo up; ip -n $P-net link add br0 type bridge; ip -n $P-net addr add 10.240.0.1/16 dev br0; ip -n $P-net link set br0 up
ip netns exec $P-net sysctl -qw net.ipv4.ip_forward=1
attach() { ip -n $P-net link add "$3" type veth peer name eth0 netns "$1"; ip -n $P-net link set "$3" master br0 up
  ip -n "$1" link set lo up; ip -n "$1" addr add "$2/16" dev eth0; ip -n "$1" link set eth0 up; ip -n "$1" route add default via 10.240.0.1; }
attach $P-cp 10.240.0.2 vcp; attach $P-n1 10.240.0.11 vn1
N="nsenter --net=/run/netns/$P-cp"
$N "$B/etcd-embed" "$D/etcd" 2379 2380 > etcd.log 2>&1 &
$N "$B/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 --secure-port=6443 --advertise-address=10.240.0.2 \
  --tls-cert-file=apiserver.crt --tls-private-key-file=apiserver.key --client-ca-file=ca.crt \
  --service-account-issuer=https://kubernetes.default.svc --service-account-key-file=sa.key --service-account-signing-key-file=sa.key \
  --authorization-mode=Node,RBAC --service-cluster-ip-range=10.96.0.0/24 --kubelet-preferred-address-types=InternalIP > apiserver.log 2>&1 &
kc() { local crt key ca; ca=$(base64 -w0 ca.crt); crt=$(base64 -w0 admin.crt); key=$(base64 -w0 admin.key)
  printf 'apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {server: "%s", certificate-authority-data: %s}\nusers:\n- name: a\n  user: {client-certificate-data: %s, client-key-data: %s}\ncontexts:\n- name: t\n  context: {cluster: t, user: a}\ncurrent-context: t\n' "$2" "$ca" "$crt" "$key" > "$1"; }
kc cp.kubeconfig https://127.0.0.1:6443; kc node.kubeconfig https://10.240.0.2:6443
for i in $(seq 150); do $N curl -sfk --cert admin.crt --key admin.key https://127.0.0.1:6443/readyz >/dev/null 2>&1 && break; sleep 0.2; done
$N "$B/kube-controller-manager" --kubeconfig=cp.kubeconfig --leader-elect=false --bind-address=127.0.0.1 --secure-port=10257 \
  --controllers=garbage-collector-controller,deployment-controller,replicaset-controller,serviceaccount-controller,serviceaccount-token-controller,endpointslice-controller,root-ca-certificate-publisher-controller \
  --service-account-private-key-file=sa.key --root-ca-file=ca.crt > kcm.log 2>&1 &
$N "$B/kube-scheduler" --kubeconfig=cp.kubeconfig --leader-elect=false --bind-address=127.0.0.1 --secure-port=10259 > sched.log 2>&1 &
"#;

struct Cluster {
    prefix: String,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for child in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            let Some(ns) = line.split_whitespace().next() else {
                continue;
            };
            if !ns.starts_with(&format!("{}-", self.prefix)) {
                continue;
            }
            let pids = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .unwrap();
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = self.dir.path();
    }
}

fn skip_reason() -> Option<String> {
    if std::env::var_os("CACHALOT_CONTROL_PLANE_BIN").is_none() {
        return Some("CACHALOT_CONTROL_PLANE_BIN is not set".into());
    }
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) != 0 {
        return Some("not root".into());
    }
    if !Path::new("/usr/bin/openssl").exists() {
        return Some("openssl is not installed".into());
    }
    None
}

fn spawn(dir: &Path, log: &str, args: &[&str]) -> Child {
    let file = std::fs::File::create(dir.join(log)).unwrap();
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn wait_file(path: &Path, deadline: Duration) {
    let end = Instant::now() + deadline;
    while !path.exists() {
        assert!(
            Instant::now() < end,
            "timed out waiting for {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn client(kubeconfig: &Path) -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    Client::try_from(config).unwrap()
}

fn curl_from(netns: &str, url: &str) -> Option<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["curl", "-s", "-m", "3", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pod_from_yaml(yaml: &str) -> Pod {
    serde_yaml::from_str(yaml).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_update_serve_and_go_away_on_a_real_control_plane() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    let bin = PathBuf::from(std::env::var_os("CACHALOT_CONTROL_PLANE_BIN").unwrap());
    let prefix = format!("si{:04x}", std::process::id() & 0xffff);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let mut cluster = Cluster {
        prefix: prefix.clone(),
        dir,
        children: Vec::new(),
    };
    let up = Command::new("bash")
        .args([
            "-c",
            UP,
            "up",
            &prefix,
            d.to_str().unwrap(),
            bin.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(
        up.success(),
        "control plane set-up failed; logs in {}",
        d.display()
    );

    // The test reaches the API server only through 127.0.0.1.
    let sock = d.join("api.sock");
    let cp = format!("--net=/run/netns/{prefix}-cp");
    let sock_arg = format!("unix:{}", sock.display());
    cluster.children.push(spawn(
        &d,
        "fwd-cp.log",
        &[
            "nsenter",
            &cp,
            BIN,
            "forward",
            "--listen",
            &sock_arg,
            "--connect",
            "tcp:127.0.0.1:6443",
        ],
    ));
    wait_file(&sock, Duration::from_secs(10));
    let port_file = d.join("api.port");
    cluster.children.push(spawn(
        &d,
        "fwd-host.log",
        &[
            BIN,
            "forward",
            "--listen",
            "tcp:127.0.0.1:0",
            "--connect",
            &sock_arg,
            "--port-file",
            port_file.to_str().unwrap(),
        ],
    ));
    wait_file(&port_file, Duration::from_secs(10));
    let port = std::fs::read_to_string(&port_file).unwrap();
    let host_kubeconfig = d.join("host.kubeconfig");
    let text = std::fs::read_to_string(d.join("cp.kubeconfig"))
        .unwrap()
        .replace(
            "https://127.0.0.1:6443",
            &format!("https://127.0.0.1:{port}"),
        );
    std::fs::write(&host_kubeconfig, text).unwrap();

    let image_dir = d.join("img");
    std::fs::create_dir_all(&image_dir).unwrap();
    let node_kubeconfig = d.join("node.kubeconfig");
    let n1 = format!("--net=/run/netns/{prefix}-n1");
    let net = format!("--net=/run/netns/{prefix}-net");
    let image = format!("busybox={}", image_dir.display());
    let run_dir = d.join("run");
    let kubelet_ready = d.join("kubelet.ready");
    cluster.children.push(spawn(
        &d,
        "kubelet.log",
        &[
            "nsenter",
            &n1,
            BIN,
            "kubelet",
            "--kubeconfig",
            node_kubeconfig.to_str().unwrap(),
            "--node",
            "n1",
            "--node-ip",
            "10.240.0.11",
            "--pod-cidr",
            "10.240.1.0/24",
            "--node-root",
            d.join("root").to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--netns-prefix",
            &prefix,
            "--bridge-netns",
            &format!("{prefix}-net"),
            "--gateway",
            "10.240.0.1",
            "--image",
            &image,
            "--ready-file",
            kubelet_ready.to_str().unwrap(),
        ],
    ));
    let proxy_ready = d.join("proxy.ready");
    cluster.children.push(spawn(
        &d,
        "proxy.log",
        &[
            "nsenter",
            &net,
            BIN,
            "proxy",
            "--kubeconfig",
            node_kubeconfig.to_str().unwrap(),
            "--ready-file",
            proxy_ready.to_str().unwrap(),
        ],
    ));
    wait_file(&kubelet_ready, Duration::from_secs(90));
    wait_file(&proxy_ready, Duration::from_secs(90));

    let client = client(&host_kubeconfig).await;
    let nodes: Api<Node> = Api::all(client.clone());
    eventually(
        "node Ready and untainted",
        Duration::from_secs(30),
        || async {
            let node = nodes.get("n1").await.ok()?;
            let ready = node
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let tainted = node.spec?.taints.is_some_and(|t| !t.is_empty());
            (ready && !tainted).then_some(())
        },
    )
    .await;

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("cfg".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "greeting".to_owned(),
            "hello".to_owned(),
        )])),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = pod_from_yaml(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  terminationGracePeriodSeconds: 5
  containers:
  - name: web
    image: busybox
    command: ["python3", "-m", "http.server", "8080", "--directory", "/cfg"]
    env: [{name: POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {path: /greeting, port: http}, periodSeconds: 1}
    volumeMounts: [{name: cfg, mountPath: /cfg, readOnly: true}]
  volumes: [{name: cfg, configMap: {name: cfg}}]
"#,
    );
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let (uid, ip) = eventually("pod Ready", Duration::from_secs(60), || async {
        let pod = pods.get("web").await.ok()?;
        let status = pod.status?;
        let ready = status
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then(|| (pod.metadata.uid.unwrap(), status.pod_ip.unwrap()))
    })
    .await;
    assert!(ip.starts_with("10.240.1."), "{ip}");
    let node_ns = format!("{prefix}-n1");
    assert_eq!(
        curl_from(&node_ns, &format!("http://{ip}:8080/greeting")).as_deref(),
        Some("hello")
    );

    cms.patch(
        "cfg",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"greeting": "bonjour"}})),
    )
    .await
    .unwrap();
    let file = run_dir.join("pods").join(&uid).join("volumes/cfg/greeting");
    eventually(
        "the ConfigMap update on disk",
        Duration::from_secs(10),
        || async { (std::fs::read_to_string(&file).ok()? == "bonjour").then_some(()) },
    )
    .await;

    let svc: k8s_openapi::api::core::v1::Service = serde_yaml::from_str(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.80, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n",
    )
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    eventually(
        "the ClusterIP answering from the node",
        Duration::from_secs(30),
        || async {
            (curl_from(&node_ns, "http://10.96.0.80/greeting")? == "bonjour").then_some(())
        },
    )
    .await;

    pods.delete("web", &DeleteParams::default()).await.unwrap();
    eventually("the pod gone", Duration::from_secs(30), || async {
        pods.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
    let netns = format!(
        "/run/netns/{prefix}-p{}",
        uid.replace('-', "").get(..12).unwrap()
    );
    assert!(!Path::new(&netns).exists(), "{netns} left behind");
    assert!(!run_dir.join("pods").join(&uid).exists());
    drop(cluster);
}
