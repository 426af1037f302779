#!/usr/bin/env bash
# `[ca] name_constraints = true` (issue 14, item 7): the CA Stowage makes can sign only for
# its configured names, and real clients enforce that. A thief holding ca.key forges leaves
# with openssl; each is served by `openssl s_server`:
#   - a leaf for quay.io (a configured registry) is accepted by curl (OpenSSL) and skopeo (Go);
#   - a leaf for accounts.google.com, and one for the IP 127.0.0.1, are refused by both, for
#     the name constraints (the same leaves under an unconstrained CA are accepted: control);
#   - Stowage's own minted leaf for quay.io, through HTTPS_PROXY, is accepted by both;
#   - certs/ is created 0700.
# Names resolve through a private /etc/hosts bind-mounted in a mount namespace this script
# makes (`unshare -m`), so the machine's own file is never touched.
set -euo pipefail
if [[ -z ${E2E_INNER:-} ]]; then
  [[ $(id -u) -eq 0 ]] || { echo "[08-ca-constraints] FAIL: needs root for a mount namespace" >&2; exit 1; }
  exec env E2E_INNER=1 unshare --mount --propagation private bash "$0" "$@"
fi
source "$(dirname "$0")/lib.sh"
for tool in skopeo curl openssl; do command -v "$tool" >/dev/null || fail "needs $tool (tests/deps.sh installs it)"; done
printf '127.0.0.1 localhost quay.io accounts.google.com\n::1 localhost\n' >"$WORK/hosts"
mount --bind "$WORK/hosts" /etc/hosts

# A Stowage with a constrained CA; quay.io's upstream is nothing (port of a closed listener):
# the TLS inside the tunnel is Stowage's alone.
dead_port=$(free_port)
port=$(free_port)
dummy="$WORK/dummy"
make_cert "$dummy" quay.io
start_stowage stowage "$port" "$dummy/ca.crt" quay.io <<CONF
[[registry]]
host = "quay.io:$dead_port"
CONF
stop_pid "${PIDS[-1]}"
certs="$WORK/stowage/certs"
[[ $(stat -c %a "$certs") == 700 ]] || fail "certs/ is $(stat -c %a "$certs"), not 700"
sed -i 's/^\[ca\]$/[ca]\nname_constraints = true/' "$WORK/stowage/config.toml"
rm -rf "$certs"
spawn "$WORK/stowage2.log" "$STOWAGE_BIN" --config "$WORK/stowage/config.toml" run >/dev/null
wait_port "$port" 127.0.0.1 "${PIDS[-1]}"
ca="$certs/ca.crt"
[[ $(stat -c %a "$certs") == 700 ]] || fail "certs/ is $(stat -c %a "$certs"), not 700"
openssl x509 -in "$ca" -noout -text | grep -q "X509v3 Name Constraints" || fail "the CA has no name constraints"
ok "certs/ is 0700; the CA carries name constraints: $(openssl x509 -in "$ca" -noout -ext nameConstraints | tr -s ' \n' ' ')"

# An unconstrained CA for the control.
open="$WORK/open"
mkdir -p "$open"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=open CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign \
  -keyout "$open/ca.key" -out "$open/ca.crt" 2>/dev/null

# forge CA_DIR NAME SAN → $WORK/leaf-NAME.{crt,key}, signed with that CA's key.
forge() {
  local cadir=$1 name=$2 san=$3
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
    -keyout "$WORK/leaf-$name.key" -out "$WORK/leaf-$name.csr" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' "$san" >"$WORK/leaf-$name.cnf"
  openssl x509 -req -in "$WORK/leaf-$name.csr" -CA "$cadir/ca.crt" -CAkey "$cadir/ca.key" \
    -CAcreateserial -days 1 -extfile "$WORK/leaf-$name.cnf" -out "$WORK/leaf-$name.crt" 2>/dev/null
}
# serve NAME → SERVED_PORT, where s_server presents leaf NAME. Not called in $(...): the
# server must be spawned by this shell, so cleanup stops it.
serve() {
  SERVED_PORT=$(free_port)
  spawn "$WORK/s_server-$1.log" openssl s_server -quiet -www -accept "$SERVED_PORT" \
    -cert "$WORK/leaf-$1.crt" -key "$WORK/leaf-$1.key" >/dev/null
  wait_port "$SERVED_PORT" 127.0.0.1 "${PIDS[-1]}"
}
mkdir -p "$WORK/trust-constrained" "$WORK/trust-open"
cp "$ca" "$WORK/trust-constrained/ca.crt"
cp "$open/ca.crt" "$WORK/trust-open/ca.crt"

# check CLIENT TRUST URL → "accepted" or "refused: <reason>"
curl_says() {
  local out
  if out=$(curl -sS -o /dev/null --cacert "$1/ca.crt" "$2" 2>&1); then echo accepted; else echo "refused: $(head -n 1 <<<"$out")"; fi
}
# skopeo got past TLS when its error is about what the server said (s_server's HTML page,
# Stowage's 5xx), not about the certificate.
skopeo_says() {
  local out
  out=$(skopeo inspect --retry-times 0 --cert-dir "$1" "docker://$2/e2e/app:v1" 2>&1 || true)
  if grep -q x509 <<<"$out"; then
    echo "refused: $(grep -o 'x509:.*' <<<"$out" | head -n 1)"
  elif grep -qiE "invalid character|status|received unexpected HTTP|manifest unknown|502|503|504" <<<"$out"; then
    echo accepted
  else
    echo "unexpected: $out"
  fi
}

forge "$certs" quay.io "DNS:quay.io"
forge "$certs" accounts.google.com "DNS:accounts.google.com"
forge "$certs" 127.0.0.1 "IP:127.0.0.1"
serve quay.io
p_quay=$SERVED_PORT
serve accounts.google.com
p_google=$SERVED_PORT
serve 127.0.0.1
p_ip=$SERVED_PORT

r=$(curl_says "$WORK/trust-constrained" "https://quay.io:$p_quay/")
[[ $r == accepted ]] || fail "curl refused the quay.io leaf: $r"
r=$(skopeo_says "$WORK/trust-constrained" "quay.io:$p_quay")
[[ $r == accepted ]] || fail "skopeo refused the quay.io leaf: $r"
ok "a forged leaf inside the constraints (quay.io) is accepted by curl and skopeo"
for target in "accounts.google.com:$p_google" "127.0.0.1:$p_ip"; do
  r=$(curl_says "$WORK/trust-constrained" "https://$target/")
  [[ $r == refused:* ]] || fail "curl accepted a forged leaf for $target"
  grep -qiE 'subtree|constraint|excluded' <<<"$r" || fail "curl refused $target, but not for the name constraints: $r"
  ok "curl (OpenSSL) refuses $target: ${r#refused: }"
  r=$(skopeo_says "$WORK/trust-constrained" "$target")
  [[ $r == refused:* ]] || fail "skopeo accepted a forged leaf for $target"
  grep -qiE 'not permitted|excluded|not authorized to sign' <<<"$r" || fail "skopeo refused $target, but not for the name constraints: $r"
  ok "skopeo (Go) refuses $target: ${r#refused: }"
done

# Control: the same names under an unconstrained CA are accepted, so the constraints are
# what refused them above.
forge "$open" accounts.google.com "DNS:accounts.google.com"
serve accounts.google.com
p_open=$SERVED_PORT
r=$(curl_says "$WORK/trust-open" "https://accounts.google.com:$p_open/")
[[ $r == accepted ]] || fail "control: curl refused a leaf of an unconstrained CA: $r"
r=$(skopeo_says "$WORK/trust-open" "accounts.google.com:$p_open")
[[ $r == accepted ]] || fail "control: skopeo refused a leaf of an unconstrained CA: $r"
ok "control: an unconstrained CA's leaf for accounts.google.com is accepted by both"

# Stowage's own leaf for quay.io, inside a CONNECT tunnel.
code=$(curl -sS -o /dev/null -w '%{http_code}' --proxy "http://127.0.0.1:$port" --cacert "$ca" \
  "https://quay.io:$dead_port/v2/" 2>&1) || fail "curl through Stowage: $code"
r=$(HTTPS_PROXY="http://127.0.0.1:$port" skopeo_says "$WORK/trust-constrained" "quay.io:$dead_port")
[[ $r == accepted ]] || fail "skopeo refused Stowage's minted quay.io leaf: $r"
ok "Stowage's minted leaf for quay.io is accepted by curl (HTTP $code inside) and skopeo"
