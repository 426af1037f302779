#!/usr/bin/env bash
# containerd through the mirror listener (issue 4): a real containerd daemon owned by this
# test pulls quay.io:<port>/e2e/app:v1 with `ctr images pull --hosts-dir`, using
# examples/containerd/quay.io/hosts.toml (only the mirror address and the registry's port
# substituted), so containerd sends `?ns=quay.io:<port>` to Stowage's [mirror] listener.
#
# 1. The first pull fills the cache (the image's 4 blobs fetched upstream, once each) and
#    containerd unpacks it (layer diff IDs checked against the config).
# 2. The image and its content removed from containerd, a second pull is served from the
#    cache: zero upstream blob GETs, every blob a hit in Stowage's access log.
# 3. skopeo through HTTPS_PROXY (the proxy listener of the same Stowage) gets the same image
#    with zero upstream blob GETs: one cache across modes. Its blobs hash to their digests
#    and are the ones containerd stored.
# 4. The TLS form of the recipe works too (a second Stowage, its mirror on TLS from its CA).
# 5. With the registry stopped, containerd pulls the tag again from the cache alone.
source "$(dirname "$0")/lib.sh"

[[ $(id -u) -eq 0 ]] || fail "containerd needs root"
command -v containerd >/dev/null && command -v ctr >/dev/null || fail "containerd and ctr are needed (tests/deps.sh)"

reg_port=$(free_port)
proxy_port=$(free_port)
mirror_port=$(free_port)
make_cert "$WORK/upstream" quay.io
start_registry registry "$reg_port" "$WORK/upstream"
registry_pid=${PIDS[-1]}
make_oci_image "$WORK/image" v1 3 2048 3 >/dev/null
push_image "$WORK/image" v1 "127.0.0.1:$reg_port/e2e/app:v1"
pushed=$(registry_blob_gets registry)

start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" quay.io <<EOF
[mirror]
listen = "127.0.0.1:$mirror_port"
EOF
wait_port "$mirror_port"

start_containerd "$WORK/containerd"
sock=$CD_SOCK
ok "containerd $(ctr -a "$sock" version 2>/dev/null | awk '/Version:/ {v=$2} END {print v}') running on its own socket"

# The example, as shipped, with the mirror address and the registry's port put in.
example="$REPO/examples/containerd/quay.io/hosts.toml"
grep -q '^server = "https://quay.io"$' "$example" || fail "$example has no server line for quay.io"
grep -q '^\[host."http://stowage-host:5000"\]$' "$example" || fail "$example has no mirror host stowage-host:5000"
hosts_dir="$WORK/certs.d"
mkdir -p "$hosts_dir/quay.io:$reg_port"
sed -e "s|stowage-host:5000|127.0.0.1:$mirror_port|" -e "s|https://quay.io\"|https://quay.io:$reg_port\"|" \
  "$example" >"$hosts_dir/quay.io:$reg_port/hosts.toml"
grep -q "^\[host.\"http://127.0.0.1:$mirror_port\"\]" "$hosts_dir/quay.io:$reg_port/hosts.toml" ||
  fail "substitution into hosts.toml failed"

ref="quay.io:$reg_port/e2e/app:v1"
pull() { # pull LOGNAME [ctr pull flags]
  local log="$WORK/pull-$1.log"
  shift
  ctr -a "$sock" -n e2e images pull --hosts-dir "$hosts_dir" "$@" "$ref" >"$log" 2>&1 ||
    { cat "$log" >&2; fail "ctr pull ($log)"; }
}
mirror_blob_hits() {
  grep 'mirror{' "$WORK/stowage.log" | grep 'stowage::access' | grep 'kind="blob"' | grep -c 'outcome="hit"' || true
}

pull first --http-dump
first=$(($(registry_blob_gets registry) - pushed))
((first == 4)) || fail "first containerd pull made $first upstream blob GETs, expected the image's 4"
ctr -a "$sock" -n e2e images ls -q | grep -qxF "$ref" || fail "image not listed after the first pull"
# ctr pull unpacks into the snapshotter: the layers' diff IDs matched the image config.
[[ $(ctr -a "$sock" -n e2e snapshots ls | tail -n +2 | wc -l) -ge 3 ]] || fail "image not unpacked into 3 snapshots"
# What containerd sent: to the mirror, with the registry (and its port, form-encoded) in ns.
# (--http-dump logs each request line and header as a log message.)
grep -qaF "msg=\"HEAD /v2/e2e/app/manifests/v1?ns=quay.io%3A$reg_port HTTP/1.1\"" "$WORK/pull-first.log" ||
  fail "containerd's request to the mirror does not carry ns=quay.io%3A$reg_port (see pull-first.log)"
grep -qaF "msg=\"Host: 127.0.0.1:$mirror_port\"" "$WORK/pull-first.log" || fail "containerd did not ask the mirror"
mirror_lines=$(grep 'mirror{' "$WORK/stowage.log" | grep 'stowage::access' | grep -c "registry=quay.io:$reg_port repo=e2e/app" || true)
((mirror_lines >= 5)) || fail "Stowage's log shows $mirror_lines mirror requests for quay.io e2e/app, expected manifest + 4 blobs"
ok "first pull through the mirror (ns=quay.io:$reg_port): $first upstream blob GETs, image unpacked"

# The digests containerd stored.
ctr -a "$sock" -n e2e content ls -q | sort >"$WORK/containerd-digests"
(($(wc -l <"$WORK/containerd-digests") >= 5)) || fail "containerd holds fewer than the image's 5 objects"

# Forget the image and its content (containerd shares content across namespaces, so a
# fresh namespace would not ask again): the garbage collector runs synchronously.
ctr -a "$sock" -n e2e images rm --sync "$ref" >/dev/null
left=$(ctr -a "$sock" -n e2e content ls -q | wc -l)
((left == 0)) || fail "$left content objects left after removing the image"

hits_before=$(mirror_blob_hits)
pull second
second=$(($(registry_blob_gets registry) - pushed - first))
((second == 0)) || fail "second containerd pull made $second upstream blob GETs, expected 0"
hits=$(($(mirror_blob_hits) - hits_before))
((hits >= 4)) || fail "second pull: $hits blob hits in Stowage's log, expected 4 (did containerd ask at all?)"
cmp -s <(ctr -a "$sock" -n e2e content ls -q | sort) "$WORK/containerd-digests" ||
  fail "the second pull stored different content"
ok "second pull (content removed first): 0 upstream blob GETs, $hits blobs served from the cache"

# Same Stowage, the proxy listener: one cache across modes.
HTTPS_PROXY="http://127.0.0.1:$proxy_port" skopeo copy -q --src-cert-dir "$STOWAGE_TRUST" \
  "docker://$ref" "dir:$WORK/skopeo" >"$WORK/skopeo.log" 2>&1 ||
  { cat "$WORK/skopeo.log" >&2; fail "skopeo copy through HTTPS_PROXY"; }
n=$(verify_dir_copy "$WORK/skopeo")
third=$(($(registry_blob_gets registry) - pushed - first))
((third == 0)) || fail "skopeo through HTTPS_PROXY made $third upstream blob GETs, expected 0"
for f in "$WORK"/skopeo/*; do
  hex=$(basename "$f")
  [[ $hex =~ ^[0-9a-f]{64}$ ]] || continue
  grep -qxF "sha256:$hex" "$WORK/containerd-digests" || fail "skopeo got sha256:$hex, which containerd does not hold"
done
tunnel_hits=$(grep 'stowage::access' "$WORK/stowage.log" | grep 'tunnel{' | grep 'kind="blob"' | grep -c 'outcome="hit"' || true)
((tunnel_hits >= 4)) || fail "HTTPS_PROXY mode: $tunnel_hits blob hits, expected 4"
ok "skopeo via HTTPS_PROXY: $n blobs verified, the same as containerd's, 0 upstream blob GETs"

# 4. The TLS variant of the recipe (examples/containerd/README.md): [mirror] tls = "ca",
#    containerd trusting Stowage's CA through `ca =` in hosts.toml. A second Stowage with its
#    own cache, so the pull goes all the way upstream through a TLS mirror (HTTP/2).
tls_port=$(free_port)
tls_proxy=$(free_port)
start_stowage stowage-tls "$tls_proxy" "$WORK/upstream/ca.crt" quay.io <<EOF
[mirror]
listen = "127.0.0.1:$tls_port"
tls = "ca"
EOF
wait_port "$tls_port"
tls_hosts="$WORK/certs.d-tls"
mkdir -p "$tls_hosts/quay.io:$reg_port"
cp "$STOWAGE_CA" "$tls_hosts/stowage-ca.crt"
sed -e "s|http://stowage-host:5000|https://localhost:$tls_port|" -e "s|https://quay.io\"|https://quay.io:$reg_port\"|" \
  "$example" >"$tls_hosts/quay.io:$reg_port/hosts.toml"
echo "  ca = \"$tls_hosts/stowage-ca.crt\"" >>"$tls_hosts/quay.io:$reg_port/hosts.toml"
ctr -a "$sock" -n e2e images rm --sync "$ref" >/dev/null
(($(ctr -a "$sock" -n e2e content ls -q | wc -l) == 0)) || fail "content left before the TLS mirror pull"
before=$(registry_blob_gets registry)
hosts_dir=$tls_hosts pull tls
tls_gets=$(($(registry_blob_gets registry) - before))
((tls_gets == 4)) || fail "pull through the TLS mirror (empty cache) made $tls_gets upstream blob GETs, expected 4"
grep 'mirror{' "$WORK/stowage-tls.log" | grep 'stowage::access' | grep -q 'kind="blob"' || fail "the TLS mirror served no blob"
cmp -s <(ctr -a "$sock" -n e2e content ls -q | sort) "$WORK/containerd-digests" || fail "the TLS mirror pull stored different content"
ok "TLS mirror (tls = \"ca\", hosts.toml ca =): containerd pulled the image, $tls_gets blobs from upstream"

# 5. Upstream gone: within the tag TTL a containerd pull (HEAD of the tag, then everything by
#    digest) is answered entirely from the cache.
kill "$registry_pid"
wait "$registry_pid" 2>/dev/null || true
(exec 3<>"/dev/tcp/127.0.0.1/$reg_port") 2>/dev/null && fail "the registry still listens"
ctr -a "$sock" -n e2e images rm --sync "$ref" >/dev/null
(($(ctr -a "$sock" -n e2e content ls -q | wc -l) == 0)) || fail "content left before the offline pull"
pull offline
cmp -s <(ctr -a "$sock" -n e2e content ls -q | sort) "$WORK/containerd-digests" ||
  fail "the pull with upstream down stored different content"
ok "registry stopped: containerd still pulls the tag through the mirror, all from the cache"
