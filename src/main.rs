//! `callfleet`: one binary, a subcommand per component.

use std::path::PathBuf;
use std::process::ExitCode;

use callfleet_balancer::{BalancerError, Listeners};
use callfleet_control_plane::scale;
use callfleet_core::config::{Config, LocalMode, LockBackendKind};
use callfleet_core::{ConfigError, NodeId, Store, fleet, shutdown, telemetry};
use callfleet_node_agent::NodeAgentError;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "callfleet",
    version,
    about = "Controller for multi-node Asterisk call centers"
)]
struct Cli {
    /// TOML configuration file (defaults suit a single box).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Log format: human or json.
    #[arg(long, global = true, value_parser = ["human", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole cluster on this box with embedded storage (./callfleet-data).
    Up,
    /// Sample this node and heartbeat it into the fleet store.
    NodeAgent,
    /// Serve fenced agent leases over gRPC and HTTP (for dialplans).
    LockService,
    /// Serve the API for CRMs, supervisors and websites: REST, XML-RPC and gRPC.
    ControlPlane,
    /// Answer the carrier's INVITEs: 302 to the least-loaded node, proxy to the local PBX,
    /// or 503 so the carrier fails over.
    Balancer,
    /// Show the fleet's nodes and their heartbeat age.
    Status {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write this node's Asterisk configuration folder (start it with
    /// `asterisk -C DIR/asterisk.conf`).
    AsteriskConfig {
        /// The folder to write; created if missing. Asterisk's run, log and spool folders go
        /// inside it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Drain or undrain a node.
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// See and steer the autoscaler (from the store, without a control plane).
    Scale {
        #[command(subcommand)]
        action: ScaleAction,
    },
}

#[derive(Debug, Subcommand)]
enum ScaleAction {
    /// Show what supervisors set, the fleet against the thresholds, the leader and the
    /// latest decisions with why.
    Status {
        /// Print the view as JSON (as GET /api/v1/autoscaler answers it).
        #[arg(long)]
        json: bool,
    },
    /// Change what supervisors set; what is not given stays. Audited as `cli:<user>`.
    Set {
        /// Take no action at all until resumed.
        #[arg(long, conflicts_with = "resume")]
        pause: bool,
        /// Act again.
        #[arg(long)]
        resume: bool,
        /// Keep at least this many extra nodes.
        #[arg(long, value_name = "N")]
        min: Option<u32>,
        /// Keep at most this many (at most control_plane.autoscaler.max_extra).
        #[arg(long, value_name = "N", conflicts_with = "no_max")]
        max: Option<u32>,
        /// Back to the configured maximum.
        #[arg(long)]
        no_max: bool,
    },
}

#[derive(Debug, Subcommand)]
enum NodeAction {
    /// Stop sending new calls to the node; it reports `drained` once it has none.
    Drain { id: NodeId },
    /// Let the node take new calls again.
    Undrain { id: NodeId },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut flags = Vec::new();
    if let Some(format) = &cli.log_format {
        flags.push(("log.format", format.clone()));
    }
    let config = match Config::load(cli.config.as_deref(), &flags) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(64); // EX_USAGE: the operator must fix the configuration
        }
    };
    telemetry::init(config.log.format);
    // Before any component records: a handle taken before the recorder exists records
    // nowhere, and `up` starts several components whose /metrics must show them all.
    callfleet_core::metrics::install();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(dispatch(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let usage = err.downcast_ref::<ConfigError>().is_some()
                || err
                    .downcast_ref::<callfleet_node_agent::asterisk_config::AsteriskConfigError>()
                    .is_some()
                || matches!(
                    err.downcast_ref::<NodeAgentError>(),
                    Some(NodeAgentError::Config(_))
                )
                || matches!(
                    err.downcast_ref::<BalancerError>(),
                    Some(BalancerError::Config(_))
                );
            eprintln!("error: {err}");
            ExitCode::from(if usage { 64 } else { 1 })
        }
    }
}

async fn dispatch(command: Command, mut config: Config) -> anyhow::Result<()> {
    if let Command::AsteriskConfig { out } = &command {
        return write_asterisk_config(&config, out);
    }
    if let Command::LockService = command {
        // Leases live in memory or Redis; the fleet store is not needed.
        let listener = bind_locks(&config).await?;
        let token = shutdown::on_signals();
        callfleet_lock_service::run(&config.lock_service, listener, token).await?;
        return Ok(());
    }
    let store = Store::connect(&config.store).await?;
    match command {
        Command::Up => {
            let id = config.node.resolved_id()?;
            // The balancer refuses to put a wildcard into Via and Record-Route; a single box
            // listening on every address advertises the one it routes from.
            if let Some(advertise) = callfleet_balancer::default_advertise(&config.balancer) {
                config.balancer.advertise = advertise;
            }
            let listeners = Listeners::bind(&config.balancer)?;
            let locks_listener = bind_locks(&config).await?;
            // The box's queued calls and queue figures use the box's lock service, wherever
            // lock_service.listen put it.
            let mut locks_address = locks_listener.local_addr()?;
            if locks_address.ip().is_unspecified() {
                locks_address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            config.node.queue.lock_service = format!("http://{locks_address}");
            let control_listener = bind_control(&config).await?;
            let mut control_config = config.control_plane.clone();
            control_config.lock_service = config.node.queue.lock_service.clone();
            let data_dir = data_dir(&config);
            let (admin, created) = callfleet_control_plane::admin_token(&data_dir)?;
            control_config.tokens.push(admin);
            if !config.asterisk.install.is_empty() {
                // The box's Asterisk gets its devices from the box's control plane, through
                // the node-agent, with a token that can do nothing else (made per run: both
                // ends live in this process).
                let provisioning = &mut config.provisioning;
                if provisioning.listen.is_empty() {
                    provisioning.listen = DEFAULT_PROVISIONING.to_owned();
                }
                if provisioning.token.expose().is_empty() {
                    let node_token = callfleet_control_plane::node_token(&id)?;
                    provisioning.token = node_token.token.clone();
                    control_config.tokens.push(node_token);
                }
                config.validate()?;
            }
            let balancer = &config.balancer;
            println!("callfleet up: a single-box cluster");
            println!(
                "  store       {}",
                callfleet_core::config::redact_url(&config.store.url)
            );
            println!(
                "  node-agent  node {id}, heartbeat every {:?}",
                config.node.heartbeat_interval
            );
            println!(
                "  balancer    SIP on {} (UDP and TCP, advertised as {}); local calls {} to {}",
                listeners.local_addr()?,
                balancer.advertised(),
                match balancer.local_mode {
                    LocalMode::Proxy => "proxied",
                    LocalMode::Redirect => "redirected",
                },
                balancer.local_pbx
            );
            println!(
                "  locks       gRPC and HTTP on {} ({})",
                locks_listener.local_addr()?,
                match config.lock_service.backend {
                    // Leases granted before a restart are gone from memory but may still
                    // ring: say why claims are refused at first.
                    LockBackendKind::Memory => format!(
                        "memory backend; claims start after a {} quarantine",
                        humantime::format_duration(config.lock_service.quarantine)
                    ),
                    LockBackendKind::Redis => "redis backend".to_owned(),
                }
            );
            println!(
                "  api         REST http://{0}/api/v1, XML-RPC http://{0}/RPC2, gRPC on {0}",
                control_listener.local_addr()?
            );
            let token_file = data_dir.join(callfleet_control_plane::ADMIN_TOKEN_FILE);
            if created {
                println!(
                    "              admin token (created, kept in {}): {}",
                    token_file.display(),
                    control_config
                        .tokens
                        .iter()
                        .find(|t| t.role == callfleet_core::config::Role::Admin)
                        .map(|t| t.token.expose())
                        .unwrap_or_default()
                );
            } else {
                println!("              admin token in {}", token_file.display());
            }
            let pbx = if config.asterisk.install.is_empty() {
                None
            } else {
                let folder = callfleet_node_agent::pbx::folder(&data_dir);
                let (folder, _) = callfleet_node_agent::asterisk_config::write(&config, &folder)?;
                println!(
                    "  asterisk    {}/sbin/asterisk -C {}/asterisk.conf, SIP on {}",
                    config.asterisk.install.trim_end_matches('/'),
                    folder.display(),
                    balancer.local_pbx
                );
                println!(
                    "              devices from http://{}/realtime (node-agent, cached)",
                    config.provisioning.listen
                );
                Some(folder)
            };
            println!("  watch it    callfleet status   (from another shell in this folder)");
            println!("Ctrl-C stops it.");
            let token = shutdown::on_signals();
            let supervisor = pbx.map(|folder| {
                let install = std::path::PathBuf::from(&config.asterisk.install);
                let restarts = callfleet_node_agent::pbx::Restarts::new(
                    config.asterisk.restart_limit,
                    config.asterisk.restart_window,
                );
                let token = token.clone();
                tokio::spawn(async move {
                    callfleet_node_agent::pbx::supervise(&install, &folder, restarts, token).await;
                })
            });
            let (agent, balancer, locks, control) = tokio::join!(
                async {
                    let result =
                        callfleet_node_agent::run(&config, store.clone(), token.clone()).await;
                    if result.is_err() {
                        token.cancel();
                    }
                    result
                },
                async {
                    let result =
                        callfleet_balancer::run(&config, store.clone(), listeners, token.clone())
                            .await;
                    if result.is_err() {
                        token.cancel();
                    }
                    result
                },
                async {
                    let result = callfleet_lock_service::run(
                        &config.lock_service,
                        locks_listener,
                        token.clone(),
                    )
                    .await;
                    if result.is_err() {
                        token.cancel();
                    }
                    result
                },
                async {
                    let result = callfleet_control_plane::run(
                        &control_config,
                        store.clone(),
                        control_listener,
                        token.clone(),
                    )
                    .await;
                    if result.is_err() {
                        token.cancel();
                    }
                    result
                },
            );
            if let Some(supervisor) = supervisor {
                // Every other task has stopped: the PBX goes last, after its calls' routing.
                token.cancel();
                let _ = supervisor.await;
            }
            shutdown::bounded("store", store.close()).await;
            agent?;
            balancer?;
            locks?;
            control?;
        }
        Command::NodeAgent => {
            let token = shutdown::on_signals();
            let result = callfleet_node_agent::run(&config, store.clone(), token).await;
            shutdown::bounded("store", store.close()).await;
            result?;
        }
        Command::LockService | Command::AsteriskConfig { .. } => {
            unreachable!("handled before the store is opened")
        }
        Command::ControlPlane => {
            let listener = bind_control(&config).await?;
            let token = shutdown::on_signals();
            let result =
                callfleet_control_plane::run(&config.control_plane, store.clone(), listener, token)
                    .await;
            shutdown::bounded("store", store.close()).await;
            result?;
        }
        Command::Balancer => {
            let listeners = Listeners::bind(&config.balancer)?;
            let token = shutdown::on_signals();
            let result = callfleet_balancer::run(&config, store.clone(), listeners, token).await;
            shutdown::bounded("store", store.close()).await;
            result?;
        }
        Command::Status { json } => {
            let nodes = store.list_nodes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else if nodes.is_empty() {
                println!(
                    "no nodes have reported yet; start one with `callfleet up` or `callfleet node-agent`"
                );
            } else {
                print!("{}", fleet::render_table(&nodes));
            }
        }
        Command::Node { action } => {
            let (id, drain) = match action {
                NodeAction::Drain { id } => (id, true),
                NodeAction::Undrain { id } => (id, false),
            };
            let state = store.set_drain(&id, drain).await?;
            println!("node {id}: {state}");
        }
        Command::Scale { action } => {
            if let ScaleAction::Set {
                pause,
                resume,
                min,
                max,
                no_max,
            } = action
            {
                let mut steering = store.scaler_steering().await?;
                steering.paused = (steering.paused || pause) && !resume;
                steering.min_extra = min.unwrap_or(steering.min_extra);
                steering.max_extra = if no_max {
                    None
                } else {
                    max.or(steering.max_extra)
                };
                scale::check_steering(&config.control_plane.autoscaler, &steering)?;
                store.set_scaler_steering(&steering, &cli_actor()).await?;
            }
            let view = scale::status_of(&config.control_plane, &store).await?;
            if matches!(action, ScaleAction::Status { json: true }) {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", scale::show::render(&view));
            }
        }
    }
    Ok(())
}

/// Who changes something from this command line, for the audit log: `cli:<unix user>`
/// (`cli:uid-<n>` where the environment names no user).
fn cli_actor() -> String {
    use std::os::unix::fs::MetadataExt;
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
        .or_else(|| {
            let uid = std::fs::metadata("/proc/self").ok()?.uid();
            Some(format!("uid-{uid}"))
        });
    format!("cli:{}", user.as_deref().unwrap_or("unknown"))
}

/// Binds `lock_service.listen`, saying what to change when the port is taken.
async fn bind_locks(config: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    let address = &config.lock_service.listen;
    tokio::net::TcpListener::bind(address).await.map_err(|err| {
        anyhow::anyhow!(
            "cannot listen for the lock service on {address}: {err}; free the port or set lock_service.listen (CALLFLEET_LOCK_SERVICE__LISTEN)"
        )
    })
}

/// Binds `control_plane.listen`, saying what to change when the port is taken.
async fn bind_control(config: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    let address = &config.control_plane.listen;
    tokio::net::TcpListener::bind(address).await.map_err(|err| {
        anyhow::anyhow!(
            "cannot listen for the control plane on {address}: {err}; free the port or set control_plane.listen (CALLFLEET_CONTROL_PLANE__LISTEN)"
        )
    })
}

/// Where `callfleet up`'s node-agent answers its Asterisk's realtime requests by default.
const DEFAULT_PROVISIONING: &str = "127.0.0.1:8090";

/// The folder of the single-box store (where `up` keeps its admin token).
fn data_dir(config: &Config) -> PathBuf {
    config
        .store
        .sqlite_path()
        .and_then(|path| std::path::Path::new(path).parent())
        .filter(|dir| !dir.as_os_str().is_empty())
        .map_or_else(
            || PathBuf::from(callfleet_core::config::DEFAULT_DATA_DIR),
            std::path::Path::to_path_buf,
        )
}

/// `callfleet asterisk-config --out DIR`.
fn write_asterisk_config(config: &Config, out: &std::path::Path) -> anyhow::Result<()> {
    let (absolute, files) = callfleet_node_agent::asterisk_config::write(config, out)?;
    println!(
        "wrote {files} files to {}; start Asterisk with: {}/sbin/asterisk -C {}/asterisk.conf",
        out.display(),
        config.asterisk.install.trim_end_matches('/'),
        absolute.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
