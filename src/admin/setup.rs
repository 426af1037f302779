//! Configuration snippets for container runtimes, filled in for this instance: served at
//! `GET /setup/<runtime>` and, for `stowage setup <runtime>`, at `GET /admin/setup` of the
//! running server (the CLI never renders them itself, so the CA and the addresses are the
//! server's). The recipes are the files in `examples/`, compiled in and filled in here with
//! the address clients reach, so a snippet and its example cannot drift apart.
//!
//! Every snippet has one shape: `#` lines that say which address it is for and why, and
//! what to do (trusting the CA first where the runtime needs it), then each file to write,
//! opened by a `# file: PATH` line and running to the next such line or the end. Nothing
//! follows a file's content, so a JSON file is exactly what a runtime parses.

use std::net::SocketAddr;

use crate::settings::{Config, MirrorTls};

pub const RUNTIMES: &[&str] = &[
    "docker",
    "docker-mirror",
    "containerd",
    "containerd-proxy",
    "k3s",
    "kind",
    "podman",
    "gitlab",
    "etc-hosts",
    "compose",
    "kubernetes",
];

/// The opening line of each file in a snippet.
pub const FILE_MARKER: &str = "# file: ";

/// Checks a runtime name before anything else happens: one of [`RUNTIMES`] or `ca`.
pub fn check_runtime(runtime: &str) -> Result<(), String> {
    if runtime == "ca" || RUNTIMES.contains(&runtime) {
        Ok(())
    } else {
        Err(format!(
            "unknown runtime {runtime:?}; one of: {}, ca",
            RUNTIMES.join(", ")
        ))
    }
}

/// Where clients reach this Stowage, and why that address (each snippet says so).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach {
    /// Host name or IP literal (IPv6 in brackets) clients put in their configuration.
    pub host: String,
    pub proxy_port: u16,
    /// The mirror listener's port; `None` when this instance has no mirror.
    pub mirror_port: Option<u16>,
    /// One sentence: where `host` comes from, and what to do when it does not fit.
    pub how: String,
}

/// The placeholder the examples use for Stowage's address.
pub const PLACEHOLDER: &str = "stowage-host";

impl Reach {
    /// An address someone gave (`--address`, or the `Host` of a request): `host[:port]`,
    /// the port being the proxy's (the bound one when absent).
    pub fn given(address: &str, proxy: SocketAddr, mirror: Option<SocketAddr>, how: &str) -> Reach {
        let (host, port) = split_host_port(address);
        Reach {
            host: host.to_owned(),
            proxy_port: port.unwrap_or(proxy.port()),
            mirror_port: mirror.map(|m| m.port()),
            how: how.to_owned(),
        }
    }

    /// From the bound listeners: the proxy's IP, or, when it listens on every address,
    /// `hostname` (this machine's name; the placeholder when it has none).
    pub fn of_listeners(
        proxy: SocketAddr,
        mirror: Option<SocketAddr>,
        hostname: Option<&str>,
    ) -> Reach {
        // A listener bound to ::ffff:127.0.0.1 is loopback too (and ::ffff:0.0.0.0 every
        // IPv4 address): judge, and print, the canonical form.
        let ip = proxy.ip().to_canonical();
        let (host, how) = if ip.is_unspecified() {
            let name = hostname.filter(|h| !h.is_empty()).unwrap_or(PLACEHOLDER);
            (
                name.to_owned(),
                format!(
                    "this machine's name, since the proxy listens on {proxy} (every address); where clients cannot resolve {name:?}, replace it with an address of this machine they reach"
                ),
            )
        } else if ip.is_loopback() {
            (
                host_literal(ip),
                format!(
                    "the proxy listens on {proxy}, on this machine only: these settings work here and nowhere else (listen on 0.0.0.0 or a network address to serve other machines, or give --address)"
                ),
            )
        } else {
            (
                host_literal(ip),
                format!("the proxy's listen address, {proxy}"),
            )
        };
        Reach {
            host,
            proxy_port: proxy.port(),
            mirror_port: mirror.map(|m| m.port()),
            how,
        }
    }

    fn proxy(&self) -> String {
        format!("http://{}:{}", self.host, self.proxy_port)
    }

    /// `host:port` of the mirror (5000 when this instance has none: the snippet says so).
    fn mirror_authority(&self, host: &str) -> String {
        format!("{host}:{}", self.mirror_port.unwrap_or(5000))
    }
}

fn host_literal(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// `host:port`, `[v6]:port`, `host` → (host, port).
fn split_host_port(address: &str) -> (&str, Option<u16>) {
    if let Some(rest) = address.strip_prefix('[') {
        if let Some((v6, tail)) = rest.split_once(']') {
            let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
            return (&address[..v6.len() + 2], port);
        }
    }
    match address.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (address, None),
        },
        _ => (address, None),
    }
}

/// The examples, compiled in.
mod example {
    pub const DOCKER_PROXY: &str = include_str!("../../examples/systemd/docker-http-proxy.conf");
    pub const CONTAINERD_PROXY: &str =
        include_str!("../../examples/systemd/containerd-http-proxy.conf");
    pub const DAEMON_JSON: &str = include_str!("../../examples/docker/daemon.json");
    pub const KIND: &str = include_str!("../../examples/kind.yaml");
    pub const GITLAB: &str = include_str!("../../examples/gitlab-ci.yml");
    pub const COMPOSE: &str = include_str!("../../examples/docker-compose.yml");
    pub const KUBERNETES: &str = include_str!("../../examples/kubernetes/deployment.yaml");
    /// `examples/containerd/<name>/hosts.toml`, for each registry the examples cover.
    pub const HOSTS_TOML: &[(&str, &str)] = &[
        (
            "docker.io",
            include_str!("../../examples/containerd/docker.io/hosts.toml"),
        ),
        (
            "quay.io",
            include_str!("../../examples/containerd/quay.io/hosts.toml"),
        ),
        (
            "gcr.io",
            include_str!("../../examples/containerd/gcr.io/hosts.toml"),
        ),
        (
            "registry.k8s.io",
            include_str!("../../examples/containerd/registry.k8s.io/hosts.toml"),
        ),
        (
            "ghcr.io",
            include_str!("../../examples/containerd/ghcr.io/hosts.toml"),
        ),
    ];
}

/// The registries the mirror snippets name, as clients name them: those of
/// `examples/containerd/` (Docker Hub as `docker.io`; not the built-in `k8s.gcr.io`, which is
/// frozen and served by `registry.k8s.io`), then every other configured registry.
fn mirrored_registries(config: &Config) -> Vec<String> {
    let builtin: Vec<String> = crate::settings::builtin_registries()
        .into_iter()
        .map(|r| r.host)
        .collect();
    let mut out: Vec<String> = example::HOSTS_TOML
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    for r in config.registries() {
        if !builtin.contains(&r.host) && !out.contains(&r.host) {
            out.push(r.host);
        }
    }
    out
}

/// `hosts.toml` for one registry: the example's file, or for a registry the examples do
/// not cover, quay.io's with the name put in.
fn hosts_toml(name: &str, mirror: &str, tls: bool) -> String {
    let text = match example::HOSTS_TOML.iter().find(|(n, _)| *n == name) {
        Some((_, t)) => t.to_string(),
        None => example::HOSTS_TOML
            .iter()
            .find(|(n, _)| *n == "quay.io")
            .map(|(_, t)| t.replace("quay.io", name))
            .unwrap_or_default(),
    };
    let mut text = text.replace("http://stowage-host:5000", mirror);
    if tls {
        text.push_str(&format!("  ca = \"{CONTAINERD_CA}\"\n"));
    }
    text
}

const CONTAINERD_CA: &str = "/etc/containerd/certs.d/stowage-ca.crt";

/// The snippet for `runtime` (checked with [`check_runtime`]).
pub fn snippet(
    runtime: &str,
    reach: &Reach,
    config: &Config,
    ca_pem: &str,
) -> Result<String, String> {
    check_runtime(runtime)?;
    if runtime == "ca" {
        return Ok(ca_pem.to_string());
    }
    let proxy = reach.proxy();
    let tls = config.mirror.tls != MirrorTls::Off;
    // By name or by IP: the mirror's `tls = "ca"` mints for the SNI, or, when a client
    // connects by IP and sends none, for the address it reached.
    let mirror_host = reach.host.as_str();
    let mirror_authority = reach.mirror_authority(mirror_host);
    let mirror = format!(
        "{}://{mirror_authority}",
        if tls { "https" } else { "http" }
    );
    let ca_url = format!("{proxy}/ca.crt");
    let ca_system = format!(
        "curl -fsS {ca_url} -o /usr/local/share/ca-certificates/stowage.crt && update-ca-certificates"
    );
    let mut s = format!(
        "# Stowage `{runtime}` recipe for {}: {}.\n",
        reach.host, reach.how
    );
    let needs_mirror = matches!(
        runtime,
        "docker-mirror" | "containerd" | "k3s" | "kind" | "podman"
    );
    if needs_mirror && reach.mirror_port.is_none() {
        s.push_str("# This Stowage has no mirror listener: set [mirror] listen = \"0.0.0.0:5000\" and restart it (port 5000 assumed below).\n");
    }
    let file = |s: &mut String, path: &str, body: &str| {
        s.push_str(FILE_MARKER);
        s.push_str(path);
        s.push('\n');
        s.push_str(body);
        if !body.ends_with('\n') {
            s.push('\n');
        }
    };
    let fill_proxy = |t: &str| t.replace("http://stowage-host:3128", &proxy);
    match runtime {
        "docker" | "containerd-proxy" => {
            let (unit, example) = if runtime == "docker" {
                ("docker", example::DOCKER_PROXY)
            } else {
                ("containerd", example::CONTAINERD_PROXY)
            };
            s.push_str(&format!(
                "# 1. Trust Stowage's CA in the system store (Debian/Ubuntu; {unit} reads it at start):\n#    {ca_system}\n# 2. Write the file below.\n# 3. systemctl daemon-reload && systemctl restart {unit}\n"
            ));
            file(
                &mut s,
                &format!("/etc/systemd/system/{unit}.service.d/http-proxy.conf"),
                &fill_proxy(example),
            );
        }
        "docker-mirror" => {
            s.push_str("# Docker Hub images only (dockerd sends only those to a mirror); for every registry use `stowage setup docker`.\n");
            if tls {
                s.push_str(&format!(
                    "# 1. Trust Stowage's CA for the mirror ([mirror] tls is on):\n#    mkdir -p /etc/docker/certs.d/{mirror_authority} && curl -fsS {ca_url} -o /etc/docker/certs.d/{mirror_authority}/ca.crt\n"
                ));
            }
            s.push_str("# Write the file below (merged into an existing daemon.json), then: systemctl restart docker\n");
            file(
                &mut s,
                "/etc/docker/daemon.json",
                &example::DAEMON_JSON.replace("http://stowage-host:5000", &mirror),
            );
        }
        "containerd" => {
            s.push_str("# containerd reads these with config_path = \"/etc/containerd/certs.d\" under [plugins.\"io.containerd.grpc.v1.cri\".registry] in /etc/containerd/config.toml; ctr with --hosts-dir /etc/containerd/certs.d.\n");
            if tls {
                s.push_str(&format!(
                    "# First trust Stowage's CA for the mirror ([mirror] tls is on):\n#    curl -fsS {ca_url} -o {CONTAINERD_CA}\n"
                ));
            }
            for name in mirrored_registries(config) {
                file(
                    &mut s,
                    &format!("/etc/containerd/certs.d/{name}/hosts.toml"),
                    &hosts_toml(&name, &mirror, tls),
                );
            }
        }
        "k3s" => {
            s.push_str("# k3s and RKE2 (RKE2: /etc/rancher/rke2/registries.yaml); restart k3s (rke2-server / rke2-agent) afterwards.\n");
            if tls {
                s.push_str(&format!(
                    "# First trust Stowage's CA for the mirror ([mirror] tls is on):\n#    curl -fsS {ca_url} -o /etc/rancher/k3s/stowage-ca.crt\n"
                ));
            }
            let mut y = String::from("mirrors:\n");
            for name in mirrored_registries(config) {
                y.push_str(&format!("  {name}:\n    endpoint:\n      - \"{mirror}\"\n"));
            }
            if tls {
                y.push_str(&format!(
                    "configs:\n  \"{mirror_authority}\":\n    tls:\n      ca_file: /etc/rancher/k3s/stowage-ca.crt\n"
                ));
            }
            file(&mut s, "/etc/rancher/k3s/registries.yaml", &y);
        }
        "kind" => {
            s.push_str(&format!(
                "# 1. Write the hosts.toml files of `stowage setup containerd` into ./examples/containerd/<registry>/ (the tree every node mounts), with a mirror address kind's nodes reach: the docker bridge gateway (often 172.18.0.1), not a loopback address. This instance's mirror: {mirror}.\n# 2. kind create cluster --config kind.yaml\n"
            ));
            file(&mut s, "kind.yaml", example::KIND);
        }
        "podman" => {
            s.push_str("# podman, CRI-O, skopeo, buildah read this.\n");
            if tls {
                s.push_str(&format!(
                    "# First trust Stowage's CA for the mirror ([mirror] tls is on):\n#    mkdir -p /etc/containers/certs.d/{mirror_authority} && curl -fsS {ca_url} -o /etc/containers/certs.d/{mirror_authority}/ca.crt\n"
                ));
            }
            s.push_str(&format!(
                "# Or the proxy, for every registry: HTTPS_PROXY={proxy} and trust its CA:\n#    {ca_system}\n"
            ));
            let mut t = String::new();
            for name in mirrored_registries(config) {
                if !t.is_empty() {
                    t.push('\n');
                }
                if name.contains(':') {
                    // `host:port/name` is no image reference: podman refuses the mirror.
                    t.push_str(&format!("# {name}: a registry with a port cannot be a mirror path prefix (podman reads {mirror_authority}/{name}/... as no valid reference); pull it through the proxy.\n"));
                    continue;
                }
                t.push_str(&format!(
                    "[[registry]]\nprefix = \"{name}\"\nlocation = \"{name}\"\n[[registry.mirror]]\nlocation = \"{mirror_authority}/{name}\"\n"
                ));
                if !tls {
                    t.push_str("insecure = true\n");
                }
            }
            file(&mut s, "/etc/containers/registries.conf.d/stowage.conf", &t);
        }
        "gitlab" => {
            s.push_str("# Inside a job Stowage is the `stowage` service: the file names it so, not this instance's address.\n");
            file(&mut s, ".gitlab-ci.yml", example::GITLAB);
        }
        "etc-hosts" => {
            let ip = if reach.host.parse::<std::net::IpAddr>().is_ok()
                || reach.host.starts_with('[')
            {
                reach.host.trim_matches(['[', ']']).to_owned()
            } else {
                s.push_str(&format!(
                    "# /etc/hosts needs an IP address: replace {} below with one of this machine's that the nodes reach.\n",
                    reach.host
                ));
                reach.host.clone()
            };
            if config.direct_listen().ok().flatten().is_none() {
                s.push_str("# This Stowage has no direct listener: set [direct] listen = \"0.0.0.0:443\" and restart it.\n");
            }
            s.push_str(&format!(
                "# 1. Trust Stowage's CA on each node:\n#    {ca_system}\n# 2. Append the lines below to /etc/hosts on each node (not on the Stowage host: it resolves these names for real, or pins them in [upstream.resolve]).\n"
            ));
            let mut t = String::new();
            for r in config.registries() {
                t.push_str(&format!("{ip} {}\n", r.host));
                for a in &r.auth_hosts {
                    t.push_str(&format!("{ip} {a}\n"));
                }
            }
            file(&mut s, "/etc/hosts", &t);
        }
        "compose" => {
            s.push_str("# Runs Stowage itself. `build: ..` builds the repository's Dockerfile: save this as examples/docker-compose.yml in a checkout (or replace build/image with your own image), then docker compose -f examples/docker-compose.yml up -d.\n");
            file(&mut s, "docker-compose.yml", example::COMPOSE);
        }
        "kubernetes" => {
            s.push_str("# Runs Stowage itself, one replica. Replace registry.example.com/stowage:latest with where you pushed the image built from the Dockerfile, then kubectl apply -f deployment.yaml. Several replicas sharing S3: examples/kubernetes/replicas.yaml.\n");
            file(&mut s, "deployment.yaml", example::KUBERNETES);
        }
        _ => unreachable!("checked above"),
    }
    Ok(s)
}

/// A snippet's files: (path, content), in order.
pub fn files(snippet: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in snippet.split_inclusive('\n') {
        if let Some(path) = line.strip_prefix(FILE_MARKER) {
            out.push((path.trim_end().to_owned(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reach(host: &str) -> Reach {
        Reach {
            host: host.into(),
            proxy_port: 3128,
            mirror_port: Some(5000),
            how: "test".into(),
        }
    }

    fn example_file(path: &str) -> String {
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
            .unwrap()
    }

    #[test]
    fn every_runtime_has_a_snippet_with_this_address() {
        let c = Config::from_toml_str("[mirror]\nlisten = \"0.0.0.0:5000\"\n").unwrap();
        for r in RUNTIMES {
            let s = snippet(r, &reach("10.1.2.3"), &c, "PEM").unwrap();
            assert!(s.contains("recipe for 10.1.2.3: test."), "{r}: {s}");
            assert!(!files(&s).is_empty(), "{r}: {s}");
            if !["compose", "kubernetes", "gitlab", "kind"].contains(r) {
                let bodies: String = files(&s).into_iter().map(|(_, b)| b).collect();
                assert!(bodies.contains("10.1.2.3"), "{r}: {s}");
                // (The examples' own comments may still say to replace it.)
                let settings = bodies.lines().filter(|l| !l.trim_start().starts_with('#'));
                assert!(
                    !settings.collect::<String>().contains(PLACEHOLDER),
                    "{r}: {s}"
                );
            }
        }
        assert_eq!(snippet("ca", &reach("h"), &c, "PEM").unwrap(), "PEM");
        assert!(snippet("nope", &reach("h"), &c, "")
            .unwrap_err()
            .contains("docker-mirror"));
    }

    /// With the examples' own address put in, the snippets are the example files.
    #[test]
    fn snippets_are_the_examples_filled_in() {
        let c = Config::from_toml_str("[mirror]\nlisten = \"0.0.0.0:5000\"\n").unwrap();
        let r = reach(PLACEHOLDER);
        let s = snippet("containerd", &r, &c, "").unwrap();
        let got = files(&s);
        let dirs: Vec<&str> = example::HOSTS_TOML.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            got.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
            dirs.iter()
                .map(|d| format!("/etc/containerd/certs.d/{d}/hosts.toml"))
                .collect::<Vec<_>>(),
            "{s}"
        );
        for ((_, body), d) in got.iter().zip(&dirs) {
            assert_eq!(
                body,
                &example_file(&format!("examples/containerd/{d}/hosts.toml"))
            );
        }
        assert!(
            s.contains("server = \"https://registry-1.docker.io\"") && !s.contains("k8s.gcr.io")
        );
        // Every directory of examples/containerd is one of them.
        let mut on_disk: Vec<String> = std::fs::read_dir(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/containerd"),
        )
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
        on_disk.sort();
        let mut dirs_sorted: Vec<String> = dirs.iter().map(|d| d.to_string()).collect();
        dirs_sorted.sort();
        assert_eq!(on_disk, dirs_sorted);

        for (runtime, path) in [
            ("docker", "examples/systemd/docker-http-proxy.conf"),
            (
                "containerd-proxy",
                "examples/systemd/containerd-http-proxy.conf",
            ),
            ("docker-mirror", "examples/docker/daemon.json"),
            ("compose", "examples/docker-compose.yml"),
            ("kubernetes", "examples/kubernetes/deployment.yaml"),
            ("gitlab", "examples/gitlab-ci.yml"),
            ("kind", "examples/kind.yaml"),
        ] {
            let s = snippet(runtime, &r, &c, "").unwrap();
            let f = files(&s);
            assert_eq!(f.len(), 1, "{runtime}: {s}");
            assert_eq!(f[0].1, example_file(path), "{runtime}");
        }

        // k3s: the same mirrors as examples/k3s/registries.yaml.
        let s = snippet("k3s", &r, &c, "").unwrap();
        let ours: serde_norway::Value = serde_norway::from_str(&files(&s)[0].1).unwrap();
        let theirs: serde_norway::Value =
            serde_norway::from_str(&example_file("examples/k3s/registries.yaml")).unwrap();
        assert_eq!(ours, theirs, "{s}");
    }

    #[test]
    fn tls_mirror_snippets_trust_the_ca() {
        let c =
            Config::from_toml_str("[mirror]\nlisten = \"0.0.0.0:5000\"\ntls = \"ca\"\n").unwrap();
        // By name: the mirror's leaf is minted for the SNI.
        let s = snippet("docker-mirror", &reach("box1.lan"), &c, "").unwrap();
        assert!(
            s.contains("/etc/docker/certs.d/box1.lan:5000/ca.crt"),
            "{s}"
        );
        assert!(files(&s)[0].1.contains("https://box1.lan:5000"), "{s}");
        assert!(!s.contains("stowage.local"), "{s}");
        // By IP: the mirror mints a leaf for the address (no SNI); no name to resolve.
        let r = reach("10.1.2.3");
        let s = snippet("docker-mirror", &r, &c, "").unwrap();
        assert!(!s.contains("stowage.local"), "{s}");
        assert!(
            s.contains("/etc/docker/certs.d/10.1.2.3:5000/ca.crt"),
            "{s}"
        );
        assert!(files(&s)[0].1.contains("https://10.1.2.3:5000"), "{s}");
        let s = snippet("k3s", &r, &c, "").unwrap();
        let y: serde_norway::Value = serde_norway::from_str(&files(&s)[0].1).unwrap();
        assert_eq!(
            y["configs"]["10.1.2.3:5000"]["tls"]["ca_file"], "/etc/rancher/k3s/stowage-ca.crt",
            "{s}"
        );
        assert!(s.contains("-o /etc/rancher/k3s/stowage-ca.crt"), "{s}");
        let s = snippet("podman", &r, &c, "").unwrap();
        assert!(
            s.contains("/etc/containers/certs.d/10.1.2.3:5000/ca.crt"),
            "{s}"
        );
        assert!(!s.contains("insecure"), "{s}");
        let s = snippet("containerd", &r, &c, "").unwrap();
        assert!(
            s.contains("-o /etc/containerd/certs.d/stowage-ca.crt"),
            "{s}"
        );
        assert!(files(&s).iter().all(|(_, b)| b.contains("ca = ")), "{s}");
        assert!(
            files(&s)
                .iter()
                .all(|(_, b)| b.contains("[host.\"https://10.1.2.3:5000\"]")),
            "{s}"
        );
    }

    #[test]
    fn the_address_says_where_it_comes_from() {
        let any: SocketAddr = "0.0.0.0:3128".parse().unwrap();
        let r = Reach::of_listeners(any, None, Some("box1"));
        assert_eq!((r.host.as_str(), r.proxy_port), ("box1", 3128));
        assert!(
            r.how.contains("this machine's name") && r.how.contains("replace"),
            "{}",
            r.how
        );
        assert_eq!(Reach::of_listeners(any, None, None).host, PLACEHOLDER);
        let lo: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let r = Reach::of_listeners(lo, Some("127.0.0.1:4001".parse().unwrap()), Some("box1"));
        assert_eq!((r.host.as_str(), r.mirror_port), ("127.0.0.1", Some(4001)));
        assert!(r.how.contains("this machine only"), "{}", r.how);
        // An IPv4-mapped loopback listener is loopback, printed as IPv4.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:4000".parse().unwrap();
        let r = Reach::of_listeners(mapped, None, Some("box1"));
        assert_eq!(r.host, "127.0.0.1");
        assert!(r.how.contains("this machine only"), "{}", r.how);
        let mapped_any: SocketAddr = "[::ffff:0.0.0.0]:4000".parse().unwrap();
        assert_eq!(
            Reach::of_listeners(mapped_any, None, Some("box1")).host,
            "box1"
        );
        let r = Reach::given("[::1]:9", lo, None, "given");
        assert_eq!((r.host.as_str(), r.proxy_port), ("[::1]", 9));
        let r = Reach::given("proxy.lan", lo, None, "given");
        assert_eq!((r.host.as_str(), r.proxy_port), ("proxy.lan", 4000));
    }
}
