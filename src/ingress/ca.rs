//! The local certificate authority and the per-host TLS server configs minted from it.
//!
//! The CA lives in `[ca] dir` as `ca.crt` (PEM, public, served at `/ca.crt`) and `ca.key`
//! (PEM, created with mode 0600, never served). Each host gets its own ECDSA P-256 leaf key,
//! a certificate whose SAN is that host (DNS name or IP), and a rustls `ServerConfig`
//! offering h2 and http/1.1. Configs are kept in a moka cache whose `try_get_with` runs one
//! mint per host, so a burst of first connections mints once.
//!
//! With `[ca] name_constraints = true` a new CA carries X.509 name constraints
//! ([`NameScope`]): permitted DNS subtrees for the configured registries, their auth hosts
//! and the mirror's names, and no IP addresses but the literal ones configured. A stolen
//! `ca.key` then vouches for nothing else (Go, OpenSSL and webpki clients enforce this).
//! The trade-off: a registry added later needs a new CA, which startup says in so many
//! words. The CA directory is created 0700.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, PKCS_ECDSA_P256_SHA256,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// The names a CA may sign for: DNS subtrees (a name and everything under it, RFC 5280)
/// and IP networks. No IP network means no IP address at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameScope {
    pub dns: Vec<String>,
    pub ips: Vec<ipnet::IpNet>,
}

impl NameScope {
    /// The scope covering these hosts (DNS names or IP literals), deduplicated.
    pub fn of<'a>(hosts: impl IntoIterator<Item = &'a str>) -> NameScope {
        let mut scope = NameScope::default();
        for h in hosts {
            let h = h.trim_end_matches('.').to_ascii_lowercase();
            match h.trim_matches(['[', ']']).parse::<IpAddr>() {
                Ok(ip) => {
                    let net = ipnet::IpNet::from(ip);
                    if !scope.ips.contains(&net) {
                        scope.ips.push(net);
                    }
                }
                Err(_) if !h.is_empty() && !scope.dns.contains(&h) => scope.dns.push(h),
                Err(_) => {}
            }
        }
        scope
    }

    /// Whether a leaf for `host` is inside the scope.
    pub fn permits(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => self.ips.iter().any(|n| n.contains(&ip)),
            Err(_) => self.dns.iter().any(|d| {
                host == *d
                    || (host.ends_with(d.as_str()) && host[..host.len() - d.len()].ends_with('.'))
            }),
        }
    }

    fn to_rcgen(&self) -> NameConstraints {
        let mut permitted: Vec<GeneralSubtree> = self
            .dns
            .iter()
            .map(|d| GeneralSubtree::DnsName(d.clone()))
            .collect();
        permitted.extend(self.ips.iter().map(|n| {
            GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(n.addr(), n.prefix_len()))
        }));
        // With no IP network permitted, exclude them all: a constraint list without IP
        // entries leaves IP addresses unconstrained.
        let excluded = if self.ips.is_empty() {
            vec![
                GeneralSubtree::IpAddress(CidrSubnet::from_v4_prefix([0; 4], 0)),
                GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix([0; 16], 0)),
            ]
        } else {
            Vec::new()
        };
        NameConstraints {
            permitted_subtrees: permitted,
            excluded_subtrees: excluded,
        }
    }

    /// The scope a CA certificate's name constraints allow; `None` for an unconstrained CA.
    fn of_certificate(der: &[u8]) -> Result<Option<NameScope>, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let Some(nc) = cert.name_constraints().map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let mut scope = NameScope::default();
        for subtree in nc.value.permitted_subtrees.iter().flatten() {
            match &subtree.base {
                GeneralName::DNSName(d) => scope
                    .dns
                    .push(d.trim_start_matches('.').to_ascii_lowercase()),
                GeneralName::IPAddress(b) => {
                    let net = match b.len() {
                        8 => {
                            let addr: [u8; 4] = b[..4].try_into().expect("4 bytes");
                            let mask: [u8; 4] = b[4..].try_into().expect("4 bytes");
                            let prefix = u32::from_be_bytes(mask).leading_ones() as u8;
                            ipnet::IpNet::new(IpAddr::from(addr), prefix)
                        }
                        32 => {
                            let addr: [u8; 16] = b[..16].try_into().expect("16 bytes");
                            let mask: [u8; 16] = b[16..].try_into().expect("16 bytes");
                            let prefix = u128::from_be_bytes(mask).leading_ones() as u8;
                            ipnet::IpNet::new(IpAddr::from(addr), prefix)
                        }
                        _ => return Err("a name constraint holds a malformed IP network".into()),
                    };
                    scope.ips.push(net.map_err(|e| e.to_string())?);
                }
                _ => {}
            }
        }
        Ok(Some(scope))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA in {dir}: {message}")]
    Invalid { dir: PathBuf, message: String },
    #[error("minting a certificate for {host}: {message}")]
    Mint { host: String, message: String },
}

/// How long a minted leaf is valid, and how long it is kept in memory (well inside validity).
const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
const LEAF_CACHE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Leaves are backdated for clients whose clocks run a little behind.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);
const MAX_CACHED_LEAVES: u64 = 10_000;

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    leaves: moka::future::Cache<String, Arc<ServerConfig>>,
    minted: AtomicU64,
    /// The CA's own name constraints; `None` when it has none.
    scope: Option<NameScope>,
}

impl CertificateAuthority {
    /// Loads `ca.crt` + `ca.key` from `dir`, or creates both when neither exists, without
    /// name constraints.
    pub fn load_or_create(dir: &Path) -> Result<CertificateAuthority, CaError> {
        Self::open(dir, None)
    }

    /// Like [`load_or_create`](Self::load_or_create); with `constrain`, a new CA is limited
    /// to that scope, and an existing one must be limited to a scope that covers it (else an
    /// error that says how to make a new CA). An existing constrained CA must cover
    /// `constrain` (or, without it, is used as it is).
    pub fn open(
        dir: &Path,
        constrain: Option<&NameScope>,
    ) -> Result<CertificateAuthority, CaError> {
        let crt = dir.join("ca.crt");
        let key = dir.join("ca.key");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        let invalid = |message: String| CaError::Invalid {
            dir: dir.to_owned(),
            message,
        };
        if dir.exists() && !dir.is_dir() {
            return Err(invalid(
                "this is a file, not a directory: point [ca] dir (or --ca-dir) at a directory, which is created when missing".into(),
            ));
        }
        match (crt.exists(), key.exists()) {
            (true, true) => {
                let mode = fs::metadata(&key).map_err(io(&key))?.permissions().mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %key.display(), mode = format!("{:o}", mode & 0o777), "CA key is readable by others; chmod 600 it");
                }
                let cert_pem = fs::read_to_string(&crt).map_err(io(&crt))?;
                let key_pem = fs::read_to_string(&key).map_err(io(&key))?;
                let key_pair =
                    KeyPair::from_pem(&key_pem).map_err(|e| invalid(format!("ca.key: {e}")))?;
                let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair)
                    .map_err(|e| invalid(format!("ca.crt: {e}")))?;
                let ca = Self::from_parts(issuer, cert_pem).map_err(invalid)?;
                match (&ca.scope, constrain) {
                    (None, Some(_)) => {
                        return Err(invalid(
                            "[ca] name_constraints is on, but this CA was made without name constraints; move ca.crt and ca.key away to have a constrained CA made, and distribute the new ca.crt to clients".into(),
                        ))
                    }
                    (Some(have), Some(want)) => {
                        let outside: Vec<&str> = want
                            .dns
                            .iter()
                            .map(String::as_str)
                            .filter(|d| !have.permits(d))
                            .chain(want.ips.iter().filter(|n| !have.ips.iter().any(|h| h.contains(*n))).map(|_| "an IP address"))
                            .collect();
                        if !outside.is_empty() {
                            return Err(invalid(format!(
                                "the CA's name constraints do not cover {}: a constrained CA cannot sign for names added after it was made; move ca.crt and ca.key away to have a new one made, and distribute the new ca.crt to clients",
                                outside.join(", ")
                            )));
                        }
                    }
                    (Some(have), None) => tracing::info!(dns = ?have.dns, "the CA is name-constrained; leaves outside its names are not minted"),
                    (None, None) => {}
                }
                Ok(ca)
            }
            (false, false) => {
                let created = !dir.exists();
                fs::create_dir_all(dir).map_err(io(dir))?;
                if created {
                    // ca.key is 0600 anyway; nobody else needs to list the directory.
                    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
                }
                let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| invalid(e.to_string()))?;
                let mut params = CertificateParams::default();
                let mut dn = DistinguishedName::new();
                dn.push(DnType::CommonName, "Stowage local CA");
                dn.push(DnType::OrganizationName, "Stowage");
                params.distinguished_name = dn;
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                let now = OffsetDateTime::now_utc();
                params.not_before = now - BACKDATE;
                params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
                params.name_constraints = constrain.map(NameScope::to_rcgen);
                let cert = params
                    .self_signed(&key_pair)
                    .map_err(|e| invalid(e.to_string()))?;
                // Key first, with 0600 from the start, so a crash never leaves a cert without its key
                // being noticed as "both missing" and regenerated over a trusted cert.
                write_new(&key, key_pair.serialize_pem().as_bytes(), 0o600).map_err(io(&key))?;
                write_new(&crt, cert.pem().as_bytes(), 0o644).map_err(io(&crt))?;
                tracing::info!(dir = %dir.display(), constrained = constrain.is_some(), "created a new CA; trust ca.crt on your clients");
                let issuer = Issuer::new(params, key_pair);
                Self::from_parts(issuer, cert.pem()).map_err(invalid)
            }
            (true, false) => Err(invalid(
                "ca.crt exists but ca.key is missing; restore the key or remove ca.crt".into(),
            )),
            (false, true) => Err(invalid(
                "ca.key exists but ca.crt is missing; restore the certificate or remove ca.key"
                    .into(),
            )),
        }
    }

    fn from_parts(
        issuer: Issuer<'static, KeyPair>,
        cert_pem: String,
    ) -> Result<CertificateAuthority, String> {
        let cert_der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .next()
            .ok_or("ca.crt holds no certificate")?
            .map_err(|e| format!("ca.crt: {e}"))?;
        let scope = NameScope::of_certificate(&cert_der).map_err(|e| format!("ca.crt: {e}"))?;
        Ok(CertificateAuthority {
            scope,
            issuer,
            cert_pem,
            cert_der,
            leaves: moka::future::Cache::builder()
                .max_capacity(MAX_CACHED_LEAVES)
                .time_to_live(LEAF_CACHE_TTL)
                .build(),
            minted: AtomicU64::new(0),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Number of leaf certificates minted since start.
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    /// The TLS server config for `host`, minted on first use. Concurrent callers for the same
    /// host share one mint.
    pub async fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, Arc<CaError>> {
        self.leaves
            .try_get_with(host.to_owned(), async { self.mint(host).map(Arc::new) })
            .await
    }

    fn mint(&self, host: &str) -> Result<ServerConfig, CaError> {
        let err = |message: String| CaError::Mint {
            host: host.to_owned(),
            message,
        };
        if self.scope.as_ref().is_some_and(|s| !s.permits(host)) {
            // Clients would refuse it; say why here rather than as a TLS error there.
            return Err(err("outside the CA's name constraints".into()));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
        let mut params =
            CertificateParams::new(vec![host.to_owned()]).map_err(|e| err(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        // An IP literal is a SAN of type IP (CertificateParams::new does that); the CN is cosmetic.
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_VALIDITY;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| err(e.to_string()))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let chain = vec![cert.der().clone(), self.cert_der.clone()];
        let config = server_tls_config(chain, key_der).map_err(|e| err(e.to_string()))?;
        self.minted.fetch_add(1, Ordering::Relaxed);
        let kind = if host.parse::<IpAddr>().is_ok() {
            "ip"
        } else {
            "dns"
        };
        tracing::debug!(host, kind, "minted leaf certificate");
        Ok(config)
    }
}

/// The TLS settings of every listener Stowage terminates: the aws-lc-rs provider with
/// AES-128-GCM preferred over AES-256-GCM whatever order the client lists them in (both are
/// safe; AES-128 takes 10 rounds instead of 14, and Go clients, which most runtimes are,
/// ask for it first anyway), and ALPN h2 then http/1.1.
pub fn server_tls_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, rustls::Error> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // A stable sort on "is AES-256": AES-128 suites move ahead of their AES-256 siblings,
    // TLS 1.3 suites stay ahead of TLS 1.2 ones.
    provider.cipher_suites.sort_by_key(|s| {
        use rustls::CipherSuite as C;
        let aes_256 = matches!(
            s.suite(),
            C::TLS13_AES_256_GCM_SHA384
                | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        );
        (s.version() != &rustls::version::TLS13, aes_256)
    });
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Creates `path` exclusively with `mode`, writes and fsyncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    // The umask may have narrowed the mode; make it exact.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn creates_then_loads_the_same_ca_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        b.server_config("quay.io").await.unwrap();
    }

    #[test]
    fn a_new_ca_directory_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        CertificateAuthority::load_or_create(&certs).unwrap();
        let mode = fs::metadata(&certs).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn name_scopes_cover_names_and_their_subdomains_only() {
        let s = NameScope::of(["Quay.io", "10.0.0.5", "quay.io", "auth.docker.io."]);
        assert_eq!(s.dns, ["quay.io", "auth.docker.io"]);
        assert_eq!(s.ips.len(), 1);
        for ok in [
            "quay.io",
            "cdn.quay.io",
            "QUAY.IO.",
            "auth.docker.io",
            "10.0.0.5",
        ] {
            assert!(s.permits(ok), "{ok}");
        }
        for no in [
            "evilquay.io",
            "io",
            "docker.io",
            "10.0.0.6",
            "127.0.0.1",
            "::1",
            "",
        ] {
            assert!(!s.permits(no), "{no}");
        }
    }

    /// A leaf signed with the CA's key for any name, as a thief holding `ca.key` would make.
    fn forge(ca: &CertificateAuthority, host: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec![host.to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.signed_by(&key, &ca.issuer).unwrap().der().clone()
    }

    /// What webpki (rustls' verifier) says of a leaf for `host` from a client trusting `ca`.
    fn webpki_verdict(
        ca: &CertificateAuthority,
        leaf: &CertificateDer<'_>,
        host: &str,
    ) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        let name = rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap();
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(leaf, &[], &name, &[], rustls_pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_constrained_ca_vouches_only_for_its_names() {
        let dir = tempfile::tempdir().unwrap();
        let scope = NameScope::of(["quay.io", "registry-1.docker.io", "auth.docker.io"]);
        let ca = CertificateAuthority::open(dir.path(), Some(&scope)).unwrap();
        assert_eq!(ca.scope.as_ref(), Some(&scope));
        for host in ["quay.io", "registry-1.docker.io", "cdn.quay.io"] {
            webpki_verdict(&ca, &forge(&ca, host), host).unwrap_or_else(|e| panic!("{host}: {e}"));
        }
        for host in [
            "accounts.google.com",
            "quay.io.evil.test",
            "127.0.0.1",
            "10.1.2.3",
        ] {
            let verdict = webpki_verdict(&ca, &forge(&ca, host), host);
            assert!(verdict.is_err(), "a leaf for {host} verified");
        }
        // The same forged leaf verifies under an unconstrained CA: the constraint is the cause.
        let open = CertificateAuthority::load_or_create(&dir.path().join("open")).unwrap();
        webpki_verdict(
            &open,
            &forge(&open, "accounts.google.com"),
            "accounts.google.com",
        )
        .unwrap();
        // Reloaded, the CA knows its scope, mints inside it and refuses outside.
        let again = CertificateAuthority::open(dir.path(), Some(&scope)).unwrap();
        assert_eq!(again.scope.as_ref(), Some(&scope));
        assert!(again.mint("quay.io").is_ok());
        let e = again.mint("accounts.google.com").err().unwrap();
        assert!(e.to_string().contains("name constraints"), "{e}");
    }

    #[test]
    fn a_ca_that_cannot_cover_the_config_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        let scope = NameScope::of(["quay.io"]);
        let e = CertificateAuthority::open(dir.path(), Some(&scope))
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("made without name constraints"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::open(dir.path(), Some(&scope)).unwrap();
        let wider = NameScope::of(["quay.io", "ghcr.io"]);
        let e = CertificateAuthority::open(dir.path(), Some(&wider))
            .err()
            .unwrap();
        assert!(e.to_string().contains("do not cover ghcr.io"), "{e}");
        // Turning the option off keeps using the constrained CA as it is.
        let ca = CertificateAuthority::open(dir.path(), None).unwrap();
        assert!(ca.scope.is_some());
    }

    #[tokio::test]
    async fn half_a_ca_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join("ca.key")).unwrap();
        let e = CertificateAuthority::load_or_create(dir.path())
            .err()
            .unwrap();
        assert!(e.to_string().contains("ca.key is missing"), "{e}");
    }

    #[tokio::test]
    async fn concurrent_first_connections_mint_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(CertificateAuthority::load_or_create(dir.path()).unwrap());
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let ca = ca.clone();
                tokio::spawn(async move { ca.server_config("ghcr.io").await.unwrap() })
            })
            .collect();
        let configs: Vec<_> = futures_util::future::join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(ca.minted(), 1);
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
        ca.server_config("127.0.0.1").await.unwrap();
        assert_eq!(ca.minted(), 2);
    }

    /// Runs a handshake in memory between `client` and a leaf of `ca` for `host`; returns
    /// the negotiated cipher suite.
    async fn negotiate(
        ca: &CertificateAuthority,
        host: &str,
        client: rustls::ClientConfig,
    ) -> rustls::CipherSuite {
        let server_config = ca.server_config(host).await.unwrap();
        let mut server = rustls::ServerConnection::new(server_config).unwrap();
        let name = rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!server.is_handshaking(), "handshake did not complete");
        server.negotiated_cipher_suite().unwrap().suite()
    }

    #[tokio::test]
    async fn servers_prefer_aes_128_gcm_whatever_the_client_lists_first() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let client = |suites: Vec<rustls::SupportedCipherSuite>,
                      versions: &[&'static rustls::SupportedProtocolVersion]| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.cert_der.clone()).unwrap();
            let provider = rustls::crypto::CryptoProvider {
                cipher_suites: suites,
                ..rustls::crypto::aws_lc_rs::default_provider()
            };
            rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth()
        };
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        use rustls::CipherSuite as C;
        // OpenSSL (curl) lists AES-256 first: the server's order wins.
        let c = client(
            vec![cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_AES_128_GCM_SHA256],
            &[&rustls::version::TLS13],
        );
        assert_eq!(
            negotiate(&ca, "quay.io", c).await,
            C::TLS13_AES_128_GCM_SHA256
        );
        let c = client(
            vec![
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ],
            &[&rustls::version::TLS12],
        );
        assert_eq!(
            negotiate(&ca, "quay.io", c).await,
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        );
        // A client that offers only AES-256 still gets it.
        let c = client(
            vec![cs::TLS13_AES_256_GCM_SHA384],
            &[&rustls::version::TLS13],
        );
        assert_eq!(
            negotiate(&ca, "quay.io", c).await,
            C::TLS13_AES_256_GCM_SHA384
        );
    }
}
