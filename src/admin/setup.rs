//! Configuration snippets for container runtimes, filled in for this instance: served at
//! `GET /setup/<runtime>` and printed by `stowage setup <runtime>`. The files in
//! `examples/` are the same recipes with placeholder addresses.

use crate::settings::Config;

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

/// Registries a containerd `hosts.toml` is written for: user-facing name and API host.
fn hosts_toml_registries(config: &Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in config.registries() {
        let name = if r.host == "registry-1.docker.io" {
            "docker.io".to_string()
        } else {
            r.host.clone()
        };
        out.push((name, r.host));
    }
    out
}

fn mirror_url(config: &Config, proxy_address: &str) -> String {
    let host = proxy_address
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(proxy_address);
    let port = config
        .mirror_listen()
        .ok()
        .flatten()
        .map(|a| a.port())
        .unwrap_or(5000);
    let scheme = if config.mirror.tls == crate::settings::MirrorTls::Off {
        "http"
    } else {
        "https"
    };
    format!("{scheme}://{host}:{port}")
}

/// The snippet for `runtime`, or an error listing the known runtimes.
pub fn snippet(
    runtime: &str,
    address: &str,
    config: &Config,
    ca_pem: &str,
) -> Result<String, String> {
    let proxy = format!("http://{address}");
    let mirror = mirror_url(config, address);
    let ca_fetch = format!("curl -fsS {proxy}/ca.crt -o /usr/local/share/ca-certificates/stowage.crt && update-ca-certificates");
    let text = match runtime {
        "docker" | "containerd-proxy" => {
            let unit = if runtime == "docker" { "docker" } else { "containerd" };
            format!(
                "# 1. Trust Stowage's CA (Debian/Ubuntu):\n#    {ca_fetch}\n# 2. /etc/systemd/system/{unit}.service.d/http-proxy.conf\n[Service]\nEnvironment=\"HTTPS_PROXY={proxy}\"\nEnvironment=\"HTTP_PROXY={proxy}\"\nEnvironment=\"NO_PROXY=localhost,127.0.0.0/8,::1\"\n# 3. systemctl daemon-reload && systemctl restart {unit}\n"
            )
        }
        "docker-mirror" => format!(
            "# /etc/docker/daemon.json (Docker Hub images only; use the proxy mode for every registry)\n{{\n  \"registry-mirrors\": [\"{mirror}\"]\n}}\n# Stowage needs [mirror] listen set. systemctl restart docker\n"
        ),
        "containerd" => {
            let mut s = format!("# containerd hosts.toml mirrors (config_path = \"/etc/containerd/certs.d\" in config.toml).\n# Stowage needs [mirror] listen set; the mirror is {mirror}.\n");
            for (name, _) in hosts_toml_registries(config) {
                s.push_str(&format!(
                    "\n# /etc/containerd/certs.d/{name}/hosts.toml\nserver = \"https://{name}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                ));
                if mirror.starts_with("https") {
                    s.push_str("  ca = \"/etc/containerd/certs.d/stowage-ca.crt\"\n");
                }
            }
            s
        }
        "k3s" => {
            let mut s = String::from("# /etc/rancher/k3s/registries.yaml (k3s and RKE2), then restart k3s\nmirrors:\n");
            for (name, _) in hosts_toml_registries(config) {
                s.push_str(&format!("  {name}:\n    endpoint:\n      - \"{mirror}\"\n"));
            }
            s
        }
        "kind" => format!(
            "# kind cluster config: containerd in every node uses Stowage as its mirror\nkind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\ncontainerdConfigPatches:\n  - |-\n    [plugins.\"io.containerd.grpc.v1.cri\".registry]\n      config_path = \"/etc/containerd/certs.d\"\n# and mount a certs.d tree from `stowage setup containerd` into each node at\n# /etc/containerd/certs.d (extraMounts). Mirror: {mirror}\n"
        ),
        "podman" => {
            let host = mirror.split("://").nth(1).unwrap_or(&mirror).to_string();
            let mut s = String::from("# /etc/containers/registries.conf.d/stowage.conf (podman, CRI-O, skopeo)\n");
            for (name, _) in hosts_toml_registries(config) {
                s.push_str(&format!("\n[[registry]]\nprefix = \"{name}\"\nlocation = \"{name}\"\n[[registry.mirror]]\nlocation = \"{host}/{name}\"\n"));
                if mirror.starts_with("http://") {
                    s.push_str("insecure = true\n");
                }
            }
            s.push_str(&format!("\n# Or use the proxy: HTTPS_PROXY={proxy} and trust {proxy}/ca.crt\n"));
            s
        }
        "gitlab" => format!(
            "# .gitlab-ci.yml: Stowage as a service for docker:dind jobs\n# The image: build Stowage's Dockerfile and push it where your runners pull from (none is\n# published); registry.example.com/stowage is a placeholder for that.\nvariables:\n  DOCKER_TLS_CERTDIR: \"\"\n  # Services reach each other (dind -> stowage) only with a network per build; without it\n  # dind cannot resolve stowage and falls back to Docker Hub without an error.\n  FF_NETWORK_PER_BUILD: \"true\"\nservices:\n  - name: registry.example.com/stowage:latest\n    alias: stowage\n  - name: docker:dind\n    command: [\"--registry-mirror=http://stowage:5000\"]\n# or for every registry, HTTPS_PROXY=http://stowage:3128 with the CA from http://stowage:3128/ca.crt\n# This instance: proxy {proxy}, mirror {mirror}\n"
        ),
        "etc-hosts" => {
            let ip = address.rsplit_once(':').map(|(h, _)| h).unwrap_or(address);
            let mut s = format!("# /etc/hosts on each node (Stowage needs [direct] listen = \"0.0.0.0:443\"), plus trust the CA:\n#   {ca_fetch}\n");
            for r in config.registries() {
                s.push_str(&format!("{ip} {}\n", r.host));
                for a in &r.auth_hosts {
                    s.push_str(&format!("{ip} {a}\n"));
                }
            }
            s.push_str("# The Stowage host itself must resolve these names for real (or pin them in [upstream.resolve]).\n");
            s
        }
        "compose" => "# See examples/docker-compose.yml in the Stowage repository.\n".to_string(),
        "kubernetes" => "# See examples/kubernetes/ in the Stowage repository.\n".to_string(),
        "ca" => ca_pem.to_string(),
        other => return Err(format!("unknown runtime {other:?}; one of: {}, ca", RUNTIMES.join(", "))),
    };
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_runtime_has_a_snippet_with_this_address() {
        let c = Config::from_toml_str("[mirror]\nlisten = \"0.0.0.0:5000\"\n").unwrap();
        for r in RUNTIMES {
            let s = snippet(r, "10.1.2.3:3128", &c, "PEM").unwrap();
            assert!(!s.is_empty(), "{r}");
            if !["compose", "kubernetes"].contains(r) {
                assert!(s.contains("10.1.2.3"), "{r}: {s}");
            }
        }
        let s = snippet("containerd", "10.1.2.3:3128", &c, "PEM").unwrap();
        assert!(
            s.contains("certs.d/docker.io/hosts.toml")
                && s.contains("certs.d/quay.io/hosts.toml")
                && s.contains("http://10.1.2.3:5000")
        );
        assert!(snippet("nope", "a:1", &c, "")
            .unwrap_err()
            .contains("docker-mirror"));
    }
}
