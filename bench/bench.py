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
import resource
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
LAYER_MIB = int(os.environ.get("BENCH_LAYER_MIB", "64" if QUICK else "256"))
REPS = int(os.environ.get("BENCH_REPS", "1" if QUICK else "3"))
WRK_SECS = int(os.environ.get("BENCH_WRK_SECS", "3" if QUICK else "5"))
WRK_CONNS = 64
# Cold GETs (each from an empty cache in a fresh process) per target and repetition.
COLD_SAMPLES = int(os.environ.get("BENCH_COLD_SAMPLES", "1" if QUICK else "3"))
PAR = 8
# Aggregate hit throughput: this many parallel curl clients, each GETting the layer.
HIT_CLIENTS = int(os.environ.get("BENCH_HIT_CLIENTS", "32"))
# Many small requests: an image of SMALL_LAYERS layers of SMALL_KIB KiB, pulled warm.
SMALL_LAYERS = int(os.environ.get("BENCH_SMALL_LAYERS", "30"))
SMALL_KIB = int(os.environ.get("BENCH_SMALL_KIB", "16"))
# The fleet over a slow uplink (see run_fleet): FLEET_N skopeo clients, the upstream behind
# a veth pair shaped to FLEET_RATE, one image of one FLEET_BIG_MIB layer and one of
# FLEET_MANY layers of FLEET_MANY_MIB each. BENCH_FLEET=0 skips it.
FLEET = os.environ.get("BENCH_FLEET", "1") == "1"
# BENCH_MAIN=0 skips figures (1)-(6) (e.g. to rerun the fleet alone).
MAIN = os.environ.get("BENCH_MAIN", "1") == "1"
FLEET_TARGETS = os.environ.get("BENCH_FLEET_TARGETS", "floor,direct,stowage,nginx,regproxy").split(",")
FLEET_N = int(os.environ.get("BENCH_FLEET_N", "8"))
FLEET_RATE = os.environ.get("BENCH_FLEET_RATE", "200mbit")
FLEET_BIG_MIB = int(os.environ.get("BENCH_FLEET_BIG_MIB", "32" if QUICK else "200"))
FLEET_MANY = int(os.environ.get("BENCH_FLEET_MANY", "20"))
FLEET_MANY_MIB = int(os.environ.get("BENCH_FLEET_MANY_MIB", "2" if QUICK else "10"))
FLEET_REPS = int(os.environ.get("BENCH_FLEET_REPS", "1"))
# Where each fleet client writes the image: "own" gives every client a tmpfs of its own (eight
# nodes, eight disks: the figure the targets judge), "shared" one directory on the work disk
# for all (eight clients on one box, whose `dir:` destinations fsync every blob to one disk).
# The shared-disk runs are made for the floor and Stowage only, next to the own-disk ones.
FLEET_DISKS = os.environ.get("BENCH_FLEET_DISKS", "own,shared").split(",")
# Addresses inside the two network namespaces the fleet run creates (nothing else uses them).
FLEET_UP_ADDR = "10.203.0.1"
FLEET_CLIENT_ADDR = "10.203.0.2"
# Every TLS connection of the curl clients: TLS 1.3, AES-128-GCM, whatever the server prefers.
CURL_TLS = ["--tlsv1.3", "--tls13-ciphers", "TLS_AES_128_GCM_SHA256"]
REPO = "bench/big"
SMALL_REPO = "bench/small"
TAG = "latest"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"

STARTED = []  # Popen objects, stopped on exit
NETNS = []  # network namespaces made here, removed on exit
MOUNTS = []  # tmpfs mounts made here, unmounted on exit


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def stop_all():
    for p in reversed(STARTED):
        stop(p)


def remove_netns():
    stop_all()
    while NETNS:
        subprocess.run(["ip", "netns", "del", NETNS.pop()], capture_output=True)
    while MOUNTS:
        subprocess.run(["umount", "-l", MOUNTS.pop()], capture_output=True)


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
        # Where the caches and clients run (None: here) and where they reach the upstream.
        self.ns = None
        self.up_ns = None
        self.up_addr = "127.0.0.1"
        # nginx as docker-registry-proxy ships it (lock age and timeout at their 5 s default)
        # for the fleet; long locks for the single-GET figures.
        self.nginx_lock_defaults = False

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
            f.write("subjectAltName=DNS:quay.io,DNS:localhost,IP:127.0.0.1,IP:" + FLEET_UP_ADDR + "\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
        sh("openssl", "x509", "-req", "-in", f"{w}/srv.csr", "-CA", f"{w}/ca.pem", "-CAkey", f"{w}/ca.key",
           "-CAcreateserial", "-out", f"{w}/srv.pem", "-days", "2", "-extfile", f"{w}/ext.cnf")
        # skopeo --src-cert-dir wants a directory of *.crt
        os.makedirs(self.path("skopeo-certs"))
        shutil.copy(f"{w}/ca.pem", self.path("skopeo-certs", "ca.crt"))
        self.ca = f"{w}/ca.pem"
        self.cert = f"{w}/srv.pem"
        self.key = f"{w}/srv.key"

    def registry_config(self, name, port, storage, remote=None, bind="127.0.0.1"):
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
  addr: {bind}:{port}
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

    def in_ns(self, cmd, ns=None):
        """`cmd` run inside network namespace `ns` (default: the caches' one, if any)."""
        ns = ns or self.ns
        return ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)

    def wait_listening(self, port, proc, ns=None):
        ns = ns or self.ns
        if not ns:
            return wait_port(port, proc)
        deadline = time.time() + 30
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
            r = subprocess.run(self.in_ns(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], ns),
                               capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"port {port} not listening in {ns} after 30s")

    def spawn(self, name, cmd, env=None, ns=None):
        out = open(self.path(f"{name}.log"), "ab")
        # `ip netns exec` execs the command: the PID stays the server's.
        cmd = self.in_ns(cmd, ns)
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or self.env(), cwd=self.work,
                             start_new_session=True)
        STARTED.append(p)
        self.procs[name] = p
        return p

    def start_upstream(self):
        bind = "0.0.0.0" if self.up_ns else "127.0.0.1"
        cfg = self.registry_config("upstream", self.ports["up"], self.path("upstream-storage"), bind=bind)
        p = self.spawn("upstream", ["docker-registry", "serve", cfg], ns=self.up_ns or self.ns)
        self.wait_listening(self.ports["up"], p, ns=self.up_ns)

    def upstream_url(self):
        return f"https://quay.io:{self.ports['up']}"

    def curl_up(self, *args):
        # Pushes go over the upstream's own loopback (in its namespace, if any): no uplink bytes.
        return sh(*self.in_ns(["curl", "-sS", "--fail", "--cacert", self.ca, "--resolve",
                               f"quay.io:{self.ports['up']}:127.0.0.1", *args], self.up_ns))

    def push_blob(self, path, digest, size, repo=REPO):
        loc_hdrs = self.curl_up("-D", "-", "-o", "/dev/null", "-X", "POST", f"{self.upstream_url()}/v2/{repo}/blobs/uploads/")
        loc = re.search(r"(?im)^location:\s*(\S+)", loc_hdrs).group(1)
        if loc.startswith("/"):
            loc = self.upstream_url() + loc
        sep = "&" if "?" in loc else "?"
        self.curl_up("-o", "/dev/null", "-X", "PUT", "-H", "Content-Type: application/octet-stream",
                     "-T", path, f"{loc}{sep}digest={digest}")

    def push_random_image(self, repo, sizes, keep=None):
        """Pushes `repo:latest` with random layers of `sizes` bytes; returns (layer digests,
        config digest). `keep`: where to leave the first layer's file (else it is removed)."""
        layers = []
        for i, size in enumerate(sizes):
            path = self.path(f"layer-{i}.bin")
            h = hashlib.sha256()
            with open(path, "wb") as f:
                left = size
                while left:
                    chunk = os.urandom(min(left, 1 << 20))
                    h.update(chunk)
                    f.write(chunk)
                    left -= len(chunk)
            digest = "sha256:" + h.hexdigest()
            self.push_blob(path, digest, size, repo)
            if keep and i == 0:
                os.makedirs(os.path.dirname(keep), exist_ok=True)
                os.replace(path, keep)
            else:
                os.remove(path)
            layers.append((digest, size))
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]}}).encode()
        cfg_path = self.path("config.json")
        with open(cfg_path, "wb") as f:
            f.write(config)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        self.push_blob(cfg_path, config_digest, len(config), repo)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n} for d, n in layers],
        })
        mpath = self.path("manifest.json")
        with open(mpath, "w") as f:
            f.write(manifest)
        self.curl_up("-o", "/dev/null", "-X", "PUT", "-H", f"Content-Type: {MANIFEST_TYPE}", "--data-binary", f"@{mpath}",
                     f"{self.upstream_url()}/v2/{repo}/manifests/{TAG}")
        return [d for d, _ in layers], config_digest

    def push_image(self):
        log(f"generating and pushing a {LAYER_MIB} MiB random layer, and {SMALL_LAYERS} layers of {SMALL_KIB} KiB")
        # The big layer stays on disk for nginx's static-file serving (the hit ceiling).
        (self.layer_digest,), self.config_digest = self.push_random_image(
            REPO, [LAYER_MIB << 20], keep=self.path("static", "layer.bin"))
        self.layer_size = LAYER_MIB << 20
        self.small_digests, _ = self.push_random_image(SMALL_REPO, [SMALL_KIB << 10] * SMALL_LAYERS)

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
"quay.io" = "{self.up_addr}"
[mirror]
listen = "127.0.0.1:{self.ports['mirror']}"
tls = "ca"
hostname = "stowage.local"
""")
        p = self.spawn("stowage", [self.args.stowage, "-c", cfg, "run"], env=self.env(RUST_LOG="info"))
        self.wait_listening(self.ports["mirror"], p)
        self.wait_listening(self.ports["proxy"], p)
        return p

    def start_nginx(self, fresh):
        if fresh:
            shutil.rmtree(self.path("nginx-cache"), ignore_errors=True)
        os.makedirs(self.path("nginx-tmp"), exist_ok=True)
        up = self.ports["up"]
        cfg = self.path("nginx.conf")
        lock_limits = "" if self.nginx_lock_defaults else "            proxy_cache_lock_timeout 880s;\n            proxy_cache_lock_age 880s;"
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
        server {self.up_addr}:{up};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{self.ports['nginx']} ssl;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        # TLS 1.3 with AES-128-GCM only, the suite Go runtimes negotiate and Stowage
        # prefers: the figures compare the engines, not the ciphers (RESULTS.md records what
        # each target negotiated).
        ssl_protocols TLSv1.3;
        ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
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
{lock_limits}
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
        location = /static/layer.bin {{
            alias {self.path('static', 'layer.bin')};
        }}
        location / {{
            proxy_pass https://registry_upstream;
        }}
    }}
}}
""")
        p = self.spawn("nginx", ["nginx", "-c", cfg, "-p", self.work, "-g", "daemon off;"])
        self.wait_listening(self.ports["nginx"], p)
        return p

    def start_regproxy(self, fresh):
        storage = self.path("regproxy-storage")
        if fresh:
            shutil.rmtree(storage, ignore_errors=True)
        # Go resolves remoteurl itself (no pinning), so the upstream is named by its IP; the
        # certificate carries IP:127.0.0.1 and the bench CA is trusted through SSL_CERT_FILE.
        cfg = self.registry_config("regproxy", self.ports["reg"], storage, remote=f"https://{self.up_addr}:{self.ports['up']}")
        env = self.env(SSL_CERT_FILE=self.ca)
        env.pop("SSL_CERT_DIR", None)
        p = self.spawn("regproxy", ["docker-registry", "serve", cfg], env=env)
        self.wait_listening(self.ports["reg"], p)
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
        port = self.ports["reg" if target == "regproxy" else "nginx"]
        return f"https://quay.io:{port}", "", ["--cacert", self.ca, "--resolve", f"quay.io:{port}:127.0.0.1"]

    def curl_cmd(self, target, path, extra=()):
        prefix, q, opts = self.base(target)
        return ["curl", "-sS", "--http1.1", *CURL_TLS, "-o", "/dev/null", *opts, *extra,
                "-w", "%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n", f"{prefix}{path}{q}"]

    def blob_path(self, digest=None, target=None):
        if target == "nginx-static":
            return "/static/layer.bin"
        return f"/v2/{REPO}/blobs/{digest or self.layer_digest}"

    def get(self, target, path=None, extra=()):
        out = subprocess.run(self.curl_cmd(target, path or self.blob_path(target=target), extra), capture_output=True, text=True, env=self.env())
        code, size, ttfb, total = out.stdout.split()
        if code != "200":
            raise RuntimeError(f"{target} {path}: HTTP {code}: {out.stderr}")
        if path is None and int(size) != self.layer_size:
            raise RuntimeError(f"{target}: got {size} bytes, expected {self.layer_size}")
        return float(ttfb), float(total)

    def parallel_get(self, target, n=PAR):
        cmd = self.curl_cmd(target, self.blob_path(target=target))
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
        """The server's process tree (nginx: master and workers)."""
        root = self.procs[target].pid
        parent = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    pass
        out, todo = [], [root]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(c for c, pp in parent.items() if pp == p)
        return out

    def cpu_s(self, target):
        """utime + stime of the server's whole process tree, in seconds."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for p in self.pids(target):
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except OSError:
                pass
        return total / tick

    def cpu_all(self, target):
        """CPU seconds so far of the upstream's and the target's process trees and of this
        script's reaped children (the clients), for the whole-machine CPU of a cold figure."""
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        cache = self.cpu_s(target) if target != "upstream" else 0.0
        return (self.cpu_s("upstream"), cache, kids.ru_utime + kids.ru_stime)

    def rec_cpu(self, target, figure, before):
        """Records the CPU spent since `before` (see cpu_all): by the upstream, the cache and
        the clients, and in all. Wall time on this machine is at least the sum / nproc."""
        after = self.cpu_all(target)
        up, cache, clients = (a - b for a, b in zip(after, before))
        self.rec(target, f"{figure}_cpu_upstream_s", up)
        self.rec(target, f"{figure}_cpu_cache_s", cache)
        self.rec(target, f"{figure}_cpu_clients_s", clients)
        self.rec(target, f"{figure}_cpu_all_s", up + cache + clients)

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

    def skopeo_cmd(self, target, repo, dest):
        """(argv, env) of a `skopeo copy` of `repo:latest` through `target` into `dest`."""
        env = self.env()
        if target == "stowage":
            # Through HTTPS_PROXY, as a runtime would use Stowage; Stowage's CA for the leaves.
            src = f"docker://quay.io:{self.ports['up']}/{repo}:{TAG}"
            env["HTTPS_PROXY"] = f"http://127.0.0.1:{self.ports['proxy']}"
            certs = self.path("stowage-certs")
            if not os.path.exists(certs):
                os.makedirs(certs)
                shutil.copy(self.path("stowage-ca", "ca.crt"), os.path.join(certs, "ca.crt"))
        elif target == "upstream":
            src = f"docker://{self.up_addr}:{self.ports['up']}/{repo}:{TAG}"
            certs = self.path("skopeo-certs")
        else:
            port = self.ports[{"nginx": "nginx", "regproxy": "reg"}[target]]
            src = f"docker://127.0.0.1:{port}/{repo}:{TAG}"
            certs = self.path("skopeo-certs")
        if not os.path.exists(self.path("skopeo-certs")):
            os.makedirs(self.path("skopeo-certs"))
            shutil.copy(self.ca, self.path("skopeo-certs", "ca.crt"))
        cmd = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-cert-dir", certs, src, f"dir:{dest}"]
        return self.in_ns(cmd), env

    def skopeo_pull(self, target, repo=REPO):
        dest = self.path("pull")
        shutil.rmtree(dest, ignore_errors=True)
        cmd, env = self.skopeo_cmd(target, repo, dest)
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        dt = time.monotonic() - t0
        shutil.rmtree(dest, ignore_errors=True)
        if r.returncode != 0:
            raise RuntimeError(f"skopeo via {target}: {r.stderr}")
        return dt

    def skopeo_fleet(self, target, repo, n, roots=None):
        """`n` skopeo pulls of `repo` through `target`, started at once: (wall, [each client's s]).
        Client i writes under `roots[i]` (its own disk) when given, else under the work dir."""
        runs = []
        for i in range(n):
            dest = os.path.join(roots[i], "pull") if roots else self.path(f"pull-{i}")
            shutil.rmtree(dest, ignore_errors=True)
            cmd, env = self.skopeo_cmd(target, repo, dest)
            if os.environ.get("BENCH_FLEET_CLIENT_NICE"):
                # Diagnosis only: clients at a lower CPU priority than the servers.
                cmd = ["nice", "-n", os.environ["BENCH_FLEET_CLIENT_NICE"], *cmd]
            runs.append((dest, cmd, env))
        t0 = time.monotonic()
        procs = [(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), dest)
                 for dest, cmd, env in runs]
        times = [None] * n
        pending = set(range(n))
        while pending:
            for i in list(pending):
                if procs[i][0].poll() is not None:
                    times[i] = time.monotonic() - t0
                    pending.discard(i)
            time.sleep(0.02)
        wall = time.monotonic() - t0
        for p, dest in procs:
            _, err = p.communicate()
            shutil.rmtree(dest, ignore_errors=True)
            if p.returncode != 0:
                raise RuntimeError(f"fleet skopeo via {target}: {err}")
        return wall, times

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
        # (2) cold miss: a fresh, empty cache, COLD_SAMPLES times (one GET is ~0.5 s and
        # swings with the machine: one sample a repetition left medians on a single outlier).
        for _ in range(COLD_SAMPLES):
            if target != "upstream":
                self.restart(target, fresh=True)
            cpu0 = self.cpu_all(target)
            ttfb, total = self.get(cold_target)
            self.rec_cpu(target, "cold", cpu0)
            self.rec(target, "cold_ttfb_ms", ttfb * 1000)
            self.rec(target, "cold_total_s", total)
            self.settle()
        self.prime(target)
        self.get(target)  # make sure the layer is cached (registry:2 stores it in the background)
        self.settle()
        # (4) + (1b): a fresh process on a warm cache, 8 parallel warm GETs with RSS sampled.
        # The server's CPU (whole process tree) is counted over every warm GET below.
        if target != "upstream":
            self.restart(target, fresh=False)
        cpu0, served = self.cpu_s(target), 0
        if target != "upstream":
            wall, rss = self.peak_rss_during(target, lambda: self.parallel_get(target))
            self.rec(target, "rss_mib", rss)
        else:
            wall = self.parallel_get(target)
        served += PAR * self.layer_size
        self.rec(target, "warm8_mbps", PAR * self.layer_size / wall / 1e6)
        # (1a) single stream, twice
        for _ in range(2):
            _, total = self.get(target)
            served += self.layer_size
            self.rec(target, "warm1_mbps", self.layer_size / total / 1e6)
        # (1c) aggregate hit throughput, HIT_CLIENTS parallel clients
        wall = self.parallel_get(target, HIT_CLIENTS)
        served += HIT_CLIENTS * self.layer_size
        self.rec(target, "hitn_mbps", HIT_CLIENTS * self.layer_size / wall / 1e6)
        self.rec(target, "cpu_ms_gib", (self.cpu_s(target) - cpu0) * 1000 / (served / (1 << 30)))
        if target == "nginx":
            # nginx serving the same bytes as a static file over the same TLS: the ceiling.
            _, total = self.get("nginx-static")
            self.rec("nginx-static", "warm1_mbps", self.layer_size / total / 1e6)
            cpu0 = self.cpu_s("nginx")
            wall = self.parallel_get("nginx-static", HIT_CLIENTS)
            self.rec("nginx-static", "hitn_mbps", HIT_CLIENTS * self.layer_size / wall / 1e6)
            self.rec("nginx-static", "cpu_ms_gib", (self.cpu_s("nginx") - cpu0) * 1000 / (HIT_CLIENTS * self.layer_size / (1 << 30)))
        if target == "stowage":
            _, total = self.get("stowage-proxy")
            self.rec(target, "warm1_proxy_mbps", self.layer_size / total / 1e6)
        # (5) warm skopeo pull; (5b) the same for an image of SMALL_LAYERS small layers
        self.rec(target, "skopeo_s", self.skopeo_pull(target))
        self.skopeo_pull(target, SMALL_REPO)  # cold for the caches the first time
        self.settle()
        self.rec(target, "skopeo_small_s", self.skopeo_pull(target, SMALL_REPO))
        # FLEET_N pulls of it at once: with the upstream's own figure, what that many clients cost.
        self.rec(target, "skopeo_small8_s", self.skopeo_fleet(target, SMALL_REPO, FLEET_N)[0])
        # (6) manifest HEAD hits
        self.rec(target, "head_rps", self.head_rps(target))
        # (3) 8 concurrent cold GETs of one blob
        if target != "upstream":
            self.restart(target, fresh=True)
            before, nb = self.upstream_blob_bytes()
            cpu0 = self.cpu_all(target)
            wall = self.parallel_get(target)
            self.rec_cpu(target, "cold8", cpu0)
            self.settle()
            after, na = self.upstream_blob_bytes()
            self.rec(target, "cold8_wall_s", wall)
            self.rec(target, "cold8_upstream_mib", (after - before) / (1 << 20))
            self.rec(target, "cold8_fetches", na - nb)
        log(f"    done, {mib:.0f} MiB layer")

    # ---------- the fleet over a slow uplink ----------

    def run_fleet(self):
        """FLEET_N skopeo clients pull one image cold at the same moment, through each cache
        and directly, with the upstream behind a shaped veth pair.

        Two network namespaces made here and removed on exit: `up` holds the upstream
        registry at FLEET_UP_ADDR, `fleet` holds the caches and the clients (on its own
        loopback) at FLEET_CLIENT_ADDR. The upstream's side of the pair sends through
        `tbf rate FLEET_RATE`, so every byte downloaded from upstream crosses that limit;
        the veth's counters give the bytes over the uplink, the upstream's access log the
        fetches per blob."""
        import copy
        tag = f"{os.getpid() % 100000}"
        up_ns, fleet_ns = f"stowbench-up-{tag}", f"stowbench-fl-{tag}"
        up_if, fl_if = f"sbu{tag}", f"sbf{tag}"
        sh("ip", "netns", "add", up_ns)
        NETNS.append(up_ns)
        sh("ip", "netns", "add", fleet_ns)
        NETNS.append(fleet_ns)
        sh("ip", "link", "add", up_if, "netns", up_ns, "type", "veth", "peer", "name", fl_if, "netns", fleet_ns)
        for ns, ifc, addr in ((up_ns, up_if, FLEET_UP_ADDR), (fleet_ns, fl_if, FLEET_CLIENT_ADDR)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", ifc)
            sh("ip", "-n", ns, "link", "set", ifc, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", up_ns, "tc", "qdisc", "add", "dev", up_if, "root", "tbf", "rate", FLEET_RATE,
           "burst", "256kb", "latency", "50ms")
        self.fleet_qdisc = sh("ip", "netns", "exec", up_ns, "tc", "qdisc", "show", "dev", up_if).strip()

        f = copy.copy(self)
        f.work = self.path("fleet")
        os.makedirs(f.work)
        f.procs = {}
        f.ports = {k: free_port() for k in ("up", "proxy", "mirror", "nginx", "reg")}
        f.ns, f.up_ns, f.up_addr = fleet_ns, up_ns, FLEET_UP_ADDR
        f.nginx_lock_defaults = True
        f.start_upstream()
        # One tmpfs per client (see FLEET_DISKS), big enough for the largest image.
        own_roots = []
        if "own" in FLEET_DISKS:
            size_mib = max(FLEET_BIG_MIB, FLEET_MANY * FLEET_MANY_MIB) + 64
            for i in range(FLEET_N):
                root = f.path(f"client-disk-{i}")
                os.makedirs(root)
                sh("mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", root)
                MOUNTS.append(root)
                own_roots.append(root)

        def uplink_bytes():
            st = json.loads(sh("ip", "-n", up_ns, "-j", "-s", "link", "show", "dev", up_if))[0]["stats64"]
            return st["tx"]["bytes"]

        images = [("fleet/one", [FLEET_BIG_MIB << 20], f"1 × {FLEET_BIG_MIB} MiB"),
                  ("fleet/many", [FLEET_MANY_MIB << 20] * FLEET_MANY, f"{FLEET_MANY} × {FLEET_MANY_MIB} MiB")]
        self.fleet_images = []
        for repo, sizes, label in images:
            log(f"fleet: pushing {repo} ({label})")
            digests, cfg_digest = f.push_random_image(repo, sizes)
            self.fleet_images.append((repo, label, sum(sizes)))
            key = repo.split("/")[1]
            for rep in range(FLEET_REPS):
                runs = [("floor", "upstream", 1), ("direct", "upstream", FLEET_N),
                        ("stowage", "stowage", FLEET_N), ("nginx", "nginx", FLEET_N), ("regproxy", "regproxy", FLEET_N)]
                runs = [r for r in runs if r[0] in FLEET_TARGETS]
                plan = [(name, target, n, "own") for name, target, n in runs if "own" in FLEET_DISKS]
                plan += [(name, target, n, "shared") for name, target, n in runs
                         if "shared" in FLEET_DISKS and name in ("floor", "stowage")]
                for name, target, n, disks in plan:
                    if target != "upstream":
                        f.restart(target, fresh=True)
                    f.settle()
                    before_b, before_log = uplink_bytes(), f.blob_fetches(digests)
                    cpu0 = f.cpu_s(target)
                    trace, tracing_done = [], threading.Event()
                    if os.environ.get("BENCH_FLEET_TRACE"):
                        # Uplink MB/s and server CPU every 0.5 s, to the log: where a slow run stalls.
                        def sample():
                            last_b, last_c, t = uplink_bytes(), f.cpu_s(target), time.monotonic()
                            while not tracing_done.wait(0.5):
                                b, c, now = uplink_bytes(), f.cpu_s(target), time.monotonic()
                                trace.append(f"{(b - last_b) / (now - t) / 1e6:.0f}MB/s,{(c - last_c) / (now - t):.2f}cpu")
                                last_b, last_c, t = b, c, now
                        tracer = threading.Thread(target=sample)
                        tracer.start()
                    wall, times = f.skopeo_fleet(target, repo, n, own_roots if disks == "own" else None)
                    cpu = f.cpu_s(target) - cpu0
                    tracing_done.set()
                    if trace:
                        tracer.join()
                        log("    trace: " + " ".join(trace))
                    f.settle()
                    after_log = f.blob_fetches(digests)
                    per_blob = [after_log[d] - before_log[d] for d in digests]
                    mib = (uplink_bytes() - before_b) / (1 << 20)
                    log(f"  fleet {key} {name} ({disks} disks): wall {wall:.1f} s, clients {min(times):.1f}..{max(times):.1f} s, "
                        f"fetches per blob {min(per_blob)}..{max(per_blob)}, uplink {mib:.0f} MiB, server CPU {cpu:.1f} s")
                    if disks == "shared":
                        self.rec(name, f"fleet_{key}_shared_wall_s", wall)
                        self.rec(name, f"fleet_{key}_shared_spread", max(times) / min(times))
                        if target != "upstream":
                            stop(f.procs[target])
                        continue
                    self.rec(name, f"fleet_{key}_wall_s", wall)
                    self.rec(name, f"fleet_{key}_spread", max(times) / min(times))
                    self.rec(name, f"fleet_{key}_fetches_max", max(per_blob))
                    self.rec(name, f"fleet_{key}_fetches", sum(per_blob))
                    self.rec(name, f"fleet_{key}_uplink_mib", mib)
                    self.rec(name, f"fleet_{key}_cpu_s", cpu)
                    if target != "upstream":
                        stop(f.procs[target])
        stop_all()

    def blob_fetches(self, digests):
        """GETs of each of `digests` the upstream has answered so far (its access log)."""
        counts = {d: 0 for d in digests}
        pat = re.compile(r'"GET /v2/[^ ]*/blobs/(sha256:[0-9a-f]{64})[^ ]* HTTP/[0-9.]+" \d+ ')
        with open(self.path("upstream.log"), errors="replace") as fh:
            for line in fh:
                m = pat.search(line)
                if m and m.group(1) in counts:
                    counts[m.group(1)] += 1
        return counts

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
        t0 = time.monotonic()
        self.suites = {}
        # BENCH_TARGETS=stowage measures one target alone (a before/after of Stowage).
        targets = [t for t in os.environ.get("BENCH_TARGETS", "upstream,stowage,nginx,regproxy").split(",") if t]
        if MAIN:
            self.start_upstream()
            self.push_image()
            self.start_stowage(fresh=True)
            if "nginx" in targets:
                self.start_nginx(fresh=True)
            if "regproxy" in targets:
                self.start_regproxy(fresh=True)
        if MAIN:
            self.suites = {t: self.negotiated_suite(t) for t in targets}
            log(f"TLS 1.3 suites negotiated with curl's OpenSSL offer: {self.suites}")
        t0 = time.monotonic()
        for rep in range(REPS if MAIN else 0):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]
            log(f"repetition {rep + 1}/{REPS}: {' '.join(order)}")
            for t in order:
                self.run_target(t)
        self.elapsed = time.monotonic() - t0
        if FLEET:
            stop_all()
            t1 = time.monotonic()
            self.run_fleet()
            self.fleet_elapsed = time.monotonic() - t1
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
            # label, metric, decimals
            ("(1) warm hit, 1 stream (MB/s)", "warm1_mbps", 0),
            ("(1) warm hit, 8 streams aggregate (MB/s)", "warm8_mbps", 0),
            (f"(1) warm hit, {HIT_CLIENTS} clients aggregate (MB/s)", "hitn_mbps", 0),
            ("(1) server CPU per GiB served on hits (ms)", "cpu_ms_gib", 0),
            ("(2) cold miss TTFB (ms)", "cold_ttfb_ms", 1),
            ("(2) cold miss total (s)", "cold_total_s", 2),
            ("(3) 8 cold GETs: wall (s)", "cold8_wall_s", 2),
            ("(3) 8 cold GETs: fetched upstream (MiB)", "cold8_upstream_mib", 0),
            ("(3) 8 cold GETs: upstream fetches", "cold8_fetches", 0),
            ("(2) cold miss: CPU of the cache (s)", "cold_cpu_cache_s", 2),
            ("(2) cold miss: CPU of upstream + cache + client (s)", "cold_cpu_all_s", 2),
            ("(3) 8 cold GETs: CPU of the cache (s)", "cold8_cpu_cache_s", 2),
            ("(3) 8 cold GETs: CPU of upstream + cache + clients (s)", "cold8_cpu_all_s", 2),
            ("(4) peak RSS, 8 warm GETs (MiB)", "rss_mib", 1),
            ("(5) warm skopeo pull (s)", "skopeo_s", 2),
            (f"(5) warm skopeo pull, {SMALL_LAYERS} × {SMALL_KIB} KiB layers (s)", "skopeo_small_s", 2),
            (f"(5) {FLEET_N} warm skopeo pulls at once, {SMALL_LAYERS} × {SMALL_KIB} KiB layers (s)", "skopeo_small8_s", 2),
            ("(6) manifest HEAD hits (req/s)", "head_rps", 0),
        ]
        lines = []
        lines.append("| figure | upstream (direct) | Stowage | nginx | nginx static file | registry:2 proxy | Stowage/nginx | Stowage/registry:2 |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, metric, nd in rows:
            u, s, n, st, r = (self.m(t, metric) for t in ("upstream", "stowage", "nginx", "nginx-static", "regproxy"))
            lines.append(f"| {label} | {fmt(u, nd)} | {fmt(s, nd)} | {fmt(n, nd)} | {fmt(st, nd)} | {fmt(r, nd)} | {ratio(s, n)} | {ratio(s, r)} |")
        px = self.m("stowage", "warm1_proxy_mbps")
        lines.append(f"| (1) warm hit, 1 stream via HTTPS_PROXY (MB/s) | – | {fmt(px)} | – | – | – | {ratio(px, self.m('nginx', 'warm1_mbps'))} | {ratio(px, self.m('regproxy', 'warm1_mbps'))} |")

        fleet_lines = []
        if getattr(self, "fleet_images", None):
            fleet_lines.append("| image | figure | one client alone, direct | direct | Stowage | nginx | registry:2 proxy |")
            fleet_lines.append("|---|---|---:|---:|---:|---:|---:|")
            for repo, label, _ in self.fleet_images:
                key = repo.split("/")[1]
                for fig, metric, nd in (("wall for all (s)", "wall_s", 1), ("slowest / fastest client", "spread", 2),
                                        ("wall for all, one shared client disk (s)", "shared_wall_s", 1),
                                        ("slowest / fastest, one shared client disk", "shared_spread", 2),
                                        ("most upstream fetches of one blob", "fetches_max", 0),
                                        ("upstream blob fetches in all", "fetches", 0),
                                        ("bytes over the uplink (MiB)", "uplink_mib", 0),
                                        ("server CPU, whole process tree (s)", "cpu_s", 1)):
                    vals = [self.m(t, f"fleet_{key}_{metric}") for t in ("floor", "direct", "stowage", "nginx", "regproxy")]
                    fleet_lines.append(f"| {label} | {fig} | " + " | ".join(fmt(v, nd) for v in vals) + " |")

        s = lambda metric: self.m("stowage", metric)
        n = lambda metric: self.m("nginx", metric)
        u = lambda metric: self.m("upstream", metric)
        st = lambda metric: self.m("nginx-static", metric)
        checks = []

        def check(figure, peer_label, peer, mine, target, ok, nd=2, ratio_text=None):
            if None in (peer, mine):
                return
            rt = ratio_text if ratio_text is not None else (f"{mine / peer:.2f}×" if peer else "–")
            checks.append(f"| {figure} | {peer_label} {fmt(peer, nd)} | {fmt(mine, nd)} | {rt} | {target} | "
                          f"{'met' if ok else '**missed**'} |")

        if getattr(self, "fleet_images", None):
            for repo, label, _ in self.fleet_images:
                key = repo.split("/")[1]
                fl = lambda t, m: self.m(t, f"fleet_{key}_{m}")
                w, floor = fl("stowage", "wall_s"), fl("floor", "wall_s")
                if None not in (w, floor):
                    check(f"fleet {label}: wall for {FLEET_N}", "one client alone direct", floor, w, "≤ 1.05×",
                          w <= 1.05 * floor, 1)
                    check(f"fleet {label}: most fetches of one blob", "nginx", fl("nginx", "fetches_max"),
                          fl("stowage", "fetches_max"), "= 1", fl("stowage", "fetches_max") == 1, 0, "–")
                    sp = fl("stowage", "spread")
                    check(f"fleet {label}: slowest / fastest client", "nginx", fl("nginx", "spread"), sp, "≤ 1.10",
                          sp <= 1.10, 2, "–")
        if None not in (s("cold_total_s"), n("cold_total_s")):
            check("cold GET total (s)", "nginx", n("cold_total_s"), s("cold_total_s"), "≤ 0.9×",
                  s("cold_total_s") <= 0.9 * n("cold_total_s"))
        if None not in (s("cold_ttfb_ms"), u("cold_ttfb_ms")):
            d = s("cold_ttfb_ms") - u("cold_ttfb_ms")
            check("cold GET TTFB (ms)", "upstream", u("cold_ttfb_ms"), s("cold_ttfb_ms"), "≤ upstream + 5 ms", d <= 5, 1,
                  f"+{d:.1f} ms")
        if None not in (s("cold8_wall_s"), n("cold8_wall_s"), s("cold8_fetches")):
            check("8 cold GETs: wall (s)", "nginx", n("cold8_wall_s"), s("cold8_wall_s"), "≤ 0.5×, 1 fetch",
                  s("cold8_wall_s") <= 0.5 * n("cold8_wall_s") and s("cold8_fetches") == 1)
        if None not in (s("cpu_ms_gib"), n("cpu_ms_gib")):
            check("CPU per GiB on hits (ms)", "nginx proxy_cache", n("cpu_ms_gib"), s("cpu_ms_gib"), "≤ 0.6×",
                  s("cpu_ms_gib") <= 0.6 * n("cpu_ms_gib"), 0)
        for metric, label in (("warm1_mbps", "1 stream"), ("hitn_mbps", f"{HIT_CLIENTS} clients")):
            if None not in (s(metric), st(metric)):
                check(f"hit throughput, {label} (MB/s)", "nginx static file", st(metric), s(metric), "≥ 0.95×",
                      s(metric) >= 0.95 * st(metric), 0)
        if None not in (s("head_rps"), n("head_rps")):
            check("manifest HEAD hits (req/s)", "nginx", n("head_rps"), s("head_rps"), "≥ 1.0×",
                  s("head_rps") >= n("head_rps"), 0)
        if None not in (s("skopeo_small_s"), u("skopeo_small_s")):
            check(f"warm pull, {SMALL_LAYERS} small layers (s)", "direct", u("skopeo_small_s"), s("skopeo_small_s"),
                  "≤ 1.02×", s("skopeo_small_s") <= 1.02 * u("skopeo_small_s"))
        if None not in (s("rss_mib"), n("rss_mib")):
            check("peak RSS, 8 warm GETs (MiB)", "nginx", n("rss_mib"), s("rss_mib"), "≤ 0.8×",
                  s("rss_mib") <= 0.8 * n("rss_mib"), 1)

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
        ncpu = os.cpu_count() or 1
        for t in ("upstream", "stowage", "nginx", "regproxy"):
            for fig, label in (("cold", "cold miss"), ("cold8", "8 cold GETs")):
                cpu, cache = self.m(t, f"{fig}_cpu_all_s"), self.m(t, f"{fig}_cpu_cache_s")
                if cpu is not None:
                    who = "upstream + client(s)" if t == "upstream" else f"upstream + cache + client(s) (the cache {cache:.2f})"
                    self.notes.append(f"{label} via {t}: {who} used {cpu:.2f} CPU-s, so on {ncpu} cores "
                                      f"it cannot take less than {cpu / ncpu:.2f} s")
        raw = ["| target | figure | samples |", "|---|---|---|"]
        for (t, metric), vals in sorted(self.samples.items()):
            raw.append(f"| {t} | {metric} | {', '.join(f'{v:.3g}' for v in vals)} |")

        md = f"""# Benchmark results

Produced by `bench/run.sh` ({'BENCH_QUICK=1, ' if QUICK else ''}{LAYER_MIB} MiB layer, {REPS} interleaved
repetition(s), medians; measured part took {self.elapsed:.0f} s) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.

Machine: {os.cpu_count()} cores (`nproc` {sh('nproc').strip()}), {model}, {mem} RAM; load average
{self.loadavg_start} at the start and {os.getloadavg()[0]:.1f} at the end (anything above 0 is other work
sharing the cores). Runs are interleaved across targets and each figure is the median of its
samples (raw samples below; {COLD_SAMPLES} cold GETs a repetition, each from an empty cache in a fresh process).

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
TLS 1.3 suite each target picks from OpenSSL's default TLS 1.3 offer (curl itself offers only TLS_AES_128_GCM_SHA256): {', '.join(f'{t} {c}' for t, c in self.suites.items())}.

{chr(10).join(lines)}

## The fleet over a slow uplink

{FLEET_N} `skopeo copy` clients started at the same moment, each cache empty, the upstream in a
network namespace of its own behind a veth pair shaped to {FLEET_RATE} in the download direction
(`{getattr(self, 'fleet_qdisc', 'not run')}`); caches and clients in a second namespace. Each client
writes to a tmpfs of its own (one node, one disk); the "one shared client disk" rows put all
clients' `dir:` destinations on the work disk (skopeo syncs every blob it writes), floor and
Stowage only. nginx with
`proxy_cache_lock on` and the lock's age and timeout at their 5 s defaults, as the nginx registry
proxies ship it. Fetches from the upstream's access log; uplink bytes from the veth's counters.
{FLEET_REPS} repetition(s), medians; took {getattr(self, 'fleet_elapsed', 0):.0f} s.

{chr(10).join(fleet_lines) if fleet_lines else '(not run: BENCH_FLEET=0)'}

## Targets (issue 19)

| figure | peer | Stowage | ratio | target | met? |
|---|---|---:|---:|---|---|
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
    # Absolute: the fleet starts these from inside network namespaces and other directories.
    args.stowage, args.head_load = os.path.abspath(args.stowage), os.path.abspath(args.head_load)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    b = Bench(args)
    atexit.register(lambda: (remove_netns(), None if args.keep else shutil.rmtree(b.work, ignore_errors=True)))
    b.run()


if __name__ == "__main__":
    main()
