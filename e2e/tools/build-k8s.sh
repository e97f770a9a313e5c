#!/usr/bin/env bash
# Builds the Kubernetes components the local cluster needs from their Go modules, once per version,
# into a cache directory (printed on stdout when done). Later runs find the binaries and return at once.
#
#   e2e/tools/build-k8s.sh            # build (or reuse) everything, print the bin directory
#
# Env: MYCEL_CACHE_DIR (default ~/.cache/mycel), K8S_VERSION, ETCD_VERSION, KWOK_VERSION.
# Why a wrapper module: k8s.io/kubernetes replaces its staging modules with ./staging paths, which a
# consumer cannot follow, so we pin each staging module to the matching v0.<minor>.<patch> release.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.7}
KWOK_VERSION=${KWOK_VERSION:-v0.7.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.14.7}
CACHE=${MYCEL_CACHE_DIR:-$HOME/.cache/mycel}
BIN="$CACHE/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION/bin"
JOBS=${GO_BUILD_JOBS:-2}

want=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd kwok coredns)
missing=0
for b in "${want[@]}"; do [ -x "$BIN/$b" ] || missing=1; done
# CoreDNS is not part of the directory's name: a changed version rebuilds it alone.
[ "$(cat "$BIN/coredns.version" 2>/dev/null)" = "$COREDNS_VERSION" ] || { rm -f "$BIN/coredns"; missing=1; }
if [ "$missing" = 0 ]; then echo "$BIN"; exit 0; fi

mkdir -p "$BIN"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CGO_ENABLED=0 GOFLAGS=-mod=mod

log() { echo "build-k8s: $*" >&2; }

# --- Kubernetes ----------------------------------------------------------------------------------
if ! { [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ] && [ -x "$BIN/kube-scheduler" ] \
      && [ -x "$BIN/kubelet" ] && [ -x "$BIN/kube-proxy" ] && [ -x "$BIN/kubectl" ]; }; then
  log "building Kubernetes $K8S_VERSION (cold: ~10 min on 2 cores)"
  mkdir -p "$work/k8s" && cd "$work/k8s"
  go mod init mycel.local/k8s-build >/dev/null 2>&1
  modfile=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  minor_patch=${K8S_VERSION#v1.}
  {
    echo "require k8s.io/kubernetes $K8S_VERSION"
    # every `k8s.io/x => ./staging/src/k8s.io/x` becomes `k8s.io/x => k8s.io/x v0.<minor>.<patch>`
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/k8s.io/.*#replace \1 => \1 v0.'"$minor_patch"'#p' "$modfile"
  } >> go.mod
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  go mod tidy >&2
  ver="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor_patch%%.*} -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  go build -p "$JOBS" -trimpath -ldflags "-s -w $ver" -o "$BIN/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl >&2
fi

# --- etcd ------------------------------------------------------------------------------------------
if [ ! -x "$BIN/etcd" ]; then
  log "building etcd $ETCD_VERSION"
  mkdir -p "$work/etcd" && cd "$work/etcd"
  go mod init mycel.local/etcd-build >/dev/null 2>&1
  echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION" >> go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
  go mod tidy >&2
  go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3 >&2
fi

# --- kwok ------------------------------------------------------------------------------------------
if [ ! -x "$BIN/kwok" ]; then
  log "building kwok $KWOK_VERSION"
  mkdir -p "$work/kwok" && cd "$work/kwok"
  go mod init mycel.local/kwok-build >/dev/null 2>&1
  echo "require sigs.k8s.io/kwok $KWOK_VERSION" >> go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "sigs.k8s.io/kwok/cmd/kwok"\n' > tools.go
  go mod tidy >&2
  go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/kwok" sigs.k8s.io/kwok/cmd/kwok >&2
fi

# --- CoreDNS ---------------------------------------------------------------------------------------
if [ ! -x "$BIN/coredns" ]; then
  log "building CoreDNS $COREDNS_VERSION"
  mkdir -p "$work/coredns" && cd "$work/coredns"
  go mod init mycel.local/coredns-build >/dev/null 2>&1
  echo "require github.com/coredns/coredns $COREDNS_VERSION" >> go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/coredns/coredns"\n' > tools.go
  go mod tidy >&2
  go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/coredns" github.com/coredns/coredns >&2
  echo "$COREDNS_VERSION" > "$BIN/coredns.version"
fi

echo "$BIN"
