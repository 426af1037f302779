#!/usr/bin/env bash
# Operators steer the cache (issue 17), against a real docker-registry (quay.io:<P>):
#   1. a multi-platform OCI index (linux/amd64, linux/arm64/v8) is pushed; `stowage prefetch
#      --platform linux/arm64` fetches that platform only; the registry is stopped and
#      `skopeo copy --override-arch arm64` through Stowage gets it (blobs verified), while
#      amd64 fails; with the registry up again `--all-platforms` fetches amd64 and nothing of
#      arm64 again; a REF that does not exist exits non-zero naming it. Progress output is
#      in this log. A private registry's image is prefetched with --creds-env only, and the
#      password appears in no log.
#   2. a second Stowage with max_size room for two of three same-sized images: the pinned
#      one survives the eviction that takes the unpinned one; after a retag upstream,
#      `cache refresh` prints the new digest and the next pull gets it; `cache forget`
#      makes the next pull ask upstream; `cache history` lists both digests.
#   3. a third Stowage with `[prefetch] images` and a 2 s interval: it fetches the image
#      itself and logs a line per image at start-up and again after the interval; a bad REF
#      in that list is a config error naming `prefetch.images[1]`.
source "$(dirname "$0")/lib.sh"
for tool in skopeo jq htpasswd; do command -v "$tool" >/dev/null || fail "needs $tool (tests/deps.sh)"; done

reg_port=$(free_port)
proxy_port=$(free_port)
make_cert "$WORK/upstream" quay.io
start_registry registry "$reg_port" "$WORK/upstream"
reg_pid=${PIDS[-1]}

amd=$(make_oci_image "$WORK/amd64" v1 2 256 31 --platform=linux/amd64)
arm=$(make_oci_image "$WORK/arm64" v1 2 256 32 --platform=linux/arm64/v8)
index=$(python3 "$E2E_DIR/make_index.py" "$WORK/multi" v1 "$WORK/amd64:linux/amd64" "$WORK/arm64:linux/arm64/v8")
skopeo copy -q --all --dest-tls-verify=false "oci:$WORK/multi:v1" "docker://127.0.0.1:$reg_port/e2e/multi:v1" \
  >"$WORK/push.log" 2>&1 || { cat "$WORK/push.log" >&2; fail "push of the index"; }

RUST_LOG=debug start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" quay.io </dev/null
stowage_() { "$STOWAGE_BIN" --config "$WORK/stowage/config.toml" "$@"; }
cached() { [[ -f $WORK/stowage/cache/blobs/sha256/${1:7:2}/${1#sha256:} ]]; }
ref="quay.io:$reg_port/e2e/multi:v1"

# 1. One platform.
stowage_ prefetch --platform linux/arm64 "$ref" >"$WORK/prefetch-arm64.out" 2>&1 ||
  { cat "$WORK/prefetch-arm64.out" >&2; fail "prefetch --platform linux/arm64"; }
log "prefetch output: $(cat "$WORK/prefetch-arm64.out")"
grep -q "^$ref  $index  platforms linux/arm64/v8  layers 2 " "$WORK/prefetch-arm64.out" ||
  fail "prefetch did not report the index, the platform and its layers"
for d in $(oci_blobs "$WORK/arm64" "$arm"); do cached "$d" || fail "arm64 blob $d not cached"; done
for d in $(oci_blobs "$WORK/amd64" "$amd"); do ! cached "$d" || fail "amd64 blob $d cached by an arm64 prefetch"; done
gets_arm=$(registry_blob_gets registry)
((gets_arm == 3)) || fail "the arm64 prefetch made $gets_arm blob GETs upstream (config and 2 layers: 3)"
ok "prefetch --platform linux/arm64: its config and 2 layers only, 3 upstream blob GETs"

# skopeo needs e2e/multi known public to be served with the registry down (09-upstream-down).
for _ in $(seq 100); do
  grep -q 'anonymous access probe.*repo=quay.io:'"$reg_port"'/e2e/multi.*public=true' "$WORK/stowage.log" && break
  sleep 0.1
done
stop_pid "$reg_pid"
export HTTPS_PROXY="http://127.0.0.1:$proxy_port"
copy() { # copy LOG ARCH DEST
  skopeo copy -q --retry-times 0 --src-cert-dir "$STOWAGE_TRUST" --override-os linux --override-arch "$2" \
    "docker://$ref" "dir:$3" >"$WORK/$1.log" 2>&1
}
copy down-arm64 arm64 "$WORK/down-arm64" || { cat "$WORK/down-arm64.log" >&2; fail "skopeo copy of arm64 with the registry down"; }
n=$(verify_dir_copy "$WORK/down-arm64")
for d in $(oci_blobs "$WORK/arm64" "$arm"); do [[ -f $WORK/down-arm64/${d#sha256:} ]] || fail "skopeo did not get arm64 blob $d"; done
if copy down-amd64 amd64 "$WORK/down-amd64"; then fail "amd64 was copied with the registry down: it was never fetched"; fi
log "skopeo amd64 with the registry down: $(tail -n 1 "$WORK/down-amd64.log")"
ok "registry down: skopeo --override-arch arm64 got the prefetched image ($n blobs verified); amd64 fails"
unset HTTPS_PROXY

# 2. Every platform, with the registry back: amd64 now, arm64 not again.
start_registry registry "$reg_port" "$WORK/upstream"
reg_pid=${PIDS[-1]}
stowage_ prefetch --all-platforms "$ref" >"$WORK/prefetch-all.out" 2>&1 ||
  { cat "$WORK/prefetch-all.out" >&2; fail "prefetch --all-platforms"; }
log "prefetch output: $(cat "$WORK/prefetch-all.out")"
grep -q "platforms linux/amd64,linux/arm64/v8  layers 4 " "$WORK/prefetch-all.out" || fail "--all-platforms did not take both"
for d in $(oci_blobs "$WORK/amd64" "$amd"); do cached "$d" || fail "amd64 blob $d not cached"; done
gets=$(registry_blob_gets registry)
((gets == 3)) || fail "--all-platforms made $gets blob GETs upstream (amd64's 3 only)"
ok "prefetch --all-platforms: amd64's 3 blobs fetched, arm64's not again"

# 3. A REF that does not exist: non-zero, named, with why; the good one beside it is done.
missing="quay.io:$reg_port/e2e/nope:v1"
if stowage_ prefetch "$missing" "$ref" >"$WORK/prefetch-missing.out" 2>&1; then
  fail "prefetch of a missing image exited 0"
fi
log "prefetch output: $(cat "$WORK/prefetch-missing.out")"
grep -q "error: 1 of 2 images failed: $missing (404 Not Found: MANIFEST_UNKNOWN" "$WORK/prefetch-missing.out" ||
  fail "the missing REF is not named with its reason"
grep -q "^$ref  $index" "$WORK/prefetch-missing.out" || fail "the existing REF was not prefetched beside it"
ok "a missing REF exits non-zero and is named (404 MANIFEST_UNKNOWN)"

# 3b. Credentials for a private registry (htpasswd): used for that prefetch only, and
# never in Stowage's log (at debug level) or the command's output.
priv_port=$(free_port)
user=ci password=prefetch-secret-$$
htpasswd -Bbn "$user" "$password" >"$WORK/htpasswd" 2>/dev/null
start_registry private "$priv_port" "$WORK/upstream" "$WORK/htpasswd"
secret=$(make_oci_image "$WORK/secret" v1 2 64 35)
push_image "$WORK/secret" v1 "127.0.0.1:$priv_port/team/app:v1" "$user:$password"
priv="quay.io:$priv_port/team/app:v1"
if stowage_ prefetch "$priv" >"$WORK/prefetch-priv-anon.out" 2>&1; then fail "a private image prefetched without credentials"; fi
log "prefetch output: $(cat "$WORK/prefetch-priv-anon.out")"
PREFETCH_CREDS="$user:$password" stowage_ prefetch --creds-env PREFETCH_CREDS "$priv" >"$WORK/prefetch-priv.out" 2>&1 ||
  { cat "$WORK/prefetch-priv.out" >&2; fail "prefetch --creds-env of the private image"; }
log "prefetch output: $(cat "$WORK/prefetch-priv.out")"
grep -q "^$priv  $secret  platforms (single manifest)  layers 2 " "$WORK/prefetch-priv.out" || fail "the private image's line"
for d in $(oci_blobs "$WORK/secret" "$secret"); do cached "$d" || fail "private blob $d not cached"; done
! grep -qF "$password" "$WORK/stowage.log" "$WORK"/prefetch-*.out || fail "the password is in a log"
! grep -qF "$(printf '%s' "$user:$password" | base64 -w0)" "$WORK/stowage.log" || fail "the Basic credentials are in the log"
ok "--creds-env: the private image prefetched with credentials only; the password is in no log"

# 4. Pins, refresh, forget, history on a second Stowage with room for two of three images.
proxy2=$(free_port)
for spec in a:41 b:42 c:43; do
  i=${spec%:*}
  make_oci_image "$WORK/img-$i" v1 2 300 "${spec#*:}" >"$WORK/img-$i.digest"
  push_image "$WORK/img-$i" v1 "127.0.0.1:$reg_port/e2e/$i:v1"
done
CACHE_EXTRA='max_size = "1500KiB"' start_stowage stowage2 "$proxy2" "$WORK/upstream/ca.crt" quay.io </dev/null
stowage2_() { "$STOWAGE_BIN" --config "$WORK/stowage2/config.toml" "$@"; }
cached2() { [[ -f $WORK/stowage2/cache/blobs/sha256/${1:7:2}/${1#sha256:} ]]; }
export HTTPS_PROXY="http://127.0.0.1:$proxy2"
pull() { # pull NAME DEST
  skopeo copy -q --retry-times 0 --src-cert-dir "$STOWAGE_TRUST" "docker://quay.io:$reg_port/e2e/$1:v1" "dir:$2" \
    >"$WORK/pull.log" 2>&1 || { cat "$WORK/pull.log" >&2; fail "pull of e2e/$1"; }
}
pull a "$WORK/pull-a"
stowage2_ cache pin "quay.io:$reg_port/e2e/a:v1" | tee -a "$WORK/cli.out" | grep -q "^pinned" || fail "cache pin"
sleep 1.1 # access times have 1 s granularity: b is then older than c, a older than both
pull b "$WORK/pull-b"
sleep 1.1
pull c "$WORK/pull-c"
for _ in $(seq 50); do grep -q "evicted least recently used objects" "$WORK/stowage2.log" && break; sleep 0.1; done
grep -q "evicted least recently used objects" "$WORK/stowage2.log" || fail "max_size never evicted"
for d in $(oci_blobs "$WORK/img-a" "$(cat "$WORK/img-a.digest")"); do cached2 "$d" || fail "pinned a's $d was evicted"; done
for d in $(jq -r '.layers[].digest' "$WORK/img-b/blobs/sha256/$(cut -c8- "$WORK/img-b.digest")"); do
  ! cached2 "$d" || fail "unpinned b's layer $d survived the eviction"
done
ok "max_size pressure evicted unpinned b (same size), pinned a (least recently used) stayed"

a_ref="quay.io:$reg_port/e2e/a:v1"
old=$(cat "$WORK/img-a.digest")
new=$(make_oci_image "$WORK/img-a2" v1 1 64 77)
push_image "$WORK/img-a2" v1 "127.0.0.1:$reg_port/e2e/a:v1"
out=$(stowage2_ cache refresh "$a_ref") || fail "cache refresh"
log "cache refresh: $out"
[[ $out == *"$old → $new"* ]] || fail "refresh did not print old → new"
pull a "$WORK/pull-a2"
[[ $(sha256sum "$WORK/pull-a2/manifest.json" | cut -d' ' -f1) == "${new#sha256:}" ]] || fail "the pull after refresh did not get the new image"
ok "cache refresh after a retag printed $old → $new; the next pull got it"

out=$(stowage2_ cache forget "$a_ref") || fail "cache forget"
log "cache forget: $out"
before=$(grep -cE '"(GET|HEAD) /v2/e2e/a/manifests/v1 HTTP' "$WORK/registry.log" || true)
pull a "$WORK/pull-a3"
after=$(grep -cE '"(GET|HEAD) /v2/e2e/a/manifests/v1 HTTP' "$WORK/registry.log" || true)
((after > before)) || fail "the pull after forget did not ask upstream for the tag"
ok "cache forget: the next pull asked upstream ($((after - before)) tag request)"

out=$(stowage2_ cache history "$a_ref") || fail "cache history"
log "cache history: $out"
[[ $out == *"$old"* && $out == *"$new"* ]] || fail "history does not list both digests"
ok "cache history lists $old and $new"

# 5. The warm list: a Stowage with [prefetch] images keeps them warm itself, one log line per
# image at start-up and each interval; a bad REF there is a config error naming its key.
unset HTTPS_PROXY
proxy3=$(free_port)
start_stowage stowage3 "$proxy3" "$WORK/upstream/ca.crt" quay.io <<EOT
[prefetch]
images = ["$ref"]
interval = "2s"
platforms = ["linux/arm64"]
EOT
for _ in $(seq 100); do
  (($(grep -c 'prefetch: image kept warm' "$WORK/stowage3.log" || true) >= 2)) && break
  sleep 0.1
done
lines=$(grep 'prefetch: image kept warm' "$WORK/stowage3.log" || true)
(($(grep -c . <<<"$lines") >= 2)) || fail "the warm list did not log a line at start-up and another after its interval"
grep -q "image=$ref digest=$index platforms=linux/arm64/v8 layers=2" <<<"$lines" || fail "the warm list's line: $lines"
log "warm list: $(head -n 1 <<<"$lines")"
for d in $(oci_blobs "$WORK/arm64" "$arm"); do
  [[ -f $WORK/stowage3/cache/blobs/sha256/${d:7:2}/${d#sha256:} ]] || fail "the warm list did not fetch $d"
done
printf '[prefetch]\nimages = ["alpine:3", "Not A Ref"]\n' >"$WORK/bad.toml"
if "$STOWAGE_BIN" --config "$WORK/bad.toml" run >"$WORK/bad.out" 2>&1; then fail "a bad [prefetch] REF was accepted"; fi
grep -q 'prefetch.images\[1\]' "$WORK/bad.out" || fail "the config error does not name prefetch.images[1]: $(cat "$WORK/bad.out")"
ok "the warm list ran at start-up and on its interval (one line per image); a bad REF names prefetch.images[1]"
