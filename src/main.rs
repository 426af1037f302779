//! The `stowage` command: parse arguments, load configuration, then run the server or
//! one of the administration commands. Everything else lives in the library.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use stowage::admin;
use stowage::settings::{Config, HumanDuration, LogFormat, Size};
use tracing_subscriber::EnvFilter;

/// A caching forward proxy for container registries: point HTTPS_PROXY at it, trust its CA,
/// and every layer from every registry is downloaded once.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Configuration file. Default: ./config.toml when present, built-in defaults otherwise.
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Override [proxy] listen, e.g. 0.0.0.0:3128.
    #[arg(long, value_name = "ADDR", global = true)]
    listen: Option<String>,
    /// Override [cache] dir.
    #[arg(long, value_name = "DIR", global = true)]
    cache_dir: Option<PathBuf>,
    /// Override [ca] dir.
    #[arg(long, value_name = "DIR", global = true)]
    ca_dir: Option<PathBuf>,
    /// Print the default configuration (every key, commented) and exit.
    #[arg(long)]
    print_default_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Inspect and maintain the cache (talks to the running server, or opens the cache
    /// directly when none runs).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// The local certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Fill the cache with images before anyone pulls them: every manifest, config and
    /// layer of the chosen platforms, through the running server.
    Prefetch {
        /// Image references: alpine:3, quay.io/org/app:1.2, registry:5000/app@sha256:....
        images: Vec<String>,
        /// Read more references from FILE, one a line (`#` starts a comment).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Platforms to take from an index, e.g. linux/amd64,linux/arm64/v8 (default:
        /// [prefetch] platforms, or linux/amd64 and linux/arm64).
        #[arg(
            long,
            value_name = "OS/ARCH[/VARIANT],...",
            conflicts_with = "all_platforms"
        )]
        platform: Vec<String>,
        /// Every platform the index lists.
        #[arg(long)]
        all_platforms: bool,
        /// Upstream credentials for these images' registry, used for this prefetch only.
        #[arg(long, value_name = "USER:PASS", conflicts_with = "creds_env")]
        creds: Option<String>,
        /// Read USER:PASS from this environment variable instead (keeps it out of `ps`).
        #[arg(long, value_name = "VAR")]
        creds_env: Option<String>,
    },
    /// Print a configuration snippet for a container runtime, filled in by the running server
    /// (its CA and addresses); refuses when none runs.
    Setup {
        /// One of: docker, docker-mirror, containerd, containerd-proxy, k3s, kind, podman,
        /// gitlab, etc-hosts, compose, kubernetes, ca.
        runtime: String,
        /// The address clients use to reach Stowage, HOST[:PORT] (default: the proxy
        /// listener's address; this machine's name when it listens on 0.0.0.0 or ::).
        #[arg(long)]
        address: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// Size, objects, and (when running) hit ratio and bytes saved.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cached repositories and tags per registry, with sizes and last use.
    Ls {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every object; report and remove corrupt ones.
    Verify,
    /// Drop a tag's row (its objects stay until evicted), so the next pull asks upstream;
    /// also forgets a remembered upstream 404 for it.
    Forget {
        /// An image reference: alpine:3, quay.io/org/app:1.2, registry:5000/app:tag.
        image: String,
    },
    /// Revalidate a tag upstream now and print old → new digest, or "unchanged" (needs the
    /// running server).
    Refresh {
        /// An image reference with a tag, e.g. alpine:3.
        image: String,
    },
    /// The digests a tag resolved to and when (the last 20).
    History {
        /// An image reference with a tag, e.g. quay.io/org/app:1.2.
        image: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Never evict an image's manifests and blobs (max_size eviction works around it).
    Pin {
        /// An image reference: alpine:3, quay.io/org/app@sha256:....
        image: String,
    },
    /// Undo `cache pin`.
    Unpin {
        /// An image reference, as pinned.
        image: String,
    },
    /// Remove least recently used objects down to a size, and/or those unused for a time.
    Prune {
        /// Evict least recently used objects until the cache is at most this size, e.g. 20GiB.
        #[arg(long, value_name = "SIZE")]
        max_size: Option<Size>,
        /// Remove objects not used for this long, e.g. 30d.
        #[arg(long, value_name = "DURATION")]
        older_than: Option<HumanDuration>,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Print the CA certificate (PEM), creating the CA if needed.
    Export {
        /// Write to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    match run_cli(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, joined by ": ", for people. Printed with
/// `Display` only: anyhow's `Debug` (what `fn main() -> Result` uses) adds a backtrace
/// whenever `RUST_BACKTRACE` is set, which says nothing to someone who mistyped a flag. A
/// cause whose text is already part of the message before it (an `io::Error` its wrapper
/// quotes) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run_cli(cli: Cli) -> anyhow::Result<()> {
    if cli.print_default_config {
        print!("{}", stowage::settings::DEFAULT_TOML);
        return Ok(());
    }
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None if Path::new("config.toml").exists() => Config::load("config.toml".as_ref())?,
        None => Config::default(),
    };
    if let Some(listen) = cli.listen {
        config.proxy.listen = listen;
    }
    if let Some(dir) = cli.cache_dir {
        config.cache.dir = dir;
    }
    if let Some(dir) = cli.ca_dir {
        config.ca.dir = dir;
    }
    config.validate()?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config),
        Command::Cache(c) => cache_command(&config, c),
        Command::Prefetch {
            images,
            file,
            platform,
            all_platforms,
            creds,
            creds_env,
        } => prefetch_command(
            &config,
            images,
            file,
            platform,
            all_platforms,
            creds,
            creds_env,
        ),
        Command::Ca(CaCommand::Export { out }) => {
            let ca = stowage::server::open_ca(&config)?;
            match out {
                Some(path) => std::fs::write(&path, ca.cert_pem())
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{}", ca.cert_pem()),
            }
            Ok(())
        }
        Command::Setup { runtime, address } => setup_command(&config, &runtime, address),
    }
}

/// `stowage setup`: the running server renders the snippet (its CA, its configuration, its
/// bound listeners); with none running this refuses, and never makes a CA of its own.
fn setup_command(config: &Config, runtime: &str, address: Option<String>) -> anyhow::Result<()> {
    admin::setup::check_runtime(runtime).map_err(anyhow::Error::msg)?;
    let addr = client_address(config).context("[proxy] listen")?;
    let server = Admin::at(addr)?;
    if server.info()?.is_none() {
        bail!(
            "no Stowage is running at {addr}: `stowage setup` prints the running server's CA and addresses, so start it first (`stowage run`), or say where it listens (--listen, or --config with its [proxy] listen); from another machine: curl http://HOST:PORT/setup/{runtime}"
        );
    }
    let mut path = format!("/admin/setup?runtime={}", query_escape(runtime));
    if let Some(a) = address {
        path.push_str(&format!("&address={}", query_escape(&a)));
    }
    let body = server
        .call("GET", &path)?
        .ok_or_else(|| anyhow::anyhow!("the server at {addr} went away"))?;
    print!("{body}");
    if !body.ends_with('\n') {
        println!();
    }
    Ok(())
}

fn run(config: Config) -> anyhow::Result<()> {
    // Held until the server has stopped: dropping it writes out the lines still queued.
    let _log_writer = init_logging(config.log.format);
    match stowage::server::raise_open_file_limit() {
        Ok(l) => {
            tracing::info!(
                soft = l.soft,
                was = l.was,
                hard = %l.hard.map_or("unlimited".to_owned(), |h| h.to_string()),
                "open file limit"
            );
            if let Some(w) =
                stowage::server::open_file_warning(config.proxy.max_connections, l.soft)
            {
                tracing::warn!("{w}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let server = stowage::Server::bind(config).await?;
        server.run(shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    // Fills and tunnels still running after the grace period are cut here.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

/// Log lines go to stderr from a thread of their own, in batches (see
/// `telemetry::log_writer`); the guard writes out what is still buffered.
fn init_logging(format: LogFormat) -> Option<stowage::telemetry::log_writer::Guard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let (writer, guard) = match stowage::telemetry::log_writer::spawn(std::io::stderr()) {
        Ok((w, g)) => (BoxMakeWriter::new(w), Some(g)),
        // No thread for it: every line is written by the thread that logs it.
        Err(_) => (BoxMakeWriter::new(std::io::stderr), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        // The defaults' output, cheaper (`telemetry::log_format`).
        LogFormat::Text => builder
            .fmt_fields(stowage::telemetry::log_format::Fields)
            .with_timer(stowage::telemetry::log_format::Clock)
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}

/// Where a local client reaches the proxy listener.
fn client_address(config: &Config) -> Option<SocketAddr> {
    let mut a = config.proxy_listen().ok()?;
    if a.ip().is_unspecified() {
        a.set_ip(match a.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Some(a)
}

/// Who answers for the configured cache.
enum Found {
    /// A Stowage listens at the configured address and serves this cache.
    Serving(Admin),
    /// Nothing listens there: the cache is opened directly.
    NotRunning,
    /// A Stowage listens there but serves another cache directory: this one is opened
    /// directly, since that server's numbers would not be about it.
    OtherCache { addr: SocketAddr, dir: PathBuf },
}

/// The running server's `/admin/*` endpoints.
struct Admin {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
}

/// Finds the server at the configured address and asks which cache it serves
/// (`/admin/info`), so that a `--cache-dir` the user gave is honoured.
fn find_server(config: &Config) -> anyhow::Result<Found> {
    let Some(addr) = client_address(config) else {
        return Ok(Found::NotRunning);
    };
    let admin = Admin::at(addr)?;
    let Some(info) = admin.info()? else {
        return Ok(Found::NotRunning);
    };
    let ours = std::fs::canonicalize(&config.cache.dir).ok();
    if ours.as_deref() != Some(info.cache_dir.as_path()) {
        return Ok(Found::OtherCache {
            addr,
            dir: info.cache_dir,
        });
    }
    Ok(Found::Serving(admin))
}

/// How long `stowage cache ...` waits for the server: to connect and answer, and between
/// two progress lines of a verify.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A prune answers when it is done, and removing tens of thousands of files takes a while:
/// it gets longer, once the server has said (`/admin/info`, within [`ADMIN_TIMEOUT`]) that it
/// is a Stowage.
const PRUNE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A response from the address the server should be at.
struct Reply {
    status: http::StatusCode,
    content_type: String,
    body: String,
}

/// Sends one request to `addr`. `Ok(None)`: nothing listens there.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&http::HeaderValue>,
) -> anyhow::Result<Option<http::Response<hyper::body::Incoming>>> {
    let stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(None),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("connecting to {addr}"))),
    };
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(v) = authorization {
        req = req.header(http::header::AUTHORIZATION, v);
    }
    let req = req.body(http_body_util::Empty::<bytes::Bytes>::new())?;
    Ok(Some(send.send_request(req).await?))
}

fn no_answer(
    addr: SocketAddr,
    method: &str,
    path: &str,
    within: std::time::Duration,
) -> anyhow::Error {
    anyhow::anyhow!(
        "{addr} did not answer {method} {path} within {}s: is that a Stowage, and is it stuck? (--listen / [proxy] listen say where the server is)",
        within.as_secs()
    )
}

impl Admin {
    fn at(addr: SocketAddr) -> anyhow::Result<Admin> {
        Ok(Admin {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            addr,
        })
    }

    /// One request, answered within `within`. `Ok(None)`: nothing listens there.
    fn request(
        &self,
        method: &str,
        path: &str,
        within: std::time::Duration,
    ) -> anyhow::Result<Option<Reply>> {
        let addr = self.addr;
        let exchange = async {
            let Some(resp) = send(addr, method, path, None).await? else {
                return Ok(None);
            };
            let status = resp.status();
            let content_type = resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            use http_body_util::BodyExt;
            let body =
                String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
            anyhow::Ok(Some(Reply {
                status,
                content_type,
                body,
            }))
        };
        match self
            .rt
            .block_on(async { tokio::time::timeout(within, exchange).await })
        {
            Ok(r) => r.with_context(|| format!("asking {addr} for {path}")),
            Err(_) => Err(no_answer(addr, method, path, within)),
        }
    }

    /// A request whose answer is newline-delimited JSON, each line handed to `on_event` as
    /// it arrives; the server must say something every [`ADMIN_TIMEOUT`].
    fn stream<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        authorization: Option<&http::HeaderValue>,
        mut on_event: impl FnMut(T),
    ) -> anyhow::Result<()> {
        use http_body_util::BodyExt;
        let addr = self.addr;
        self.rt.block_on(async {
            let resp = match tokio::time::timeout(ADMIN_TIMEOUT, send(addr, method, path, authorization)).await {
                Err(_) => return Err(no_answer(addr, method, path, ADMIN_TIMEOUT)),
                Ok(r) => r?.ok_or_else(|| anyhow::anyhow!("the server at {addr} went away"))?,
            };
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let text = tokio::time::timeout(ADMIN_TIMEOUT, body.collect())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_default();
                bail!("the server at {addr} answered {status}: {}", text.trim());
            }
            let mut pending = Vec::new();
            loop {
                let frame = match tokio::time::timeout(ADMIN_TIMEOUT, body.frame()).await {
                    Err(_) => bail!(
                        "the server at {addr} said nothing for {}s during {method} {path}: it is stuck",
                        ADMIN_TIMEOUT.as_secs()
                    ),
                    Ok(None) => return Ok(()),
                    Ok(Some(f)) => f.with_context(|| format!("reading {path} from {addr}"))?,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                pending.extend_from_slice(&data);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    let event = serde_json::from_slice(&line).with_context(|| {
                        format!("{path} from {addr}: {}", String::from_utf8_lossy(&line).trim())
                    })?;
                    on_event(event);
                }
            }
        })
    }

    /// What the server at this address says about itself; an error when it is not Stowage.
    fn info(&self) -> anyhow::Result<Option<admin::ServerInfo>> {
        let Some(reply) = self.request("GET", "/admin/info", ADMIN_TIMEOUT)? else {
            return Ok(None);
        };
        let info = (reply.status == http::StatusCode::OK
            && reply.content_type.starts_with("application/json"))
        .then(|| serde_json::from_str::<admin::ServerInfo>(&reply.body).ok())
        .flatten();
        match info {
            Some(i) => Ok(Some(i)),
            None => bail!(
                "{} answers HTTP, but it is not a Stowage admin API (GET /admin/info: {}{}); --listen / [proxy] listen say where the server is",
                self.addr,
                reply.status,
                if reply.content_type.is_empty() {
                    String::new()
                } else {
                    format!(", {}", reply.content_type)
                }
            ),
        }
    }

    /// One request to a server known to be Stowage; its refusals are plain text.
    fn call(&self, method: &str, path: &str) -> anyhow::Result<Option<String>> {
        let within = if path.starts_with("/admin/prune") {
            PRUNE_TIMEOUT
        } else {
            ADMIN_TIMEOUT
        };
        let Some(reply) = self.request(method, path, within)? else {
            return Ok(None);
        };
        if !reply.status.is_success() {
            bail!(
                "the server at {} answered {}: {}",
                self.addr,
                reply.status,
                reply.body.trim()
            );
        }
        Ok(Some(reply.body))
    }
}

/// The server to ask for `path`, or `None` to open the cache directly.
fn ask(found: &Found, method: &str, path: &str) -> anyhow::Result<Option<String>> {
    match found {
        Found::Serving(admin) => admin.call(method, path),
        Found::NotRunning | Found::OtherCache { .. } => Ok(None),
    }
}

/// Opens the cache directly, only when it exists (the commands that call this inspect a
/// cache; they never create one). Its errors name the directory (and a Stowage holding it).
fn open_store(config: &Config) -> anyhow::Result<std::sync::Arc<stowage::cache::BlobStore>> {
    Ok(stowage::cache::BlobStore::open_existing(&config.cache.dir)?)
}

fn cache_command(config: &Config, cmd: CacheCommand) -> anyhow::Result<()> {
    match cmd {
        CacheCommand::Stats { json } => {
            let found = find_server(config)?;
            let stats: admin::Stats = match ask(&found, "GET", "/admin/stats")? {
                Some(body) => serde_json::from_str(&body)?,
                None => admin::stats(&*open_store(config)?, config.cache.max_size.0),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
                return Ok(());
            }
            println!(
                "cache:    {} ({})",
                config.cache.dir.display(),
                match &found {
                    Found::Serving(a) => format!("server running at {}", a.addr),
                    Found::NotRunning => "server not running".to_owned(),
                    Found::OtherCache { addr, dir } => format!(
                        "read directly; the server at {addr} serves {}",
                        dir.display()
                    ),
                }
            );
            println!(
                "size:     {} of {} ({:.1}%)",
                admin::human_bytes(stats.bytes),
                admin::human_bytes(stats.max_size),
                100.0 * stats.bytes as f64 / stats.max_size.max(1) as f64
            );
            println!("objects:  {}", stats.objects);
            if stats.pinned_bytes > 0 {
                println!("pinned:   {}", admin::human_bytes(stats.pinned_bytes));
            }
            if let Some(t) = stats.since_start {
                let ratio = t
                    .hit_ratio()
                    .map(|r| format!("{:.1}%", r * 100.0))
                    .unwrap_or_else(|| "n/a".into());
                println!(
                    "since start: hit ratio {ratio} ({} hits, {} coalesced, {} stale, {} misses)",
                    t.hits, t.coalesced, t.stale, t.misses
                );
                println!(
                    "bytes saved: {} served from cache, {} from upstream",
                    admin::human_bytes(t.bytes_saved),
                    admin::human_bytes(t.bytes_from_upstream)
                );
            }
            Ok(())
        }
        CacheCommand::Ls { json } => {
            let list: Vec<admin::TagListing> = match ask(&find_server(config)?, "GET", "/admin/ls")?
            {
                Some(body) => serde_json::from_str(&body)?,
                None => admin::list(&*open_store(config)?)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if list.is_empty() {
                println!("no tags cached yet");
            }
            let mut last_registry = String::new();
            for t in &list {
                if t.registry != last_registry {
                    println!("{}", t.registry);
                    last_registry = t.registry.clone();
                }
                println!(
                    "  {}:{}  {}  {}  last used {}{}",
                    t.repository,
                    t.tag,
                    &t.digest[..t.digest.len().min(19)],
                    held(t),
                    last_used(t.last_used_ms),
                    if t.pinned { "  pinned" } else { "" },
                );
            }
            Ok(())
        }
        CacheCommand::Verify => {
            let report = match find_server(config)? {
                Found::Serving(server) => {
                    use admin::VerifyEvent;
                    let mut view = None;
                    let mut end = None;
                    server.stream("POST", "/admin/verify", None, |event| match event {
                        VerifyEvent::Start { objects, bytes } => {
                            view = Some(VerifyView::new(objects, bytes))
                        }
                        VerifyEvent::Progress { checked, bytes } => {
                            if let Some(v) = &mut view {
                                v.progress(checked, bytes)
                            }
                        }
                        VerifyEvent::Corrupt { digest } => match &view {
                            Some(v) => v.corrupt(&digest),
                            None => println!("corrupt: {digest} (removed)"),
                        },
                        VerifyEvent::Done(r) => end = Some(Ok(r)),
                        VerifyEvent::Failed { message } => end = Some(Err(message)),
                    })?;
                    if let Some(v) = view {
                        v.finish();
                    }
                    match end {
                        Some(Ok(r)) => r,
                        Some(Err(m)) => bail!("the server's verify failed: {m}"),
                        None => bail!("the server ended the verify without a report"),
                    }
                }
                Found::NotRunning | Found::OtherCache { .. } => {
                    let store = open_store(config)?;
                    let mut view = VerifyView::new(store.index.len() as u64, store.index.total());
                    let mut checked = 0;
                    let r = admin::verify(&store, |bytes, d, ok| {
                        checked += 1;
                        if !ok {
                            view.corrupt(&d.to_string());
                        }
                        view.progress(checked, bytes);
                    })?;
                    view.finish();
                    r
                }
            };
            println!(
                "verified {} objects ({}), {} corrupt and removed",
                report.checked,
                admin::human_bytes(report.bytes),
                report.corrupt
            );
            std::io::stdout().flush()?;
            if report.corrupt > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        CacheCommand::Forget { image } => {
            let image = parse_image(&image)?;
            let path = format!("/admin/forget?ref={}", query_escape(&image.to_string()));
            let report: admin::ForgetReport = match ask(&find_server(config)?, "POST", &path)? {
                Some(body) => serde_json::from_str(&body)?,
                None => admin::forget(&*open_store(config)?, &image).map_err(anyhow::Error::msg)?,
            };
            if report.forgotten {
                println!("forgot {}: the next pull asks upstream", report.image);
            } else {
                println!(
                    "{} was not cached as a tag; nothing to forget",
                    report.image
                );
            }
            Ok(())
        }
        CacheCommand::Refresh { image } => {
            let image = parse_image(&image)?;
            let path = format!("/admin/refresh?ref={}", query_escape(&image.to_string()));
            let Some(body) = ask(&find_server(config)?, "POST", &path)? else {
                bail!("cache refresh asks upstream through the running server, and none serves {}: start `stowage run`", config.cache.dir.display());
            };
            let r: admin::RefreshReport = serde_json::from_str(&body)?;
            let mut lines: Vec<String> = r
                .variants
                .iter()
                .map(|v| match &v.before {
                    Some(b) if *b == v.now => format!("{}: unchanged ({})", r.image, v.now),
                    Some(b) => format!("{}: {b} → {}", r.image, v.now),
                    None => format!("{}: (not cached) → {}", r.image, v.now),
                })
                .collect();
            lines.dedup();
            for l in lines {
                println!("{l}");
            }
            Ok(())
        }
        CacheCommand::History { image, json } => {
            let image = parse_image(&image)?;
            let path = format!("/admin/history?ref={}", query_escape(&image.to_string()));
            let changes: Vec<stowage::cache::TagChange> =
                match ask(&find_server(config)?, "GET", &path)? {
                    Some(body) => serde_json::from_str(&body)?,
                    None => {
                        admin::history(&*open_store(config)?, &image).map_err(anyhow::Error::msg)?
                    }
                };
            if json {
                println!("{}", serde_json::to_string_pretty(&changes)?);
                return Ok(());
            }
            if changes.is_empty() {
                println!("{image}: no history (never pulled through this cache)");
            }
            for c in &changes {
                println!(
                    "{}  {}  ({} ago)",
                    c.digest,
                    format_ms(c.at_ms),
                    human_age(stowage::clock::now_ms().saturating_sub(c.at_ms) / 1000)
                );
            }
            Ok(())
        }
        CacheCommand::Pin { image } => pin_command(config, &image, true),
        CacheCommand::Unpin { image } => pin_command(config, &image, false),
        CacheCommand::Prune {
            max_size,
            older_than,
        } => {
            if max_size.is_none() && older_than.is_none() {
                bail!("say what to prune: --max-size 20GiB and/or --older-than 30d");
            }
            let mut q = Vec::new();
            if let Some(s) = max_size {
                q.push(format!("max_size={}B", s.0));
            }
            if let Some(d) = older_than {
                q.push(format!("older_than={}ms", d.0.as_millis()));
            }
            let report: admin::PruneReport = match ask(
                &find_server(config)?,
                "POST",
                &format!("/admin/prune?{}", q.join("&")),
            )? {
                Some(body) => serde_json::from_str(&body)?,
                None => admin::prune(
                    &*open_store(config)?,
                    max_size.map(|s| s.0),
                    older_than.map(|d| d.0),
                )?,
            };
            println!(
                "removed {} objects ({})",
                report.objects,
                admin::human_bytes(report.bytes)
            );
            Ok(())
        }
    }
}

fn parse_image(text: &str) -> anyhow::Result<stowage::oci::ImageRef> {
    Ok(text.parse::<stowage::oci::ImageRef>()?)
}

/// `text` as a query value: everything but unreserved characters percent-encoded.
fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Unix milliseconds as `2026-12-02 07:58:08 UTC`.
fn format_ms(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn pin_command(config: &Config, image: &str, pinned: bool) -> anyhow::Result<()> {
    let image = parse_image(image)?;
    let op = if pinned { "pin" } else { "unpin" };
    let path = format!("/admin/{op}?ref={}", query_escape(&image.to_string()));
    let report: admin::PinReport = match ask(&find_server(config)?, "POST", &path)? {
        Some(body) => serde_json::from_str(&body)?,
        None => admin::pin(&*open_store(config)?, &image, pinned)?,
    };
    let held = format!(
        "{} objects, {} cached",
        report.objects,
        admin::human_bytes(report.bytes)
    );
    match (pinned, report.changed) {
        (true, true) => println!("pinned {} ({held}): never evicted", report.image),
        (true, false) => println!("{} was already pinned ({held})", report.image),
        (false, true) => println!("unpinned {} ({held})", report.image),
        (false, false) => println!("{} was not pinned", report.image),
    }
    Ok(())
}

/// What the cache holds of a tag's image. Nothing at all (not even its manifest) means
/// eviction took it: the next pull fetches it again.
fn held(t: &admin::TagListing) -> String {
    match (t.cached_bytes, t.missing) {
        (0, _) => "layers evicted (fetched again on the next pull)".to_owned(),
        (bytes, 0) => admin::human_bytes(bytes),
        (bytes, 1) => format!("{}, 1 object not cached", admin::human_bytes(bytes)),
        (bytes, n) => format!("{}, {n} objects not cached", admin::human_bytes(bytes)),
    }
}

/// `3h ago`, or `never` when no object of the image is left to have a last use (the store
/// says 0, the 1970 epoch).
fn last_used(ms: u64) -> String {
    if ms == 0 {
        return "never".to_owned();
    }
    let age = stowage::clock::now_ms().saturating_sub(ms) / 1000;
    format!("{} ago", human_age(age))
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// What `cache verify` shows while it runs, from the server's events or the local verify:
/// a progress bar on a terminal, else a line every `VERIFY_PROGRESS_EVERY` objects; each
/// corrupt object as it is found.
struct VerifyView {
    bar: Option<indicatif::ProgressBar>,
    objects: u64,
    bytes: u64,
    next_line: u64,
}

impl VerifyView {
    fn new(objects: u64, bytes: u64) -> VerifyView {
        VerifyView {
            bar: progress(bytes),
            objects,
            bytes,
            next_line: admin::VERIFY_PROGRESS_EVERY,
        }
    }

    fn progress(&mut self, checked: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_position(bytes);
        } else if checked >= self.next_line {
            println!(
                "verified {checked} of {} objects ({} of {})",
                self.objects,
                admin::human_bytes(bytes),
                admin::human_bytes(self.bytes)
            );
            self.next_line =
                (checked / admin::VERIFY_PROGRESS_EVERY + 1) * admin::VERIFY_PROGRESS_EVERY;
        }
    }

    fn corrupt(&self, digest: &str) {
        let msg = format!("corrupt: {digest} (removed)");
        match &self.bar {
            Some(b) => b.println(msg),
            None => println!("{msg}"),
        }
    }

    fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// A progress bar on a terminal; `None` (plain lines) otherwise.
fn progress(total: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} verifying [{bar:40}] {bytes}/{total_bytes} ({eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    Some(bar)
}

/// glibc gives threads that allocate concurrently their own malloc arenas (up to 8 per
/// core); with tokio's workers and the blocking pool, freed memory stays spread over them
/// and RSS creeps up under churn. Two arenas keep it flat: in a 4-minute soak with 1,000
/// connections, RSS grew 39 MiB with glibc's default and 6 MiB with two arenas
/// (bench/LOAD.md). Called first thing in `main`, before any other thread exists.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tuning; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// `stowage prefetch`: the server prefetches; this prints its progress (a bar per image on
/// a terminal, one line per image otherwise) and fails naming each image that failed.
#[allow(clippy::too_many_arguments)]
fn prefetch_command(
    config: &Config,
    mut images: Vec<String>,
    file: Option<PathBuf>,
    platform: Vec<String>,
    all_platforms: bool,
    creds: Option<String>,
    creds_env: Option<String>,
) -> anyhow::Result<()> {
    use stowage::registry_api::prefetch::PrefetchEvent;
    if let Some(f) = &file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        images.extend(admin::parse_ref_list(&text));
    }
    if images.is_empty() {
        bail!("say which images: stowage prefetch REF... or --file FILE");
    }
    let mut platforms = Vec::new();
    for p in &platform {
        platforms.extend(stowage::oci::platform::parse_list(p)?);
    }
    let creds =
        match (creds, creds_env) {
            (Some(c), _) => Some(c),
            (None, Some(var)) => Some(std::env::var(&var).with_context(|| {
                format!("--creds-env {var}: the environment variable is not set")
            })?),
            (None, None) => None,
        };
    let authorization = match creds {
        None => None,
        Some(c) => {
            let Some((user, pass)) = c.split_once(':') else {
                bail!("credentials are USER:PASS");
            };
            Some(stowage::settings::Credentials::new(user, pass).basic())
        }
    };
    // Each reference is checked here, so a typo is named without asking the server.
    let mut failed: Vec<(String, String)> = Vec::new();
    let mut query = Vec::new();
    for i in &images {
        match i.parse::<stowage::oci::ImageRef>() {
            Ok(r) => query.push(format!("ref={}", query_escape(&r.to_string()))),
            Err(e) => failed.push((i.clone(), e.to_string())),
        }
    }
    for p in &platforms {
        query.push(format!("platform={}", query_escape(&p.to_string())));
    }
    if all_platforms {
        query.push("all_platforms=1".to_owned());
    }
    let asked = query.iter().filter(|q| q.starts_with("ref=")).count();
    if asked > 0 {
        let Found::Serving(server) = find_server(config)? else {
            bail!(
                "prefetch fills the cache through the running server, and none serves {}: start `stowage run`",
                config.cache.dir.display()
            );
        };
        let multi = std::io::stderr()
            .is_terminal()
            .then(indicatif::MultiProgress::new);
        let mut bars: std::collections::HashMap<String, indicatif::ProgressBar> =
            Default::default();
        let mut layers: std::collections::HashMap<String, u64> = Default::default();
        let path = format!("/admin/prefetch?{}", query.join("&"));
        server.stream("POST", &path, authorization.as_ref(), |event| match event {
            PrefetchEvent::Resolved {
                image,
                bytes,
                layers: n,
                ..
            } => {
                layers.insert(image.clone(), n);
                if let Some(m) = &multi {
                    let bar = m.add(indicatif::ProgressBar::new(bytes));
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(image.clone());
                    bar.set_message(format!("layers 0/{n}"));
                    bars.insert(image, bar);
                }
            }
            PrefetchEvent::Progress {
                image,
                bytes,
                layers_done,
            } => {
                if let Some(bar) = bars.get(&image) {
                    bar.set_position(bytes);
                    bar.set_message(format!(
                        "layers {layers_done}/{}",
                        layers.get(&image).copied().unwrap_or(0)
                    ));
                }
            }
            PrefetchEvent::Done(r) => {
                if let Some(bar) = bars.remove(&r.image) {
                    bar.finish_and_clear();
                }
                let line = format!(
                    "{}  {}  platforms {}  layers {}  {} ({} fetched)  {:.1}s",
                    r.image,
                    r.digest,
                    if r.platforms.is_empty() {
                        "(single manifest)".to_owned()
                    } else {
                        r.platforms.join(",")
                    },
                    r.layers,
                    admin::human_bytes(r.bytes),
                    admin::human_bytes(r.fetched_bytes),
                    r.seconds
                );
                match &multi {
                    Some(m) => {
                        let _ = m.println(&line);
                    }
                    None => println!("{line}"),
                }
            }
            PrefetchEvent::Failed { image, reason } => {
                if let Some(bar) = bars.remove(&image) {
                    bar.abandon();
                }
                eprintln!("prefetch {image} failed: {reason}");
                failed.push((image, reason));
            }
            PrefetchEvent::Working => {}
        })?;
    }
    std::io::stdout().flush()?;
    if !failed.is_empty() {
        let list: Vec<String> = failed
            .iter()
            .map(|(i, why)| format!("{i} ({why})"))
            .collect();
        bail!(
            "{} of {} images failed: {}",
            failed.len(),
            images.len(),
            list.join("; ")
        );
    }
    Ok(())
}
