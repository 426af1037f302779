#!/usr/bin/env bash
# The container image, built from the repository's Dockerfile and run as users run it
# (issue 16), with the real Docker engine (Debian's docker.io, dockerd 20.10) of this test's
# own, as in 10-dockerd.sh.
#
# Build, offline: `docker build --target prebuilt` (BuildKit) with the stripped debug binary
# `cargo test` built (target/e2e-image/stowage) and a runtime base made here from this
# machine's own Debian files: the glibc and libgcc libraries `ldd` names, ca-certificates'
# bundle, a passwd file. That is what the public default (gcr.io/distroless/cc-debian12)
# holds for this binary, with no shell; the full default build (rust:1-bookworm) needs the
# network and is not run here. (Not debootstrap: a minbase rootfs is ~100 packages fetched
# from deb.debian.org to keep five files of two of them; these are those files, from the
# same Debian 12 packages, copied in well under a second, so there is nothing to cache.)
#
# 1. examples/kubernetes/deployment.yaml: `docker run` flags derived from the manifest by
#    pod_to_docker.py (user, read-only root, no-new-privileges, dropped capabilities, env,
#    memory limit, stop timeout, the ConfigMap's config mounted at /etc/stowage, a named
#    volume for the PVC), with the config's listen addresses moved to free loopback ports
#    (--network host) and upstream pins appended. It answers the readiness probe; a dockerd
#    with HTTPS_PROXY at the container pulls, rmi, pulls again with zero upstream blob GETs;
#    `docker rm -f`, a new container on the same volume: zero GETs again, the same CA bytes.
# 2. examples/docker-compose.yml, as shipped (published ports, its own network, named
#    volumes, read_only, user) with an override file naming the image built here, the
#    network's subnet and the config its commented line mounts, in a network namespace of
#    this test's own: the same checks across `docker-compose down` / `up`.
# Every check was seen failing: a second pull with caching off (min_free above the disk),
# an anonymous volume instead of the PVC's, `down -v`, the cache removed between
# containers, a /bin/sh in the base; and the CA check caught the Dockerfile's old VOLUME.
source "$(dirname "$0")/lib.sh"

[[ $(id -u) -eq 0 ]] || fail "dockerd needs root"
[[ -x /usr/sbin/dockerd && -x /usr/bin/docker ]] || fail "needs Debian's docker.io (tests/deps.sh)"
[[ -x /usr/bin/docker-compose ]] || fail "needs Debian's docker-compose (tests/deps.sh)"
[[ -x /bin/busybox ]] || fail "needs Debian's busybox-static (tests/deps.sh)"
/usr/bin/python3 -c 'import yaml' 2>/dev/null || fail "needs Debian's python3-yaml (tests/deps.sh)"
for tool in skopeo jq strip; do command -v "$tool" >/dev/null || fail "needs $tool (tests/deps.sh)"; done
[[ -x $STOWAGE_BIN ]] || fail "no binary at $STOWAGE_BIN (cargo build)"

# --- the upstream registry and a runnable image in it --------------------------------------
reg_port=$(free_port)
make_cert "$WORK/upstream" quay.io
start_registry registry "$reg_port" "$WORK/upstream"
make_oci_image "$WORK/app" v1 3 1024 31 --busybox=/bin/busybox >/dev/null
push_image "$WORK/app" v1 "127.0.0.1:$reg_port/e2e/app:v1"
app="quay.io:$reg_port/e2e/app:v1"
app_blobs=4 # config + layers
UPSTREAM=registry # the registry whose log upstream_gets reads
upstream_gets() { registry_blob_gets "$UPSTREAM"; }

# The dockerd helpers (start_dockerd, dk) are in lib.sh.

# --- the image ---------------------------------------------------------------------------------
# The runtime base from this machine's files (Debian 12, as the distroless base): the shared
# libraries the binary needs, the CA bundle, passwd/group naming uid 10001. No shell.
base="$WORK/base"
mkdir -p "$base/etc/ssl/certs" "$base/tmp"
chmod 1777 "$base/tmp"
libs=$(ldd "$STOWAGE_BIN" | grep -oE '/[^ ]+' | sort -u)
for f in $libs /etc/ssl/certs/ca-certificates.crt; do
  mkdir -p "$base$(dirname "$f")"
  cp -L "$f" "$base$f"
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nstowage:x:10001:10001:stowage:/var/lib/stowage:/sbin/nologin\n' >"$base/etc/passwd"
printf 'root:x:0:\nstowage:x:10001:\n' >"$base/etc/group"
log "runtime base ($(du -sh "$base" | cut -f1)): $(dpkg -S $libs | cut -d: -f1 | sort -u | tr '\n' ' ')+ ca-certificates' bundle"

start_dockerd engine --
engine=$DK_SOCK
tar --numeric-owner --owner=0 --group=0 -C "$base" -c . |
  dk "$engine" import - stowage-e2e/runtime-base:1 >/dev/null || fail "docker import of the runtime base"

# The debug binary `cargo test` built, stripped, where .dockerignore lets the context have it.
mkdir -p "$REPO/target/e2e-image"
strip -o "$REPO/target/e2e-image/stowage" "$STOWAGE_BIN"
image=stowage-e2e:test
DOCKER_BUILDKIT=1 dk "$engine" build --target prebuilt \
  --build-arg RUNTIME_IMAGE=stowage-e2e/runtime-base:1 \
  --build-arg STOWAGE_BINARY=target/e2e-image/stowage \
  -t "$image" "$REPO" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; fail "docker build --target prebuilt"; }
size=$(dk "$engine" image inspect -f '{{.Size}}' "$image")
[[ $(dk "$engine" image inspect -f '{{.Config.User}}' "$image") == 10001:10001 ]] || fail "the image does not run as 10001:10001"
cid=$(dk "$engine" create "$image")
dk "$engine" export "$cid" | tar -tv --numeric-owner >"$WORK/image-ls.txt" || fail "docker export"
dk "$engine" rm "$cid" >/dev/null
awk '{ print $NF }' "$WORK/image-ls.txt" >"$WORK/image-files.txt"
owner() { awk -v p="$1" '$NF == p { print $2 }' "$WORK/image-ls.txt"; }
for d in var/ var/cache/ var/lib/ etc/stowage/; do
  [[ $(owner "$d") == 0/0 ]] || fail "$d in the image is owned by $(owner "$d"), not root"
done
for d in var/cache/stowage/ var/lib/stowage/ var/lib/stowage/certs/; do
  [[ $(owner "$d") == 10001/10001 ]] || fail "$d in the image is owned by $(owner "$d"), not 10001"
done
grep -qx 'etc/ssl/certs/ca-certificates.crt' "$WORK/image-files.txt" || fail "the image has no CA bundle"
grep -qx 'usr/local/bin/stowage' "$WORK/image-files.txt" || fail "the image has no /usr/local/bin/stowage"
if grep -qE '^(usr/)?s?bin/([a-z]*sh|busybox)$' "$WORK/image-files.txt"; then
  fail "the image has a shell: $(grep -E '^(usr/)?s?bin/([a-z]*sh|busybox)$' "$WORK/image-files.txt" | tr '\n' ' ')"
fi
ok "docker build --target prebuilt: $image, $((size / 1000000)) MB ($size bytes), $(grep -vc '/$' "$WORK/image-files.txt") files, user 10001 (owns only the volume directories), CA bundle, no shell"

# --- 1. as examples/kubernetes/deployment.yaml runs it -----------------------------------------
proxy_port=$(free_port)
mirror_port=$(free_port)
k8s="$WORK/k8s"
mkdir -p "$k8s"
/usr/bin/python3 "$E2E_DIR/pod_to_docker.py" "$REPO/examples/kubernetes/deployment.yaml" "$k8s" \
  stowage-e2e 3128="$proxy_port" 5000="$mirror_port" || fail "deployment.yaml does not translate to docker run"
mapfile -t run_args <"$k8s/run.args"
mapfile -t cmd_args <"$k8s/cmd.args"
read -r probe_path probe_port <"$k8s/probe"
conf_dir="$k8s/configmap-stowage-config"
cp "$WORK/upstream/ca.crt" "$conf_dir/upstream-ca.crt"
cat >>"$conf_dir/config.toml" <<EOF
[upstream]
extra_ca = ["/etc/stowage/upstream-ca.crt"]
[upstream.resolve]
"quay.io" = "127.0.0.1"
EOF
log "docker run --network host ${run_args[*]} $image ${cmd_args[*]}"

# start_container NAME [docker run flags...] -- ARGS...: waits for the probe, fetches the CA
start_container() {
  local name=$1
  shift
  dk "$engine" run -d --name "$name" --network host "${run_args[@]}" "$image" "${cmd_args[@]}" >/dev/null ||
    fail "docker run $name"
  for _ in $(seq 200); do
    curl -fsS "http://127.0.0.1:$probe_port$probe_path" >/dev/null 2>&1 && break
    [[ $(dk "$engine" inspect -f '{{.State.Running}}' "$name") == true ]] ||
      { dk "$engine" logs "$name" >&2; fail "container $name exited"; }
    sleep 0.05
  done
  curl -fsS "http://127.0.0.1:$probe_port$probe_path" >/dev/null || fail "$name does not answer $probe_path"
}

start_container stowage-k8s
curl -fsS "http://127.0.0.1:$proxy_port/ca.crt" >"$WORK/ca-k8s-1.pem" || fail "GET /ca.crt"
[[ $(dk "$engine" inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}} {{.HostConfig.CapDrop}}' stowage-k8s) == "true 10001:10001 [ALL]" ]] ||
  fail "the container does not run read-only, as 10001, without capabilities"
ok "the Deployment's container answers $probe_path, serves its CA"

# The client: a dockerd with HTTPS_PROXY at the container and its CA trusted.
start_dockerd client-k8s "HTTPS_PROXY=http://127.0.0.1:$proxy_port" "SSL_CERT_FILE=$WORK/ca-k8s-1.pem" --
client=$DK_SOCK
pull() { # pull SOCK LOGNAME: pulls $app, prints the upstream blob GETs it made
  local before
  before=$(upstream_gets)
  dk "$1" pull "$app" >"$WORK/pull-$2.log" 2>&1 || { cat "$WORK/pull-$2.log" >&2; fail "docker pull $app ($2)"; }
  echo $(($(upstream_gets) - before))
}
remove() { dk "$1" rmi "$app" >/dev/null || fail "docker rmi $app"; }
first=$(pull "$client" k8s-first)
((first == app_blobs)) || fail "first pull made $first upstream blob GETs, expected the image's $app_blobs"
remove "$client"
second=$(pull "$client" k8s-second)
((second == 0)) || fail "second pull made $second upstream blob GETs, expected 0"
dk "$client" run --rm --network none "$app" /bin/true || fail "docker run $app /bin/true"
ok "through the Deployment's container: pull ($first upstream blob GETs), rmi, pull ($second), the image runs"

dk "$engine" rm -f stowage-k8s >/dev/null
start_container stowage-k8s
curl -fsS "http://127.0.0.1:$proxy_port/ca.crt" >"$WORK/ca-k8s-2.pem" || fail "GET /ca.crt"
cmp -s "$WORK/ca-k8s-1.pem" "$WORK/ca-k8s-2.pem" || fail "a new container on the same volume serves another CA"
remove "$client"
third=$(pull "$client" k8s-third)
((third == 0)) || fail "pull after docker rm -f and a new container made $third upstream blob GETs, expected 0"
ok "docker rm -f, a new container on the volume: the same CA, pull with $third upstream blob GETs"
dk "$engine" rm -f stowage-k8s >/dev/null


# --- 2. examples/docker-compose.yml --------------------------------------------------------------
# As shipped: its published ports (3128:3128, 5000:5000 on every address), its own network,
# the image's built-in listeners. So that nothing binds a fixed port on this machine, this
# part runs in a network namespace of its own: a dockerd, the client dockerd and a second
# docker-registry (on the same storage) in there, reached by the compose network's gateway.
# An override file names the image built here, fixes the compose network's subnet (to pin
# the upstream to its gateway), and fills in the config mount the example's commented line
# offers: docker/config.toml (the image's own) with the test upstream's CA and pin appended.
compose_file="$REPO/examples/docker-compose.yml"
config_mount=$(sed -n 's|^ *# - ./stowage.toml:\(/[^ ]*\)$|\1|p' "$compose_file")
[[ $config_mount == /etc/stowage/config.toml:ro ]] ||
  fail "$compose_file no longer offers ./stowage.toml:/etc/stowage/config.toml:ro ($config_mount)"
ns="stowage-e2e-$$"
ip netns add "$ns" || fail "ip netns add $ns"
AT_EXIT+=("ip netns del $ns")
ip netns exec "$ns" ip link set lo up
# nsenter, not `ip netns exec`: that remounts /sys, and dockerd needs the cgroup mounts. (A
# process to spawn is given nsenter itself, which execs it: its PID is the one recorded.)
in_ns() { nsenter --net="/run/netns/$ns" "$@"; }

# The same registry storage, served inside the namespace on every address, same port.
sed -e "s|addr: 127.0.0.1:$reg_port|addr: 0.0.0.0:$reg_port|" "$WORK/registry/config.yml" >"$WORK/registry/config-ns.yml"
grep -q "0.0.0.0:$reg_port" "$WORK/registry/config-ns.yml" || fail "registry config substitution"
spawn "$WORK/registry-ns.log" nsenter --net="/run/netns/$ns" docker-registry serve "$WORK/registry/config-ns.yml" >/dev/null
UPSTREAM=registry-ns
gateway=172.31.254.1
cdir="$WORK/compose"
mkdir -p "$cdir"
cp "$WORK/upstream/ca.crt" "$cdir/upstream-ca.crt"
{
  cat "$REPO/docker/config.toml"
  echo '[upstream]'
  echo 'extra_ca = ["/etc/stowage/upstream-ca.crt"]'
  echo '[upstream.resolve]'
  echo "\"quay.io\" = \"$gateway\""
} >"$cdir/stowage.toml"
cat >"$cdir/override.yml" <<EOF
services:
  stowage:
    image: $image
    volumes:
      - $cdir/stowage.toml:$config_mount
      - $cdir/upstream-ca.crt:/etc/stowage/upstream-ca.crt:ro
networks:
  default:
    ipam:
      config:
        - {subnet: 172.31.254.0/24, gateway: $gateway}
EOF

DK_NETNS=$ns start_dockerd engine-ns --
engine_ns=$DK_SOCK
dk "$engine" save "$image" | dk "$engine_ns" load >/dev/null || fail "docker save | docker load of $image"
compose() {
  DOCKER_HOST=$engine_ns /usr/bin/docker-compose -p stowage-e2e -f "$compose_file" -f "$cdir/override.yml" "$@"
}
compose_up() {
  compose up -d --no-build >>"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log" >&2; fail "docker-compose up"; }
  local id
  id=$(compose ps -q stowage)
  [[ -n $id ]] || fail "docker-compose started no stowage container"
  for _ in $(seq 200); do
    in_ns curl -fsS http://127.0.0.1:3128/healthz >/dev/null 2>&1 && break
    [[ $(dk "$engine_ns" inspect -f '{{.State.Running}}' "$id") == true ]] ||
      { dk "$engine_ns" logs "$id" >&2; fail "the compose container exited"; }
    sleep 0.05
  done
  in_ns curl -fsS http://127.0.0.1:3128/healthz >/dev/null || fail "the compose service does not answer /healthz on :3128"
  in_ns curl -fsS http://127.0.0.1:5000/v2/ -o /dev/null || fail "the compose service's mirror does not answer on :5000"
  [[ $(dk "$engine_ns" inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}' "$id") == "true 10001:10001" ]] ||
    fail "the compose container does not run read-only as 10001:10001"
}
compose_down() {
  compose down >>"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log" >&2; fail "docker-compose down"; }
}

compose_up
in_ns curl -fsS http://127.0.0.1:3128/ca.crt >"$WORK/ca-compose-1.pem" || fail "GET /ca.crt"
ok "docker-compose up: the example's service answers /healthz on its published :3128 (mirror :5000), read-only, as 10001:10001"
DK_NETNS=$ns start_dockerd client-ns "HTTPS_PROXY=http://127.0.0.1:3128" "SSL_CERT_FILE=$WORK/ca-compose-1.pem" --
client=$DK_SOCK
first=$(pull "$client" compose-first)
((first == app_blobs)) || fail "first pull through compose made $first upstream blob GETs, expected $app_blobs"
remove "$client"
second=$(pull "$client" compose-second)
((second == 0)) || fail "second pull through compose made $second upstream blob GETs, expected 0"
ok "through the compose service: pull ($first upstream blob GETs), rmi, pull ($second)"

compose_down
compose_up
in_ns curl -fsS http://127.0.0.1:3128/ca.crt >"$WORK/ca-compose-2.pem" || fail "GET /ca.crt"
cmp -s "$WORK/ca-compose-1.pem" "$WORK/ca-compose-2.pem" || fail "after docker-compose down / up the service serves another CA"
remove "$client"
third=$(pull "$client" compose-third)
((third == 0)) || fail "pull after docker-compose down / up made $third upstream blob GETs, expected 0"
dk "$client" run --rm --network none "$app" /bin/true || fail "docker run $app /bin/true"
ok "docker-compose down, up: the same CA, pull with $third upstream blob GETs, the image runs"
compose_down
