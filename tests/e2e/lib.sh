# Shared helpers for the end-to-end scenarios. Each scenario is a bash script that sources
# this file, starts what it needs on loopback ports, and exits non-zero on the first failed
# check. Every process a scenario starts is recorded and stopped, by PID, on exit.
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$E2E_DIR/../.." && pwd)
# tests/e2e/run.sh builds this (the debug binary `cargo test` builds anyway) and exports it.
STOWAGE_BIN=${STOWAGE_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/stowage}
SCENARIO=$(basename "$0" .sh)
WORK=$(mktemp -d "/tmp/stowage-e2e-$SCENARIO.XXXXXX")
PIDS=()
# Commands cleanup runs (with eval) after every recorded process has stopped.
AT_EXIT=()
# The venv tests/deps.sh installs moto into (Debian's python3 takes no pip installs).
TEST_VENV=${STOWAGE_TEST_VENV:-/opt/stowage-test-venv}

# The machine sets AWS_CA_BUNDLE, which makes docker-registry's S3 driver panic; none of
# the processes here need it.
unset AWS_CA_BUNDLE
# Never let a developer's own proxy settings leak into a scenario.
unset HTTPS_PROXY https_proxy HTTP_PROXY http_proxy NO_PROXY no_proxy ALL_PROXY all_proxy

log() { echo "[$SCENARIO] $*" >&2; }
fail() {
  log "FAIL: $*"
  exit 1
}
ok() { log "ok: $*"; }

# Waits up to 5 s for a line matching the basic regex PATTERN in FILE: Stowage's log lines
# reach its stderr from a writer thread, a moment after what they record.
# Usage: wait_log FILE PATTERN
wait_log() {
  local i
  for i in $(seq 50); do
    grep -q -- "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  local cmd
  for cmd in "${AT_EXIT[@]}"; do
    eval "$cmd" || true
  done
  # What a stopped process left mounted under $WORK (dockerd leaves exec-root/netns/default
  # behind once a container used --network host), so the directory can be removed.
  local mnt
  while read -r mnt; do
    umount -l "$mnt" 2>/dev/null || true
  done < <(awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r)
  if [[ $status -ne 0 ]]; then
    log "logs kept in $WORK"
    for f in "$WORK"/*.log; do
      [[ -e $f ]] || continue
      echo "----- $f (last 40 lines)" >&2
      tail -n 40 "$f" >&2
    done
  elif [[ -z ${E2E_KEEP:-} ]]; then
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# Starts a background process, records its PID. Usage: spawn LOGFILE cmd args...
spawn() {
  local logfile=$1
  shift
  "$@" >"$logfile" 2>&1 &
  PIDS+=($!)
  echo $!
}

# A free TCP port on 127.0.0.1 (bind to 0, read it back, release).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until something accepts on host:port; gives up after 10s, or at once when the
# given PID (the process expected to listen) has exited.
wait_port() {
  local port=$1 host=${2:-127.0.0.1} pid=${3:-} tries=200
  while ! (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      fail "the process meant to listen on $host:$port exited"
    fi
    tries=$((tries - 1))
    ((tries > 0)) || fail "nothing listens on $host:$port"
    sleep 0.05
  done
}

# A CA and a server certificate for the given DNS names, made with openssl.
# Usage: make_cert DIR NAME... → DIR/ca.crt DIR/ca.key DIR/server.crt DIR/server.key
make_cert() {
  local dir=$1
  shift
  mkdir -p "$dir"
  local san="" n
  for n in "$@"; do san+="DNS:$n,"; done
  san+="IP:127.0.0.1"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=Stowage e2e upstream CA" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$1" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' "$san" >"$dir/ext.cnf"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/ext.cnf" -out "$dir/server.crt" 2>/dev/null
}

# Starts Debian's docker-registry (distribution 2.8) over TLS on 127.0.0.1:PORT.
# Usage: start_registry NAME PORT CERTDIR [HTPASSWD_FILE] → logs in $WORK/NAME.log
start_registry() {
  local name=$1 port=$2 certs=$3 htpasswd=${4:-}
  local dir="$WORK/$name"
  mkdir -p "$dir/data"
  {
    echo "version: 0.1"
    echo "log: {level: info, formatter: text, accesslog: {disabled: false}}"
    echo "storage: {filesystem: {rootdirectory: $dir/data}, delete: {enabled: true}}"
    echo "http:"
    echo "  addr: 127.0.0.1:$port"
    echo "  tls: {certificate: $certs/server.crt, key: $certs/server.key}"
    if [[ -n $htpasswd ]]; then
      echo "auth: {htpasswd: {realm: e2e, path: $htpasswd}}"
    fi
  } >"$dir/config.yml"
  spawn "$WORK/$name.log" docker-registry serve "$dir/config.yml" >/dev/null
  wait_port "$port"
}

# Counts the blob GETs a docker-registry served so far (its access log, combined format).
registry_blob_gets() {
  grep -cE '"GET /v2/[^ ]+/blobs/sha256:[0-9a-f]{64} HTTP' "$WORK/$1.log" || true
}

# Builds an OCI image layout with real gzipped tar layers of pseudo-random content.
# Usage: make_oci_image DIR TAG LAYERS SIZE_KIB SEED
make_oci_image() {
  python3 "$E2E_DIR/make_image.py" "$@"
}

# Pushes an OCI layout to a registry on 127.0.0.1 (TLS not verified: it is our own).
# Usage: push_image OCI_DIR TAG 127.0.0.1:PORT/REPO:TAG [CREDS]
push_image() {
  local src=$1 tag=$2 dest=$3 creds=${4:-}
  local args=(--dest-tls-verify=false)
  [[ -n $creds ]] && args+=(--dest-creds "$creds")
  skopeo copy -q "${args[@]}" "oci:$src:$tag" "docker://$dest" >"$WORK/push.log" 2>&1 ||
    { cat "$WORK/push.log" >&2; fail "push to $dest"; }
}

# Writes a Stowage config and starts it.
# Usage: start_stowage NAME PROXY_PORT UPSTREAM_CA [HOST...] <<< "extra TOML"
# Pins each HOST to 127.0.0.1 and trusts UPSTREAM_CA. Extra TOML on stdin is appended; it
# must not repeat [proxy], [ca], [cache] or [upstream]: put lines for those sections in
# $PROXY_EXTRA, $CACHE_EXTRA and $UPSTREAM_EXTRA instead. Sets STOWAGE_CA (its CA file)
# and STOWAGE_TRUST (a cert dir for skopeo's --src-cert-dir holding that CA).
start_stowage() {
  local name=$1 port=$2 upstream_ca=$3
  shift 3
  local dir="$WORK/$name"
  mkdir -p "$dir"
  local extra=""
  [[ -t 0 ]] || extra=$(cat)
  local h
  {
    echo "[proxy]"
    echo "listen = \"127.0.0.1:$port\""
    echo "shutdown_grace = \"1s\""
    echo "${PROXY_EXTRA:-}"
    echo "[ca]"
    echo "dir = \"${STOWAGE_CA_DIR:-$dir/certs}\""
    echo "[cache]"
    echo "dir = \"$dir/cache\""
    echo "min_free = \"1MiB\""
    echo "${CACHE_EXTRA:-}"
    echo "[upstream]"
    echo "extra_ca = [\"$upstream_ca\"]"
    echo "connect_timeout = \"3s\""
    echo "${UPSTREAM_EXTRA:-}"
    echo "[upstream.resolve]"
    for h in "$@"; do echo "\"$h\" = \"127.0.0.1\""; done
    echo "$extra"
  } >"$dir/config.toml"
  spawn "$WORK/$name.log" env RUST_LOG="${RUST_LOG:-info}" "$STOWAGE_BIN" --config "$dir/config.toml" run >/dev/null
  wait_port "$port" 127.0.0.1 "${PIDS[-1]}"
  STOWAGE_CA="${STOWAGE_CA_DIR:-$dir/certs}/ca.crt"
  STOWAGE_TRUST="$dir/trust"
  mkdir -p "$STOWAGE_TRUST"
  cp "$STOWAGE_CA" "$STOWAGE_TRUST/stowage-ca.crt"
}

# Checks every blob a `dir:` copy wrote against the digest it is named by.
verify_dir_copy() {
  local dir=$1 count=0 f hex
  for f in "$dir"/*; do
    hex=$(basename "$f")
    [[ $hex =~ ^[0-9a-f]{64}$ ]] || continue
    [[ $(sha256sum "$f" | cut -d' ' -f1) == "$hex" ]] || fail "$f does not hash to its digest"
    count=$((count + 1))
  done
  ((count > 0)) || fail "no blobs in $dir"
  echo "$count"
}

# Counts the blob GETs a docker-registry answered with 200 (content actually handed out;
# 401 challenges excluded).
registry_blob_gets_ok() {
  grep -cE '"GET /v2/[^ ]+/blobs/sha256:[0-9a-f]{64} HTTP/[0-9.]+" 200 ' "$WORK/$1.log" || true
}

# Stops one process this scenario started, by its PID, waits for it, and drops it from the
# list cleanup signals (so a restarted process's old PID, maybe reused, is never signalled).
# Usage: stop_pid PID
stop_pid() {
  local pid=$1 i
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for i in "${!PIDS[@]}"; do
    [[ ${PIDS[$i]} != "$pid" ]] || unset 'PIDS[i]'
  done
}

# The digests an OCI layout's manifest references (config first, then layers), one a line.
# Usage: oci_blobs OCI_DIR MANIFEST_DIGEST
oci_blobs() {
  jq -r '.config.digest, .layers[].digest' "$1/blobs/sha256/${2#sha256:}"
}

# Docker engines of a scenario's own (10-dockerd, 12-image).
# start_dockerd NAME [VAR=VALUE...] -- [dockerd flags...]: a dockerd of this test's own, in
# an environment holding only PATH and the given variables, in network namespace $DK_NETNS
# when set. Sets DK_SOCK.
start_dockerd() {
  local name=$1 d="$WORK/$1" envs=()
  shift
  while [[ $1 != -- ]]; do
    envs+=("$1")
    shift
  done
  shift
  mkdir -p "$d"
  [[ -e $d/daemon.json ]] || echo '{}' >"$d/daemon.json"
  spawn "$WORK/$name.log" ${DK_NETNS:+nsenter --net=/run/netns/$DK_NETNS} env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "${envs[@]}" \
    /usr/sbin/dockerd --config-file "$d/daemon.json" \
    --data-root "$d/root" --exec-root "$d/exec" -H "unix://$d/docker.sock" --pidfile "$d/pid" \
    --storage-driver vfs --iptables=false --ip6tables=false --bridge=none --ip-masq=false "$@" >/dev/null
  local pid=${PIDS[-1]}
  for _ in $(seq 300); do
    /usr/bin/docker -H "unix://$d/docker.sock" version >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || fail "dockerd $name exited"
    sleep 0.1
  done
  /usr/bin/docker -H "unix://$d/docker.sock" version >/dev/null 2>&1 || fail "dockerd $name did not come up"
  DK_SOCK="unix://$d/docker.sock"
}
# start_containerd DIR: a containerd of this test's own (root, state and sockets under DIR;
# only what pulling needs), stopped by PID at exit; its socket in CD_SOCK.
start_containerd() {
  local cd_dir=$1
  CD_SOCK="$cd_dir/containerd.sock"
  mkdir -p "$cd_dir"
  cat >"$cd_dir/config.toml" <<EOF
version = 2
root = "$cd_dir/root"
state = "$cd_dir/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]
[grpc]
  address = "$CD_SOCK"
[ttrpc]
  address = "$CD_SOCK.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$cd_dir/opt"
EOF
  spawn "$WORK/containerd.log" containerd --config "$cd_dir/config.toml" --log-level info >/dev/null
  for _ in $(seq 200); do
    ctr -a "$CD_SOCK" version >/dev/null 2>&1 && break
    sleep 0.05
  done
  ctr -a "$CD_SOCK" version >/dev/null 2>&1 || fail "containerd did not come up on $CD_SOCK"
}
# dk SOCK docker-args...: the docker.io client against one of this test's daemons (its
# config.json, where proxies for containers could be set, is this test's own too). Only the
# docker client gets DOCKER_CONFIG: podman and buildah read it too and fail on an empty dir.
dk() {
  local sock=$1
  shift
  DOCKER_CONFIG="$WORK/docker-cli" /usr/bin/docker -H "$sock" "$@"
}
