#!/usr/bin/env bash
# The real Docker engine (Debian's docker.io, dockerd 20.10) through Stowage, configured from
# the recipes in examples/ as shipped (issue 16). Each dockerd is this test's own (data root,
# exec root, socket, pid file and daemon.json under $WORK; vfs storage; no iptables, no
# bridge), stopped by PID. The images are runnable: their first layer is Debian's static
# busybox (make_image.py --busybox), so a layer that arrived wrong fails `docker run`.
#
# 1. HTTPS_PROXY (examples/systemd/docker-http-proxy.conf, its Environment= lines with the
#    proxy address put in; Stowage's CA through SSL_CERT_FILE, as update-ca-certificates
#    would): `docker pull quay.io:<port>/e2e/app:v1`, `docker rmi`, pull again: zero
#    upstream blob GETs the second time, every blob a hit; the image runs.
# 2. registry-mirrors (examples/docker/daemon.json with the mirror address put in, given as
#    dockerd's --config-file): `docker pull x:1`, rmi, `docker pull library/x:1`: Docker Hub
#    names, sent to the mirror without ns and mapped to [mirror] default_registry, here
#    registry-1.docker.io:<port> pinned to the test registry. The second pull is a hit.
# 3. The GitLab dind pattern (examples/gitlab-ci.yml): a second, empty dockerd with only the
#    service's `--registry-mirror=` flag pulls what the first pulled: zero upstream blob GETs.
# With no network here, a dockerd that bypassed Stowage could not pull at all. (Whatever its
# other paths, dockerd 20.10 keeps its ID key in /etc/docker/key.json, makes
# /run/docker/plugins, and its containerd puts shim sockets under /run/containerd/s.)
source "$(dirname "$0")/lib.sh"

[[ $(id -u) -eq 0 ]] || fail "dockerd needs root"
[[ -x /usr/sbin/dockerd && -x /usr/bin/docker ]] || fail "needs Debian's docker.io (tests/deps.sh)"
[[ -x /bin/busybox ]] || fail "needs Debian's busybox-static (tests/deps.sh)"
for tool in skopeo jq; do command -v "$tool" >/dev/null || fail "needs $tool (tests/deps.sh)"; done

reg_port=$(free_port)
proxy_port=$(free_port)
mirror_port=$(free_port)
make_cert "$WORK/upstream" quay.io registry-1.docker.io
start_registry registry "$reg_port" "$WORK/upstream"
make_oci_image "$WORK/app" v1 3 1024 21 --busybox=/bin/busybox >/dev/null
push_image "$WORK/app" v1 "127.0.0.1:$reg_port/e2e/app:v1"
make_oci_image "$WORK/hub" 1 2 1024 22 --busybox=/bin/busybox >/dev/null
push_image "$WORK/hub" 1 "127.0.0.1:$reg_port/library/x:1"
app_blobs=4 hub_blobs=3 # config + layers

start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" quay.io registry-1.docker.io <<EOF
[mirror]
listen = "127.0.0.1:$mirror_port"
default_registry = "registry-1.docker.io:$reg_port"
EOF
wait_port "$mirror_port"

# start_dockerd and dk: lib.sh.
pull() { # pull SOCK REF LOGNAME
  dk "$1" pull "$2" >"$WORK/pull-$3.log" 2>&1 || { cat "$WORK/pull-$3.log" >&2; fail "docker pull $2 ($3)"; }
}
runs() { # runs SOCK REF SEED: the image's busybox runs, and its layer is the one made for SEED
  dk "$1" run --rm --network none "$2" /bin/true || fail "docker run $2 /bin/true"
  [[ $(dk "$1" run --rm --network none "$2" /bin/busybox cat /etc/e2e-image) == "seed $3" ]] ||
    fail "$2 does not hold the layer made for seed $3"
}
remove() { # remove SOCK REF: the image and its layers gone from that daemon
  dk "$1" rmi "$2" >/dev/null || fail "docker rmi $2"
  [[ -z $(dk "$1" images -q) ]] || fail "images left after docker rmi $2"
}
upstream_gets() { registry_blob_gets registry; }
# Blob hits in Stowage's access log for a way in (tunnel or mirror) and a repository.
blob_hits() {
  grep 'stowage::access' "$WORK/stowage.log" | grep "$1{" | grep "repo=$2 " | grep 'kind="blob"' |
    grep -c 'outcome="hit"' || true
}

# 1. dockerd with the systemd drop-in's environment.
conf="$REPO/examples/systemd/docker-http-proxy.conf"
mapfile -t proxy_env < <(sed -n 's/^Environment="\(.*\)"$/\1/p' "$conf" | sed "s|stowage-host:3128|127.0.0.1:$proxy_port|")
printf '%s\n' "${proxy_env[@]}" | grep -qxF "HTTPS_PROXY=http://127.0.0.1:$proxy_port" ||
  fail "$conf sets no HTTPS_PROXY=http://stowage-host:3128"
grep -q 'update-ca-certificates' "$conf" || fail "$conf no longer says how dockerd trusts Stowage's CA"
cp "$STOWAGE_CA" "$WORK/stowage-ca.pem"
start_dockerd proxy "${proxy_env[@]}" "SSL_CERT_FILE=$WORK/stowage-ca.pem" --
proxy_sock=$DK_SOCK
ok "dockerd $(dk "$proxy_sock" version -f '{{.Server.Version}}') with ${proxy_env[*]}"

app="quay.io:$reg_port/e2e/app:v1"
before=$(upstream_gets)
pull "$proxy_sock" "$app" proxy-first
first=$(($(upstream_gets) - before))
((first == app_blobs)) || fail "first pull through HTTPS_PROXY made $first upstream blob GETs, expected the image's $app_blobs"
grep 'stowage::access' "$WORK/stowage.log" | grep 'tunnel{' | grep -q "registry=quay.io:$reg_port repo=e2e/app" ||
  fail "Stowage's log shows no tunnelled request for quay.io:$reg_port e2e/app"
remove "$proxy_sock" "$app"
hits=$(blob_hits tunnel e2e/app)
pull "$proxy_sock" "$app" proxy-second
second=$(($(upstream_gets) - before - first))
((second == 0)) || fail "second pull through HTTPS_PROXY made $second upstream blob GETs, expected 0"
hits=$(($(blob_hits tunnel e2e/app) - hits))
((hits >= app_blobs)) || fail "second pull: $hits blob hits in Stowage's log, expected $app_blobs"
runs "$proxy_sock" "$app" 21
ok "HTTPS_PROXY: pull ($first upstream blob GETs), rmi, pull again ($second GETs, $hits hits), the image runs"

# 2. dockerd with daemon.json's registry-mirrors.
example="$REPO/examples/docker/daemon.json"
jq -e '."registry-mirrors" == ["http://stowage-host:5000"]' "$example" >/dev/null ||
  fail "$example does not list http://stowage-host:5000 as its registry mirror"
mkdir -p "$WORK/mirror"
sed "s|http://stowage-host:5000|http://127.0.0.1:$mirror_port|" "$example" >"$WORK/mirror/daemon.json"
jq -e --arg m "http://127.0.0.1:$mirror_port" '."registry-mirrors" == [$m]' "$WORK/mirror/daemon.json" >/dev/null ||
  fail "substitution into daemon.json failed"
start_dockerd mirror --
mirror_sock=$DK_SOCK
dk "$mirror_sock" info -f '{{json .RegistryConfig.Mirrors}}' | grep -qF "127.0.0.1:$mirror_port" ||
  fail "dockerd did not take the mirror from daemon.json"

before=$(upstream_gets)
pull "$mirror_sock" x:1 mirror-first
first=$(($(upstream_gets) - before))
((first == hub_blobs)) || fail "docker pull x:1 through the mirror made $first upstream blob GETs, expected the image's $hub_blobs"
grep 'stowage::access' "$WORK/stowage.log" | grep 'mirror{' | grep -q "registry=registry-1.docker.io:$reg_port repo=library/x " ||
  fail "Stowage's log shows no mirror request for registry-1.docker.io:$reg_port library/x"
remove "$mirror_sock" x:1
hits=$(blob_hits mirror library/x)
pull "$mirror_sock" library/x:1 mirror-second
second=$(($(upstream_gets) - before - first))
((second == 0)) || fail "docker pull library/x:1 after rmi made $second upstream blob GETs, expected 0"
hits=$(($(blob_hits mirror library/x) - hits))
((hits >= hub_blobs)) || fail "docker pull library/x:1: $hits blob hits in Stowage's log, expected $hub_blobs"
runs "$mirror_sock" library/x:1 22
ok "registry-mirrors: pull x:1 ($first upstream blob GETs), rmi, pull library/x:1 ($second GETs, $hits hits), runs"

# 3. GitLab's dind service: only the flag from examples/gitlab-ci.yml.
ci="$REPO/examples/gitlab-ci.yml"
flag=$(grep -o -- '--registry-mirror=http://stowage:5000' "$ci" | head -n 1)
[[ -n $flag ]] || fail "$ci has no dind service with --registry-mirror=http://stowage:5000"
start_dockerd dind -- "${flag/stowage:5000/127.0.0.1:$mirror_port}"
dind_sock=$DK_SOCK
before=$(upstream_gets)
hits=$(blob_hits mirror library/x)
pull "$dind_sock" x:1 dind
dind=$(($(upstream_gets) - before))
((dind == 0)) || fail "the dind daemon's pull made $dind upstream blob GETs, expected 0"
hits=$(($(blob_hits mirror library/x) - hits))
((hits >= hub_blobs)) || fail "the dind daemon's pull: $hits blob hits, expected $hub_blobs"
runs "$dind_sock" x:1 22
ok "dind (${flag/stowage:5000/127.0.0.1:$mirror_port} only): a fresh dockerd pulls x:1 with $dind upstream blob GETs, $hits hits, runs"
