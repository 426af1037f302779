#!/usr/bin/env bash
# Core (issue 2): skopeo copies an image from a real docker-registry (TLS, on the real name
# quay.io with an explicit port, pinned to 127.0.0.1 by Stowage's upstream.resolve) through
# Stowage as HTTPS_PROXY, twice. The second copy makes no upstream blob GETs, and every
# copied blob hashes to its digest.
source "$(dirname "$0")/lib.sh"

reg_port=$(free_port)
proxy_port=$(free_port)
make_cert "$WORK/upstream" quay.io
start_registry registry "$reg_port" "$WORK/upstream"

make_oci_image "$WORK/image" v1 3 2048 1 >/dev/null
push_image "$WORK/image" v1 "127.0.0.1:$reg_port/e2e/app:v1"
pushed_gets=$(registry_blob_gets registry)

start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" quay.io </dev/null

# The CA is served on the proxy listener, identical to the file on disk.
curl -fsS "http://127.0.0.1:$proxy_port/ca.crt" -o "$WORK/served-ca.crt"
cmp -s "$WORK/served-ca.crt" "$STOWAGE_CA" || fail "/ca.crt differs from the CA on disk"
ok "/ca.crt served"

copy() {
  HTTPS_PROXY="http://127.0.0.1:$proxy_port" skopeo copy -q --src-cert-dir "$STOWAGE_TRUST" \
    "docker://quay.io:$reg_port/e2e/app:v1" "dir:$1" >"$WORK/copy.log" 2>&1 ||
    { cat "$WORK/copy.log" >&2; fail "skopeo copy through Stowage into $1"; }
}

copy "$WORK/copy1"
n=$(verify_dir_copy "$WORK/copy1")
first_gets=$(($(registry_blob_gets registry) - pushed_gets))
((first_gets >= 4)) || fail "first copy fetched $first_gets blobs upstream, expected the 4 of the image"
ok "first copy: $n blobs verified, $first_gets upstream blob GETs"

copy "$WORK/copy2"
n=$(verify_dir_copy "$WORK/copy2")
second_gets=$(($(registry_blob_gets registry) - pushed_gets - first_gets))
((second_gets == 0)) || fail "second copy made $second_gets upstream blob GETs, expected 0"
diff -r "$WORK/copy1" "$WORK/copy2" >/dev/null || fail "the two copies differ"
ok "second copy: $n blobs verified, 0 upstream blob GETs"

# The cache on disk holds exactly the verified layers, stored by digest.
for f in "$WORK"/copy1/*; do
  hex=$(basename "$f")
  [[ $hex =~ ^[0-9a-f]{64}$ ]] || continue
  cached="$WORK/stowage/cache/blobs/sha256/${hex:0:2}/$hex"
  [[ -f $cached ]] || fail "blob $hex is not in the cache"
  cmp -s "$f" "$cached" || fail "cached $hex differs from the copied blob"
done
grep -qE 'outcome="?hit' "$WORK/stowage.log" || fail "no hit in Stowage's access log"
# Every blob response was delivered whole, and the access log says so.
blob_lines=$(grep -c 'kind="blob"' "$WORK/stowage.log" || true)
whole=$(grep 'kind="blob"' "$WORK/stowage.log" | grep -c 'complete=true' || true)
((blob_lines == 8 && whole == 8)) || fail "access log: $whole of $blob_lines blob lines complete, expected 8 of 8"
ok "cache holds the verified blobs; access log shows hits and 8 complete blob responses"
