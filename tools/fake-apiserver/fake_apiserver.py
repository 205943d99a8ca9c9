"""A kube-like fake API server for controller-loop tests, built on kmock 0.8.

Role: stand in for kube-apiserver on 127.0.0.1 so a kube-runtime `Controller` (watchers, server-side
apply, status patches, finalizers) can run end to end in a test. It is an in-memory store behind
kmock's aiohttp server, request recording and discovery scaffolding.

Why a subclass and not kmock's emulator as is: kmock 0.8 stamps no resourceVersion/uid/generation,
404s on server-side apply and PUT, ignores label selectors, lets a /status patch change spec, uses
free-text error reasons and says `groupVersion: "/v1"` for the core group. `FakeApiServer` keeps
kmock's server, request parsing, discovery and DSL (non-resource paths and discovery still go
through kmock's reactions), and serves every resource request itself.

Invariants:
- `metadata.resourceVersion` is one global, strictly increasing counter; a write that changes
  nothing (a repeated apply) bumps nothing and emits no watch event, as in Kubernetes, so a
  controller that applies its owned objects on every pass does not feed itself events forever.
- `metadata.generation` starts at 1 and moves only when something outside metadata and status
  changes (or when deletion starts), for the kinds that have a generation in Kubernetes.
- For kinds with a status subresource, writes to the main resource never change status and writes
  to `/status` change only status.
- An object with finalizers is only marked (`deletionTimestamp`) on DELETE; it goes away when its
  finalizer list becomes empty. When an object goes away, dependents whose owners are all gone are
  deleted too (a synchronous stand-in for the garbage collector).
- All mutations run synchronously on the event loop (no `await` inside them), so they are atomic
  with respect to each other and to watch streams without any lock.

Not emulated: field ownership and SSA conflicts between managers (an apply from manager M removes
the fields M applied before and no longer applies, and merges the rest; lists are replaced whole),
validation against schemas, defaulting, admission, strategic merge (treated as a JSON merge
patch), pagination (`limit` is ignored and lists are never continued), and YAML bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import json
import os
import re
import signal
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import k8s as kmock_k8s
from kmock._internal import parsing as kmock_parsing
from kmock._internal import rendering as kmock_rendering

# How many past events per resource a watch can resume from before it gets 410 Gone.
HISTORY_PER_RESOURCE = 4096
# Upper bound of a watch stream's life when the client gives no timeoutSeconds.
DEFAULT_WATCH_SECONDS = 1800
# How often a quiet watch stream checks that its client is still connected.
WATCH_LIVENESS_SECONDS = 2.0
# Kept requests for kmock's assertions; bounded so a long benchmark does not grow without end.
KEPT_REQUESTS = 256

NAME_RE = re.compile(r'^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')
ALL_VERBS = ['create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch']


# kmock 0.8 parses every request path before any handler runs, and its parser raises ValueError on
# `/api/v1/namespaces` (a resource list with nothing after it), which would turn a namespace list
# into a 500. Paths it cannot parse are treated as non-resource paths by kmock; `parse_route` below
# parses resource paths itself. Pinned to kmock==0.8, where this function exists as patched.
_kmock_parse_path = kmock_parsing.parse_path


def _tolerant_parse_path(path: str) -> kmock_parsing.ParsedPath:
    try:
        return _kmock_parse_path(path)
    except ValueError:
        return kmock_parsing.ParsedPath()


kmock_parsing.parse_path = _tolerant_parse_path


# ----------------------------------------------------------------------------------------------
# Errors: Kubernetes `Status` bodies with machine-readable reasons.


@attrs.frozen
class ApiError(kmock.KubernetesError):
    """A failed API call rendered as a Kubernetes `Status` (kube reads `reason` and `code`)."""
    status: int = 500
    reason: str = 'InternalError'
    message: str = 'internal error'
    details: Any = None


def not_found(kind: 'Kind | None', name: str | None) -> ApiError:
    if kind is None:
        return ApiError(404, 'NotFound', 'the server could not find the requested resource', {})
    return ApiError(404, 'NotFound', f'{kind.plural}{kind.dotted_group()} "{name}" not found',
                    {'name': name, 'group': kind.group, 'kind': kind.plural})


def already_exists(kind: 'Kind', name: str) -> ApiError:
    return ApiError(409, 'AlreadyExists', f'{kind.plural}{kind.dotted_group()} "{name}" already exists',
                    {'name': name, 'group': kind.group, 'kind': kind.plural})


def conflict(kind: 'Kind', name: str, why: str) -> ApiError:
    return ApiError(409, 'Conflict',
                    f'Operation cannot be fulfilled on {kind.plural}{kind.dotted_group()} "{name}": {why}',
                    {'name': name, 'group': kind.group, 'kind': kind.plural})


def bad_request(message: str) -> ApiError:
    return ApiError(400, 'BadRequest', message, {})


def invalid(kind: 'Kind', name: str | None, message: str) -> ApiError:
    return ApiError(422, 'Invalid', f'{kind.kind} "{name}" is invalid: {message}',
                    {'name': name, 'group': kind.group, 'kind': kind.kind})


def status_body(err: ApiError) -> dict[str, Any]:
    # kube refuses a Status whose details hold nulls ("Failed to parse error data"): drop them.
    details = {k: v for k, v in (err.details or {}).items() if v is not None}
    return {
        'apiVersion': 'v1', 'kind': 'Status', 'metadata': {}, 'status': 'Failure',
        'message': err.message, 'reason': err.reason, 'details': details, 'code': err.status,
    }


# ----------------------------------------------------------------------------------------------
# Resource kinds known to the server.


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = False
    has_generation: bool = False
    short_names: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f'{self.group}/{self.version}' if self.group else self.version

    def dotted_group(self) -> str:
        return f'.{self.group}' if self.group else ''


BUILTIN_KINDS = [
    Kind('', 'v1', 'namespaces', 'Namespace', False, status_subresource=True, short_names=('ns',)),
    Kind('', 'v1', 'configmaps', 'ConfigMap', True, short_names=('cm',)),
    Kind('', 'v1', 'secrets', 'Secret', True),
    Kind('', 'v1', 'services', 'Service', True, status_subresource=True, short_names=('svc',)),
    Kind('', 'v1', 'serviceaccounts', 'ServiceAccount', True, short_names=('sa',)),
    Kind('', 'v1', 'pods', 'Pod', True, status_subresource=True, has_generation=True, short_names=('po',)),
    Kind('', 'v1', 'events', 'Event', True, short_names=('ev',)),
    Kind('', 'v1', 'nodes', 'Node', False, status_subresource=True, short_names=('no',)),
    Kind('', 'v1', 'persistentvolumeclaims', 'PersistentVolumeClaim', True, status_subresource=True,
         short_names=('pvc',)),
    Kind('apps', 'v1', 'deployments', 'Deployment', True, True, True, ('deploy',)),
    Kind('apps', 'v1', 'statefulsets', 'StatefulSet', True, True, True, ('sts',)),
    Kind('apps', 'v1', 'daemonsets', 'DaemonSet', True, True, True, ('ds',)),
    Kind('policy', 'v1', 'poddisruptionbudgets', 'PodDisruptionBudget', True, True, True, ('pdb',)),
    Kind('coordination.k8s.io', 'v1', 'leases', 'Lease', True),
    Kind('events.k8s.io', 'v1', 'events', 'Event', True, short_names=('ev',)),
    Kind('apiextensions.k8s.io', 'v1', 'customresourcedefinitions', 'CustomResourceDefinition', False,
         True, True, ('crd', 'crds')),
    Kind('cachalot.dev', 'v1alpha1', 'registrymirrors', 'RegistryMirror', True, True, True, ('rmirror',)),
]


# ----------------------------------------------------------------------------------------------
# Pure helpers: request paths, selectors, patches.


@dataclass(frozen=True)
class Route:
    """A resource request path, parsed once: /api(s)/[group/]version/[namespaces/NS/]plural[/name[/sub]]."""
    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_route(path: str) -> Route | None:
    """Parse a resource path; None for discovery and non-resource paths (served by kmock)."""
    parts = [p for p in path.split('/') if p]
    if len(parts) >= 3 and parts[0] == 'api':
        group, version, rest = '', parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == 'apis':
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    # `/namespaces/NS/plural...` addresses a namespaced resource; `/namespaces[/NS[/status]]` itself
    # addresses the Namespace objects.
    if rest[0] == 'namespaces' and len(rest) >= 3 and not (group == '' and rest[2] in ('status', 'finalize')):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) >= 2 else None
    sub = '/'.join(rest[2:]) or None
    return Route(group, version, plural, namespace, name, sub)


def split_outside_parens(text: str) -> list[str]:
    out, depth, cur = [], 0, ''
    for ch in text:
        if ch == '(':
            depth += 1
        elif ch == ')':
            depth -= 1
        if ch == ',' and depth == 0:
            out.append(cur)
            cur = ''
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [s.strip() for s in out if s.strip()]


SET_RE = re.compile(r'^(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)$')
EQ_RE = re.compile(r'^(?P<key>[^\s!=]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s,]*)$')
EXISTS_RE = re.compile(r'^(?P<neg>!?)\s*(?P<key>[^\s!=()]+)$')


def parse_label_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """Compile a label selector (equality and set-based) into a predicate; raise ApiError if malformed."""
    reqs: list[Callable[[dict[str, str]], bool]] = []
    for term in split_outside_parens(text):
        if m := SET_RE.match(term):
            key, op = m['key'], m['op']
            values = {v.strip() for v in m['values'].split(',') if v.strip()}
            if op == 'in':
                reqs.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                reqs.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m := EQ_RE.match(term):
            key, op, value = m['key'], m['op'], m['value']
            if op == '!=':
                reqs.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                reqs.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif m := EXISTS_RE.match(term):
            key, neg = m['key'], m['neg'] == '!'
            reqs.append(lambda labels, k=key, n=neg: (k in labels) != n)
        else:
            raise bad_request(f'unable to parse requirement: {term!r} in label selector {text!r}')
    return lambda labels: all(req(labels) for req in reqs)


def parse_field_selector(text: str) -> Callable[[dict[str, Any]], bool]:
    """Compile a field selector (`a.b=v`, `a.b==v`, `a.b!=v`, comma-joined) into a predicate."""
    reqs: list[Callable[[dict[str, Any]], bool]] = []
    for term in split_outside_parens(text):
        m = EQ_RE.match(term)
        if not m:
            raise bad_request(f'invalid field selector term {term!r}')
        path, op, value = m['key'].split('.'), m['op'], m['value']

        def get(obj: dict[str, Any], p: list[str] = path) -> str:
            cur: Any = obj
            for seg in p:
                cur = cur.get(seg) if isinstance(cur, dict) else None
            return '' if cur is None else str(cur)

        if op == '!=':
            reqs.append(lambda obj, g=get, v=value: g(obj) != v)
        else:
            reqs.append(lambda obj, g=get, v=value: g(obj) == v)
    return lambda obj: all(req(obj) for req in reqs)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == '':
        return []
    if not path.startswith('/'):
        raise bad_request(f'invalid JSON pointer {path!r}')
    return [seg.replace('~1', '/').replace('~0', '~') for seg in path[1:].split('/')]


def _container(doc: Any, segs: list[str]) -> Any:
    cur = doc
    for seg in segs:
        if isinstance(cur, dict) and seg in cur:
            cur = cur[seg]
        elif isinstance(cur, list) and seg.isdigit() and int(seg) < len(cur):
            cur = cur[int(seg)]
        else:
            raise ApiError(422, 'Invalid', f'JSON patch path not found: /{"/".join(segs)}', {})
    return cur


def _exists(doc: Any, segs: list[str]) -> bool:
    try:
        _container(doc, segs)
    except ApiError:
        return False
    return True


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    if not isinstance(ops, list):
        raise bad_request('a JSON patch must be a list of operations')
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or 'op' not in op or 'path' not in op:
            raise bad_request(f'invalid JSON patch operation: {op!r}')
        kind, segs = op['op'], _pointer(op['path'])

        def remove(segs: list[str]) -> Any:
            parent, last = _container(doc, segs[:-1]), segs[-1]
            if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
                return parent.pop(int(last))
            if isinstance(parent, dict) and last in parent:
                return parent.pop(last)
            raise ApiError(422, 'Invalid', f'JSON patch cannot remove missing {op["path"]}', {})

        def add(segs: list[str], value: Any) -> None:
            nonlocal doc
            if not segs:
                doc = copy.deepcopy(value)
                return
            parent, last = _container(doc, segs[:-1]), segs[-1]
            if isinstance(parent, list):
                if last == '-':
                    parent.append(copy.deepcopy(value))
                elif last.isdigit() and int(last) <= len(parent):
                    parent.insert(int(last), copy.deepcopy(value))
                else:
                    raise ApiError(422, 'Invalid', f'JSON patch index out of range: {op["path"]}', {})
            elif isinstance(parent, dict):
                parent[last] = copy.deepcopy(value)
            else:
                raise ApiError(422, 'Invalid', f'JSON patch parent is not a container: {op["path"]}', {})

        if kind == 'add':
            add(segs, op.get('value'))
        elif kind == 'remove':
            remove(segs)
        elif kind == 'replace':
            remove(segs) if segs else None
            add(segs, op.get('value'))
        elif kind == 'move':
            value = remove(_pointer(op.get('from', '')))
            add(segs, value)
        elif kind == 'copy':
            add(segs, copy.deepcopy(_container(doc, _pointer(op.get('from', '')))))
        elif kind == 'test':
            # As in Kubernetes (evanphx/json-patch): testing for null passes on a missing path,
            # which kube-runtime's finalizer helper relies on when it adds the first finalizer.
            if op.get('value') is None and not _exists(doc, segs):
                continue
            if _container(doc, segs) != op.get('value'):
                raise ApiError(422, 'Invalid', f'JSON patch test failed at {op["path"]}', {})
        else:
            raise bad_request(f'unknown JSON patch operation {kind!r}')
    return doc


def remove_unapplied(target: dict[str, Any], previous: dict[str, Any], current: dict[str, Any]) -> None:
    """Drop from `target` the fields a manager applied before (`previous`) and no longer applies."""
    for key, prev_value in previous.items():
        if key not in current:
            target.pop(key, None)
        elif isinstance(prev_value, dict) and isinstance(current[key], dict) and isinstance(target.get(key), dict):
            remove_unapplied(target[key], prev_value, current[key])


def apply_merge(target: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
    """Merge an applied configuration: maps recursively, lists and scalars replaced whole."""
    result = copy.deepcopy(target)
    for key, value in applied.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = apply_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def spec_part(obj: dict[str, Any]) -> dict[str, Any]:
    """Everything that moves `generation`: all but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ('metadata', 'status', 'apiVersion', 'kind')}


# ----------------------------------------------------------------------------------------------
# The store and the server.


@dataclass
class WatchEvent:
    rv: int
    type: str
    obj: dict[str, Any]
    previous: dict[str, Any] | None


@dataclass
class Store:
    """In-memory objects per resource kind, with a global resourceVersion and per-kind event history."""
    kinds: dict[tuple[str, str, str], Kind] = field(default_factory=dict)
    objects: dict[tuple[str, str, str], dict[tuple[str, str], dict[str, Any]]] = field(default_factory=dict)
    history: dict[tuple[str, str, str], deque[WatchEvent]] = field(default_factory=dict)
    compacted: dict[tuple[str, str, str], int] = field(default_factory=dict)
    applied: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    rv: int = 1
    services_allocated: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@attrs.define(kw_only=True)
class FakeApiServer(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with the semantics kube-runtime needs (see the module docs)."""

    store: Store = attrs.field(factory=Store)
    history_per_resource: int = HISTORY_PER_RESOURCE
    log_requests: bool = False

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for kind in BUILTIN_KINDS:
            self.register_kind(kind)

    # -- registration and discovery --------------------------------------------------------------

    def register_kind(self, kind: Kind) -> None:
        self.store.kinds[kind.key] = kind
        self.store.objects.setdefault(kind.key, {})
        self.store.history.setdefault(kind.key, deque())
        self.resources[kmock.resource(kind.group, kind.version, kind.plural)] = kmock.ResourceInfo(
            namespaced=kind.namespaced, kind=kind.kind, singular=kind.kind.lower(),
            verbs=ALL_VERBS, shortnames=kind.short_names,
            subresources={'status'} if kind.status_subresource else set(),
        )

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get('spec', {})
        names = spec.get('names', {})
        for version in spec.get('versions', []):
            if not version.get('served', True) or not names.get('plural') or not version.get('name'):
                continue
            self.register_kind(Kind(
                group=spec.get('group', ''), version=version['name'], plural=names['plural'],
                kind=names.get('kind', names['plural']), namespaced=spec.get('scope') == 'Namespaced',
                status_subresource='status' in (version.get('subresources') or {}),
                has_generation=True, short_names=tuple(names.get('shortNames', [])),
            ))

    async def _serve_server_version(self, request: kmock_rendering.Request) -> Any:
        # kmock answers as a k3s 1.26; say plainly what this is.
        return {'major': '1', 'minor': '33', 'gitVersion': 'v1.33.0-cachalot-fake-apiserver',
                'gitCommit': '', 'gitTreeState': 'clean', 'buildDate': '', 'goVersion': '',
                'compiler': '', 'platform': 'linux/amd64'}

    async def _serve_version(self, request: kmock_rendering.Request) -> Any:
        # kmock renders the core group as "/v1"; kube's discovery expects "v1".
        body = await super()._serve_version(request)
        if isinstance(body, dict) and body.get('groupVersion', '').startswith('/'):
            body['groupVersion'] = body['groupVersion'][1:]
        for res in body.get('resources', []) if isinstance(body, dict) else []:
            if '/' in res.get('name', ''):
                res['verbs'] = ['get', 'patch', 'update']
        return body

    # -- entry point -----------------------------------------------------------------------------

    async def _handle(self, request: kmock_rendering.Request) -> aiohttp.web.StreamResponse:
        self._trim_recorded_requests()
        route = parse_route(request.url.path)
        if route is None:
            # Discovery, /version and anything a test declared through kmock's DSL.
            return await kmock_k8s.KubernetesScaffold._handle(self, request)
        try:
            response = await self._serve_resource(request, route)
        except ApiError as err:
            response = aiohttp.web.json_response(status_body(err), status=err.status)
            if self.log_requests:
                print(f'{request.method.value} {request.url.path_qs} -> {err.status} {err.reason}: {err.message}',
                      file=sys.stderr, flush=True)
            return response
        if self.log_requests:
            print(f'{request.method.value} {request.url.path_qs} -> {response.status}', file=sys.stderr, flush=True)
        return response

    def _trim_recorded_requests(self) -> None:
        if len(self._requests) > 2 * KEPT_REQUESTS:
            del self._requests[:-KEPT_REQUESTS]
        for payload in self._payloads:
            if len(payload._requests) > 2 * KEPT_REQUESTS:
                del payload._requests[:-KEPT_REQUESTS]
        for errors in self._errors:
            del errors[:]

    async def _serve_resource(self, request: kmock_rendering.Request, route: Route) -> aiohttp.web.StreamResponse:
        kind = self.store.kinds.get((route.group, route.version, route.plural))
        if kind is None:
            raise not_found(None, None)
        if route.namespace is not None and not kind.namespaced:
            raise not_found(None, None)
        if route.subresource not in (None, 'status') or (route.subresource == 'status' and not kind.status_subresource):
            raise not_found(None, None)
        if kind.namespaced and route.name is not None and route.namespace is None:
            raise not_found(None, None)
        method = request.method.value if hasattr(request.method, 'value') else str(request.method)
        params = request.params
        ns = route.namespace if kind.namespaced else ''

        if method == 'GET' and params.get('watch') in ('true', '1'):
            return await self._serve_watch_stream(request, kind, route)
        if method == 'GET' and route.name is None:
            return aiohttp.web.json_response(self._list(kind, route.namespace, params))
        if method == 'GET':
            return aiohttp.web.json_response(self._get(kind, ns, route.name))
        if method == 'POST' and route.name is None:
            obj = self._create(kind, ns, self._body_object(request), params)
            return aiohttp.web.json_response(obj, status=201)
        if method == 'PUT' and route.name is not None:
            obj = self._replace(kind, ns, route.name, route.subresource, self._body_object(request))
            return aiohttp.web.json_response(obj)
        if method == 'PATCH' and route.name is not None:
            content_type = request.headers.get('Content-Type', '').split(';')[0].strip()
            obj, created = self._patch(kind, ns, route.name, route.subresource, content_type,
                                       self._body_json(request), params)
            return aiohttp.web.json_response(obj, status=201 if created else 200)
        if method == 'DELETE' and route.name is not None and route.subresource is None:
            return aiohttp.web.json_response(self._delete(kind, ns, route.name))
        if method == 'DELETE' and route.name is None:
            listing = self._list(kind, route.namespace, params)
            for item in listing['items']:
                self._delete(kind, item['metadata'].get('namespace', ''), item['metadata']['name'])
            return aiohttp.web.json_response(listing)
        raise ApiError(405, 'MethodNotAllowed', f'{method} is not supported on this path', {})

    @staticmethod
    def _body_json(request: kmock_rendering.Request) -> Any:
        if not request.body:
            raise bad_request('the request body is empty')
        try:
            return json.loads(request.body)
        except ValueError as exc:
            raise bad_request(f'the request body is not JSON (YAML is not supported here): {exc}') from None

    def _body_object(self, request: kmock_rendering.Request) -> dict[str, Any]:
        body = self._body_json(request)
        if not isinstance(body, dict):
            raise bad_request('the request body must be a JSON object')
        return body

    # -- reads -----------------------------------------------------------------------------------

    def _get(self, kind: Kind, ns: str, name: str) -> dict[str, Any]:
        obj = self.store.objects[kind.key].get((ns, name))
        if obj is None:
            raise not_found(kind, name)
        return obj

    def _matcher(self, kind: Kind, namespace: str | None, params: dict[str, str]) -> Callable[[dict[str, Any]], bool]:
        labels = parse_label_selector(params.get('labelSelector', ''))
        fields = parse_field_selector(params.get('fieldSelector', ''))

        def matches(obj: dict[str, Any]) -> bool:
            meta = obj.get('metadata', {})
            if namespace is not None and kind.namespaced and meta.get('namespace') != namespace:
                return False
            return labels(meta.get('labels') or {}) and fields(obj)
        return matches

    def _list(self, kind: Kind, namespace: str | None, params: dict[str, str]) -> dict[str, Any]:
        matches = self._matcher(kind, namespace, params)
        items = [obj for _, obj in sorted(self.store.objects[kind.key].items()) if matches(obj)]
        return {
            'apiVersion': kind.api_version, 'kind': f'{kind.kind}List',
            'metadata': {'resourceVersion': str(self.store.rv)}, 'items': items,
        }

    # -- writes ----------------------------------------------------------------------------------

    def _publish(self, kind: Kind, type_: str, obj: dict[str, Any], previous: dict[str, Any] | None) -> None:
        history = self.store.history[kind.key]
        history.append(WatchEvent(int(obj['metadata']['resourceVersion']), type_, obj, previous))
        while len(history) > self.history_per_resource:
            self.store.compacted[kind.key] = history.popleft().rv
        # Wake every waiting watch stream; each one re-reads the history from its own position.
        changed, self.store.changed = self.store.changed, asyncio.Event()
        changed.set()

    def _next_rv(self) -> str:
        self.store.rv += 1
        return str(self.store.rv)

    def _check_identity(self, kind: Kind, ns: str, obj: dict[str, Any], name: str | None) -> None:
        api_version, obj_kind = obj.get('apiVersion'), obj.get('kind')
        if api_version is not None and api_version != kind.api_version:
            raise bad_request(f'apiVersion {api_version!r} does not match the URL ({kind.api_version})')
        if obj_kind is not None and obj_kind != kind.kind:
            raise bad_request(f'kind {obj_kind!r} does not match the URL ({kind.kind})')
        meta = obj.get('metadata')
        if not isinstance(meta, dict):
            raise invalid(kind, name, 'metadata: Required value')
        body_ns = meta.get('namespace')
        if kind.namespaced and body_ns not in (None, '', ns):
            raise bad_request(f'the namespace of the object ({body_ns}) does not match the namespace on the request ({ns})')
        if name is not None and meta.get('name') not in (None, name):
            raise bad_request(f'the name of the object ({meta.get("name")}) does not match the name on the URL ({name})')

    def _stamp_new(self, kind: Kind, ns: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault('metadata', {})
        name = meta.get('name')
        if not name and meta.get('generateName'):
            name = meta['name'] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        if not name:
            raise invalid(kind, None, 'metadata.name: Required value: name or generateName is required')
        if len(name) > 253 or not NAME_RE.match(name):
            raise invalid(kind, name, 'metadata.name: Invalid value: must be a lowercase RFC 1123 subdomain')
        obj['apiVersion'], obj['kind'] = kind.api_version, kind.kind
        if kind.namespaced:
            meta['namespace'] = ns
        else:
            meta.pop('namespace', None)
        meta['uid'] = str(uuid.uuid4())
        meta['creationTimestamp'] = now_rfc3339()
        for transient in ('resourceVersion', 'deletionTimestamp', 'deletionGracePeriodSeconds', 'managedFields'):
            meta.pop(transient, None)
        if kind.has_generation:
            meta['generation'] = 1
        else:
            meta.pop('generation', None)
        if kind.status_subresource:
            obj.pop('status', None)
        if kind.key == ('', 'v1', 'services'):
            self._allocate_service_addresses(obj)
        if kind.key == ('apiextensions.k8s.io', 'v1', 'customresourcedefinitions'):
            obj['status'] = {
                'acceptedNames': obj.get('spec', {}).get('names', {}),
                'conditions': [
                    {'type': 'NamesAccepted', 'status': 'True', 'reason': 'NoConflicts',
                     'lastTransitionTime': meta['creationTimestamp'], 'message': 'no conflicts found'},
                    {'type': 'Established', 'status': 'True', 'reason': 'InitialNamesAccepted',
                     'lastTransitionTime': meta['creationTimestamp'], 'message': 'the initial names have been accepted'},
                ],
                'storedVersions': [v.get('name') for v in obj.get('spec', {}).get('versions', []) if v.get('storage')],
            }
        return obj

    def _allocate_service_addresses(self, obj: dict[str, Any]) -> None:
        """Give a new Service a ClusterIP and NodePorts, as kube-apiserver's allocators do."""
        spec = obj.setdefault('spec', {})
        svc_type = spec.get('type') or 'ClusterIP'
        spec['type'] = svc_type
        if svc_type == 'ExternalName':
            return
        if not spec.get('clusterIP'):
            self.store.services_allocated += 1
            n = self.store.services_allocated
            spec['clusterIP'] = f'10.96.{(n // 250) % 250}.{n % 250 + 1}'
        if spec['clusterIP'] != 'None':
            spec['clusterIPs'] = [spec['clusterIP']]
        if svc_type in ('NodePort', 'LoadBalancer'):
            used = {port.get('nodePort') for objs in [self.store.objects[('', 'v1', 'services')]]
                    for svc in objs.values() for port in svc.get('spec', {}).get('ports', [])}
            for port in spec.get('ports', []):
                if not port.get('nodePort'):
                    port['nodePort'] = next(p for p in range(30000, 32768) if p not in used)
                    used.add(port['nodePort'])

    def _keep_service_addresses(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Allocated addresses survive updates that do not mention them (SSA merges ports by key)."""
        old_spec, spec = old.get('spec', {}), new.setdefault('spec', {})
        for key in ('clusterIP', 'clusterIPs'):
            if key in old_spec and not spec.get(key):
                spec[key] = copy.deepcopy(old_spec[key])
        old_ports = {(p.get('port'), p.get('protocol', 'TCP')): p for p in old_spec.get('ports', [])}
        for port in spec.get('ports', []):
            previous = old_ports.get((port.get('port'), port.get('protocol', 'TCP')))
            if previous and previous.get('nodePort') and not port.get('nodePort') and \
                    (spec.get('type') or 'ClusterIP') in ('NodePort', 'LoadBalancer'):
                port['nodePort'] = previous['nodePort']
        spec.setdefault('type', old_spec.get('type', 'ClusterIP'))
        if spec['type'] in ('NodePort', 'LoadBalancer') and any(not p.get('nodePort') for p in spec.get('ports', [])):
            self._allocate_service_addresses(new)

    def _insert(self, kind: Kind, ns: str, obj: dict[str, Any]) -> dict[str, Any]:
        name = obj['metadata']['name']
        if (ns, name) in self.store.objects[kind.key]:
            raise already_exists(kind, name)
        obj['metadata']['resourceVersion'] = self._next_rv()
        self.store.objects[kind.key][(ns, name)] = obj
        self._publish(kind, 'ADDED', obj, None)
        if kind.key == ('apiextensions.k8s.io', 'v1', 'customresourcedefinitions'):
            self._register_crd(obj)
        return obj

    def _create(self, kind: Kind, ns: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        self._check_identity(kind, ns, body, None)
        obj = self._stamp_new(kind, ns, body)
        if params.get('dryRun') == 'All':
            return obj
        return self._insert(kind, ns, obj)

    def _commit(self, kind: Kind, ns: str, old: dict[str, Any], new: dict[str, Any], subresource: str | None) -> dict[str, Any]:
        """Store `new` as the next version of `old`, enforcing the metadata and status invariants."""
        new = copy.deepcopy(new)
        meta, old_meta = new.setdefault('metadata', {}), old['metadata']
        if not isinstance(meta, dict):
            raise invalid(kind, old_meta['name'], 'metadata: must be an object')
        if kind.status_subresource:
            if subresource == 'status':
                # Only status moves through /status; everything else stays as stored.
                new = {**copy.deepcopy(old), 'status': new.get('status')}
                if new['status'] is None:
                    new.pop('status')
                meta = new['metadata']
            else:
                new.pop('status', None)
                if 'status' in old:
                    new['status'] = copy.deepcopy(old['status'])
        new['apiVersion'], new['kind'] = kind.api_version, kind.kind
        for immutable in ('name', 'namespace', 'uid', 'creationTimestamp', 'deletionTimestamp', 'generation'):
            if immutable in old_meta:
                meta[immutable] = old_meta[immutable]
            else:
                meta.pop(immutable, None)
        meta.pop('managedFields', None)
        meta['resourceVersion'] = old_meta['resourceVersion']
        if old_meta.get('deletionTimestamp'):
            # Kubernetes refuses new finalizers on an object that is being deleted.
            added = set(meta.get('finalizers') or []) - set(old_meta.get('finalizers') or [])
            if added:
                raise invalid(kind, old_meta['name'], f'metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {sorted(added)}')
        if not meta.get('finalizers'):
            meta.pop('finalizers', None)
        if kind.key == ('', 'v1', 'services'):
            self._keep_service_addresses(old, new)
        if kind.has_generation and spec_part(new) != spec_part(old):
            meta['generation'] = int(old_meta.get('generation', 1)) + 1
        if new == old:
            return old  # a no-op write: no new resourceVersion, no event
        meta['resourceVersion'] = self._next_rv()
        if old_meta.get('deletionTimestamp') and not meta.get('finalizers'):
            self._remove(kind, ns, new)
            return new
        self.store.objects[kind.key][(ns, old_meta['name'])] = new
        self._publish(kind, 'MODIFIED', new, old)
        if kind.key == ('apiextensions.k8s.io', 'v1', 'customresourcedefinitions'):
            self._register_crd(new)
        return new

    def _check_rv(self, kind: Kind, old: dict[str, Any], body: dict[str, Any]) -> None:
        wanted = (body.get('metadata') or {}).get('resourceVersion') if isinstance(body, dict) else None
        if wanted and wanted != old['metadata']['resourceVersion']:
            raise conflict(kind, old['metadata']['name'],
                           'the object has been modified; please apply your changes to the latest version and try again')

    def _replace(self, kind: Kind, ns: str, name: str, sub: str | None, body: dict[str, Any]) -> dict[str, Any]:
        self._check_identity(kind, ns, body, name)
        old = self._get(kind, ns, name)
        self._check_rv(kind, old, body)
        return self._commit(kind, ns, old, body, sub)

    def _patch(self, kind: Kind, ns: str, name: str, sub: str | None, content_type: str, body: Any,
               params: dict[str, str]) -> tuple[dict[str, Any], bool]:
        existing = self.store.objects[kind.key].get((ns, name))
        if content_type == 'application/apply-patch+yaml':
            if not isinstance(body, dict):
                raise bad_request('an apply patch must be a JSON object')
            self._check_identity(kind, ns, body, name)
            manager = params.get('fieldManager')
            if not manager:
                raise bad_request('PATCH with apply-patch+yaml requires the fieldManager parameter')
            applied = copy.deepcopy(body)
            meta = applied.setdefault('metadata', {})
            meta['name'] = name
            wanted_rv = meta.pop('resourceVersion', None)
            for ignored in ('managedFields', 'uid', 'creationTimestamp', 'generation', 'deletionTimestamp'):
                meta.pop(ignored, None)
            if kind.namespaced:
                meta['namespace'] = ns
            if sub == 'status':
                applied = {'status': applied.get('status')} if 'status' in applied else {}
            elif kind.status_subresource:
                applied.pop('status', None)
            key = (kind.key, ns, name, manager, sub)
            if existing is None:
                if sub == 'status':
                    raise not_found(kind, name)
                created = self._stamp_new(kind, ns, applied)
                if params.get('dryRun') == 'All':
                    return created, True
                obj = self._insert(kind, ns, created)
                self.store.applied[key] = applied
                return obj, True
            if wanted_rv and wanted_rv != existing['metadata']['resourceVersion']:
                raise conflict(kind, name, 'the object has been modified; please apply your changes to the latest version and try again')
            target = copy.deepcopy(existing)
            remove_unapplied(target, self.store.applied.get(key, {}), applied)
            merged = apply_merge(target, applied)
            if params.get('dryRun') == 'All':
                return merged, False
            obj = self._commit(kind, ns, existing, merged, sub)
            self.store.applied[key] = applied
            return obj, False
        if existing is None:
            raise not_found(kind, name)
        if content_type == 'application/json-patch+json':
            patched = json_patch(existing, body)
        elif content_type in ('application/merge-patch+json', 'application/strategic-merge-patch+json'):
            if not isinstance(body, dict):
                raise bad_request('a merge patch must be a JSON object')
            self._check_rv(kind, existing, body)
            patched = merge_patch(existing, body)
        else:
            raise ApiError(415, 'UnsupportedMediaType', f'the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {content_type!r})', {})
        if not isinstance(patched, dict):
            raise bad_request('the patched object is not a JSON object')
        self._check_identity(kind, ns, patched, name)
        if params.get('dryRun') == 'All':
            return patched, False
        return self._commit(kind, ns, existing, patched, sub), False

    def _delete(self, kind: Kind, ns: str, name: str) -> dict[str, Any]:
        old = self._get(kind, ns, name)
        if old['metadata'].get('deletionTimestamp'):
            return old
        if old['metadata'].get('finalizers'):
            new = copy.deepcopy(old)
            new['metadata']['deletionTimestamp'] = now_rfc3339()
            new['metadata']['deletionGracePeriodSeconds'] = 0
            if kind.has_generation:
                new['metadata']['generation'] = int(old['metadata'].get('generation', 1)) + 1
            new['metadata']['resourceVersion'] = self._next_rv()
            self.store.objects[kind.key][(ns, name)] = new
            self._publish(kind, 'MODIFIED', new, old)
            return new
        gone = copy.deepcopy(old)
        gone['metadata']['resourceVersion'] = self._next_rv()
        self._remove(kind, ns, gone)
        return gone

    def _remove(self, kind: Kind, ns: str, final: dict[str, Any]) -> None:
        name = final['metadata']['name']
        self.store.objects[kind.key].pop((ns, name), None)
        for key in [k for k in self.store.applied if k[0] == kind.key and k[1] == ns and k[2] == name]:
            del self.store.applied[key]
        self._publish(kind, 'DELETED', final, None)
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Delete every object whose ownerReferences all point at objects that no longer exist."""
        live = {obj['metadata'].get('uid') for objs in self.store.objects.values() for obj in objs.values()}
        for kind_key, objs in list(self.store.objects.items()):
            for (ns, name), obj in list(objs.items()):
                owners = obj['metadata'].get('ownerReferences') or []
                if owners and not any(ref.get('uid') in live for ref in owners):
                    if (ns, name) in objs and not obj['metadata'].get('deletionTimestamp'):
                        self._delete(self.store.kinds[kind_key], ns, name)

    # -- watch -----------------------------------------------------------------------------------

    async def _serve_watch_stream(self, request: kmock_rendering.Request, kind: Kind, route: Route) -> aiohttp.web.StreamResponse:
        params = request.params
        matches = self._matcher(kind, route.namespace, params)
        if route.name is not None:
            by_name = matches
            matches = lambda obj: by_name(obj) and obj['metadata'].get('name') == route.name  # noqa: E731
        try:
            timeout = float(params.get('timeoutSeconds') or DEFAULT_WATCH_SECONDS)
        except ValueError:
            raise bad_request(f'invalid timeoutSeconds {params.get("timeoutSeconds")!r}') from None
        rv_param = params.get('resourceVersion', '')
        initial = params.get('sendInitialEvents') == 'true'
        if rv_param not in ('', '0'):
            if not rv_param.isdigit():
                raise bad_request(f'invalid resourceVersion {rv_param!r}')
            start = int(rv_param)
        else:
            start = None

        response = aiohttp.web.StreamResponse(status=200, headers={'Content-Type': 'application/json'})
        assert request._raw_request is not None  # set by kmock for every served request
        await response.prepare(request._raw_request)
        try:
            async for event in self._watch_events(kind, matches, start, initial, timeout, request):
                await response.write(json.dumps(event).encode() + b'\n')
        except (ConnectionError, asyncio.CancelledError):
            return response
        await response.write_eof()
        return response

    async def _watch_events(self, kind: Kind, matches: Callable[[dict[str, Any]], bool], start: int | None,
                            initial: bool, timeout: float, request: kmock_rendering.Request) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if start is None:
            # No resourceVersion: synthetic ADDED for what exists now, then everything after it.
            start = self.store.rv
            snapshot = [obj for _, obj in sorted(self.store.objects[kind.key].items()) if matches(obj)]
            for obj in snapshot:
                yield {'type': 'ADDED', 'object': obj}
            if initial:
                yield {'type': 'BOOKMARK', 'object': {
                    'apiVersion': kind.api_version, 'kind': kind.kind,
                    'metadata': {'resourceVersion': str(start), 'annotations': {'k8s.io/initial-events-end': 'true'}}}}
        elif start < self.store.compacted.get(kind.key, 0):
            yield {'type': 'ERROR', 'object': status_body(ApiError(
                410, 'Expired', f'too old resource version: {start} ({self.store.compacted[kind.key]})', {}))}
            return
        position = start
        while loop.time() < deadline:
            changed = self.store.changed
            for event in list(self.store.history[kind.key]):
                if event.rv <= position:
                    continue
                position = event.rv
                if matches(event.obj):
                    yield {'type': event.type, 'object': event.obj}
                elif event.previous is not None and matches(event.previous):
                    # The object left the selection: a watcher sees it as deleted.
                    yield {'type': 'DELETED', 'object': event.obj}
            raw = request._raw_request
            if raw is not None and (raw.transport is None or raw.transport.is_closing()):
                return
            remaining = deadline - loop.time()
            try:
                await asyncio.wait_for(changed.wait(), timeout=max(0.0, min(remaining, WATCH_LIVENESS_SECONDS)))
            except asyncio.TimeoutError:
                pass


# ----------------------------------------------------------------------------------------------
# Command line.


async def serve(host: str, port: int, port_file: str | None, history: int, log_requests: bool) -> None:
    handler = FakeApiServer(history_per_resource=history, log_requests=log_requests)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with handler, kmock.Server(handler, host=host, port=port or None) as server:
        actual = server.port
        if port_file:
            tmp = f'{port_file}.tmp'
            with open(tmp, 'w', encoding='utf-8') as fh:
                fh.write(f'{actual}\n')
            os.replace(tmp, port_file)  # atomic: a reader never sees a half-written port
        print(f'fake-apiserver listening on http://{host}:{actual}', flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='fake-apiserver', description=__doc__.split('\n')[0])
    parser.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1)')
    parser.add_argument('--port', type=int, default=0, help='port to bind; 0 picks a free one (default)')
    parser.add_argument('--port-file', default=None, help='write the bound port to this file once listening')
    parser.add_argument('--history', type=int, default=HISTORY_PER_RESOURCE,
                        help='watch events kept per resource kind before a resume gets 410 Expired')
    parser.add_argument('--log-requests', action='store_true',
                        default=os.environ.get('FAKE_APISERVER_LOG_REQUESTS') == '1',
                        help='log every resource request and its status to stderr '
                             '(also FAKE_APISERVER_LOG_REQUESTS=1)')
    args = parser.parse_args(argv)
    if args.history < 1:
        parser.error('--history must be at least 1')
    if args.host not in ('127.0.0.1', 'localhost', '::1'):
        parser.error('the fake API server only binds to loopback addresses')
    try:
        asyncio.run(serve(args.host, args.port, args.port_file, args.history, args.log_requests))
    except OSError as exc:
        print(f'fake-apiserver: cannot listen on {args.host}:{args.port}: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
