#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy once from Debian's
# `kubernetes` source package (v1.20) and cache them; install etcd and the build tools from Debian.
# Idempotent: when the five binaries are cached and etcd is installed, it does nothing.
# The node's runtime (containerd, runc, CNI, podman) is installed by e2e/realnode/provision.sh.
# Skipped entirely when KUBECONFIG points at a reachable cluster (kind, minikube, a real one).
set -euo pipefail

CACHE="${GEARSHIFT_KUBE_CACHE:-$HOME/.cache/gearshift/kube}"
BIN="$CACHE/bin"
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
# Written after a good build; binaries without it (an older, unpatched build) are rebuilt.
STAMP="$BIN/BUILD-INFO"
STAMP_TEXT="kubernetes 1.20 (Debian source), Debian golang-go, vendored reflect2 1.0.2, static kubelet with fast-delete patch"

log() { echo "[build.sh] $*" >&2; }

if [[ -n "${KUBECONFIG:-}" ]] && command -v kubectl >/dev/null \
    && kubectl --request-timeout=5s version >/dev/null 2>&1; then
    log "KUBECONFIG=$KUBECONFIG answers: using that cluster, building nothing"
    exit 0
fi

have_all() {
    [[ "$(cat "$STAMP" 2>/dev/null)" == "$STAMP_TEXT" ]] || return 1
    for c in "${COMPONENTS[@]}"; do [[ -x "$BIN/$c" ]] || return 1; done
    command -v etcd >/dev/null || [[ -x /usr/bin/etcd ]] || return 1
    command -v kubectl >/dev/null || return 1
    command -v openssl >/dev/null || return 1
}
if have_all; then
    log "control plane binaries cached in $BIN"
    exit 0
fi
# One build at a time (concurrent test runs): the second waits, then finds the binaries cached.
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9
if have_all; then
    log "control plane binaries cached in $BIN (built meanwhile)"
    exit 0
fi

SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
apt_install() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    ((${#missing[@]} == 0)) && return 0
    log "apt-get install ${missing[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || { $SUDO apt-get update -q >&2 && \
             $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
}

apt_install etcd-server openssl ca-certificates
# kubectl: any recent one works against v1.20; Debian's kubernetes-client is the fallback.
command -v kubectl >/dev/null || apt_install kubernetes-client

for c in "${COMPONENTS[@]}"; do [[ -x "$BIN/$c" ]] || need_build=1; done
[[ "$(cat "$STAMP" 2>/dev/null)" == "$STAMP_TEXT" ]] || need_build=1
if [[ -z "${need_build:-}" ]]; then
    log "done (binaries already cached)"
    exit 0
fi

apt_install golang-go rsync jq make patch dpkg-dev golang-github-modern-go-reflect2-dev
SRC_LIST=/etc/apt/sources.list.d/gearshift-debian-src.sources
if ! apt-cache showsrc kubernetes >/dev/null 2>&1 || ! apt-cache showsrc kubernetes | grep -q '^Package:'; then
    log "adding a deb-src entry for bookworm main ($SRC_LIST)"
    $SUDO tee "$SRC_LIST" >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    $SUDO apt-get update -q >&2
fi

SRC="$CACHE/src"
mkdir -p "$SRC" "$BIN"
tree=$(find "$SRC" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -n1)
if [[ -z "$tree" ]]; then
    log "apt-get source kubernetes into $SRC"
    (cd "$SRC" && apt-get source -q kubernetes >&2)
    tree=$(find "$SRC" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -n1)
fi
[[ -n "$tree" ]] || { log "no kubernetes source tree under $SRC"; exit 1; }

# Kubernetes 1.20 vendors reflect2 1.0.1, which reads Go's map iterator layout from before Go 1.18: built
# with Debian's Go 1.19 the API server segfaults encoding maps (json-iterator). Vendor Debian's 1.0.2.
r2="$tree/vendor/github.com/modern-go/reflect2"
if [[ ! -f "$r2/go_above_118.go" ]]; then
    log "vendoring reflect2 1.0.2 from Debian (Go >= 1.18 map iteration)"
    rm -f "$r2"/*.go "$r2"/*.s
    find /usr/share/gocode/src/github.com/modern-go/reflect2 -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) \
        ! -name '*_test.go' -exec cp {} "$r2/" \;
fi

# v1.20's kubelet deletes a terminated pod from the API only after its sandbox is garbage collected (every
# 60 s) and on a 10 s status tick: `kubectl delete pod` took 40-61 s. The patch makes it ~6 s (e2e only).
if ! grep -q "gearshift e2e" "$tree/pkg/kubelet/kubelet.go"; then
    log "patching the kubelet: container GC every 5 s, status sync every 2 s"
    patch -d "$tree" -p1 < "$(dirname "$0")/kubelet-fast-delete.patch" >&2
fi

log "building ${COMPONENTS[*]} in $tree (several minutes)"
whats=""
for c in "${COMPONENTS[@]}"; do whats+="cmd/$c "; done
# Debian's golang-go; one parallel job per core is the default of the Go toolchain.
# No GOFLAGS: hack/lib/golang.sh splices it into -tags. The vendor/ tree is used by default.
unset GOFLAGS
export PATH="/usr/lib/go/bin:$PATH" GO111MODULE=on
export GOCACHE="$CACHE/gocache" GOPATH="$CACHE/gopath"
# A heartbeat while Go is silent: elapsed time and how many compile results its cache holds so far.
t0=$(date +%s)
( while sleep 60; do
    log "still building: $(( ($(date +%s) - t0) / 60 )) min, $(find "$GOCACHE" -name '*-d' 2>/dev/null | wc -l) objects in the Go cache"
  done ) &
beat=$!
trap 'kill $beat 2>/dev/null || true' EXIT
# nice: the build takes both cores for minutes; the kubelet static (no host glibc dependency).
(cd "$tree" && nice -n 19 make WHAT="${whats% }" KUBE_BUILD_PLATFORMS=linux/amd64 KUBE_STATIC_OVERRIDES=kubelet >&2)
kill $beat 2>/dev/null || true; trap - EXIT
log "go build finished in $(( ($(date +%s) - t0) / 60 )) min"
for c in "${COMPONENTS[@]}"; do
    f=$(find "$tree/_output" -type f -name "$c" -perm -u+x | head -n1)
    [[ -n "$f" ]] || { log "build produced no $c"; exit 1; }
    # Copy then rename: a running binary (another test run's cluster) keeps its old inode.
    install -m 0755 "$f" "$BIN/.$c.new" && mv -f "$BIN/.$c.new" "$BIN/$c"
done
echo "$STAMP_TEXT" > "$STAMP"
log "cached: $(ls "$BIN" | tr '\n' ' ')"
