#!/usr/bin/env bash
# Replicas sharing an S3 bucket (issue 7): moto's S3 server on loopback, one bucket, two
# Stowage processes (own ports, own local caches) with [storage] backend = "s3",
# path-style, keys from environment variables. skopeo copies an image from a real
# docker-registry (served as quay.io:<port>) through the first, then through the second:
# the second makes zero upstream blob GETs, and the bucket holds exactly the verified
# bytes (each object downloaded and hashed against the digest in its key).
source "$(dirname "$0")/lib.sh"

py="$TEST_VENV/bin/python"
"$py" -c 'import moto.server, boto3' 2>/dev/null || fail "moto[server] is not installed in $TEST_VENV (tests/deps.sh installs it)"

reg_port=$(free_port)
s3_port=$(free_port)
port_a=$(free_port)
port_b=$(free_port)
bucket=stowage-e2e
prefix=fleet/
make_cert "$WORK/upstream" quay.io
start_registry registry "$reg_port" "$WORK/upstream"
make_oci_image "$WORK/image" v1 3 2048 5 >/dev/null
push_image "$WORK/image" v1 "127.0.0.1:$reg_port/e2e/app:v1"
pushed_gets=$(registry_blob_gets registry)

# Dummy keys: moto accepts any. Stowage reads them from the variables named in its config.
export E2E_S3_KEY=AKIDE2ESTOWAGE E2E_S3_SECRET="e2e-secret-$(openssl rand -hex 8)"
spawn "$WORK/moto.log" "$py" -m moto.server -H 127.0.0.1 -p "$s3_port" >/dev/null
wait_port "$s3_port"

# s3 OP [ARGS]: a tiny boto3 client for moto (create | list | fetch KEY FILE).
s3() {
  "$py" - "$@" <<EOF
import sys, boto3
c = boto3.client("s3", endpoint_url="http://127.0.0.1:$s3_port", region_name="us-east-1",
                 aws_access_key_id="$E2E_S3_KEY", aws_secret_access_key="$E2E_S3_SECRET")
op = sys.argv[1]
if op == "create":
    c.create_bucket(Bucket="$bucket")
elif op == "list":
    for page in c.get_paginator("list_objects_v2").paginate(Bucket="$bucket"):
        for o in page.get("Contents", []):
            print(o["Key"], o["Size"])
elif op == "fetch":
    c.download_file("$bucket", sys.argv[2], sys.argv[3])
EOF
}
s3 create || fail "cannot create the bucket in moto"
[[ -z $(s3 list) ]] || fail "a new bucket is not empty"
ok "moto S3 on 127.0.0.1:$s3_port, bucket $bucket"

storage_toml() {
  cat <<EOF
[storage]
backend = "s3"
bucket = "$bucket"
prefix = "$prefix"
endpoint = "http://127.0.0.1:$s3_port"
region = "us-east-1"
path_style = true
access_key_env = "E2E_S3_KEY"
secret_key_env = "E2E_S3_SECRET"
EOF
}
start_stowage stowage-a "$port_a" "$WORK/upstream/ca.crt" quay.io <<<"$(storage_toml)"
trust_a=$STOWAGE_TRUST
start_stowage stowage-b "$port_b" "$WORK/upstream/ca.crt" quay.io <<<"$(storage_toml)"
trust_b=$STOWAGE_TRUST

copy() {
  local port=$1 trust=$2 dest=$3
  HTTPS_PROXY="http://127.0.0.1:$port" skopeo copy -q --src-cert-dir "$trust" \
    "docker://quay.io:$reg_port/e2e/app:v1" "dir:$dest" >"$WORK/copy.log" 2>&1 ||
    { cat "$WORK/copy.log" >&2; fail "skopeo copy through Stowage on port $port into $dest"; }
}

copy "$port_a" "$trust_a" "$WORK/copy-a"
n=$(verify_dir_copy "$WORK/copy-a")
first_gets=$(($(registry_blob_gets registry) - pushed_gets))
((first_gets >= n)) || fail "replica A fetched $first_gets blobs upstream, expected the $n of the image"
ok "replica A: $n blobs verified, $first_gets upstream blob GETs"

# Replica A uploads each blob after verifying it, in the background: wait for all of them.
for _ in $(seq 100); do
  (($(s3 list | wc -l) >= n)) && break
  sleep 0.2
done
(($(s3 list | wc -l) >= n)) || { s3 list >&2; fail "the bucket holds $(s3 list | wc -l) objects, expected $n"; }

copy "$port_b" "$trust_b" "$WORK/copy-b"
verify_dir_copy "$WORK/copy-b" >/dev/null
second_gets=$(($(registry_blob_gets registry) - pushed_gets - first_gets))
((second_gets == 0)) || fail "replica B made $second_gets upstream blob GETs, expected 0"
diff -r "$WORK/copy-a" "$WORK/copy-b" >/dev/null || fail "the two copies differ"
grep -qE 'outcome="?hit' "$WORK/stowage-b.log" || fail "no hit in replica B's access log"
ok "replica B: $n blobs verified, 0 upstream blob GETs (served from the bucket)"

# The bucket holds exactly the image's blobs, each the verified bytes of its key's digest.
s3 list >"$WORK/bucket.txt"
expected=$(for f in "$WORK"/copy-a/*; do
  hex=$(basename "$f")
  if [[ $hex =~ ^[0-9a-f]{64}$ ]]; then echo "${prefix}blobs/sha256/$hex"; fi
done | sort)
actual=$(cut -d' ' -f1 "$WORK/bucket.txt" | sort)
[[ $actual == "$expected" ]] || fail "bucket keys differ from the image's blobs:
$(diff <(echo "$expected") <(echo "$actual"))"
mkdir -p "$WORK/fetched"
while read -r key size; do
  hex=${key##*/}
  s3 fetch "$key" "$WORK/fetched/$hex" || fail "cannot download $key"
  [[ $(sha256sum "$WORK/fetched/$hex" | cut -d' ' -f1) == "$hex" ]] || fail "object $key does not hash to its digest"
  [[ $(stat -c %s "$WORK/fetched/$hex") == "$size" ]] || fail "object $key: size differs from the listing"
  cmp -s "$WORK/fetched/$hex" "$WORK/copy-a/$hex" || fail "object $key differs from the copied blob"
done <"$WORK/bucket.txt"
ok "bucket holds exactly the $n verified blobs under ${prefix}blobs/sha256/"

# Both replicas keep a local hot tier of what they served.
for f in "$WORK"/copy-a/*; do
  hex=$(basename "$f")
  [[ $hex =~ ^[0-9a-f]{64}$ ]] || continue
  for r in stowage-a stowage-b; do
    [[ -f $WORK/$r/cache/blobs/sha256/${hex:0:2}/$hex ]] || fail "$r has no local copy of $hex"
  done
done
ok "each replica holds the blobs in its local cache"
