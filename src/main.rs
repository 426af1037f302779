//! The `stowage` command: parse arguments, load configuration, run the server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use stowage::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// A caching forward proxy for container registries: point HTTPS_PROXY at it, trust its CA,
/// and every layer from every registry is downloaded once.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Configuration file. Default: ./config.toml when present, built-in defaults otherwise.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override [proxy] listen, e.g. 0.0.0.0:3128.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Override [cache] dir.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Override [ca] dir.
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// Print the default configuration (every key, commented) and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", stowage::config::DEFAULT_TOML);
        return Ok(());
    }
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None if std::path::Path::new("config.toml").exists() => Config::load("config.toml".as_ref())?,
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
    init_logging(config.log.format);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        let server = stowage::Server::bind(config).await?;
        server.run(shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    // Fills and tunnels still running after the grace period are cut here.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
