#!/usr/bin/env python3
"""Side-by-side benchmark: Stowage vs nginx (TLS caching reverse proxy) vs docker-registry
as a pull-through cache, all on loopback, against a local docker-registry upstream (TLS).

Started by bench/run.sh, which installs the tools and builds Stowage. Everything lives in a
temporary directory; every process started here is stopped by PID on exit.
"""

import argparse
import atexit
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

QUICK = os.environ.get("BENCH_QUICK") == "1"
LAYER_MIB = int(os.environ.get("BENCH_LAYER_MIB", "64" if QUICK else "512"))
REPS = int(os.environ.get("BENCH_REPS", "1" if QUICK else "3"))
WRK_SECS = int(os.environ.get("BENCH_WRK_SECS", "3" if QUICK else "5"))
WRK_CONNS = 64
PAR = 8
REPO = "bench/big"
TAG = "latest"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"

STARTED = []  # Popen objects, stopped on exit


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def stop_all():
    for p in reversed(STARTED):
        stop(p)


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in STARTED:
        STARTED.remove(p)


def on_signal(sig, _frame):
    stop_all()
    sys.exit(128 + sig)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening after {timeout}s")


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="stowage-bench-")
        self.keep = args.keep
        self.ports = {k: free_port() for k in ("up", "proxy", "mirror", "nginx", "reg")}
        self.procs = {}
        self.cache_gen = 0
        self.samples = {}  # (target, metric) -> [values]
        self.loadavg_start = f"{os.getloadavg()[0]:.1f}"
        self.notes = []

    # ---------- set-up ----------

    def path(self, *p):
        return os.path.join(self.work, *p)

    def make_certs(self):
        w = self.path("pki")
        os.makedirs(w)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        sh("openssl", "req", "-x509", *ec, "-keyout", f"{w}/ca.key", "-out", f"{w}/ca.pem", "-days", "2",
           "-subj", "/CN=stowage-bench-ca", "-addext", "basicConstraints=critical,CA:TRUE",
           "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        sh("openssl", "req", *ec, "-keyout", f"{w}/srv.key", "-out", f"{w}/srv.csr", "-subj", "/CN=quay.io")
        with open(f"{w}/ext.cnf", "w") as f:
            f.write("subjectAltName=DNS:quay.io,DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
        sh("openssl", "x509", "-req", "-in", f"{w}/srv.csr", "-CA", f"{w}/ca.pem", "-CAkey", f"{w}/ca.key",
           "-CAcreateserial", "-out", f"{w}/srv.pem", "-days", "2", "-extfile", f"{w}/ext.cnf")
        # skopeo --src-cert-dir wants a directory of *.crt
        os.makedirs(self.path("skopeo-certs"))
        shutil.copy(f"{w}/ca.pem", self.path("skopeo-certs", "ca.crt"))
        self.ca = f"{w}/ca.pem"
        self.cert = f"{w}/srv.pem"
        self.key = f"{w}/srv.key"

    def registry_config(self, name, port, storage, remote=None):
        cfg = f"""version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  tls:
    certificate: {self.cert}
    key: {self.key}
"""
        if remote:
            cfg += f"proxy:\n  remoteurl: {remote}\n"
        p = self.path(f"{name}.yml")
        with open(p, "w") as f:
            f.write(cfg)
        return p

    def env(self, **extra):
        e = {k: v for k, v in os.environ.items()
             if k.lower() not in ("https_proxy", "http_proxy", "all_proxy", "no_proxy") and k != "AWS_CA_BUNDLE"}
        e.update(extra)
        return e

    def spawn(self, name, cmd, env=None):
        out = open(self.path(f"{name}.log"), "ab")
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or self.env(), cwd=self.work,
                             start_new_session=True)
        STARTED.append(p)
        self.procs[name] = p
        return p

    def start_upstream(self):
        cfg = self.registry_config("upstream", self.ports["up"], self.path("upstream-storage"))
        p = self.spawn("upstream", ["docker-registry", "serve", cfg])
        wait_port(self.ports["up"], p)

    def upstream_url(self):
        return f"https://quay.io:{self.ports['up']}"

    def curl_up(self, *args):
        return sh("curl", "-sS", "--fail", "--cacert", self.ca, "--resolve", f"quay.io:{self.ports['up']}:127.0.0.1", *args)

    def push_blob(self, path, digest, size):
        loc_hdrs = self.curl_up("-D", "-", "-o", "/dev/null", "-X", "POST", f"{self.upstream_url()}/v2/{REPO}/blobs/uploads/")
        loc = re.search(r"(?im)^location:\s*(\S+)", loc_hdrs).group(1)
        if loc.startswith("/"):
            loc = self.upstream_url() + loc
        sep = "&" if "?" in loc else "?"
        self.curl_up("-o", "/dev/null", "-X", "PUT", "-H", "Content-Type: application/octet-stream",
                     "-T", path, f"{loc}{sep}digest={digest}")

    def push_image(self):
        log(f"generating and pushing a {LAYER_MIB} MiB random layer")
        layer = self.path("layer.bin")
        h = hashlib.sha256()
        with open(layer, "wb") as f:
            for _ in range(LAYER_MIB):
                chunk = os.urandom(1 << 20)
                h.update(chunk)
                f.write(chunk)
        self.layer_digest = "sha256:" + h.hexdigest()
        self.layer_size = LAYER_MIB << 20
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [self.layer_digest]}}).encode()
        cfg_path = self.path("config.json")
        with open(cfg_path, "wb") as f:
            f.write(config)
        self.config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        self.push_blob(layer, self.layer_digest, self.layer_size)
        self.push_blob(cfg_path, self.config_digest, len(config))
        os.remove(layer)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": self.config_digest, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": self.layer_digest, "size": self.layer_size}],
        })
        mpath = self.path("manifest.json")
        with open(mpath, "w") as f:
            f.write(manifest)
        self.curl_up("-o", "/dev/null", "-X", "PUT", "-H", f"Content-Type: {MANIFEST_TYPE}", "--data-binary", f"@{mpath}",
                     f"{self.upstream_url()}/v2/{REPO}/manifests/{TAG}")

    # ---------- the caches under test ----------

    def start_stowage(self, fresh):
        if fresh:
            shutil.rmtree(self.path("stowage-cache"), ignore_errors=True)
        cfg = self.path("stowage.toml")
        with open(cfg, "w") as f:
            f.write(f"""[proxy]
listen = "127.0.0.1:{self.ports['proxy']}"
[ca]
dir = "{self.path('stowage-ca')}"
[cache]
dir = "{self.path('stowage-cache')}"
max_size = "50GiB"
min_free = "1GiB"
[upstream]
extra_ca = ["{self.ca}"]
proxy = ""
[upstream.resolve]
"quay.io" = "127.0.0.1"
[mirror]
listen = "127.0.0.1:{self.ports['mirror']}"
tls = "ca"
hostname = "stowage.local"
""")
        p = self.spawn("stowage", [self.args.stowage, "-c", cfg, "run"], env=self.env(RUST_LOG="info"))
        wait_port(self.ports["mirror"], p)
        wait_port(self.ports["proxy"], p)
        return p

    def start_nginx(self, fresh):
        if fresh:
            shutil.rmtree(self.path("nginx-cache"), ignore_errors=True)
        os.makedirs(self.path("nginx-tmp"), exist_ok=True)
        up = self.ports["up"]
        cfg = self.path("nginx.conf")
        # The engine of the popular nginx-based registry proxy: proxy_cache keyed by the URI,
        # proxy_cache_lock on, TLS both ways, upstream verified against the bench CA.
        with open(cfg, "w") as f:
            f.write(f"""user root;
worker_processes auto;
pid {self.path('nginx.pid')};
error_log {self.path('nginx-error.log')} warn;
events {{ worker_connections 4096; }}
http {{
    access_log {self.path('nginx-access.log')};
    client_body_temp_path {self.path('nginx-tmp')}/body;
    proxy_temp_path {self.path('nginx-tmp')}/proxy;
    fastcgi_temp_path {self.path('nginx-tmp')}/fastcgi;
    uwsgi_temp_path {self.path('nginx-tmp')}/uwsgi;
    scgi_temp_path {self.path('nginx-tmp')}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    proxy_cache_path {self.path('nginx-cache')} levels=1:2 keys_zone=registry:32m max_size=100g inactive=60d use_temp_path=off;
    upstream registry_upstream {{
        server 127.0.0.1:{up};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{self.ports['nginx']} ssl;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        # The suite Go runtimes negotiate and Stowage prefers: every target serves curl
        # AES-128-GCM, so the figures compare the engines, not the ciphers.
        ssl_prefer_server_ciphers on;
        ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host quay.io:{up};
        proxy_ssl_server_name on;
        proxy_ssl_name quay.io;
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {self.ca};
        proxy_ssl_session_reuse on;
        proxy_read_timeout 900s;
        location ~ ^/v2/.*/blobs/sha256:[0-9a-f]+$ {{
            proxy_pass https://registry_upstream;
            proxy_cache registry;
            proxy_cache_key $uri;
            proxy_cache_valid 200 206 60d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 880s;
            proxy_cache_lock_age 880s;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            add_header X-Cache $upstream_cache_status;
        }}
        location ~ ^/v2/.*/manifests/ {{
            proxy_pass https://registry_upstream;
            proxy_cache registry;
            proxy_cache_key $uri$http_accept;
            proxy_cache_valid 200 5m;
            proxy_cache_lock on;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            add_header X-Cache $upstream_cache_status;
        }}
        location / {{
            proxy_pass https://registry_upstream;
        }}
    }}
}}
""")
        p = self.spawn("nginx", ["nginx", "-c", cfg, "-p", self.work, "-g", "daemon off;"])
        wait_port(self.ports["nginx"], p)
        return p

    def start_regproxy(self, fresh):
        storage = self.path("regproxy-storage")
        if fresh:
            shutil.rmtree(storage, ignore_errors=True)
        # Go resolves remoteurl itself (no pinning), so the upstream is named by its IP; the
        # certificate carries IP:127.0.0.1 and the bench CA is trusted through SSL_CERT_FILE.
        cfg = self.registry_config("regproxy", self.ports["reg"], storage, remote=f"https://127.0.0.1:{self.ports['up']}")
        env = self.env(SSL_CERT_FILE=self.ca)
        env.pop("SSL_CERT_DIR", None)
        p = self.spawn("regproxy", ["docker-registry", "serve", cfg], env=env)
        wait_port(self.ports["reg"], p)
        return p

    def restart(self, target, fresh):
        p = self.procs.get(target)
        if p is not None:
            stop(p)
        return {"stowage": self.start_stowage, "nginx": self.start_nginx, "regproxy": self.start_regproxy}[target](fresh)

    # ---------- clients ----------

    def base(self, target):
        """(URL prefix, query suffix, curl options) to reach `target` over TLS, HTTP/1.1."""
        if target == "upstream":
            return self.upstream_url(), "", ["--cacert", self.ca, "--resolve", f"quay.io:{self.ports['up']}:127.0.0.1"]
        if target == "stowage":
            port = self.ports["mirror"]
            return (f"https://stowage.local:{port}", f"?ns=quay.io:{self.ports['up']}",
                    ["--cacert", self.path("stowage-ca", "ca.crt"), "--resolve", f"stowage.local:{port}:127.0.0.1"])
        if target == "stowage-proxy":
            return (self.upstream_url(), "",
                    ["--cacert", self.path("stowage-ca", "ca.crt"), "--proxy", f"http://127.0.0.1:{self.ports['proxy']}"])
        port = self.ports["nginx" if target == "nginx" else "reg"]
        return f"https://quay.io:{port}", "", ["--cacert", self.ca, "--resolve", f"quay.io:{port}:127.0.0.1"]

    def curl_cmd(self, target, path, extra=()):
        prefix, q, opts = self.base(target)
        return ["curl", "-sS", "--http1.1", "-o", "/dev/null", *opts, *extra,
                "-w", "%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n", f"{prefix}{path}{q}"]

    def blob_path(self, digest=None):
        return f"/v2/{REPO}/blobs/{digest or self.layer_digest}"

    def get(self, target, path=None, extra=()):
        out = subprocess.run(self.curl_cmd(target, path or self.blob_path(), extra), capture_output=True, text=True, env=self.env())
        code, size, ttfb, total = out.stdout.split()
        if code != "200":
            raise RuntimeError(f"{target} {path}: HTTP {code}: {out.stderr}")
        if path is None and int(size) != self.layer_size:
            raise RuntimeError(f"{target}: got {size} bytes, expected {self.layer_size}")
        return float(ttfb), float(total)

    def parallel_get(self, target, n=PAR):
        cmd = self.curl_cmd(target, self.blob_path())
        t0 = time.monotonic()
        ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env()) for _ in range(n)]
        outs = [p.communicate() for p in ps]
        wall = time.monotonic() - t0
        for out, err in outs:
            code, size = out.split()[:2]
            if code != "200" or int(size) != self.layer_size:
                raise RuntimeError(f"{target}: parallel GET: HTTP {code}, {size} bytes: {err}")
        return wall

    def prime(self, target):
        """Manifest by tag and config blob, so later pulls and HEADs are warm."""
        self.get(target, f"/v2/{REPO}/manifests/{TAG}", ["-H", f"Accept: {MANIFEST_TYPE}"])
        self.get(target, self.blob_path(self.config_digest))

    # ---------- upstream accounting ----------

    def upstream_blob_bytes(self):
        """Bytes of the big layer the upstream has served so far, from its access log."""
        pat = re.compile(r'"GET /v2/[^ ]*/blobs/' + re.escape(self.layer_digest) + r'[^ ]* HTTP/[0-9.]+" \d+ (\d+)')
        total = fetches = 0
        with open(self.path("upstream.log"), errors="replace") as f:
            for line in f:
                m = pat.search(line)
                if m:
                    total += int(m.group(1))
                    fetches += 1
        return total, fetches

    def settle(self, timeout=60):
        """Waits until the upstream's access log stops growing (background fills done)."""
        p = self.path("upstream.log")
        last, stable_since, deadline = -1, time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            size = os.path.getsize(p)
            if size != last:
                last, stable_since = size, time.monotonic()
            elif time.monotonic() - stable_since > 1.0:
                return
            time.sleep(0.1)

    # ---------- RSS ----------

    def pids(self, target):
        root = self.procs[target].pid
        out = [root]
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == root:
                            out.append(int(d))
                except OSError:
                    pass
        return out

    @staticmethod
    def rss_kib(pid, field="VmRSS"):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def peak_rss_during(self, target, fn):
        pids = self.pids(target)
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], sum(self.rss_kib(p) for p in pids))
                time.sleep(0.01)

        t = threading.Thread(target=sample)
        t.start()
        try:
            result = fn()
        finally:
            done.set()
            t.join()
        return result, peak[0] / 1024.0

    # ---------- tools ----------

    def skopeo_pull(self, target):
        dest = self.path("pull")
        shutil.rmtree(dest, ignore_errors=True)
        env = self.env()
        if target == "stowage":
            # Through HTTPS_PROXY, as a runtime would use Stowage; Stowage's CA for the leaves.
            src = f"docker://quay.io:{self.ports['up']}/{REPO}:{TAG}"
            env["HTTPS_PROXY"] = f"http://127.0.0.1:{self.ports['proxy']}"
            certs = self.path("stowage-certs")
            if not os.path.exists(certs):
                os.makedirs(certs)
                shutil.copy(self.path("stowage-ca", "ca.crt"), os.path.join(certs, "ca.crt"))
        else:
            port = self.ports[{"upstream": "up", "nginx": "nginx", "regproxy": "reg"}[target]]
            src = f"docker://127.0.0.1:{port}/{REPO}:{TAG}"
            certs = self.path("skopeo-certs")
        t0 = time.monotonic()
        r = subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--src-cert-dir", certs, src, f"dir:{dest}"],
                           capture_output=True, text=True, env=env)
        dt = time.monotonic() - t0
        shutil.rmtree(dest, ignore_errors=True)
        if r.returncode != 0:
            raise RuntimeError(f"skopeo via {target}: {r.stderr}")
        return dt

    def head_rps(self, target):
        """Manifest HEADs by tag on WRK_CONNS keep-alive TLS connections (benches/head_load.rs)."""
        prefix, q, opts = self.base(target)
        port = prefix.rsplit(":", 1)[1]
        host = prefix.split("//", 1)[1]
        ca = opts[opts.index("--cacert") + 1]
        perf = None
        if target == "stowage" and os.environ.get("BENCH_PERF_HEAD"):
            # A profile of Stowage during this figure: BENCH_PERF_HEAD=<perf.data path>.
            perf = subprocess.Popen(["perf", "record", "-g", "-e", "cpu-clock", "-p", str(self.procs[target].pid),
                                     "-o", os.environ["BENCH_PERF_HEAD"], "--", "sleep", str(WRK_SECS)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = sh(self.args.head_load, "--url", f"https://127.0.0.1:{port}/v2/{REPO}/manifests/{TAG}{q}", "--ca", ca,
                 "--sni", host.rsplit(":", 1)[0], "--host", host, "--accept", MANIFEST_TYPE,
                 "--connections", str(WRK_CONNS), "--seconds", str(WRK_SECS), "--threads", "2")
        if perf:
            perf.wait()
        f = dict(kv.split("=") for kv in out.split())
        if int(f["errors"]) or int(f["non2xx"]):
            self.notes.append(f"HEAD load against {target}: {f['errors']} connection errors, {f['non2xx']} non-2xx answers")
        return float(f["rps"])

    # ---------- the runs ----------

    def rec(self, target, metric, value):
        self.samples.setdefault((target, metric), []).append(value)

    def run_target(self, target):
        mib = self.layer_size / (1 << 20)
        log(f"  [{target}]")
        cold_target = "upstream" if target == "upstream" else target
        # (2) cold miss: a fresh, empty cache.
        if target != "upstream":
            self.restart(target, fresh=True)
        ttfb, total = self.get(cold_target)
        self.rec(target, "cold_ttfb_ms", ttfb * 1000)
        self.rec(target, "cold_total_s", total)
        self.settle()
        self.prime(target)
        self.get(target)  # make sure the layer is cached (registry:2 stores it in the background)
        self.settle()
        # (4) + (1b): a fresh process on a warm cache, 8 parallel warm GETs with RSS sampled.
        if target != "upstream":
            self.restart(target, fresh=False)
            wall, rss = self.peak_rss_during(target, lambda: self.parallel_get(target))
            self.rec(target, "rss_mib", rss)
        else:
            wall = self.parallel_get(target)
        self.rec(target, "warm8_mbps", PAR * self.layer_size / wall / 1e6)
        # (1a) single stream, twice
        for _ in range(2):
            _, total = self.get(target)
            self.rec(target, "warm1_mbps", self.layer_size / total / 1e6)
        if target == "stowage":
            _, total = self.get("stowage-proxy")
            self.rec(target, "warm1_proxy_mbps", self.layer_size / total / 1e6)
        # (5) warm skopeo pull
        self.rec(target, "skopeo_s", self.skopeo_pull(target))
        # (6) manifest HEAD hits
        self.rec(target, "head_rps", self.head_rps(target))
        # (3) 8 concurrent cold GETs of one blob
        if target != "upstream":
            self.restart(target, fresh=True)
            before, nb = self.upstream_blob_bytes()
            wall = self.parallel_get(target)
            self.settle()
            after, na = self.upstream_blob_bytes()
            self.rec(target, "cold8_wall_s", wall)
            self.rec(target, "cold8_upstream_mib", (after - before) / (1 << 20))
            self.rec(target, "cold8_fetches", na - nb)
        log(f"    done, {mib:.0f} MiB layer")

    def negotiated_suite(self, target):
        """The cipher suite `target` picks from OpenSSL's default TLS 1.3 offer (curl's)."""
        prefix, _, opts = self.base(target)
        host, port = prefix.split("//", 1)[1].rsplit(":", 1)
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", host, "-tls1_3",
                            "-CAfile", opts[opts.index("--cacert") + 1]],
                           input="", capture_output=True, text=True, timeout=30)
        m = re.search(r"Cipher is (\S+)", r.stdout)
        return m.group(1) if m else "unknown"

    def run(self):
        log(f"work dir {self.work}; ports {self.ports}")
        self.make_certs()
        self.start_upstream()
        self.push_image()
        # BENCH_TARGETS=stowage measures one target alone (a before/after of Stowage).
        targets = [t for t in os.environ.get("BENCH_TARGETS", "upstream,stowage,nginx,regproxy").split(",") if t]
        self.start_stowage(fresh=True)
        if "nginx" in targets:
            self.start_nginx(fresh=True)
        if "regproxy" in targets:
            self.start_regproxy(fresh=True)
        self.suites = {t: self.negotiated_suite(t) for t in targets}
        log(f"TLS 1.3 suites negotiated with curl's OpenSSL offer: {self.suites}")
        t0 = time.monotonic()
        for rep in range(REPS):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]
            log(f"repetition {rep + 1}/{REPS}: {' '.join(order)}")
            for t in order:
                self.run_target(t)
        self.elapsed = time.monotonic() - t0
        self.report()

    # ---------- the report ----------

    def m(self, target, metric):
        return median(self.samples.get((target, metric), []))

    def report(self):
        def fmt(v, nd=0):
            if v is None:
                return "–"
            return f"{v:,.{nd}f}"

        def ratio(a, b, lower_better=False):
            if a is None or b is None or b == 0:
                return "–"
            return f"{a / b:.2f}×"

        rows = [
            # label, metric, decimals, lower-is-better
            ("(1) warm hit, 1 stream (MB/s)", "warm1_mbps", 0, False),
            ("(1) warm hit, 8 streams aggregate (MB/s)", "warm8_mbps", 0, False),
            ("(2) cold miss TTFB (ms)", "cold_ttfb_ms", 1, True),
            ("(2) cold miss total (s)", "cold_total_s", 2, True),
            ("(3) 8 cold GETs: wall (s)", "cold8_wall_s", 2, True),
            ("(3) 8 cold GETs: fetched upstream (MiB)", "cold8_upstream_mib", 0, True),
            ("(3) 8 cold GETs: upstream fetches", "cold8_fetches", 0, True),
            ("(4) peak RSS, 8 warm GETs (MiB)", "rss_mib", 1, True),
            ("(5) warm skopeo pull (s)", "skopeo_s", 2, True),
            ("(6) manifest HEAD hits (req/s)", "head_rps", 0, False),
        ]
        lines = []
        lines.append("| figure | upstream (direct) | Stowage | nginx | registry:2 proxy | Stowage/nginx | Stowage/registry:2 |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for label, metric, nd, _ in rows:
            u, s, n, r = (self.m(t, metric) for t in ("upstream", "stowage", "nginx", "regproxy"))
            lines.append(f"| {label} | {fmt(u, nd)} | {fmt(s, nd)} | {fmt(n, nd)} | {fmt(r, nd)} | {ratio(s, n)} | {ratio(s, r)} |")
        px = self.m("stowage", "warm1_proxy_mbps")
        lines.append(f"| (1) warm hit, 1 stream via HTTPS_PROXY (MB/s) | – | {fmt(px)} | – | – | {ratio(px, self.m('nginx', 'warm1_mbps'))} | {ratio(px, self.m('regproxy', 'warm1_mbps'))} |")

        s = lambda metric: self.m("stowage", metric)
        n = lambda metric: self.m("nginx", metric)
        r = lambda metric: self.m("regproxy", metric)
        u = lambda metric: self.m("upstream", metric)
        checks = []

        def check(name, ok, detail):
            checks.append(f"| {name} | {'met' if ok else '**missed**'} | {detail} |")

        for metric, label in (("warm1_mbps", "1 stream"), ("warm8_mbps", "8 streams")):
            if None not in (s(metric), n(metric), r(metric)):
                check(f"hit throughput ≥ 1.5× nginx, ≥ 1.2× registry:2 ({label})",
                      s(metric) >= 1.5 * n(metric) and s(metric) >= 1.2 * r(metric),
                      f"{s(metric) / n(metric):.2f}× nginx, {s(metric) / r(metric):.2f}× registry:2")
        if None not in (s("cold_ttfb_ms"), u("cold_ttfb_ms")):
            d = s("cold_ttfb_ms") - u("cold_ttfb_ms")
            check("cold TTFB within 10 ms of upstream's", d <= 10, f"+{d:.1f} ms")
        if None not in (s("cold_total_s"), u("cold_total_s")):
            q = s("cold_total_s") / u("cold_total_s")
            check("cold total ≤ 1.1× direct", q <= 1.1, f"{q:.2f}×")
        if None not in (s("cold8_fetches"), s("cold8_wall_s"), n("cold8_wall_s")):
            q = s("cold8_wall_s") / n("cold8_wall_s")
            check("8 cold GETs: one upstream fetch, wall ≤ 0.6× nginx",
                  s("cold8_fetches") == 1 and q <= 0.6, f"{s('cold8_fetches'):.0f} fetch(es), {q:.2f}× nginx")
        if None not in (s("rss_mib"), n("rss_mib")):
            check("peak RSS ≤ nginx's", s("rss_mib") <= n("rss_mib"), f"{s('rss_mib'):.1f} vs {n('rss_mib'):.1f} MiB")
        if None not in (s("skopeo_s"), u("skopeo_s")):
            q = s("skopeo_s") / u("skopeo_s")
            check("warm skopeo pull ≤ 1.05× direct", q <= 1.05, f"{q:.2f}×")

        model = "unknown"
        try:
            model = re.search(r"Model name:\s*(.+)", sh("lscpu")).group(1).strip()
        except Exception:
            pass
        mem = "?"
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / (1 << 20):.0f} GiB"
        versions = []
        for cmd in (["nginx", "-v"], ["docker-registry", "--version"], ["skopeo", "--version"], ["curl", "--version"]):
            try:
                p = subprocess.run(cmd, capture_output=True, text=True)
                versions.append((p.stdout + p.stderr).strip().splitlines()[0])
            except Exception:
                pass
        raw = ["| target | figure | samples |", "|---|---|---|"]
        for (t, metric), vals in sorted(self.samples.items()):
            raw.append(f"| {t} | {metric} | {', '.join(f'{v:.3g}' for v in vals)} |")

        md = f"""# Benchmark results

Produced by `bench/run.sh` ({'BENCH_QUICK=1, ' if QUICK else ''}{LAYER_MIB} MiB layer, {REPS} interleaved
repetition(s), medians; measured part took {self.elapsed:.0f} s) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.

Machine: {os.cpu_count()} cores (`nproc` {sh('nproc').strip()}), {model}, {mem} RAM; load average
{self.loadavg_start} at the start and {os.getloadavg()[0]:.1f} at the end (anything above 0 is other work
sharing the cores). Runs are interleaved across targets and each figure is the median of its
samples (raw samples below).

Everything on loopback, TLS everywhere, clients over HTTP/1.1: `curl` for single GETs
(8 parallel = 8 curl processes), `skopeo copy docker://… dir:…` for pulls, `benches/head_load.rs`
(2 threads, {WRK_CONNS} keep-alive connections, {WRK_SECS} s; wrk and h2load wait for a body after
`HEAD`) for `HEAD` of the manifest by tag. Stowage is reached on its mirror TLS listener
(`?ns=quay.io:<port>`), except the skopeo pull, which goes through `HTTPS_PROXY` (CONNECT + TLS
termination) as a runtime would; the HTTPS_PROXY row is curl through the same CONNECT path.
Peers: nginx 1.22 as a TLS caching reverse proxy (`proxy_cache` keyed by `$uri`,
`proxy_cache_lock on`), and Debian's docker-registry (distribution 2.8) as a pull-through cache
(`proxy.remoteurl`). Upstream: docker-registry with TLS, filesystem storage.
Peak RSS: fresh process on a warm cache, `VmRSS` summed over the process tree (nginx: master +
workers), sampled every 10 ms during 8 parallel warm GETs. Upstream bytes: from the upstream
registry's access log. Cold runs start each cache empty (restart with its cache removed).
TLS 1.3 suite each target picks from curl's (OpenSSL's default) offer: {', '.join(f'{t} {c}' for t, c in self.suites.items())}.

{chr(10).join(lines)}

## Targets (issue 8)

| target | result | figures |
|---|---|---|
{chr(10).join(checks)}

## Notes

{chr(10).join('- ' + n for n in self.notes) if self.notes else '- none'}

Tools: {'; '.join(versions)}.

## Raw samples

{chr(10).join(raw)}
"""
        with open(self.args.out, "w") as f:
            f.write(md)
        print(md)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stowage", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--head-load", required=True, help="the benches/head_load.rs executable")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    b = Bench(args)
    atexit.register(lambda: (stop_all(), None if args.keep else shutil.rmtree(b.work, ignore_errors=True)))
    b.run()


if __name__ == "__main__":
    main()
