#!/usr/bin/env bash
# Stowage vs nginx (caching reverse proxy) vs docker-registry (pull-through cache), on
# loopback only. One command: installs what is missing, builds Stowage (release), runs
# bench/bench.py, writes bench/RESULTS.md. See bench/README.md.
#
#   bench/run.sh                 # 256 MiB layer, 3 interleaved repetitions, then the fleet
#   BENCH_QUICK=1 bench/run.sh   # 64 MiB layer, 1 repetition, a small fleet (smoke test)
#   BENCH_REPS=5 bench/run.sh    # more repetitions
#   BENCH_FLEET=0 bench/run.sh   # without the fleet over a slow uplink (needs root: netns, tc)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

need=()
for pair in docker-registry:docker-registry nginx:nginx skopeo:skopeo curl:curl openssl:openssl python3:python3 ip:iproute2 tc:iproute2; do
    cmd="${pair%%:*}"
    pkg="${pair##*:}"
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Another apt may be running (the machine's own set-up): wait for the dpkg lock.
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}"
fi

(cd "$repo" && cargo build --release --quiet --bin stowage)
# The keep-alive HEAD load client (benches/head_load.rs): wrk and h2load stall on HEAD.
head_load="$(cd "$repo" && cargo bench --quiet --bench head_load --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "head_load" and m.get("executable"):
        print(m["executable"])')"
[ -x "$head_load" ] || { echo "could not build benches/head_load.rs" >&2; exit 1; }

# Nothing here may talk to a proxy of the environment, and docker-registry's S3 driver
# panics on AWS_CA_BUNDLE: clear them for every process the benchmark starts.
unset HTTPS_PROXY https_proxy HTTP_PROXY http_proxy ALL_PROXY all_proxy NO_PROXY no_proxy AWS_CA_BUNDLE

exec python3 "$here/bench.py" --stowage "$repo/target/release/stowage" --head-load "$head_load" --out "$here/RESULTS.md" "$@"
