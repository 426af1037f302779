#!/usr/bin/env bash
# Every `stowage setup <runtime>` snippet, as the CLI prints it for a running Stowage,
# through the runtime's own parser where one exists here (issues 16 and 20). The snippets
# come from the CLI asking the server (`--listen` only, from an empty working directory,
# which must stay empty); their `# file: PATH` sections are written out and then:
#
# - ca: the server's own ca.crt, byte for byte; openssl reads it.
# - docker, containerd-proxy: systemd-analyze verify loads the drop-in next to a unit of the
#   same name and says nothing about it.
# - docker-mirror: daemon.json is a test dockerd's --config-file; dockerd shows the mirror and
#   `docker pull x:1` goes through it (Stowage's mirror log), 0 upstream blob GETs the second
#   time (after rmi).
# - containerd: every hosts.toml parses as TOML; the one for the test registry
#   (quay.io:<port>, a configured [[registry]]) is used as written by a test containerd:
#   `ctr images pull --hosts-dir` pulls through the mirror. Then the TLS form (a second
#   Stowage, [mirror] tls = "ca"), as printed: its CA command run, its files at the paths it
#   names and the mirror name it says to resolve, in a mount namespace of this test's own;
#   ctr pulls through https://127.0.0.1:<port> (the mirror mints a leaf for the IP).
# - podman: `podman info` with CONTAINERS_REGISTRIES_CONF set to the file lists its mirrors;
#   (no pull: the test registry has a port, which a podman mirror path prefix cannot carry).
# - k3s, kind, gitlab, kubernetes: YAML (python3-yaml), with the keys each runtime reads.
# - compose: `docker-compose config` (Debian's docker-compose 1.29) accepts it.
# - etc-hosts: glibc resolves the registries from it (getent, the file bind-mounted over
#   /etc/hosts in a mount namespace of this test's own).
source "$(dirname "$0")/lib.sh"

[[ $(id -u) -eq 0 ]] || fail "dockerd, containerd and the mount namespace need root"
for tool in dockerd docker containerd ctr podman docker-compose systemd-analyze openssl jq skopeo unshare getent; do
  command -v "$tool" >/dev/null || fail "needs $tool (tests/deps.sh)"
done
/usr/bin/python3 -c 'import yaml, tomllib' || fail "needs python3-yaml and Python 3.11 (tests/deps.sh)"

reg_port=$(free_port)
proxy_port=$(free_port)
mirror_port=$(free_port)
make_cert "$WORK/upstream" quay.io registry-1.docker.io
start_registry registry "$reg_port" "$WORK/upstream"
make_oci_image "$WORK/app" v1 2 512 31 >/dev/null
push_image "$WORK/app" v1 "127.0.0.1:$reg_port/e2e/app:v1"
make_oci_image "$WORK/hub" 1 2 512 32 >/dev/null
push_image "$WORK/hub" 1 "127.0.0.1:$reg_port/library/x:1"
blobs=3 # config + 2 layers, each image

start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" quay.io registry-1.docker.io <<EOF
[mirror]
listen = "127.0.0.1:$mirror_port"
default_registry = "registry-1.docker.io:$reg_port"

[[registry]]
host = "quay.io:$reg_port"
EOF
wait_port "$mirror_port"
proxy="127.0.0.1:$proxy_port"
mirror="http://127.0.0.1:$mirror_port"

# The snippets, from the CLI, in an empty directory with no configuration.
cwd="$WORK/cwd"
snip="$WORK/snippets"
mkdir -p "$cwd" "$snip"
runtimes=$("$STOWAGE_BIN" help setup | sed -n 's/.*One of: //p' | tr -d ,.)
[[ $runtimes == *ca* && $runtimes == *kubernetes* ]] || fail "stowage help setup lists no runtimes: $runtimes"
for r in $runtimes; do
  (cd "$cwd" && "$STOWAGE_BIN" --listen "$proxy" setup "$r") >"$snip/$r.txt" 2>"$WORK/setup-$r.log" ||
    { cat "$WORK/setup-$r.log" >&2; fail "stowage setup $r"; }
done
[[ -z $(ls -A "$cwd") ]] || fail "stowage setup wrote into its working directory: $(ls -A "$cwd")"
# Each snippet's files under $snip/<runtime>/<path>.
/usr/bin/python3 - "$snip" $runtimes <<'EOF'
import os, sys
out, runtimes = sys.argv[1], sys.argv[2:]
for r in runtimes:
    if r == "ca":
        continue
    files, path = {}, None
    for line in open(f"{out}/{r}.txt").read().splitlines(keepends=True):
        if line.startswith("# file: "):
            path = line[len("# file: "):].strip()
            files[path] = ""
        elif path is not None:
            files[path] += line
    if not files:
        sys.exit(f"setup {r}: no '# file: ' section")
    for p, body in files.items():
        dest = os.path.join(out, r, p.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        open(dest, "w").write(body)
EOF
for r in $runtimes; do
  [[ $r == ca ]] && continue
  head -n1 "$snip/$r.txt" | grep -qF "for 127.0.0.1: the proxy listens on $proxy, on this machine only" ||
    fail "setup $r does not say which address it is for: $(head -n1 "$snip/$r.txt")"
done
ok "$(wc -w <<<"$runtimes") snippets from the running server, nothing written to the working directory"

# ca
cmp -s "$snip/ca.txt" "$STOWAGE_CA" || fail "setup ca is not the server's ca.crt"
openssl x509 -in "$snip/ca.txt" -noout || fail "setup ca: openssl cannot read it"
ok "ca: the server's ca.crt, byte for byte"

# docker, containerd-proxy: systemd's own parser.
for r in docker containerd-proxy; do
  unit=docker
  [[ $r == containerd-proxy ]] && unit=containerd
  units="$WORK/units-$r"
  mkdir -p "$units/$unit.service.d"
  printf '[Unit]\nDescription=test\n[Service]\nExecStart=/bin/true\n' >"$units/$unit.service"
  cp "$snip/$r/etc/systemd/system/$unit.service.d/http-proxy.conf" "$units/$unit.service.d/"
  SYSTEMD_UNIT_PATH="$units:" systemd-analyze verify "$units/$unit.service" >"$WORK/verify-$r.log" 2>&1 ||
    { cat "$WORK/verify-$r.log" >&2; fail "systemd-analyze verify, setup $r"; }
  ! grep -q 'http-proxy.conf' "$WORK/verify-$r.log" || { cat "$WORK/verify-$r.log" >&2; fail "systemd complains about setup $r's drop-in"; }
  grep -qxF "Environment=\"HTTPS_PROXY=http://$proxy\"" "$units/$unit.service.d/http-proxy.conf" ||
    fail "setup $r: no HTTPS_PROXY=http://$proxy"
  grep -qF "curl -fsS http://$proxy/ca.crt" "$snip/$r.txt" || fail "setup $r does not say how to trust the CA"
done
ok "docker, containerd-proxy: systemd-analyze verify reads the drop-ins without a complaint"

# docker-mirror: dockerd's own parser, then a pull through the mirror.
mkdir -p "$WORK/dmirror"
cp "$snip/docker-mirror/etc/docker/daemon.json" "$WORK/dmirror/daemon.json"
start_dockerd dmirror --
dk "$DK_SOCK" info -f '{{json .RegistryConfig.Mirrors}}' | grep -qF "\"$mirror/\"" ||
  fail "dockerd did not take the mirror from setup docker-mirror's daemon.json: $(dk "$DK_SOCK" info -f '{{json .RegistryConfig.Mirrors}}')"
before=$(registry_blob_gets registry)
dk "$DK_SOCK" pull x:1 >"$WORK/pull-dmirror-1.log" 2>&1 || { cat "$WORK/pull-dmirror-1.log" >&2; fail "docker pull x:1 (setup docker-mirror)"; }
dk "$DK_SOCK" rmi x:1 >/dev/null
dk "$DK_SOCK" pull x:1 >"$WORK/pull-dmirror-2.log" 2>&1 || { cat "$WORK/pull-dmirror-2.log" >&2; fail "second docker pull x:1"; }
gets=$(($(registry_blob_gets registry) - before))
((gets == blobs)) || fail "two docker pulls through the mirror made $gets upstream blob GETs, expected $blobs (the first pull's)"
grep 'stowage::access' "$WORK/stowage.log" | grep 'mirror{' | grep -q "repo=library/x " || fail "no mirror request for library/x in Stowage's log"
ok "docker-mirror: dockerd --config-file takes it; pull, rmi, pull: $gets upstream blob GETs in all"

# containerd: TOML, and containerd itself with the test registry's file.
/usr/bin/python3 - "$snip/containerd/etc/containerd/certs.d" "$mirror" <<'EOF' || fail "setup containerd: a hosts.toml does not parse"
import os, sys, tomllib
root, mirror = sys.argv[1], sys.argv[2]
names = sorted(os.listdir(root))
for n in names:
    t = tomllib.load(open(os.path.join(root, n, "hosts.toml"), "rb"))
    want = "https://registry-1.docker.io" if n == "docker.io" else f"https://{n}"
    assert t["server"] == want, (n, t)
    assert t["host"][mirror]["capabilities"] == ["pull", "resolve"], (n, t)
assert "k8s.gcr.io" not in names, names
print(" ".join(names), file=sys.stderr)
EOF
[[ -f $snip/containerd/etc/containerd/certs.d/quay.io:$reg_port/hosts.toml ]] || fail "setup containerd has no file for the configured quay.io:$reg_port"
start_containerd "$WORK/containerd"
sock=$CD_SOCK
before=$(registry_blob_gets registry)
ctr -a "$sock" -n e2e images pull --hosts-dir "$snip/containerd/etc/containerd/certs.d" "quay.io:$reg_port/e2e/app:v1" \
  >"$WORK/pull-containerd.log" 2>&1 || { cat "$WORK/pull-containerd.log" >&2; fail "ctr pull with setup containerd's hosts.toml"; }
grep 'stowage::access' "$WORK/stowage.log" | grep 'mirror{' | grep -q "registry=quay.io:$reg_port repo=e2e/app" ||
  fail "containerd did not pull through the mirror"
ok "containerd: every hosts.toml is TOML (no k8s.gcr.io); ctr --hosts-dir pulled quay.io:$reg_port/e2e/app:v1 through the mirror ($(($(registry_blob_gets registry) - before)) upstream blob GETs)"

# containerd with the TLS mirror (tls = "ca"), the snippet as printed: its CA command run,
# its files at the paths it names (in a mount namespace of this test's own, where a
# directory of ours is /etc/containerd and a hosts file of ours /etc/hosts). The snippet
# names the mirror by IP: ctr sends no SNI for it and the mirror's leaf names that IP.
tls_proxy=$(free_port)
tls_mirror=$(free_port)
start_stowage stowage-tls "$tls_proxy" "$WORK/upstream/ca.crt" quay.io <<EOF2
[mirror]
listen = "127.0.0.1:$tls_mirror"
tls = "ca"

[[registry]]
host = "quay.io:$reg_port"
EOF2
wait_port "$tls_mirror"
"$STOWAGE_BIN" --listen "127.0.0.1:$tls_proxy" setup containerd >"$snip/containerd-tls.txt" || fail "setup containerd (TLS mirror)"
grep -q "host.\"https://127.0.0.1:$tls_mirror\"" "$snip/containerd-tls.txt" ||
  fail "setup containerd (TLS) does not name the mirror by the address it listens on"
! grep -q stowage.local "$snip/containerd-tls.txt" || fail "setup containerd (TLS, by IP) names [mirror] hostname"
ca_cmd=$(sed -n 's/^#    \(curl -fsS .* -o \/etc\/containerd\/certs.d\/stowage-ca.crt\)$/\1/p' "$snip/containerd-tls.txt")
[[ -n $ca_cmd ]] || fail "setup containerd (TLS) does not say how to fetch the CA"
mkdir -p "$WORK/etc-containerd"
/usr/bin/python3 - "$snip/containerd-tls.txt" "$WORK/etc-containerd" <<'EOF2'
import os, sys
text, root = open(sys.argv[1]).read(), sys.argv[2]
path = None
for line in text.splitlines(keepends=True):
    if line.startswith("# file: "):
        path = line[len("# file: "):].strip()
        assert path.startswith("/etc/containerd/"), path
        dest = os.path.join(root, path[len("/etc/containerd/"):])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        open(dest, "w").close()
    elif path:
        open(dest, "a").write(line)
EOF2
# quay.io too: should the mirror fail, containerd's fallback to `server` stays on loopback.
printf '127.0.0.1 localhost quay.io\n' >"$WORK/tls-hosts"
ctr -a "$sock" -n e2e images rm --sync "quay.io:$reg_port/e2e/app:v1" >/dev/null
unshare -m bash -c "mount --bind '$WORK/etc-containerd' /etc/containerd && mount --bind '$WORK/tls-hosts' /etc/hosts &&
  $ca_cmd && ctr -a '$sock' -n e2e images pull --hosts-dir /etc/containerd/certs.d 'quay.io:$reg_port/e2e/app:v1'" \
  >"$WORK/pull-containerd-tls.log" 2>&1 || { cat "$WORK/pull-containerd-tls.log" >&2; fail "ctr pull with setup containerd's TLS hosts.toml"; }
grep 'stowage::access' "$WORK/stowage-tls.log" | grep 'mirror{' | grep -q "registry=quay.io:$reg_port repo=e2e/app" ||
  fail "containerd did not pull through the TLS mirror"
ok "containerd, TLS mirror: the snippet's CA command, files and name as printed; ctr pulled through https://127.0.0.1:$tls_mirror (a leaf for the IP)"

# podman: its own parser, and a pull through the mirror.
conf="$snip/podman/etc/containers/registries.conf.d/stowage.conf"
# podman refuses a runroot longer than 50 characters.
runroot=$(mktemp -d /tmp/e2e-podman.XXXXXX)
AT_EXIT+=("rm -rf '$runroot'")
podman_() {
  CONTAINERS_REGISTRIES_CONF="$conf" podman --root "$WORK/podman/root" --runroot "$runroot" \
    --storage-driver vfs --cgroup-manager cgroupfs --events-backend none "$@"
}
podman_ info --format '{{json .Registries}}' >"$WORK/podman-registries.json" 2>"$WORK/podman-info.log" ||
  { cat "$WORK/podman-info.log" >&2; fail "podman info with setup podman's registries.conf"; }
jq -e --arg l "127.0.0.1:$mirror_port/docker.io" \
  '.["docker.io"].Mirrors[0].Location == $l and .["docker.io"].Mirrors[0].Insecure == true and .["ghcr.io"].Mirrors[0].Location != null' \
  "$WORK/podman-registries.json" >/dev/null || fail "podman reads other mirrors: $(cat "$WORK/podman-registries.json")"
# A registry with a port cannot be a path prefix (podman refuses host:port/host:port/name as
# a reference): the snippet leaves it out and says so.
jq -e --arg p "quay.io:$reg_port" 'has($p) | not' "$WORK/podman-registries.json" >/dev/null || fail "setup podman mirrors quay.io:$reg_port by path prefix"
grep -qF "# quay.io:$reg_port: a registry with a port cannot be a mirror path prefix" "$conf" || fail "setup podman does not say why quay.io:$reg_port is missing"
grep -qF "curl -fsS http://$proxy/ca.crt" "$snip/podman.txt" || fail "setup podman does not say how to trust the CA for the proxy"
ok "podman: podman info reads the registries.conf and lists its mirrors (no podman pull: the test registry has a port, which a mirror path prefix cannot carry)"

# YAML: k3s, kind, gitlab, kubernetes.
/usr/bin/python3 - "$snip" "$mirror" "$reg_port" <<'EOF' || fail "a YAML snippet does not parse or lacks what its runtime reads"
import sys, yaml
snip, mirror, port = sys.argv[1:]
k3s = yaml.safe_load(open(f"{snip}/k3s/etc/rancher/k3s/registries.yaml"))
assert k3s["mirrors"]["docker.io"]["endpoint"] == [mirror], k3s
assert k3s["mirrors"][f"quay.io:{port}"]["endpoint"] == [mirror], k3s
assert "k8s.gcr.io" not in k3s["mirrors"], k3s
kind = yaml.safe_load(open(f"{snip}/kind/kind.yaml"))
assert kind["kind"] == "Cluster" and "config_path" in kind["containerdConfigPatches"][0], kind
ci = yaml.safe_load(open(f"{snip}/gitlab/.gitlab-ci.yml"))
assert any(j.get("variables", {}).get("FF_NETWORK_PER_BUILD") == "true" for j in ci.values() if isinstance(j, dict)), ci
docs = [d for d in yaml.safe_load_all(open(f"{snip}/kubernetes/deployment.yaml")) if d]
kinds = [d["kind"] for d in docs]
assert "Deployment" in kinds and "ConfigMap" in kinds and "Service" in kinds, kinds
EOF
ok "k3s, kind, gitlab, kubernetes: YAML with the keys their runtimes read"

# compose: docker-compose's own validation.
(cd "$snip/compose" && docker-compose -f docker-compose.yml config -q) >"$WORK/compose.log" 2>&1 ||
  { cat "$WORK/compose.log" >&2; fail "docker-compose config rejects setup compose"; }
ok "compose: docker-compose config accepts it"

# etc-hosts: glibc's own resolver reads it.
hosts="$snip/etc-hosts/etc/hosts"
resolved=$(unshare -m sh -c "mount --bind '$hosts' /etc/hosts && getent hosts quay.io auth.docker.io")
[[ $(awk '{print $1}' <<<"$resolved" | sort -u) == 127.0.0.1 && $(wc -l <<<"$resolved") -eq 2 ]] ||
  fail "getent with setup etc-hosts as /etc/hosts: $resolved"
grep -qF "curl -fsS http://$proxy/ca.crt" "$snip/etc-hosts.txt" || fail "setup etc-hosts does not say how to trust the CA"
ok "etc-hosts: getent resolves quay.io and auth.docker.io to 127.0.0.1 from it"
