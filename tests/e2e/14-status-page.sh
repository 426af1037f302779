#!/usr/bin/env bash
# Status page (issue 18): skopeo copies an image from a real docker-registry through Stowage
# twice (misses, then hits); headless Chromium loads http://127.0.0.1:PORT/ and the
# figures it rendered (read from the DOM by their data-figure/data-value attributes) match
# /status.json and /metrics. A screenshot of the page is kept and its path printed.
source "$(dirname "$0")/lib.sh"

command -v chromium >/dev/null || fail "chromium is not installed (tests/deps.sh installs it)"

reg_port=$(free_port)
proxy_port=$(free_port)
make_cert "$WORK/upstream" quay.io
start_registry registry "$reg_port" "$WORK/upstream"
make_oci_image "$WORK/image" v1 2 1024 14 >/dev/null
push_image "$WORK/image" v1 "127.0.0.1:$reg_port/e2e/status:v1"
start_stowage stowage "$proxy_port" "$WORK/upstream/ca.crt" quay.io </dev/null
base="http://127.0.0.1:$proxy_port"

copy() {
  HTTPS_PROXY="$base" skopeo copy -q --src-cert-dir "$STOWAGE_TRUST" \
    "docker://quay.io:$reg_port/e2e/status:v1" "dir:$1" >"$WORK/copy.log" 2>&1 ||
    { cat "$WORK/copy.log" >&2; fail "skopeo copy through Stowage into $1"; }
}
copy "$WORK/copy1"
copy "$WORK/copy2"
verify_dir_copy "$WORK/copy2" >/dev/null
ok "two copies through Stowage"

# Requests are recorded when their body ends: wait for the second copy's blob hits
# (config and 2 layers), then take both views with no traffic in between.
for _ in $(seq 100); do
  curl -fsS "$base/status.json" -o "$WORK/status.json"
  hits=$(jq '.traffic.since_start.hits' "$WORK/status.json")
  ((hits >= 3)) && break
  sleep 0.1
done
((hits >= 3)) || fail "status.json shows $hits hits after the second copy, expected at least 3"
misses=$(jq '.traffic.since_start.misses' "$WORK/status.json")
((misses >= 3)) || fail "status.json shows $misses misses after the first copy, expected at least 3"
curl -fsS "$base/metrics" -o "$WORK/metrics.txt"
ok "status.json: $hits hits, $misses misses"

# A fresh profile each run; no sandbox (root), no GPU, no background traffic.
browser() {
  timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --no-first-run --user-data-dir="$WORK/chromium-profile-$1" "${@:2}" 2>>"$WORK/chromium.log"
}
browser dom --dump-dom "$base/" >"$WORK/dom.html" || fail "chromium --dump-dom"
shot="$WORK/status-page.png"
browser shot --screenshot="$shot" --window-size=1280,2000 --hide-scrollbars "$base/" >/dev/null ||
  fail "chromium --screenshot"

# The DOM Chromium rendered against status.json and /metrics (after them: the page was
# loaded with no registry traffic in between, so every count must be equal).
python3 - "$WORK/dom.html" "$WORK/status.json" "$WORK/metrics.txt" "$shot" <<'EOF' || fail "the page does not show what status.json and /metrics say"
import html.parser, json, re, struct, sys

dom_file, status_file, metrics_file, shot = sys.argv[1:]
status = json.load(open(status_file))
metrics = open(metrics_file).read()

class Figures(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.charts, self.series, self.stack = {}, [], [], []
        self.scripts = 0
        self.text = {}
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "svg" and "data-chart" in a:
            self.charts.append(a["data-chart"])
        if tag == "polyline":
            self.series.append((a.get("data-series"), a.get("points", "")))
        if "data-figure" in a and "data-value" in a:
            self.figures[a["data-figure"]] = a["data-value"]
            self.stack.append(a["data-figure"])
        else:
            self.stack.append(None)
    def handle_endtag(self, tag):
        if self.stack:
            self.stack.pop()
    def handle_data(self, data):
        if self.stack and self.stack[-1]:
            self.text[self.stack[-1]] = self.text.get(self.stack[-1], "") + data

p = Figures()
p.feed(open(dom_file).read())
errors = []
def check(what, got, want):
    if got != want:
        errors.append(f"{what}: page {got!r}, expected {want!r}")

def lookup(path):
    v = status
    for part in path.split("."):
        if part == "length":
            return len(v)
        v = v[int(part)] if isinstance(v, list) else v[part]
    return v

# Every figure of the traffic and cache tables equals status.json.
compared = 0
for path, value in p.figures.items():
    if not re.match(r"(traffic|registries\.\d+\.since_start|cache\.(objects|bytes|max_size|pinned_bytes|min_free|evictions)|errors\.length|top_repositories)", path):
        continue
    want = lookup(path)
    want = "null" if want is None else str(want)
    if path.endswith("hit_ratio") and want != "null":
        check(path, round(float(value), 9), round(float(want), 9))
    else:
        check(path, value, want)
    compared += 1
if compared < 40:
    errors.append(f"only {compared} figures compared")

def metric_sum(name, label, value):
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") and f'{label}="{value}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)

def metric(name):
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split(" ")[1]))
    raise SystemExit(f"no {name} in /metrics")

f = p.figures
for field, outcome in [("hits", "hit"), ("misses", "miss"), ("passed", "pass"), ("coalesced", "coalesced")]:
    check(f"page since_start.{field} vs stowage_requests_total{{outcome={outcome}}}",
          int(f[f"traffic.since_start.{field}"]), metric_sum("stowage_requests_total", "outcome", outcome))
check("page bytes_saved vs stowage_served_bytes_total{source=cache}",
      int(f["traffic.since_start.bytes_saved"]), metric_sum("stowage_served_bytes_total", "source", "cache"))
check("page bytes_from_upstream vs stowage_served_bytes_total{source=upstream}",
      int(f["traffic.since_start.bytes_from_upstream"]), metric_sum("stowage_served_bytes_total", "source", "upstream"))
check("page cache.bytes vs stowage_cache_size_bytes", int(f["cache.bytes"]), metric("stowage_cache_size_bytes"))
check("page cache.objects vs stowage_cache_objects", int(f["cache.objects"]), metric("stowage_cache_objects"))
check("page cache.max_size vs stowage_cache_max_size_bytes", int(f["cache.max_size"]), metric("stowage_cache_max_size_bytes"))
# What a person reads is the same number.
check("text of traffic.since_start.hits", p.text.get("traffic.since_start.hits"), f["traffic.since_start.hits"])
check("text of traffic.since_start.misses", p.text.get("traffic.since_start.misses"), f["traffic.since_start.misses"])
check("the repository on top", f.get("top_repositories.by_bytes_served.0.repository"), "e2e/status")
check("charts", sorted(p.charts), ["bytes", "errors", "requests"])
check("scripts", p.scripts, 0)
hits = [s for s in p.series if s[0] == "hit"]
check("hit series points", len(hits[0][1].split()) if hits else 0, 1440)

png = open(shot, "rb").read()
if png[:8] != b"\x89PNG\r\n\x1a\n":
    errors.append("the screenshot is not a PNG")
else:
    w, h = struct.unpack(">II", png[16:24])
    check("screenshot width", w, 1280)
    if len(png) < 20_000:
        errors.append(f"the screenshot is {len(png)} bytes: blank?")

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
print(f"{compared} figures equal to status.json; counts equal to /metrics", file=sys.stderr)
EOF
ok "Chromium's DOM matches status.json and /metrics"

# Keep the screenshot (and the DOM) after a pass; drop the rest of $WORK.
E2E_KEEP=1
AT_EXIT+=("find '$WORK' -mindepth 1 -maxdepth 1 ! -name status-page.png ! -name dom.html ! -name status.json -exec rm -rf {} +")
ok "screenshot: $shot"
