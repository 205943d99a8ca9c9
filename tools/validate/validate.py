#!/usr/bin/env python3
"""Offline validation of cachalot's Kubernetes manifests, run by scripts/validate-manifests.

Subcommands:
  k8s        built-in objects against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
             unknown fields are errors), plus the chart's hardening rules for workloads and RBAC.
  crs        custom resources against the generated CRD: the structural schema is translated into
             JSON Schema with unknown fields forbidden, defaults are applied first and the CEL rules
             (x-kubernetes-validations) are evaluated, as the API server would.
  crd-match  the CRD rendered by the chart has the same spec as the generated one in crds/.
  metrics    every cachalot metric name used by alerts and the dashboard is one the registry exports.
  metric-sources  every known metric name is still registered in registry/src.
  rbac-match the chart's ClusterRole and Role grant exactly the RBAC table of docs/operator.md.
  cli-args   the operator binary accepts the args the chart's Deployment passes it.
  values-doc every leaf of the chart's values.yaml has a `# --` comment (on itself or a parent).

Invariants: no network and no cluster; every problem is reported (not only the first file's), and
the exit status is non-zero when any problem was found.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import yaml

# Groups whose kinds have no built-in schema: validated elsewhere (`crs`) or not at all (the
# prometheus-operator kinds, whose CRDs are not ours; helm lint and yamllint still check them).
CUSTOM_GROUPS = {"monitoring.coreos.com", "cachalot.dev"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    checked: int = 0
    skipped: list[str] = field(default_factory=list)

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def finish(self, what: str) -> int:
        for e in self.errors:
            print(f"ERROR {e}")
        skipped = f", {len(self.skipped)} skipped ({', '.join(sorted(set(self.skipped)))})" if self.skipped else ""
        print(f"{what}: {self.checked} checked, {len(self.errors)} error(s){skipped}")
        return 1 if self.errors else 0


@dataclass
class Doc:
    path: str
    index: int
    body: dict[str, Any]

    @property
    def where(self) -> str:
        meta = self.body.get("metadata") or {}
        ns = meta.get("namespace")
        name = f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))
        return f"{self.path}#{self.index} {self.body.get('kind')} {name}"


def load_docs(paths: list[str], report: Report) -> list[Doc]:
    docs: list[Doc] = []
    for path in paths:
        try:
            text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
            loaded = list(yaml.safe_load_all(text))
        except (OSError, yaml.YAMLError) as e:
            report.error(path, f"cannot read YAML: {e}")
            continue
        for i, body in enumerate(loaded):
            if body is None:
                continue
            if not isinstance(body, dict) or "apiVersion" not in body or "kind" not in body:
                report.error(f"{path}#{i}", "not a Kubernetes object (no apiVersion/kind)")
                continue
            docs.append(Doc(path, i, body))
    return docs


def group_of(api_version: str) -> str:
    return api_version.split("/", 1)[0] if "/" in api_version else ""


# ---------------------------------------------------------------------------------------------
# k8s: built-in schemas and hardening rules


def check_builtin(docs: list[Doc], versions: list[str], report: Report) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    seen: dict[tuple, str] = {}
    for doc in docs:
        body = doc.body
        meta = body.get("metadata") or {}
        key = (group_of(body["apiVersion"]), body["kind"], meta.get("namespace"), meta.get("name"))
        if key in seen:
            report.error(doc.where, f"duplicate object (also {seen[key]})")
        seen[key] = doc.where
        if group_of(body["apiVersion"]) in CUSTOM_GROUPS:
            report.skipped.append(body["kind"])
            continue
        report.checked += 1
        for version in versions:
            try:
                kubernetes_validate.validate(body, version, strict=True)
            except ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(root)"
                report.error(doc.where, f"Kubernetes {version} schema: {path}: {e.message}")
            except SchemaNotFoundError as e:
                report.error(doc.where, f"Kubernetes {version} has no {body['kind']} in {body['apiVersion']} ({e.message})")
        check_hardening(doc, report)


def check_hardening(doc: Doc, report: Report) -> None:
    body = doc.body
    if body["kind"] in WORKLOAD_KINDS:
        pod = ((body.get("spec") or {}).get("template") or {}).get("spec") or {}
        psc = pod.get("securityContext") or {}
        for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            where = f"{doc.where} container {c.get('name')}"
            sc = c.get("securityContext") or {}
            if sc.get("readOnlyRootFilesystem") is not True:
                report.error(where, "securityContext.readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                report.error(where, "securityContext.allowPrivilegeEscalation must be false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                report.error(where, "securityContext.capabilities.drop must contain ALL")
            if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                report.error(where, "runAsNonRoot must be true (pod or container)")
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp != "RuntimeDefault":
                report.error(where, "seccompProfile.type must be RuntimeDefault")
            if not (c.get("resources") or {}).get("requests"):
                report.error(where, "resources.requests must be set")
            if c in (pod.get("containers") or []) and not (c.get("livenessProbe") and c.get("readinessProbe")):
                report.error(where, "liveness and readiness probes must be set")
            image = str(c.get("image", ""))
            if "@" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
                report.error(where, f"image {image!r} must be pinned by a version tag or digest")
    if body["kind"] in {"ClusterRole", "Role"}:
        for i, rule in enumerate(body.get("rules") or []):
            for key in ("apiGroups", "resources", "verbs"):
                if "*" in (rule.get(key) or []):
                    report.error(doc.where, f"rules[{i}].{key} must not use '*' (least privilege)")


# ---------------------------------------------------------------------------------------------
# crs: custom resources against the CRD's structural schema and CEL rules


def to_json_schema(node: Any, root: bool = False) -> Any:
    """Translate a structural schema node into JSON Schema that forbids unknown fields.

    The API server prunes (or, with strict field validation, rejects) fields a structural schema
    does not declare, unless `x-kubernetes-preserve-unknown-fields` is set; JSON Schema allows them
    by default, so `additionalProperties: false` is added to every declared object.
    """
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {k: to_json_schema(v) for k, v in out["properties"].items()}
        if root:
            # Kubernetes adds these to every object; the CRD schema may leave them out.
            out["properties"].setdefault("apiVersion", {"type": "string"})
            out["properties"].setdefault("kind", {"type": "string"})
            out["properties"].setdefault("metadata", {"type": "object"})
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = to_json_schema(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out and key in node:
            out[key] = [to_json_schema(v) for v in out[key]]
    if isinstance(out.get("not"), dict):
        out["not"] = to_json_schema(out["not"])
    return out


def apply_defaults(schema: dict, value: Any) -> Any:
    """Fill in schema defaults the way the API server does before validation."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in props:
                    value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


def cel_rules(schema: dict, value: Any, path: str) -> Iterator[tuple[str, dict, Any]]:
    """Yield (path, rule, self) for every CEL rule that applies to a present value."""
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path, rule, value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key in value and value[key] is not None:
                yield from cel_rules(sub, value[key], f"{path}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in props:
                    yield from cel_rules(extra, value[key], f"{path}[{key}]")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            yield from cel_rules(schema["items"], v, f"{path}[{i}]")


def check_cel(schema: dict, body: dict, where: str, report: Report) -> None:
    import celpy

    env = celpy.Environment()
    for path, rule, value in cel_rules(schema, body, ""):
        text = rule.get("rule", "")
        if "oldSelf" in text:
            continue  # transition rules need a previous object; an example has none
        message = rule.get("message") or f"failed rule: {text}"
        try:
            program = env.program(env.compile(text))
            result = program.evaluate({"self": celpy.json_to_cel(value)})
        except Exception as e:  # noqa: BLE001 - any CEL failure is a validation failure
            report.error(where, f"{path or '(root)'}: CEL rule {text!r} could not be evaluated: {e}")
            continue
        if isinstance(result, Exception) or not bool(result):
            report.error(where, f"{path or '(root)'}: {message}")


def check_metadata(body: dict, where: str, report: Report) -> None:
    meta = body.get("metadata")
    if not isinstance(meta, dict):
        report.error(where, "metadata must be an object")
        return
    name = meta.get("name")
    if not isinstance(name, str) or not DNS_SUBDOMAIN.match(name):
        report.error(where, f"metadata.name {name!r} is not a DNS subdomain")
    ns = meta.get("namespace")
    if ns is not None and (not isinstance(ns, str) or not DNS_LABEL.match(ns)):
        report.error(where, f"metadata.namespace {ns!r} is not a DNS label")
    for key in ("labels", "annotations"):
        m = meta.get(key)
        if m is not None and not (isinstance(m, dict) and all(isinstance(v, str) for v in m.values())):
            report.error(where, f"metadata.{key} must map strings to strings")


def load_crds(paths: list[str], report: Report) -> dict[tuple[str, str], dict]:
    crds: dict[tuple[str, str], dict] = {}
    for doc in load_docs(paths, report):
        if doc.body.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc.body.get("spec") or {}
        for version in spec.get("versions") or []:
            if version.get("served"):
                schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
                crds[(f"{spec.get('group')}/{version.get('name')}", (spec.get("names") or {}).get("kind"))] = schema
    if not crds:
        report.error(",".join(paths), "no served CRD version found (run `cargo run -p cachalot-operator --bin crdgen`)")
    return crds


# The keys the registry reads from a credentials Secret, per `credentialsSecret.type`.
CREDENTIAL_KEYS = {"Basic": {"username", "password"}, "DockerConfigJson": {".dockerconfigjson"}}
# The keys the registry reads from `storage.s3.credentialsSecretRef`.
S3_CREDENTIAL_KEYS = {"access-key-id", "secret-access-key"}


def check_credentials_secrets(docs: list[Doc], report: Report) -> None:
    """A RegistryMirror's credentialsSecret (and S3 credentialsSecretRef) that is defined in the
    same files must hold the keys the registry reads (an example with a mismatched Secret would
    fail only on a cluster)."""
    secrets = {
        ((d.body.get("metadata") or {}).get("namespace"), (d.body.get("metadata") or {}).get("name")): d.body
        for d in docs
        if d.body.get("kind") == "Secret"
    }
    for doc in docs:
        if doc.body.get("kind") != "RegistryMirror":
            continue
        ns = (doc.body.get("metadata") or {}).get("namespace")
        for reg in (doc.body.get("spec") or {}).get("registries") or []:
            ref = reg.get("credentialsSecret")
            if not ref or (ns, ref.get("name")) not in secrets:
                continue
            secret = secrets[(ns, ref.get("name"))]
            keys = set((secret.get("data") or {}).keys()) | set((secret.get("stringData") or {}).keys())
            wanted = CREDENTIAL_KEYS.get(ref.get("type", "Basic"), set())
            missing = wanted - keys
            if missing:
                report.error(doc.where, f"credentials Secret {ref.get('name')} lacks {sorted(missing)} for type {ref.get('type', 'Basic')}")
        s3_ref = (((doc.body.get("spec") or {}).get("storage") or {}).get("s3") or {}).get("credentialsSecretRef")
        if s3_ref and (ns, s3_ref.get("name")) in secrets:
            secret = secrets[(ns, s3_ref.get("name"))]
            keys = set((secret.get("data") or {}).keys()) | set((secret.get("stringData") or {}).keys())
            missing = S3_CREDENTIAL_KEYS - keys
            if missing:
                report.error(doc.where, f"S3 credentials Secret {s3_ref.get('name')} lacks {sorted(missing)}")


def check_custom_resources(crd_paths: list[str], paths: list[str], versions: list[str], report: Report) -> None:
    import jsonschema

    crds = load_crds(crd_paths, report)
    builtin: list[Doc] = []
    for doc in load_docs(paths, report):
        body = doc.body
        group = group_of(body["apiVersion"])
        if group not in CUSTOM_GROUPS:
            builtin.append(doc)  # Secrets and the like next to the examples
            continue
        key = (body["apiVersion"], body["kind"])
        if key not in crds:
            report.error(doc.where, f"no served CRD for {body['kind']} in {body['apiVersion']}")
            continue
        report.checked += 1
        structural = crds[key]
        check_metadata(body, doc.where, report)
        defaulted = apply_defaults(structural, copy.deepcopy(body))
        validator = jsonschema.Draft7Validator(to_json_schema(structural, root=True))
        schema_errors = sorted(validator.iter_errors(defaulted), key=lambda e: list(e.path))
        for e in schema_errors:
            path = ".".join(str(p) for p in e.path) or "(root)"
            report.error(doc.where, f"schema: {path}: {e.message}")
        if not schema_errors:
            check_cel(structural, defaulted, doc.where, report)
    check_credentials_secrets(load_docs(paths, Report()), report)
    if not any(group_of(d.body["apiVersion"]) in CUSTOM_GROUPS for d in load_docs(paths, Report())):
        report.error(",".join(paths), "no custom resource found (nothing was validated)")
    if builtin:
        check_builtin(builtin, versions, report)


# ---------------------------------------------------------------------------------------------
# crd-match and metrics


def check_crd_match(rendered: list[str], generated: list[str], report: Report) -> None:
    def by_name(paths: list[str]) -> dict[str, dict]:
        return {
            d.body["metadata"]["name"]: d.body
            for d in load_docs(paths, report)
            if d.body.get("kind") == "CustomResourceDefinition"
        }

    want, got = by_name(generated), by_name(rendered)
    for name, crd in want.items():
        report.checked += 1
        if name not in got:
            report.error(name, "the chart does not render this CRD (run scripts/gen-chart-crds)")
        elif got[name].get("spec") != crd.get("spec"):
            report.error(name, "the chart's CRD spec differs from crds/ (run scripts/gen-chart-crds)")
    for name in set(got) - set(want):
        report.error(name, "the chart renders a CRD that crds/ does not have")


def exprs_in(value: Any) -> Iterator[str]:
    """Every PromQL expression (`expr` field) in a PrometheusRule or a Grafana dashboard."""
    if isinstance(value, dict):
        for key, sub in value.items():
            if key == "expr" and isinstance(sub, str):
                yield sub
            else:
                yield from exprs_in(sub)
    elif isinstance(value, list):
        for sub in value:
            yield from exprs_in(sub)


def strip_label_names(expr: str) -> str:
    """Drop the parts of a PromQL expression that hold label names, not metric names:
    `{...}` matchers and `by/without/on/ignoring/group_left/group_right (...)` clauses."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)


def check_metric_names(known_path: str, paths: list[str], report: Report) -> None:
    known = {
        line.strip()
        for line in open(known_path, encoding="utf-8")
        if line.strip() and not line.startswith("#")
    }
    pattern = re.compile(r"\bcachalot_[a-z0-9_]+")
    for path in paths:
        if path.endswith(".json"):
            bodies = [json.load(open(path, encoding="utf-8"))]
        else:
            bodies = [d.body for d in load_docs([path], report) if d.body.get("kind") == "PrometheusRule"]
        for body in bodies:
            exprs = list(exprs_in(body))
            report.checked += len(exprs)
            for expr in exprs:
                for name in sorted(set(pattern.findall(strip_label_names(expr)))):
                    if name not in known:
                        report.error(path, f"metric {name} is not exported by cachalot (see {known_path})")


def check_values_documented(path: str, report: Report) -> None:
    """Every leaf value of a chart's values.yaml is documented by a `# --` comment block directly
    above it or above one of its parent keys (a documented map documents its contents)."""
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    comment_above = False
    for number, line in enumerate(open(path, encoding="utf-8"), start=1):
        stripped = line.strip()
        if not stripped:
            comment_above = False
            continue
        if stripped.startswith("#"):
            comment_above = comment_above or stripped.startswith("# --")
            continue
        indent = len(line) - len(line.lstrip(" "))
        match = re.match(r"^([A-Za-z0-9_.\-/\"]+):(\s|$)", stripped)
        if not match or stripped.startswith("- "):
            comment_above = False
            continue  # list items and continuation lines belong to the key above
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = comment_above or any(d for _, _, d in stack)
        key = ".".join([k for _, k, _ in stack] + [match.group(1)])
        value = stripped[match.end():].split(" #")[0].strip()
        is_leaf = value != ""
        report.checked += 1
        if is_leaf and not documented:
            report.error(f"{path}:{number}", f"value {key} has no `# --` documentation comment")
        stack.append((indent, match.group(1), documented))
        comment_above = False


def check_cli_args(binary: str, paths: list[str], report: Report) -> None:
    """The operator Deployment's args are accepted by the real binary's command line parser.

    clap parses arguments in order and stops at `--help`, so running the rendered args followed by
    `--help` fails on an unknown flag or a bad value, and succeeds without starting anything.
    """
    import subprocess

    for doc in load_docs(paths, report):
        if doc.body.get("kind") != "Deployment":
            continue
        pod = doc.body["spec"]["template"]["spec"]
        for c in pod.get("containers") or []:
            command = c.get("command") or []
            if not command or not command[0].endswith("/cachalot-operator"):
                continue
            report.checked += 1
            argv = [binary, *command[1:], *(c.get("args") or []), "--help"]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                report.error(doc.where, f"cannot run {binary}: {e}")
                continue
            if done.returncode != 0:
                report.error(doc.where, f"the operator refuses the chart's args {argv[1:-1]}: {done.stderr.strip()}")


def check_metric_sources(known_path: str, sources: list[str], report: Report) -> None:
    """Every metric name the alerts may use is still registered in the source: the name without
    its `cachalot_registry_`/`cachalot_operator_` prefix and `_total`/`_bucket` suffix appears as a
    string literal (prometheus-client adds both when encoding). Catches a metric renamed there."""
    text = "".join(open(path, encoding="utf-8").read() for path in sources)
    for line in open(known_path, encoding="utf-8"):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        report.checked += 1
        stem = name.removeprefix("cachalot_registry_").removeprefix("cachalot_operator_")
        stem = stem.removesuffix("_total").removesuffix("_bucket")
        if f'"{stem}"' not in text:
            report.error(known_path, f"{name}: no \"{stem}\" registered in {', '.join(sources)}")


def rbac_from_doc(path: str) -> set[tuple[str, str, str, str]]:
    """(group, resource, verb, resourceName) from the table under `## RBAC` in docs/operator.md."""
    rules: set[tuple[str, str, str, str]] = set()
    in_section = False
    for line in open(path, encoding="utf-8"):
        if line.startswith("## "):
            in_section = line.strip() == "## RBAC"
            continue
        if not in_section or not line.startswith("|") or "---" in line:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0].lower().startswith("api group"):
            continue
        group = re.findall(r"`([^`]*)`", cells[0])
        group_name = "" if not group or group[0] == '""' else group[0]
        resource_part, _, extra = cells[1].partition("(")
        resources = re.findall(r"`([^`]+)`", resource_part)
        names = re.findall(r"resourceNames? `([^`]+)`", extra)
        verbs = re.findall(r"`([^`]+)`", cells[2])
        for r in resources:
            for v in verbs:
                rules.add((group_name, r, v, names[0] if names else ""))
    return rules


def rbac_from_manifests(paths: list[str], report: Report) -> set[tuple[str, str, str, str]]:
    rules: set[tuple[str, str, str, str]] = set()
    for doc in load_docs(paths, report):
        if doc.body.get("kind") not in ("ClusterRole", "Role"):
            continue
        for rule in doc.body.get("rules") or []:
            names = rule.get("resourceNames") or [""]
            for g in rule.get("apiGroups") or []:
                for r in rule.get("resources") or []:
                    for v in rule.get("verbs") or []:
                        for n in names:
                            rules.add((g, r, v, n))
    return rules


def check_rbac_match(doc_path: str, paths: list[str], report: Report) -> None:
    want = rbac_from_doc(doc_path)
    got = rbac_from_manifests(paths, report)
    report.checked += len(want | got)
    if not want:
        report.error(doc_path, "no RBAC table found under `## RBAC`")
    fmt = lambda r: f"{r[0] or 'core'}/{r[1]} {r[2]}" + (f" (resourceName {r[3]})" if r[3] else "")
    for r in sorted(want - got):
        report.error(",".join(paths), f"missing permission the operator needs: {fmt(r)}")
    for r in sorted(got - want):
        report.error(",".join(paths), f"permission the operator does not use ({doc_path}): {fmt(r)}")


def check_k8s(args: argparse.Namespace, report: Report) -> None:
    docs = load_docs(args.files, report)
    if not docs:
        report.error(",".join(args.files), "no objects found")
    check_builtin(docs, args.kube_version, report)


def check_values_doc(args: argparse.Namespace, report: Report) -> None:
    for path in args.files:
        check_values_documented(path, report)


@dataclass(frozen=True)
class Subcommand:
    help: str
    title: str  # what the summary line says was checked
    run: Callable[[argparse.Namespace, Report], None]
    options: tuple[str, ...] = ()  # required options given once
    lists: tuple[str, ...] = ()  # required options that may be repeated
    positional: str = "files"  # one or more of these


SUBCOMMANDS = {
    "k8s": Subcommand("validate built-in objects against the Kubernetes schemas", "kubernetes schemas",
                      check_k8s, lists=("--kube-version",)),
    "crs": Subcommand("validate custom resources against the CRD", "custom resources",
                      lambda a, r: check_custom_resources(a.crd, a.files, a.kube_version, r),
                      lists=("--crd", "--kube-version")),
    "crd-match": Subcommand("compare the chart's rendered CRD with crds/", "chart CRD matches crds/",
                            lambda a, r: check_crd_match(a.rendered, a.generated, r), lists=("--generated",),
                            positional="rendered"),
    "metrics": Subcommand("check metric names used by alerts and dashboards", "metric names",
                          lambda a, r: check_metric_names(a.known, a.files, r), ("--known",)),
    "metric-sources": Subcommand("check known metric names against the registry source",
                                 "metric names registered by the registry",
                                 lambda a, r: check_metric_sources(a.known, a.files, r), ("--known",)),
    "rbac-match": Subcommand("compare chart RBAC with docs/operator.md", "chart RBAC equals docs/operator.md",
                             lambda a, r: check_rbac_match(a.doc, a.files, r), ("--doc",)),
    "cli-args": Subcommand("check the operator binary accepts the rendered args", "operator accepts the chart's args",
                           lambda a, r: check_cli_args(a.binary, a.files, r), ("--binary",)),
    "values-doc": Subcommand("check every chart value is documented", "documented values", check_values_doc),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, subcommand in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=subcommand.help)
        for option in subcommand.options:
            p.add_argument(option, required=True)
        for option in subcommand.lists:
            p.add_argument(option, required=True, action="append")
        p.add_argument(subcommand.positional, nargs="+")
    args = parser.parse_args()

    report = Report()
    subcommand = SUBCOMMANDS[args.command]
    subcommand.run(args, report)
    return report.finish(subcommand.title)


if __name__ == "__main__":
    sys.exit(main())
