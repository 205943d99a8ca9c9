#!/usr/bin/env python3
"""Measure the operator against the kube-like fake API server: reconcile time of one mirror and
operator memory idle and with N RegistryMirrors.

Usage (from the repository root, after `cargo build -p cachalot-operator --release`):

    python3 operator/perf/operator_load.py [--binary target/release/cachalot-operator] [--mirrors 100]

It starts tools/fake-apiserver on 127.0.0.1 (needs `pip install -r tools/fake-apiserver/requirements.txt`),
creates the CRD, starts `cachalot-operator run` with leader election against it, and reports:
- RSS of the operator once it is ready and idle (no mirrors);
- for one mirror: time from create to a status with observedGeneration, and the operator's own
  reconcile duration histogram (sum/count from /metrics);
- RSS after N mirrors all have status, and the time to get there.
No kubelet runs, so no registry or agent pod exists: reconciles apply every owned object and
report NoReadyPods / NoNodesSelected, which is the full API work of a pass minus the HTTP probes.
Every wait is bounded by a deadline. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
NS = "perf"


def wait_for(what, check, deadline_s, poll_s=0.05):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    raise SystemExit(f"timed out after {deadline_s}s waiting for {what}")


def request(base, method, path, body=None, content_type="application/json"):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def rss_kib(pid):
    with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def crd_json():
    import yaml  # PyYAML ships with kmock's dependencies; fall back to the binary if absent

    text = (ROOT / "crds" / "registrymirrors.cachalot.dev.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def mirror(name):
    return {
        "apiVersion": "cachalot.dev/v1alpha1",
        "kind": "RegistryMirror",
        "metadata": {"name": name, "namespace": NS},
        # Disjoint node selectors: otherwise every later mirror is (correctly) a Conflict.
        "spec": {"registries": [{"name": "docker.io"}], "nodes": {"nodeSelector": {"pool": name}}},
    }


def has_status(base, name):
    code, obj = request(base, "GET", f"/apis/cachalot.dev/v1alpha1/namespaces/{NS}/registrymirrors/{name}")
    return code == 200 and (obj.get("status") or {}).get("observedGeneration") is not None


def metric(metrics_url, name):
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", default=str(ROOT / "target" / "release" / "cachalot-operator"))
    parser.add_argument("--mirrors", type=int, default=100)
    args = parser.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="cachalot-perf-"))
    port_file = tmp / "port"
    api = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "fake-apiserver" / "fake_apiserver.py"), "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "api.log", "w"),
    )
    op = None
    try:
        port = int(wait_for("fake API server port", lambda: port_file.exists() and port_file.read_text().strip(), 30))
        base = f"http://127.0.0.1:{port}"
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {server: '%s'}\n"
            "users:\n- name: fake\n  user: {}\ncontexts:\n- name: fake\n  context: {cluster: fake, user: fake, namespace: %s}\n"
            "current-context: fake\n" % (base, NS)
        )
        code, _ = request(base, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd_json())
        assert code in (200, 201), code
        request(base, "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        metrics_port = free_port()
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), RUST_LOG="warn", POD_NAME="perf-0")
        started = time.monotonic()
        op = subprocess.Popen(
            [args.binary, "run", "--listen", f"127.0.0.1:{metrics_port}", "--lease-namespace", NS,
             "--image", "cachalot:perf", "--requeue-after", "300s"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "operator.log", "w"),
        )
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

        def leader():
            try:
                return metric(metrics_url, "cachalot_operator_leader") == 1
            except OSError:
                return False

        wait_for("operator to lead", leader, 60)
        print(f"operator leading after {time.monotonic() - started:.2f}s")
        time.sleep(2)  # settle: let the initial watches and allocations finish before sampling idle RSS
        print(f"idle RSS: {rss_kib(op.pid) / 1024:.1f} MiB")

        t0 = time.monotonic()
        request(base, "POST", f"/apis/cachalot.dev/v1alpha1/namespaces/{NS}/registrymirrors", mirror("m0"))
        wait_for("status of m0", lambda: has_status(base, "m0"), 60, poll_s=0.005)
        first = time.monotonic() - t0
        count = metric(metrics_url, "cachalot_operator_reconcile_duration_seconds_count")
        total = metric(metrics_url, "cachalot_operator_reconcile_duration_seconds_sum")
        print(f"one mirror: create -> status {first * 1000:.0f} ms; "
              f"operator reconciles so far {count:.0f}, mean {total / count * 1000:.1f} ms")

        t0 = time.monotonic()
        for i in range(1, args.mirrors):
            request(base, "POST", f"/apis/cachalot.dev/v1alpha1/namespaces/{NS}/registrymirrors", mirror(f"m{i}"))
        names = [f"m{i}" for i in range(args.mirrors)]
        wait_for(f"status of {args.mirrors} mirrors", lambda: all(has_status(base, n) for n in names), 600, poll_s=0.5)
        elapsed = time.monotonic() - t0
        time.sleep(2)
        count = metric(metrics_url, "cachalot_operator_reconcile_duration_seconds_count")
        total = metric(metrics_url, "cachalot_operator_reconcile_duration_seconds_sum")
        print(f"{args.mirrors} mirrors: all with status after {elapsed:.1f}s; RSS {rss_kib(op.pid) / 1024:.1f} MiB; "
              f"reconciles {count:.0f}, mean {total / count * 1000:.1f} ms")
    finally:
        for proc in (op, api):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
