#!/usr/bin/env bash
# Authorization (issue 3): a private image on a real docker-registry with htpasswd auth
# (distribution answers with a Basic challenge, not Bearer tokens), served as quay.io:<port>.
#
# 1. skopeo with the right credentials copies it through Stowage (HTTPS_PROXY); every blob
#    hashes to its digest.
# 2. With the layers now cached, skopeo without credentials and with wrong ones is refused,
#    and upstream serves no blob to those attempts. curl through the proxy shows the same for
#    one cached blob: 401 without or with wrong credentials, 200 (a hit, no upstream GET)
#    with the right ones.
# 3. A second Stowage with the account configured ([[registry]] username + password_env)
#    lets an anonymous skopeo pull; a client's own wrong credentials (curl) still win and
#    are refused; the password (and its Basic encoding) appears in no log line, even at debug.
source "$(dirname "$0")/lib.sh"

reg_port=$(free_port)
proxy_port=$(free_port)
user=e2e-user
# A password that cannot occur by accident in a log.
password="pw-$(openssl rand -hex 12)"
basic=$(printf '%s:%s' "$user" "$password" | base64 -w0)

make_cert "$WORK/upstream" quay.io
htpasswd -Bbn "$user" "$password" >"$WORK/htpasswd" 2>/dev/null
start_registry registry "$reg_port" "$WORK/upstream" "$WORK/htpasswd"

make_oci_image "$WORK/image" v1 3 1024 2 >/dev/null
push_image "$WORK/image" v1 "127.0.0.1:$reg_port/private/app:v1" "$user:$password"
image="docker://quay.io:$reg_port/private/app:v1"

# The registry really is private: an anonymous manifest request is refused.
status=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$WORK/upstream/ca.crt" \
  --resolve "quay.io:$reg_port:127.0.0.1" "https://quay.io:$reg_port/v2/private/app/manifests/v1")
[[ $status == 401 ]] || fail "registry answers an anonymous manifest request with $status, expected 401"

start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" quay.io </dev/null
proxy="http://127.0.0.1:$proxy_port"

# Usage: copy LOG DEST [skopeo source flags...]; returns skopeo's status.
copy() {
  local log=$1 dest=$2
  shift 2
  HTTPS_PROXY=$proxy skopeo copy -q --src-cert-dir "$STOWAGE_TRUST" "$@" "$image" "dir:$dest" >"$WORK/$log" 2>&1
}

# 1. The right credentials.
copy copy-good.log "$WORK/good" --src-creds "$user:$password" ||
  { cat "$WORK/copy-good.log" >&2; fail "skopeo with the right credentials"; }
n=$(verify_dir_copy "$WORK/good")
gets=$(registry_blob_gets registry)
((gets >= 4)) || fail "the first copy made $gets upstream blob GETs, expected the image's 4"
ok "right credentials: $n blobs verified, $gets upstream blob GETs"

# Every layer of the image is in the cache now.
layers=$(python3 -c 'import json,sys; print(" ".join(l["digest"].split(":")[1] for l in json.load(open(sys.argv[1]))["layers"]))' "$WORK/good/manifest.json")
for hex in $layers; do
  [[ -f "$WORK/stowage/cache/blobs/sha256/${hex:0:2}/$hex" ]] || fail "layer $hex is not cached"
done
layer=${layers%% *}

# 2. No credentials, and wrong ones: refused although every layer is cached.
if copy copy-anon.log "$WORK/anon" --src-no-creds; then
  fail "skopeo without credentials copied a private image"
fi
grep -qiE 'unauthorized|authentication required|401' "$WORK/copy-anon.log" ||
  { cat "$WORK/copy-anon.log" >&2; fail "the anonymous copy failed, but not for lack of authorization"; }
if copy copy-wrong.log "$WORK/wrong" --src-creds "$user:not-$password"; then
  fail "skopeo with wrong credentials copied a private image"
fi
grep -qiE 'unauthorized|authentication required|401' "$WORK/copy-wrong.log" ||
  { cat "$WORK/copy-wrong.log" >&2; fail "the wrong-credentials copy failed, but not for lack of authorization"; }
for d in anon wrong; do
  if [[ -d $WORK/$d ]] && ls "$WORK/$d" | grep -qE '^[0-9a-f]{64}$'; then
    fail "the refused $d copy received blobs"
  fi
done
after=$(registry_blob_gets registry)
((after == gets)) || fail "refused copies caused $((after - gets)) upstream blob GETs"
ok "no credentials and wrong credentials: skopeo refused, no blob handed out"

# The same with curl, for one cached layer: status, X-Cache, and the bytes.
blob_url="https://quay.io:$reg_port/v2/private/app/blobs/sha256:$layer"
fetch_blob() { # fetch_blob OUT [curl args] → "<status> <x-cache>"
  local out=$1
  shift
  curl -s --proxy "$proxy" --cacert "$STOWAGE_CA" -D "$out.headers" -o "$out" "$@" "$blob_url" >/dev/null
  local status xcache
  # The proxy's CONNECT answer comes first in the dump: read the last response's head.
  status=$(awk '/^HTTP\// {s=$2} END {print s}' "$out.headers")
  xcache=$(tr -d '\r' <"$out.headers" | awk -F': ' 'tolower($1)=="x-cache" {x=$2} END {print x}')
  echo "$status $xcache"
}
r=$(fetch_blob "$WORK/curl-anon")
[[ $r == "401 hit" ]] || fail "anonymous curl of a cached private layer: '$r', expected '401 hit' (cached, refused)"
tr -d '\r' <"$WORK/curl-anon.headers" | grep -qi '^www-authenticate: Basic' ||
  fail "the 401 does not carry upstream's Basic challenge"
cmp -s "$WORK/curl-anon" "$WORK/good/$layer" && fail "the 401 body is the layer"
r=$(fetch_blob "$WORK/curl-wrong" -u "$user:not-$password")
[[ $r == "401 hit" ]] || fail "curl with wrong credentials: '$r', expected '401 hit'"
r=$(fetch_blob "$WORK/curl-good" -u "$user:$password")
[[ $r == "200 hit" ]] || fail "curl with the right credentials: '$r', expected '200 hit'"
cmp -s "$WORK/curl-good" "$WORK/good/$layer" || fail "the layer served to the right credentials differs"
after=$(registry_blob_gets registry)
((after == gets)) || fail "curl requests caused $((after - gets)) upstream blob GETs"
refusals=$(grep -c 'cached content refused: upstream denies this client' "$WORK/stowage.log" || true)
((refusals >= 2)) || fail "Stowage logged $refusals refusals of cached content, expected at least 2"
ok "curl: cached layer refused (401 hit) without and with wrong credentials, served (200 hit) with the right ones; $refusals refusals logged"

# 3. Configured credentials: an anonymous client pulls as the configured account.
proxy2_port=$(free_port)
export E2E_QUAY_PASSWORD=$password
RUST_LOG=debug start_stowage stowage2 "$proxy2_port" "$WORK/upstream/ca.crt" quay.io <<EOF
[[registry]]
host = "quay.io:$reg_port"
username = "$user"
password_env = "E2E_QUAY_PASSWORD"
EOF
unset E2E_QUAY_PASSWORD
proxy=http://127.0.0.1:$proxy2_port
before=$(registry_blob_gets_ok registry)
copy copy-configured.log "$WORK/configured" --src-no-creds ||
  { cat "$WORK/copy-configured.log" >&2; fail "anonymous skopeo through Stowage with a configured account"; }
n=$(verify_dir_copy "$WORK/configured")
diff -r "$WORK/good" "$WORK/configured" >/dev/null || fail "the configured-account copy differs from the first"
# The registry answers 200 only to authenticated requests, and skopeo sent none: these
# came with the configured account.
fetched=$(($(registry_blob_gets_ok registry) - before))
((fetched == 4)) || fail "the second Stowage (empty cache) got $fetched blobs from upstream, expected the image's 4"
ok "configured account: anonymous skopeo copied $n verified blobs; upstream served $fetched blob GETs to the account"

# skopeo never sends its own credentials here: the /v2/ ping, answered upstream with the
# configured account, needs no login. curl sends them unasked: they must win.
r=$(fetch_blob "$WORK/curl2-wrong" -u "$user:not-$password")
[[ $r == "401 hit" ]] || fail "configured account, client's wrong credentials: '$r', expected '401 hit'"
r=$(fetch_blob "$WORK/curl2-anon")
[[ $r == "200 hit" ]] || fail "configured account, anonymous client: '$r', expected '200 hit'"
cmp -s "$WORK/curl2-anon" "$WORK/good/$layer" || fail "the layer served to the anonymous client differs"
ok "configured account: a client's own wrong credentials win and are refused (401); anonymous gets the layer"

for f in "$WORK"/stowage*.log "$WORK"/stowage*/config.toml; do
  if grep -qF -e "$password" -e "$basic" "$f"; then
    fail "the password appears in $(basename "$f")"
  fi
done
grep -q 'DEBUG' "$WORK/stowage2.log" || fail "stowage2 did not log at debug level; the secret check proves little"
ok "the password and its Basic encoding appear in no Stowage log line (debug level) nor config"
