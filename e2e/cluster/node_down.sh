#!/usr/bin/env bash
# Stop what node_up.sh started (by pid file), remove the pods' containers, mounts, network namespaces, the
# bridge, the kubelet's and kube-proxy's iptables chains and the egress guard, and restore the sysctls.
# The Node object is deleted (its pods are gone with it). containerd's images stay for the next start.
set -uo pipefail
: "${STATE:?}" "${BIN:?}" "${NODE_NAME:?}"
N=$STATE/node
export KUBECONFIG=$STATE/kubeconfig CONTAINERD_ADDRESS=$N/containerd/containerd.sock
stop() { local f=$N/$1.pid p; [[ -f $f ]] || return 0; p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then kill "$p"
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p"; fi
  rm -f "$f"; }
stop kube-proxy; "$BIN/kube-proxy" --cleanup >/dev/null 2>&1
stop kubelet
if ctr version >/dev/null 2>&1; then
  for t in $(ctr -n k8s.io tasks ls -q); do ctr -n k8s.io tasks kill -s KILL "$t" >/dev/null 2>&1; done; sleep 1
  for t in $(ctr -n k8s.io tasks ls -q); do ctr -n k8s.io tasks delete -f "$t" >/dev/null 2>&1; done
  for c in $(ctr -n k8s.io containers ls -q); do ctr -n k8s.io containers delete "$c" >/dev/null 2>&1; done
fi
stop containerd
# shims whose command line names our socket (children of init once containerd is gone)
for p in $(pgrep -f "containerd-shim-runc-v2 -namespace k8s.io -id .* -address $N/containerd/containerd.sock" || true); do
  kill "$p"; done
grep " $N/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^cni-'); do ip netns del "$ns"; done
ip link del gs0 2>/dev/null
# the kubelet's own chains (KUBE-FIREWALL, KUBE-MARK-*) survive kube-proxy --cleanup
for tbl in filter nat mangle; do
  iptables -t $tbl -S | grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*-j KUBE-' | sed 's/^-A/-D/' |
    while read -r rule; do eval iptables -t $tbl "$rule"; done
  for ch in $(iptables -t $tbl -S | awk '/^-N KUBE-/{print $2}'); do iptables -t $tbl -F "$ch"; done
  for ch in $(iptables -t $tbl -S | awk '/^-N KUBE-/{print $2}'); do iptables -t $tbl -X "$ch"; done
done
for chain in FORWARD OUTPUT; do
  iptables -S $chain | grep -- '--comment gearshift-egress' | sed 's/^-A/-D/' |
    while read -r rule; do eval iptables "$rule"; done
done
rm -rf "$N/cni/ipam"
[[ -f $N/sysctl.orig ]] && sysctl -q -p "$N/sysctl.orig" && rm -f "$N/sysctl.orig"
kubectl --request-timeout=10s delete node "$NODE_NAME" --ignore-not-found >/dev/null 2>&1
echo "[node_down] node $NODE_NAME stopped" >&2
