#!/usr/bin/env bash
# Upstream proxy chaining (issue 7): Debian's squid is the corporate proxy on a loopback
# port, the only way out. Stowage has [upstream] proxy = squid (and no_proxy = ghcr.io);
# skopeo copies an image from a real docker-registry, served as quay.io:<port>, through
# Stowage as HTTPS_PROXY, and every blob hashes to its digest. squid's access log shows
# CONNECT quay.io:<port>; a blind tunnel Stowage relays for a non-registry host goes through
# squid too (curl sees the upstream's own certificate); the no_proxy registry does not.
# A second Stowage takes the proxy from HTTPS_PROXY in its own environment instead.
source "$(dirname "$0")/lib.sh"

reg_port=$(free_port)
squid_port=$(free_port)
proxy_port=$(free_port)
make_cert "$WORK/upstream" quay.io ghcr.io tunnel.test
start_registry registry "$reg_port" "$WORK/upstream"
make_oci_image "$WORK/image" v1 2 1024 6 >/dev/null
push_image "$WORK/image" v1 "127.0.0.1:$reg_port/e2e/app:v1"
pushed_gets=$(registry_blob_gets registry)

# squid: loopback only, no cache, CONNECT to any port from localhost, its own "DNS" in a
# hosts file (it never asks a real name server). It drops root for the `proxy` user, which
# must be able to reach its files under $WORK.
sq="$WORK/squid"
mkdir -p "$sq"
chmod 711 "$WORK"
printf '127.0.0.1 quay.io ghcr.io tunnel.test\n' >"$sq/hosts"
cat >"$sq/squid.conf" <<EOF
http_port 127.0.0.1:$squid_port
visible_hostname stowage-e2e-squid
pid_filename $sq/squid.pid
access_log stdio:$sq/access.log squid
cache_log $sq/cache.log
cache_store_log none
logfile_rotate 0
coredump_dir $sq
cache deny all
cache_mem 8 MB
hosts_file $sq/hosts
dns_nameservers 127.0.0.1
dns_timeout 2 seconds
netdb_filename none
pinger_enable off
shutdown_lifetime 1 second
cache_effective_user proxy
acl localhost src 127.0.0.1/32 ::1
http_access allow localhost
http_access deny all
EOF
chown -R proxy "$sq"
/usr/sbin/squid -k parse -f "$sq/squid.conf" >"$WORK/squid-parse.log" 2>&1 || { cat "$WORK/squid-parse.log" >&2; fail "squid rejects its config"; }
spawn "$WORK/squid.log" /usr/sbin/squid -N -f "$sq/squid.conf" >/dev/null
squid_pid=${PIDS[-1]}
wait_port "$squid_port"
ok "squid on 127.0.0.1:$squid_port"

# squid writes a CONNECT's log line when the tunnel closes.
squid_saw() {
  grep -qE " CONNECT $1 " "$sq/access.log" 2>/dev/null
}
wait_squid_saw() {
  for _ in $(seq 100); do
    squid_saw "$1" && return 0
    sleep 0.1
  done
  return 1
}

copy() {
  local host=$1 dest=$2
  HTTPS_PROXY="http://127.0.0.1:$proxy_port" skopeo copy -q --src-cert-dir "$STOWAGE_TRUST" \
    "docker://$host:$reg_port/e2e/app:v1" "dir:$dest" >"$WORK/copy.log" 2>&1 ||
    { cat "$WORK/copy.log" >&2; fail "skopeo copy of $host through Stowage into $dest"; }
}

# Stowage pins the names squid must reach to 127.0.0.2, where nothing listens (these lines
# land in start_stowage's [upstream.resolve]): only through squid, whose hosts file puts
# them on 127.0.0.1, can a pull or a tunnel work. A Stowage that ignored the proxy fails
# here, and still never leaves loopback.
unreachable_pins='"quay.io" = "127.0.0.2"
"tunnel.test" = "127.0.0.2"'
(exec 3<>"/dev/tcp/127.0.0.2/$reg_port") 2>/dev/null && fail "127.0.0.2:$reg_port reaches the registry"

PROXY_EXTRA="tunnel_ports = [$reg_port]" \
  UPSTREAM_EXTRA="proxy = \"http://127.0.0.1:$squid_port\"
no_proxy = \"ghcr.io\"" \
  start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" ghcr.io <<<"$unreachable_pins"
stowage_pid=${PIDS[-1]}

copy quay.io "$WORK/copy1"
n=$(verify_dir_copy "$WORK/copy1")
gets=$(($(registry_blob_gets registry) - pushed_gets))
((gets >= n)) || fail "$gets upstream blob GETs for $n blobs"
ok "pull through Stowage and squid: $n blobs verified"

# A non-registry host: Stowage relays the bytes blindly, through squid. curl trusts only
# the upstream's CA, so the answer came through untouched.
curl -fsS --max-time 20 --proxy "http://127.0.0.1:$proxy_port" --cacert "$WORK/upstream/ca.crt" \
  "https://tunnel.test:$reg_port/v2/" -o /dev/null || fail "blind tunnel to tunnel.test:$reg_port through Stowage and squid"
wait_squid_saw "tunnel.test:$reg_port" || fail "squid did not see CONNECT tunnel.test:$reg_port"
ok "blind tunnel for a non-registry host went through squid"

# no_proxy: ghcr.io (pinned in Stowage) is reached directly. Same image, so only the
# manifest goes upstream; squid must not see it at all.
copy ghcr.io "$WORK/copy2"
verify_dir_copy "$WORK/copy2" >/dev/null
diff -r "$WORK/copy1" "$WORK/copy2" >/dev/null || fail "the two copies differ"

# Stowage's pooled tunnels through squid close when it stops; squid logs them then.
kill "$stowage_pid"
wait "$stowage_pid" 2>/dev/null || true
wait_squid_saw "quay.io:$reg_port" || { cat "$sq/access.log" >&2; fail "squid's access log has no CONNECT quay.io:$reg_port"; }
! grep -q "ghcr.io" "$sq/access.log" || fail "the no_proxy registry went through squid: $(grep ghcr.io "$sq/access.log")"
ok "squid's access log: CONNECT quay.io:$reg_port, nothing for no_proxy ghcr.io"

# The proxy from Stowage's own environment (HTTPS_PROXY), with a fresh cache.
proxy_port=$(free_port)
before=$(grep -c " CONNECT quay.io:$reg_port " "$sq/access.log" || true)
HTTPS_PROXY="http://127.0.0.1:$squid_port" start_stowage stowage-env "$proxy_port" "$WORK/upstream/ca.crt" <<<"$unreachable_pins"
env_pid=${PIDS[-1]}
copy quay.io "$WORK/copy3"
verify_dir_copy "$WORK/copy3" >/dev/null
kill "$env_pid"
wait "$env_pid" 2>/dev/null || true
for _ in $(seq 100); do
  (($(grep -c " CONNECT quay.io:$reg_port " "$sq/access.log" || true) > before)) && break
  sleep 0.1
done
(($(grep -c " CONNECT quay.io:$reg_port " "$sq/access.log" || true) > before)) || fail "Stowage ignored HTTPS_PROXY in its environment"
ok "HTTPS_PROXY in Stowage's environment: pull through squid"
kill "$squid_pid" 2>/dev/null || true
