#!/usr/bin/env bash
# Identity (issue 13): a registry is its scheme, host AND port. Two real docker-registry
# instances under one name on two ports, quay.io:<A> (htpasswd auth, all private) and
# quay.io:<B> (anonymous), both holding `team/private:1` with different content; B also
# holds a public `library/pub:1`. Everything goes through Stowage as HTTPS_PROXY.
#
# 1. alice (credentials for A) copies quay.io:<A>/team/private:1: A's image, verified.
# 2. An anonymous copy of quay.io:<B>/team/private:1 gets B's image, not the A image cached
#    under the same name and tag; so does alice's skopeo copy of it (B sends no challenge,
#    so skopeo sends no credentials; the curl probes in 4 send alice's to B unasked).
#    B serves the blobs of B's image.
# 3. An anonymous copy of quay.io:<A>/team/private:1 is refused; A serves no blob to it.
# 4. After an anonymous pull of quay.io:<B>/library/pub:1 (a readable repository), no digest
#    trick gets A's private objects (config, layers, manifest) to an anonymous client, by GET
#    or HEAD, under A's or B's repositories, nor to alice under B's: every answer is a 4xx
#    and no body hashes to the digest asked for. A serves no blob to any of it.
# 5. /metrics has request series for quay.io:<A> and quay.io:<B> (the canonical form: host
#    alone only for https on 443, so no bare "quay.io" here); `cache ls` lists both, each
#    with its own digest for team/private:1.
# 6. After a restart on the same cache: the anonymous copy of B still gets B's image, the
#    anonymous copy of A is still refused, A's layer under B's public repository still 4xx.
source "$(dirname "$0")/lib.sh"

port_a=$(free_port)
port_b=$(free_port)
proxy_port=$(free_port)
reg_a="quay.io:$port_a"
reg_b="quay.io:$port_b"
user=alice
password="pw-$(openssl rand -hex 12)"

make_cert "$WORK/upstream" quay.io
htpasswd -Bbn "$user" "$password" >"$WORK/htpasswd" 2>/dev/null
start_registry registry-a "$port_a" "$WORK/upstream" "$WORK/htpasswd"
start_registry registry-b "$port_b" "$WORK/upstream"

# Three images with different seeds: no blob is shared between them.
manifest_a=$(make_oci_image "$WORK/image-a" 1 2 512 71)
manifest_b=$(make_oci_image "$WORK/image-b" 1 2 512 72)
manifest_pub=$(make_oci_image "$WORK/image-pub" 1 1 256 73)
mapfile -t blobs_a < <(oci_blobs "$WORK/image-a" "$manifest_a")
mapfile -t blobs_b < <(oci_blobs "$WORK/image-b" "$manifest_b")
mapfile -t blobs_pub < <(oci_blobs "$WORK/image-pub" "$manifest_pub")
layer_a=${blobs_a[1]}
layer_b=${blobs_b[1]}
push_image "$WORK/image-a" 1 "127.0.0.1:$port_a/team/private:1" "$user:$password"
push_image "$WORK/image-b" 1 "127.0.0.1:$port_b/team/private:1"
push_image "$WORK/image-pub" 1 "127.0.0.1:$port_b/library/pub:1"

# The registries are what they should be: A refuses an anonymous client, B does not.
# distribution 2.8 answers 404 for an OCI manifest to a client that does not accept OCI.
oci_accept=(-H "Accept: application/vnd.oci.image.manifest.v1+json")
direct() { # direct REGISTRY PATH → status, straight to the registry (no Stowage)
  curl -s -o /dev/null -w '%{http_code}' --cacert "$WORK/upstream/ca.crt" "${oci_accept[@]}" \
    --resolve "$1:127.0.0.1" "https://$1$2"
}
s=$(direct "$reg_a" /v2/team/private/manifests/1)
[[ $s == 401 ]] || fail "registry A answers an anonymous manifest request with $s, expected 401"
s=$(direct "$reg_b" /v2/team/private/manifests/1)
[[ $s == 200 ]] || fail "registry B answers an anonymous manifest request with $s, expected 200"
s=$(direct "$reg_b" "/v2/library/pub/blobs/$layer_a")
[[ $s == 404 ]] || fail "registry B answers a request for A's layer under library/pub with $s, expected 404"

start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" quay.io </dev/null
proxy="http://127.0.0.1:$proxy_port"

# Usage: copy LOG DEST IMAGE [skopeo source flags...]; returns skopeo's status.
copy() {
  local log=$1 dest=$2 image=$3
  shift 3
  rm -rf "$dest"
  HTTPS_PROXY=$proxy skopeo copy -q --src-cert-dir "$STOWAGE_TRUST" "$@" "docker://$image" "dir:$dest" >"$WORK/$log" 2>&1
}
# Checks a dir: copy is the expected image.
# Usage: expect_image WHAT DEST WANT_MANIFEST OTHER_MANIFEST OTHER_NAME
expect_image() {
  local what=$1 dest=$2 want=$3 other=$4 other_name=$5 got
  got="sha256:$(sha256sum "$dest/manifest.json" | cut -d' ' -f1)"
  [[ $got != "$other" ]] || fail "$what got manifest $got, which is $other_name; expected $want"
  [[ $got == "$want" ]] || fail "$what got manifest $got, expected $want"
  verify_dir_copy "$dest" >/dev/null
}
no_blobs() { # no_blobs DIR: a refused copy wrote no blob
  if [[ -d $1 ]] && ls "$1" | grep -qE '^[0-9a-f]{64}$'; then fail "the refused copy into $1 received blobs"; fi
}

# 1. alice copies A's image.
gets_a=$(registry_blob_gets_ok registry-a)
copy copy-alice-a.log "$WORK/alice-a" "$reg_a/team/private:1" --src-creds "$user:$password" ||
  { cat "$WORK/copy-alice-a.log" >&2; fail "alice's copy of $reg_a/team/private:1 through Stowage"; }
expect_image "alice's copy of $reg_a/team/private:1" "$WORK/alice-a" "$manifest_a" "$manifest_b" "B's image ($reg_b)"
for d in "${blobs_a[@]}"; do
  [[ -f "$WORK/alice-a/${d#sha256:}" ]] || fail "alice's copy of A lacks $d"
done
fetched=$(($(registry_blob_gets_ok registry-a) - gets_a))
((fetched >= ${#blobs_a[@]})) || fail "A served $fetched blobs to alice's first copy, expected ${#blobs_a[@]}"
ok "1. alice copied $reg_a/team/private:1: A's manifest and ${#blobs_a[@]} blobs, verified"

# 2. The same repository and tag on B: B's image, for an anonymous client and for alice.
gets_b=$(registry_blob_gets_ok registry-b)
copy copy-anon-b.log "$WORK/anon-b" "$reg_b/team/private:1" --src-no-creds ||
  { cat "$WORK/copy-anon-b.log" >&2; fail "anonymous copy of $reg_b/team/private:1 (an anonymous registry) through Stowage"; }
expect_image "the anonymous copy of $reg_b/team/private:1" "$WORK/anon-b" "$manifest_b" "$manifest_a" "A's image ($reg_a), cached under the same name and tag"
for d in "${blobs_a[@]}"; do
  [[ ! -e "$WORK/anon-b/${d#sha256:}" ]] || fail "the anonymous copy of $reg_b/team/private:1 holds A's blob $d"
done
fetched=$(($(registry_blob_gets_ok registry-b) - gets_b))
((fetched >= ${#blobs_b[@]})) || fail "B served $fetched blobs to the anonymous copy, expected ${#blobs_b[@]} (its image was not cached)"
copy copy-alice-b.log "$WORK/alice-b" "$reg_b/team/private:1" --src-creds "$user:$password" ||
  { cat "$WORK/copy-alice-b.log" >&2; fail "alice's copy of $reg_b/team/private:1 through Stowage"; }
expect_image "alice's copy of $reg_b/team/private:1" "$WORK/alice-b" "$manifest_b" "$manifest_a" "A's image ($reg_a), cached under the same name and tag"
ok "2. $reg_b/team/private:1 gives B's image ($manifest_b) to an anonymous client and to alice, not A's; B served $fetched blobs"

# 3. Anonymous on A: refused, and A hands out no blob.
all_a=$(registry_blob_gets registry-a)
if copy copy-anon-a.log "$WORK/anon-a" "$reg_a/team/private:1" --src-no-creds; then
  fail "an anonymous skopeo copied $reg_a/team/private:1 (private) through Stowage"
fi
grep -qiE 'unauthorized|authentication required|401|denied' "$WORK/copy-anon-a.log" ||
  { cat "$WORK/copy-anon-a.log" >&2; fail "the anonymous copy of $reg_a failed, but not for lack of authorization"; }
no_blobs "$WORK/anon-a"
after=$(registry_blob_gets registry-a)
((after == all_a)) || fail "the refused anonymous copy of $reg_a made $((after - all_a)) blob GETs on A"
ok "3. anonymous copy of $reg_a/team/private:1 refused; A saw no blob GET"

# 4. Digest tricks. probe METHOD URL [curl args] → PROBE_STATUS, body in $WORK/probe.body
probe() {
  local method=$1 url=$2
  shift 2
  local args=(-s --proxy "$proxy" --cacert "$STOWAGE_CA" -D "$WORK/probe.headers" -o "$WORK/probe.body")
  [[ $method == HEAD ]] && args+=(-I)
  : >"$WORK/probe.headers"
  curl "${args[@]}" "$@" "$url" >/dev/null 2>&1 || true
  # The proxy's CONNECT answer comes first in the dump: read the last response's head.
  PROBE_STATUS=$(awk '/^HTTP\// {s=$2} END {print s}' "$WORK/probe.headers")
  PROBE_STATUS=${PROBE_STATUS:-000}
  PROBE_XCACHE=$(tr -d '\r' <"$WORK/probe.headers" | awk -F': ' 'tolower($1)=="x-cache" {x=$2} END {print x}')
}
served() { # served WHAT URL DIGEST [curl args]: a GET gets 200 and the digest's bytes
  local what=$1 url=$2 digest=$3
  shift 3
  probe GET "$url" "$@"
  [[ $PROBE_STATUS == 200 ]] || fail "$what: GET $url answered $PROBE_STATUS, expected 200"
  [[ $(sha256sum <"$WORK/probe.body" | cut -d' ' -f1) == "${digest#sha256:}" ]] ||
    fail "$what: GET $url returned bytes that do not hash to $digest"
}
refusals=0
refused() { # refused WHAT METHOD URL DIGEST [curl args]: a 4xx, and not the digest's bytes
  local what=$1 method=$2 url=$3 digest=$4
  shift 4
  probe "$method" "$url" "$@"
  [[ $PROBE_STATUS =~ ^4[0-9][0-9]$ ]] ||
    fail "$what: $method $url answered $PROBE_STATUS${PROBE_XCACHE:+ (X-Cache: $PROBE_XCACHE)}, expected a 4xx refusal"
  [[ $(sha256sum <"$WORK/probe.body" | cut -d' ' -f1) != "${digest#sha256:}" ]] ||
    fail "$what: $method $url answered $PROBE_STATUS with the bytes of $digest"
  refusals=$((refusals + 1))
}

# B's public repository is pulled anonymously, so Stowage knows it as readable.
copy copy-anon-pub.log "$WORK/anon-pub" "$reg_b/library/pub:1" --src-no-creds ||
  { cat "$WORK/copy-anon-pub.log" >&2; fail "anonymous copy of $reg_b/library/pub:1"; }
expect_image "the anonymous copy of $reg_b/library/pub:1" "$WORK/anon-pub" "$manifest_pub" "$manifest_a" "A's image ($reg_a)"
# The probes work: what may be read is served.
served "anonymous, B's own layer" "https://$reg_b/v2/team/private/blobs/$layer_b" "$layer_b"
served "anonymous, B's public layer" "https://$reg_b/v2/library/pub/blobs/${blobs_pub[1]}" "${blobs_pub[1]}"
served "alice, A's layer" "https://$reg_a/v2/team/private/blobs/$layer_a" "$layer_a" -u "$user:$password"
served "anonymous, B's manifest" "https://$reg_b/v2/team/private/manifests/1" "$manifest_b" "${oci_accept[@]}"
served "alice, A's manifest" "https://$reg_a/v2/team/private/manifests/$manifest_a" "$manifest_a" -u "$user:$password" "${oci_accept[@]}"

ok_a=$(registry_blob_gets_ok registry-a)
for d in "${blobs_a[@]}"; do
  for method in GET HEAD; do
    refused "anonymous, A's blob on A" "$method" "https://$reg_a/v2/team/private/blobs/$d" "$d"
    refused "anonymous, A's blob under another repository of A" "$method" "https://$reg_a/v2/library/pub/blobs/$d" "$d"
    refused "anonymous, A's blob under B's public repository" "$method" "https://$reg_b/v2/library/pub/blobs/$d" "$d"
    refused "anonymous, A's blob under B's team/private" "$method" "https://$reg_b/v2/team/private/blobs/$d" "$d"
  done
  refused "alice, A's blob under B's public repository" GET "https://$reg_b/v2/library/pub/blobs/$d" "$d" -u "$user:$password"
  refused "alice, A's blob under B's team/private" GET "https://$reg_b/v2/team/private/blobs/$d" "$d" -u "$user:$password"
done
for method in GET HEAD; do
  refused "anonymous, A's manifest by tag on A" "$method" "https://$reg_a/v2/team/private/manifests/1" "$manifest_a" "${oci_accept[@]}"
  refused "anonymous, A's manifest by digest on A" "$method" "https://$reg_a/v2/team/private/manifests/$manifest_a" "$manifest_a" "${oci_accept[@]}"
  refused "anonymous, A's manifest under B's public repository" "$method" "https://$reg_b/v2/library/pub/manifests/$manifest_a" "$manifest_a" "${oci_accept[@]}"
  refused "anonymous, A's manifest under B's team/private" "$method" "https://$reg_b/v2/team/private/manifests/$manifest_a" "$manifest_a" "${oci_accept[@]}"
done
after=$(registry_blob_gets_ok registry-a)
((after == ok_a)) || fail "A served $((after - ok_a)) blobs during the anonymous digest probes"
ok "4. $refusals digest tricks for A's private objects refused (4xx, no bytes), under A's and B's repositories, GET and HEAD"

# 5. Two registries in /metrics and `cache ls`.
curl -fsS "$proxy/metrics" -o "$WORK/metrics.txt" || fail "GET /metrics"
for r in "$reg_a" "$reg_b"; do
  grep -qE "^stowage_requests_total\{([^}]*,)?registry=\"$r\"" "$WORK/metrics.txt" ||
    fail "/metrics has no stowage_requests_total series for registry=\"$r\" (has: $(grep -oE '^stowage_requests_total\{[^}]*registry="[^"]*"' "$WORK/metrics.txt" | grep -oE 'registry="[^"]*"' | sort -u | tr '\n' ' '))"
done
# (Configured registries' error and rate-limit series exist from the start at zero.)
used_443=$(grep -E '^stowage_[a-z_]+\{([^}]*,)?registry="quay\.io"' "$WORK/metrics.txt" | awk '$NF != 0' || true)
[[ -z $used_443 ]] ||
  fail "/metrics has non-zero series for registry=\"quay.io\" (port 443), but nothing here used port 443: $used_443"
"$STOWAGE_BIN" --config "$WORK/stowage/config.toml" cache ls --json >"$WORK/ls.json" 2>"$WORK/ls.err" ||
  { cat "$WORK/ls.err" >&2; fail "stowage cache ls --json"; }
for pair in "$reg_a $manifest_a" "$reg_b $manifest_b"; do
  read -r r m <<<"$pair"
  got=$(jq -r --arg r "$r" '[.[] | select(.registry == $r and .repository == "team/private" and .tag == "1") | .digest] | join(" ")' "$WORK/ls.json")
  [[ $got == "$m" ]] || fail "cache ls: $r team/private:1 is '$got', expected $m (listing: $(jq -c '[.[] | [.registry, .repository, .tag, .digest[7:19]]]' "$WORK/ls.json"))"
done
ok "5. /metrics has series for $reg_a and $reg_b and none for bare quay.io; cache ls lists team/private:1 for both with their own digests"

# 6. Restart on the same cache: the rows read back keep the two registries apart.
stop_pid "${PIDS[-1]}"
proxy_port=$(free_port)
start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" quay.io </dev/null
proxy="http://127.0.0.1:$proxy_port"
copy copy-anon-b2.log "$WORK/anon-b2" "$reg_b/team/private:1" --src-no-creds ||
  { cat "$WORK/copy-anon-b2.log" >&2; fail "after restart: anonymous copy of $reg_b/team/private:1"; }
expect_image "after restart, the anonymous copy of $reg_b/team/private:1" "$WORK/anon-b2" "$manifest_b" "$manifest_a" "A's image ($reg_a), cached under the same name and tag"
copy copy-alice-a2.log "$WORK/alice-a2" "$reg_a/team/private:1" --src-creds "$user:$password" ||
  { cat "$WORK/copy-alice-a2.log" >&2; fail "after restart: alice's copy of $reg_a/team/private:1"; }
expect_image "after restart, alice's copy of $reg_a/team/private:1" "$WORK/alice-a2" "$manifest_a" "$manifest_b" "B's image ($reg_b)"
all_a=$(registry_blob_gets registry-a)
if copy copy-anon-a2.log "$WORK/anon-a2" "$reg_a/team/private:1" --src-no-creds; then
  fail "after restart, an anonymous skopeo copied $reg_a/team/private:1 (private)"
fi
no_blobs "$WORK/anon-a2"
after=$(registry_blob_gets registry-a)
((after == all_a)) || fail "after restart, the refused anonymous copy of $reg_a made $((after - all_a)) blob GETs on A"
refused "after restart, anonymous, A's layer under B's public repository" GET "https://$reg_b/v2/library/pub/blobs/$layer_a" "$layer_a"
refused "after restart, anonymous, A's layer on A" GET "https://$reg_a/v2/team/private/blobs/$layer_a" "$layer_a"
ok "6. after restart: B's image for B, A's for alice, anonymous refused on A and for A's layer under B"
