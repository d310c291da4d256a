#!/usr/bin/env bash
# Start a real Kubernetes node next to the local control plane: containerd + runc + the CNI bridge from
# Debian, the kubelet and kube-proxy built by build.sh, the given images imported into containerd.
# Usage: node_up.sh IMAGE...   (podman image names; imported under the same names, pulled never)
# Env: STATE (the control plane's state dir), BIN (kube binaries), NODE_IP, API_PORT, NODE_NAME.
# Idempotent: what runs is left running. The recipe and every problem it solves: ../shared/real-node in the
# project's workspace, summarised in e2e/README.md ("The real node").
set -euo pipefail
: "${STATE:?}" "${BIN:?}" "${NODE_IP:?}" "${API_PORT:?}" "${NODE_NAME:?}"
N=$STATE/node; L=$N/logs; P=$STATE/pki
BRIDGE=gs0 POD_CIDR=10.244.0.0/24 SERVICE_CIDR=10.0.0.0/16
mkdir -p "$L" "$N/containerd" "$N/cni/net.d" "$N/kubelet"
log() { echo "[node_up] $*" >&2; }
T0=$(date +%s)

start() { # name cmd...: own session, pid in $N/<name>.pid, log in $L/<name>.log
  local n=$1; shift
  if [[ -f $N/$n.pid ]] && kill -0 "$(cat "$N/$n.pid")" 2>/dev/null; then return; fi
  setsid "$@" >>"$L/$n.log" 2>&1 </dev/null & echo $! >"$N/$n.pid"
}
# A config file from stdin, replaced only when its content changed: a running kube-proxy exits (fatal,
# "content of the proxy server's configuration file was updated") on any write to its config file, so a
# re-run of this script (restarting containerd alone) must not touch an unchanged one.
put() { local t; t=$(mktemp "$1.XXXXXX"); cat >"$t"
  if cmp -s "$t" "$1"; then rm -f "$t"; else mv -f "$t" "$1"; fi; }
waitfor() { local what=$1 t=$2; shift 2
  for _ in $(seq 1 $((t * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "timeout after ${t}s: $what"; return 1; }

# 0. packages (Debian bookworm: containerd 1.6, runc 1.1, CNI plugins 1.1) and the pause image.
missing=()
for p in containerd runc conntrack socat containernetworking-plugins iptables podman; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; fi
if ! podman image exists localhost/pause:3.4.1; then
  # No registry: the sandbox image from the Kubernetes source's own pause.c, static.
  src=$(ls -d "$BIN"/../src/kubernetes-*/build/pause/linux | head -n1); d=$(mktemp -d)
  gcc -Os -static -DVERSION=v3.4.1-gearshift -o "$d/pause" "$src/pause.c"
  printf 'FROM scratch\nADD pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$d/Containerfile"
  podman build --runtime runc --network none -q -t localhost/pause:3.4.1 "$d" >/dev/null; rm -rf "$d"
fi

# 1. configuration (written each time it differs: paths follow $STATE)
put "$N/containerd/config.toml" <<EOF
version = 2
root = "$N/containerd/root"
state = "$N/containerd/state"
oom_score = 0
disabled_plugins = ["io.containerd.grpc.v1.cri.tracing", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$N/containerd/containerd.sock"
[ttrpc]
  address = "$N/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:3.4.1"
  # no CAP_SYS_RESOURCE on this VM: never ask runc for an oom_score_adj below our own
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$N/cni/net.d"
    max_conf_num = 1
EOF
# Pods get no default route: only Services and the API server's address, via the bridge.
put "$N/cni/net.d/10-gearshift.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "gearshift", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "isDefaultGateway": false, "ipMasq": false,
   "hairpinMode": true, "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "10.244.0.1"}]],
   "routes": [{"dst": "$SERVICE_CIDR"}, {"dst": "$NODE_IP/32"}], "dataDir": "$N/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}, {"type": "loopback"}]}
EOF
put "$N/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: $P/ca.crt}}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failSwapOn: false
oomScoreAdj: 0
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
hairpinMode: hairpin-veth
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Absolute floors, not percentages: the node shares the host's disk, and 2% of a large volume is several GiB
# (a CI machine with 4 GiB free tainted the node DiskPressure and evicted the operator). Space is checked
# before the import (step 3) instead, with a message that says what to free.
evictionHard: {"memory.available": "100Mi", "nodefs.available": "512Mi", "imagefs.available": "512Mi"}
maxPods: 50
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 5s
EOF
put "$N/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $N/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF

# 2. host network: sysctls the kubelet/bridge/kube-proxy change are saved for node_down.sh; the egress
# guard drops pod traffic to anything but the bridge (pods never leave the machine).
[[ -f $N/sysctl.orig ]] || sysctl vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.ip_forward \
  net.ipv4.conf.all.route_localnet >"$N/sysctl.orig"
sysctl -q -w net.ipv4.ip_forward=1
guard=(-s 10.244.0.0/16 ! -o "$BRIDGE" -j DROP -m comment --comment gearshift-egress)
iptables -C FORWARD "${guard[@]}" 2>/dev/null || iptables -I FORWARD "${guard[@]}"
for dev in $(ip route show default | awk '{print $5}' | sort -u); do  # what the host itself sends with a pod address
  out=(-s 10.244.0.0/16 -o "$dev" -j DROP -m comment --comment gearshift-egress)
  iptables -C OUTPUT "${out[@]}" 2>/dev/null || iptables -I OUTPUT "${out[@]}"
done

# 3. containerd and the images
start containerd containerd --config "$N/containerd/config.toml"
export CONTAINERD_ADDRESS=$N/containerd/containerd.sock
waitfor containerd 30 ctr version
free_gib() { df -P -k "$1" | awk 'NR==2{printf "%.1f", $4/1048576}'; }
log "disk: $(free_gib "$N") GiB free for containerd under $N"
for img in localhost/pause:3.4.1 "$@"; do
  id=$(podman image inspect --format '{{.Id}}' "$img")
  # Labelled with podman's image ID: imported again only when the build changed.
  have=$(ctr -n k8s.io images ls "name==$img" 2>/dev/null | grep -o 'gearshift.dev/id=[0-9a-f]*' || true)
  if [[ $have != "gearshift.dev/id=$id" ]]; then
    # The import holds the image three times at its peak (podman save's archive in /var/tmp, containerd's layers,
    # the unpacked snapshot); below that plus the kubelet's floor
    # the node would come up tainted DiskPressure and evict every pod: stop here and say so instead.
    need=$(podman image inspect --format '{{.Size}}' "$img" | awk '{printf "%.1f", 3 * $1 / 1073741824 + 0.75}')
    if awk -v f="$(free_gib "$N")" -v n="$need" 'BEGIN{exit !(f < n)}'; then
      log "not enough disk to import $img: $(free_gib "$N") GiB free under $N, $need GiB needed;" \
          "free space (podman image prune, old clones' .cache/cluster) and run again"
      exit 1
    fi
    s=$(date +%s); log "importing $img into containerd"
    podman save "$img" | ctr -n k8s.io images import - >/dev/null
    ctr -n k8s.io images label "$img" "gearshift.dev/id=$id" >/dev/null
    log "imported $img in $(( $(date +%s) - s ))s"
  fi
done
# Earlier builds' images in this node's own containerd (ours alone: its root is under $N) are dead weight
# of several GiB each: remove every image not asked for now, and the CRI's sha256:<id> aliases (which hold
# their layers) whose target is not a kept image's.
keep_refs=" localhost/pause:3.4.1 $* " keep_digests=" "
while read -r ref _ digest _; do
  [[ $ref == sha256:* ]] && continue
  if [[ $keep_refs == *" $ref "* ]]; then keep_digests+="$digest "
  else ctr -n k8s.io images rm "$ref" >/dev/null && log "removed stale $ref"; fi
done < <(ctr -n k8s.io images ls | tail -n +2)
while read -r ref _ digest _; do
  if [[ $ref == sha256:* && $keep_digests != *" $digest "* ]]; then ctr -n k8s.io images rm "$ref" >/dev/null; fi
done < <(ctr -n k8s.io images ls | tail -n +2)

# 4. the kubelet (client certificate system:node:$NODE_NAME) and kube-proxy
start kubelet "$BIN/kubelet" --config="$N/kubelet/config.yaml" --kubeconfig="$N/kubelet.kubeconfig" \
  --container-runtime=remote --container-runtime-endpoint="unix://$N/containerd/containerd.sock" \
  --image-service-endpoint="unix://$N/containerd/containerd.sock" --runtime-request-timeout=5m \
  --root-dir="$N/kubelet/root" --cert-dir="$N/kubelet/pki" --hostname-override="$NODE_NAME" \
  --node-ip="$NODE_IP" --v=2
start kube-proxy "$BIN/kube-proxy" --config="$N/kube-proxy.yaml" --v=1
export KUBECONFIG=$STATE/kubeconfig
waitfor "node $NODE_NAME Ready" 120 sh -c "kubectl get node $NODE_NAME -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
log "node $NODE_NAME Ready after $(( $(date +%s) - T0 ))s"
