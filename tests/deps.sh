#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine, and nothing that is
# already there: `apt-get update` runs once, and only when a package is missing.
# Called by tests/run.sh; safe to run again on a warm machine (it then does nothing).
set -euo pipefail

# Debian package → a file that proves it is installed.
declare -A PROBES=(
  [docker-registry]=/usr/bin/docker-registry
  [skopeo]=/usr/bin/skopeo
  [podman]=/usr/bin/podman
  [buildah]=/usr/bin/buildah
  [containerd]=/usr/bin/containerd
  [squid-openssl]=/usr/sbin/squid
  [openssl]=/usr/bin/openssl
  [curl]=/usr/bin/curl
  [jq]=/usr/bin/jq
  [python3]=/usr/bin/python3
  [iproute2]=/usr/sbin/ip
  [apache2-utils]=/usr/bin/htpasswd
  [docker.io]=/usr/sbin/dockerd
  [busybox-static]=/bin/busybox
  [docker-compose]=/usr/bin/docker-compose
  [python3-yaml]=/usr/lib/python3/dist-packages/yaml/__init__.py
  # systemd-analyze verify reads `stowage setup docker`'s drop-in (tests/e2e/15-setup-snippets.sh).
  [systemd]=/usr/bin/systemd-analyze
  # promtool: checks and unit-tests the alert rules in examples/prometheus/.
  [prometheus]=/usr/bin/promtool
  # headless browser for the status page end-to-end test (tests/e2e/14-status-page.sh).
  [chromium]=/usr/bin/chromium
)

missing=()
for pkg in "${!PROBES[@]}"; do
  [[ -e ${PROBES[$pkg]} ]] || missing+=("$pkg")
done
# Debian's python3 makes venvs only with python3-venv (it ships ensurepip).
/usr/bin/python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "deps: missing ${missing[*]}; run as root or install them: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps Debian from starting squid/containerd/registry/prometheus services on install:
  # the tests start their own instances on loopback ports.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.stowage
  chmod +x /usr/sbin/policy-rc.d.stowage
  had_policy=0; [[ -e /usr/sbin/policy-rc.d ]] && had_policy=1
  ((had_policy)) || cp /usr/sbin/policy-rc.d.stowage /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  ((had_policy)) || rm -f /usr/sbin/policy-rc.d
  rm -f /usr/sbin/policy-rc.d.stowage
else
  echo "deps: all present"
fi

# moto (a local S3 server) for the shared-store end-to-end test, from PyPI, into a venv of
# its own made with Debian's python3: the system Python is externally managed (PEP 668),
# so pip refuses to install into it. The venv lives outside the work tree and is kept, so a
# warm machine (and a fresh clone on it) skips this. tests/e2e/lib.sh uses the same path.
venv=${STOWAGE_TEST_VENV:-/opt/stowage-test-venv}
if ! "$venv/bin/python" -c 'import moto.server, boto3' 2>/dev/null; then
  echo "deps: installing moto[server] into $venv"
  /usr/bin/python3 -m venv --clear "$venv" ||
    { echo "deps: cannot make a venv at $venv (set STOWAGE_TEST_VENV to a writable path)" >&2; exit 1; }
  "$venv/bin/python" -m pip install -q 'moto[server]>=5' >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "deps: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
