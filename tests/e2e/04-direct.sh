#!/usr/bin/env bash
# Direct TLS, the /etc/hosts mode (issue 4), in a network namespace this script creates, so
# the machine's own /etc/hosts is never touched. Inside it (`ip netns exec` bind-mounts
# /etc/netns/<name>/hosts over /etc/hosts), quay.io names 127.0.0.1, as it would on a node
# using examples/etc-hosts (which this script installs there, 10.0.0.5 → 127.0.0.1):
#   - docker-registry, the real "quay.io", listens on 127.0.0.2:443;
#   - Stowage's [direct] listener is 127.0.0.1:443, and Stowage pins quay.io to 127.0.0.2 in
#     [upstream.resolve] (the proxy host must not use the nodes' hosts file);
#   - skopeo pulls plain `quay.io/e2e/app:v1`, trusting only Stowage's CA.
#
# 1. The pull works, chosen by SNI: the certificate skopeo sees for quay.io:443 is minted by
#    Stowage's CA; the blobs verify; a second pull makes zero upstream blob GETs.
# 2. A ClientHello without SNI, or naming a host that is not a registry, gets no
#    certificate: the handshake fails and Stowage says why.
# 3. A Stowage that resolves quay.io through the same hosts file reaches itself: it answers
#    508 Loop Detected with an explanation instead of recursing.
set -euo pipefail

if [[ -z ${E2E_NETNS:-} ]]; then
  [[ $(id -u) -eq 0 ]] || { echo "[04-direct] FAIL: needs root for a network namespace" >&2; exit 1; }
  command -v ip >/dev/null || { echo "[04-direct] FAIL: needs ip (iproute2)" >&2; exit 1; }
  ns="stowage-e2e-$$"
  inner=""
  had_netns_dir=0
  [[ -d /etc/netns ]] && had_netns_dir=1
  teardown() {
    local status=$?
    set +e
    if [[ -n $inner ]]; then
      kill "$inner" 2>/dev/null
      wait "$inner" 2>/dev/null
    fi
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
    ((had_netns_dir)) || rmdir /etc/netns 2>/dev/null || true
    exit "$status"
  }
  trap teardown EXIT
  trap 'exit 143' TERM INT
  mkdir -p "/etc/netns/$ns"
  # The shipped recipe, with its example Stowage address replaced by this namespace's.
  example="$(cd "$(dirname "$0")/../.." && pwd)/examples/etc-hosts"
  grep -qE '^10\.0\.0\.5 +quay\.io$' "$example" || { echo "[04-direct] FAIL: $example has no quay.io line" >&2; exit 1; }
  { echo "127.0.0.1 localhost"; sed 's/^10\.0\.0\.5 /127.0.0.1 /' "$example"; } >"/etc/netns/$ns/hosts"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  E2E_NETNS=$ns ip netns exec "$ns" bash "$0" "$@" &
  inner=$!
  wait "$inner"
  status=$?
  inner=""
  exit "$status"
fi

source "$(dirname "$0")/lib.sh"

# Sanity: inside the namespace, and its hosts file is in effect.
[[ $(ip netns identify $$) == "$E2E_NETNS" ]] || fail "not inside network namespace $E2E_NETNS"
[[ $(getent hosts quay.io | awk '{print $1}') == 127.0.0.1 ]] || fail "quay.io does not resolve to 127.0.0.1 in the namespace"

# docker-registry on 127.0.0.2:443 (start_registry binds 127.0.0.1 only).
start_registry_at() { # NAME ADDR PORT CERTDIR
  local name=$1 addr=$2 port=$3 certs=$4 dir="$WORK/$1"
  mkdir -p "$dir/data"
  cat >"$dir/config.yml" <<EOF
version: 0.1
log: {level: info, formatter: text, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: $dir/data}}
http:
  addr: $addr:$port
  tls: {certificate: $certs/server.crt, key: $certs/server.key}
EOF
  spawn "$WORK/$name.log" docker-registry serve "$dir/config.yml" >/dev/null
  wait_port "$port" "$addr"
}

make_cert "$WORK/upstream" quay.io
start_registry_at registry 127.0.0.2 443 "$WORK/upstream"
make_oci_image "$WORK/image" v1 3 1024 4 >/dev/null
push_image "$WORK/image" v1 "127.0.0.2:443/e2e/app:v1"
pushed=$(registry_blob_gets registry)

# No HOST arguments: the stdin TOML continues start_stowage's [upstream.resolve] table,
# pinning quay.io to the registry's own address.
proxy_port=$(free_port)
start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" <<EOF
"quay.io" = "127.0.0.2"
[direct]
listen = "127.0.0.1:443"
EOF
wait_port 443
ca=$STOWAGE_CA
trust=$STOWAGE_TRUST

# 1. What a node sees at quay.io:443 is Stowage, with a certificate for quay.io from its CA.
openssl s_client -connect quay.io:443 -servername quay.io -CAfile "$ca" -verify_return_error \
  </dev/null >"$WORK/sclient.log" 2>&1 || { cat "$WORK/sclient.log" >&2; fail "TLS to quay.io:443 with Stowage's CA"; }
grep -q 'Verify return code: 0 (ok)' "$WORK/sclient.log" || fail "Stowage's certificate for quay.io does not verify"
openssl s_client -connect quay.io:443 -servername quay.io -CAfile "$WORK/upstream/ca.crt" -verify_return_error \
  </dev/null >/dev/null 2>&1 && fail "quay.io:443 presented the registry's own certificate: not Stowage"
ok "quay.io:443 in the namespace is Stowage's direct listener, certificate minted from its CA for quay.io"

copy() {
  skopeo copy -q --src-cert-dir "$trust" "docker://quay.io/e2e/app:v1" "dir:$1" >"$WORK/copy.log" 2>&1 ||
    { cat "$WORK/copy.log" >&2; fail "skopeo copy from quay.io (direct) into $1"; }
}
copy "$WORK/copy1"
n=$(verify_dir_copy "$WORK/copy1")
first=$(($(registry_blob_gets registry) - pushed))
((first == 4)) || fail "first pull made $first upstream blob GETs, expected the image's 4"
direct_lines=$(grep 'stowage::access' "$WORK/stowage.log" | grep -c 'registry=quay.io repo=e2e/app' || true)
((direct_lines >= 5)) || fail "Stowage logged $direct_lines requests for quay.io e2e/app, expected manifest + 4 blobs"
ok "first pull by SNI: $n blobs verified, $first upstream blob GETs"

copy "$WORK/copy2"
verify_dir_copy "$WORK/copy2" >/dev/null
second=$(($(registry_blob_gets registry) - pushed - first))
((second == 0)) || fail "second pull made $second upstream blob GETs, expected 0"
diff -r "$WORK/copy1" "$WORK/copy2" >/dev/null || fail "the two pulls differ"
ok "second pull: 0 upstream blob GETs"

# 2. No SNI, or SNI for a host that is not a registry: no certificate, a clear log line.
openssl s_client -connect 127.0.0.1:443 -noservername </dev/null >"$WORK/nosni.log" 2>&1 || true
grep -q 'no peer certificate available' "$WORK/nosni.log" || fail "a ClientHello without SNI got a certificate"
openssl s_client -connect 127.0.0.1:443 -servername example.com </dev/null >"$WORK/othersni.log" 2>&1 || true
grep -q 'no peer certificate available' "$WORK/othersni.log" || fail "a ClientHello for example.com got a certificate"
wait_log "$WORK/stowage.log" 'direct TLS without SNI' || fail "Stowage did not log the missing SNI"
wait_log "$WORK/stowage.log" 'direct TLS for a host that is not a configured registry.*example.com' ||
  fail "Stowage did not log the unknown SNI"
ok "handshakes without SNI and for example.com are refused, and logged"

# 3. A Stowage that resolves quay.io via this hosts file (no pin) talks to itself.
loop_port=$(free_port)
loop_proxy=$(free_port)
start_stowage loop "$loop_proxy" "$WORK/upstream/ca.crt" <<EOF
[direct]
listen = "127.0.0.1:$loop_port"
upstream_port = $loop_port
EOF
wait_port "$loop_port"
before=$(grep -c '"GET \|"HEAD ' "$WORK/registry.log" || true)
status=$(curl -s --max-time 20 -o "$WORK/loop.body" -w '%{http_code}' --cacert "$STOWAGE_CA" \
  "https://quay.io:$loop_port/v2/e2e/app/manifests/v1") || fail "curl to the looping Stowage did not complete"
[[ $status == 508 ]] || fail "a request that would loop got $status, expected 508"
grep -q 'resolves to this Stowage' "$WORK/loop.body" || fail "the 508 does not explain the loop: $(cat "$WORK/loop.body")"
wait_log "$WORK/loop.log" 'upstream resolves to this Stowage: refusing a request loop' || fail "the loop is not logged"
after=$(grep -c '"GET \|"HEAD ' "$WORK/registry.log" || true)
((after == before)) || fail "the looping request reached the registry"
accepted=$(grep -c 'stowage::access' "$WORK/loop.log" || true)
((accepted <= 1)) || fail "the looping Stowage logged $accepted requests: it recursed"
ok "upstream resolving to the direct listener itself: 508 Loop Detected, explained, no recursion"
