#!/usr/bin/env bash
# Every client keeps pulling when upstream is down (issue 15). Two real docker-registry
# instances: quay.io:<P> anonymous (public) and quay.io:<Q> with htpasswd (private). Each
# image is pulled once through Stowage (HTTPS_PROXY) while the registries run; then both
# are stopped and:
#   - skopeo copy, podman pull and buildah pull (containers/image: they ping /v2/ first and
#     gave up on its 502) each get the public image again from the cache, blobs verified;
#   - the private image stays refused, anonymous or with the right credentials (nobody can
#     vouch for the client while upstream is down), and no byte of it is handed out.
# (containerd through the mirror with the registry stopped: 03-containerd.sh, step 5.)
source "$(dirname "$0")/lib.sh"
[[ $(id -u) -eq 0 ]] || fail "podman and buildah with their own roots need root here"
for tool in skopeo podman buildah htpasswd; do command -v "$tool" >/dev/null || fail "needs $tool (tests/deps.sh)"; done

pub_port=$(free_port)
priv_port=$(free_port)
proxy_port=$(free_port)
make_cert "$WORK/upstream" quay.io
start_registry public "$pub_port" "$WORK/upstream"
public_pid=${PIDS[-1]}
user=alice password=secret-$$
htpasswd -Bbn "$user" "$password" >"$WORK/htpasswd" 2>/dev/null
start_registry private "$priv_port" "$WORK/upstream" "$WORK/htpasswd"
private_pid=${PIDS[-1]}
make_oci_image "$WORK/image" v1 2 1024 7 >/dev/null
push_image "$WORK/image" v1 "127.0.0.1:$pub_port/e2e/app:v1"
make_oci_image "$WORK/secret" v1 2 1024 8 >/dev/null
push_image "$WORK/secret" v1 "127.0.0.1:$priv_port/team/secret:v1" "$user:$password"

RUST_LOG=info,stowage::access=debug start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" quay.io </dev/null
export HTTPS_PROXY="http://127.0.0.1:$proxy_port"
pub="quay.io:$pub_port/e2e/app:v1"
priv="quay.io:$priv_port/team/secret:v1"

skopeo_copy() { # skopeo_copy LOG REF DEST [skopeo args]
  local log=$WORK/$1.log ref=$2 dest=$3
  shift 3
  skopeo copy -q --retry-times 0 --src-cert-dir "$STOWAGE_TRUST" "$@" "docker://$ref" "dir:$dest" >"$log" 2>&1
}
# podman and buildah: their own storage under $WORK, nothing of the machine's touched (the
# run roots through short links: podman refuses a runroot path over 50 characters).
mkdir -p "$WORK/podman/run" "$WORK/buildah/run"
ln -sfn "$WORK/podman/run" "/tmp/e2e-pr.$$"
ln -sfn "$WORK/buildah/run" "/tmp/e2e-br.$$"
podman_() { podman --root "$WORK/podman/root" --runroot "/tmp/e2e-pr.$$" --storage-driver vfs "$@"; }
buildah_() { buildah --root "$WORK/buildah/root" --runroot "/tmp/e2e-br.$$" --storage-driver vfs "$@"; }

# 1. Online: one pull each fills the cache (the public probe marks e2e/app public).
skopeo_copy first "$pub" "$WORK/first" || { cat "$WORK/first.log" >&2; fail "first skopeo copy"; }
verify_dir_copy "$WORK/first" >/dev/null
skopeo_copy secret-first "$priv" "$WORK/secret-first" --src-creds "$user:$password" ||
  { cat "$WORK/secret-first.log" >&2; fail "first copy of the private image with credentials"; }
for _ in $(seq 100); do
  grep -q 'anonymous access probe.*repo=quay.io:'"$pub_port"'/e2e/app.*public=true' "$WORK/stowage.log" && break
  sleep 0.1
done
grep -q 'anonymous access probe.*repo=quay.io:'"$pub_port"'/e2e/app.*public=true' "$WORK/stowage.log" ||
  fail "Stowage never found e2e/app public"
ok "online: both images pulled through Stowage; e2e/app known public"

# 2. Upstream down.
stop_pid "$public_pid"
stop_pid "$private_pid"
gets_before=$(grep -c 'outcome="miss"' "$WORK/stowage.log" || true)

skopeo_copy down-skopeo "$pub" "$WORK/down-skopeo" ||
  { cat "$WORK/down-skopeo.log" >&2; fail "skopeo copy with the registry down"; }
n=$(verify_dir_copy "$WORK/down-skopeo")
diff -r "$WORK/first" "$WORK/down-skopeo" >/dev/null || fail "skopeo got other bytes with the registry down"
ok "skopeo copy with the registry down: $n blobs verified, the same image"

podman_ pull -q --cert-dir "$STOWAGE_TRUST" "$pub" >"$WORK/podman.log" 2>&1 ||
  { cat "$WORK/podman.log" >&2; fail "podman pull with the registry down"; }
podman_ image exists "$pub" || fail "podman does not list the image"
ok "podman pull with the registry down: $(podman_ images --format '{{.ID}} {{.Size}}' "$pub" | head -n 1)"

buildah_ pull -q --cert-dir "$STOWAGE_TRUST" "$pub" >"$WORK/buildah.log" 2>&1 ||
  { cat "$WORK/buildah.log" >&2; fail "buildah pull with the registry down"; }
buildah_ images -q "$pub" | grep -q . || fail "buildah does not list the image"
ok "buildah pull with the registry down"

grep -q 'answering the version check (/v2/) from the cache' "$WORK/stowage.log" ||
  fail "Stowage did not say it answered /v2/ itself"

# 3. The private image: refused, with or without credentials, nothing of it delivered.
for creds in "" "$user:$password"; do
  args=()
  [[ -n $creds ]] && args=(--src-creds "$creds")
  rm -rf "$WORK/down-secret"
  if skopeo_copy down-secret "$priv" "$WORK/down-secret" "${args[@]}"; then
    fail "the private image was copied with the registry down (creds: ${creds:+yes}${creds:-none})"
  fi
  for f in "$WORK"/secret-first/*; do
    hex=$(basename "$f")
    [[ $hex =~ ^[0-9a-f]{64}$ ]] || continue
    [[ ! -e $WORK/down-secret/$hex ]] || fail "a private blob reached the client with the registry down"
  done
done
ok "the private image stays refused with the registry down, anonymous and with credentials"
rm -f "/tmp/e2e-pr.$$" "/tmp/e2e-br.$$"
