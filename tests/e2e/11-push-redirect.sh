#!/usr/bin/env bash
# A push through Stowage to a registry that keeps its blobs in S3 (issue 15). A real
# docker-registry with the S3 storage driver on moto's S3 (TLS, as s3.lab.test): it answers
# blob GETs and HEADs with a 307 to a presigned storage URL. Through Stowage (HTTPS_PROXY):
#   - a HEAD of a blob Stowage has never seen is answered 200 with Content-Length and
#     Docker-Content-Digest and no Location (Stowage follows the redirect itself; before,
#     the client got the 307 and then could not CONNECT to the storage host);
#   - skopeo copy pushes an image whose blobs the registry already holds (it HEADs each
#     one, gets 200, uploads nothing) and one whose blobs it does not (uploads pass
#     through); both tags then name the pushed manifests.
source "$(dirname "$0")/lib.sh"
[[ $(id -u) -eq 0 ]] || fail "needs root (a private mount namespace for the registry's /etc/hosts)"
py="$TEST_VENV/bin/python"
"$py" -c 'import moto.server, boto3' 2>/dev/null || fail "moto[server] is not installed in $TEST_VENV (tests/deps.sh installs it)"
for tool in skopeo curl unshare; do command -v "$tool" >/dev/null || fail "needs $tool"; done

reg_port=$(free_port)
s3_port=$(free_port)
proxy_port=$(free_port)
bucket=stowage-push
s3_host=s3.lab.test
# One CA for the registry and the storage host (the bucket's virtual-host name too).
make_cert "$WORK/upstream" quay.io "$s3_host" "$bucket.$s3_host"

export E2E_S3_KEY=AKIDE2EPUSH E2E_S3_SECRET="e2e-secret-$(openssl rand -hex 8)"
MOTO_S3_CUSTOM_ENDPOINTS="https://$s3_host:$s3_port" \
  spawn "$WORK/moto.log" "$py" -m moto.server -H 127.0.0.1 -p "$s3_port" \
  -c "$WORK/upstream/server.crt" -k "$WORK/upstream/server.key" >/dev/null
wait_port "$s3_port"
"$py" - <<EOF || fail "cannot create the bucket in moto"
import boto3
boto3.client("s3", endpoint_url="https://127.0.0.1:$s3_port", region_name="us-east-1",
             verify="$WORK/upstream/ca.crt", aws_access_key_id="$E2E_S3_KEY",
             aws_secret_access_key="$E2E_S3_SECRET").create_bucket(Bucket="$bucket")
EOF

# The registry reaches its storage as s3.lab.test: a hosts file of its own, bind-mounted
# in a private mount namespace (nothing of the machine's changes).
printf '127.0.0.1 localhost %s %s\n' "$s3_host" "$bucket.$s3_host" >"$WORK/hosts"
mkdir -p "$WORK/registry"
cat >"$WORK/registry/config.yml" <<EOF
version: 0.1
log: {level: info, formatter: text, accesslog: {disabled: false}}
storage:
  s3:
    accesskey: $E2E_S3_KEY
    secretkey: $E2E_S3_SECRET
    region: us-east-1
    regionendpoint: https://$s3_host:$s3_port
    forcepathstyle: true
    bucket: $bucket
    secure: true
    skipverify: true
    v4auth: true
  redirect: {disable: false}
  delete: {enabled: true}
http:
  addr: 127.0.0.1:$reg_port
  tls: {certificate: $WORK/upstream/server.crt, key: $WORK/upstream/server.key}
EOF
spawn "$WORK/registry.log" unshare -m sh -c \
  "mount --bind '$WORK/hosts' /etc/hosts && exec docker-registry serve '$WORK/registry/config.yml'" >/dev/null
wait_port "$reg_port" 127.0.0.1 "${PIDS[-1]}"

make_oci_image "$WORK/one" v1 2 1024 21 >/dev/null
manifest_two=$(make_oci_image "$WORK/two" v2 2 1024 22)
make_oci_image "$WORK/three" v3 2 512 23 >/dev/null
push_image "$WORK/one" v1 "127.0.0.1:$reg_port/e2e/app:v1"
push_image "$WORK/two" v2 "127.0.0.1:$reg_port/e2e/app:v2"
# The registry really redirects: a direct HEAD of a blob answers 307 to the storage host.
layer=$(oci_blobs "$WORK/two" "$manifest_two" | tail -n 1)
direct=$(curl -sS -o /dev/null -w '%{http_code} %{redirect_url}' --cacert "$WORK/upstream/ca.crt" \
  --resolve "quay.io:$reg_port:127.0.0.1" -I "https://quay.io:$reg_port/v2/e2e/app/blobs/$layer")
[[ $direct == "307 https://$s3_host:$s3_port/"* || $direct == "307 https://$bucket.$s3_host:$s3_port/"* ]] ||
  fail "the registry does not redirect blob HEADs to S3: $direct"
ok "docker-registry on S3 (moto, TLS): blob HEAD → 307 to $(cut -d/ -f1-3 <<<"${direct#307 }")/…"

start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" quay.io "$s3_host" "$bucket.$s3_host" </dev/null
export HTTPS_PROXY="http://127.0.0.1:$proxy_port"

# 1. HEAD of a blob Stowage has never seen.
size=$(stat -c %s "$WORK/two/blobs/sha256/${layer#sha256:}")
curl -sS -D "$WORK/head.txt" -o /dev/null --cacert "$STOWAGE_CA" -I \
  "https://quay.io:$reg_port/v2/e2e/app/blobs/$layer" || fail "HEAD through Stowage"
tr -d '\r' <"$WORK/head.txt" >"$WORK/head"
head -n 1 "$WORK/head" | grep -qE '^HTTP/[0-9.]+ 200' || { cat "$WORK/head" >&2; fail "HEAD of an uncached redirected blob is not 200"; }
grep -qix "content-length: $size" "$WORK/head" || { cat "$WORK/head" >&2; fail "HEAD: Content-Length is not $size"; }
grep -qix "docker-content-digest: $layer" "$WORK/head" || { cat "$WORK/head" >&2; fail "HEAD: no Docker-Content-Digest $layer"; }
! grep -qi '^location:' "$WORK/head" || { cat "$WORK/head" >&2; fail "HEAD: a Location reached the client"; }
ok "HEAD of an uncached redirected blob: 200, Content-Length $size, Docker-Content-Digest, no Location"

# 2. Push blobs the registry already holds (every HEAD is redirected upstream).
uploads_before=$(grep -c 'PUT /v2/e2e/app/blobs/uploads/' "$WORK/registry.log" || true)
skopeo copy -q --retry-times 0 --dest-cert-dir "$STOWAGE_TRUST" \
  "oci:$WORK/two:v2" "docker://quay.io:$reg_port/e2e/app:copy" >"$WORK/push-existing.log" 2>&1 ||
  { cat "$WORK/push-existing.log" >&2; fail "skopeo copy (push) of an image whose blobs upstream holds"; }
uploads=$(($(grep -c 'PUT /v2/e2e/app/blobs/uploads/' "$WORK/registry.log" || true) - uploads_before))
((uploads == 0)) || fail "skopeo uploaded $uploads blobs the registry already had"
heads=$(grep -cE '"HEAD /v2/e2e/app/blobs/sha256:[0-9a-f]{64} HTTP/[0-9.]+" 307 ' "$WORK/registry.log" || true)
ok "push of existing blobs through Stowage: 0 uploads, $heads redirected blob HEADs upstream"

# 3. Push new blobs (uploads pass through Stowage).
skopeo copy -q --retry-times 0 --dest-cert-dir "$STOWAGE_TRUST" \
  "oci:$WORK/three:v3" "docker://quay.io:$reg_port/e2e/app:new" >"$WORK/push-new.log" 2>&1 ||
  { cat "$WORK/push-new.log" >&2; fail "skopeo copy (push) of new blobs"; }
uploads=$(($(grep -c 'PUT /v2/e2e/app/blobs/uploads/' "$WORK/registry.log" || true) - uploads_before))
((uploads > 0)) || fail "the push of new blobs uploaded nothing"
ok "push of new blobs through Stowage: $uploads uploads"

# Both tags name what was pushed: read back directly from the registry.
for pair in "two:v2:copy" "three:v3:new"; do
  IFS=: read -r layout tag pushed <<<"$pair"
  want=$(skopeo inspect --raw "oci:$WORK/$layout:$tag" | sha256sum | cut -d' ' -f1)
  got=$(skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$reg_port/e2e/app:$pushed" | sha256sum | cut -d' ' -f1)
  [[ $want == "$got" ]] || fail "e2e/app:$pushed is not the pushed manifest"
done
# And the pushed image pulls back through Stowage, every blob verified.
skopeo copy -q --retry-times 0 --src-cert-dir "$STOWAGE_TRUST" \
  "docker://quay.io:$reg_port/e2e/app:new" "dir:$WORK/pulled" >"$WORK/pull.log" 2>&1 ||
  { cat "$WORK/pull.log" >&2; fail "pulling the pushed image back through Stowage"; }
ok "pushed tags read back upstream; e2e/app:new pulled back: $(verify_dir_copy "$WORK/pulled") blobs verified"
