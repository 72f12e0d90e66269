//! The `mailwarden` command: dispatch only; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use mailwarden::config::{Config, LogFormat};
use mailwarden::server::{Server, shutdown};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "mailwarden",
    version = mailwarden::service::VERSION,
    about = "SMTP proxy that verifies sender authentication",
    after_long_help = "Files:\n  /etc/mailwarden/mailwarden.toml   the configuration (the default of -c)\n  /etc/mailwarden/policy.toml       the example policy ([auth] policy_file)\n  /var/lib/mailwarden/              quarantine, outbound state (mode 0700)\n\nWithout -c, /etc/mailwarden/mailwarden.toml is used when it exists, else\nconfig/mailwarden.toml in the working directory (a checkout)."
)]
struct Cli {
    /// The configuration file. Accepted before or after the subcommand, by every
    /// subcommand. Default: /etc/mailwarden/mailwarden.toml, else config/mailwarden.toml.
    // One pattern for every subcommand: no subcommand declares its own `config`; the
    // dispatch below passes `config()` (the resolved path) to the ones that need it.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Overrides `[log] format`.
        #[arg(long)]
        log_format: Option<LogFormatArg>,
    },
    /// Validate a configuration file and exit (0: valid).
    CheckConfig,
    /// Evaluate one message offline, through the same checks and policy as the proxy.
    Check {
        /// The connecting client's IP address.
        #[arg(long)]
        ip: String,
        /// The HELO/EHLO name the client gave.
        #[arg(long)]
        helo: String,
        /// The MAIL FROM address ('' for the null sender).
        #[arg(long, allow_hyphen_values = true)]
        mail_from: String,
        /// Envelope recipients (repeatable).
        #[arg(long)]
        rcpt: Vec<String>,
        /// The listener role the message arrived on.
        #[arg(long, default_value = "inbound")]
        role: String,
        /// One JSON object on stdout instead of a table.
        #[arg(long)]
        json: bool,
        /// The message (RFC 5322), LF or CRLF line endings.
        message: PathBuf,
    },
    /// Inspect, release and delete quarantined messages.
    Quarantine {
        #[command(subcommand)]
        command: mailwarden::admin::quarantine_cli::QuarantineCommand,
    },
    /// Outbound accounts: burst counters, freezes.
    Accounts {
        #[command(subcommand)]
        command: mailwarden::admin::accounts_cli::AccountsCommand,
    },
    /// DMARC aggregate reports: list, show, send now.
    Dmarc {
        #[command(subcommand)]
        command: mailwarden::admin::dmarc_reports_cli::DmarcCommand,
    },
    /// Tune a policy file: replay the decision log through it, run its test cases.
    Policy {
        #[command(subcommand)]
        command: mailwarden::admin::policy_cli::PolicyCommand,
    },
    /// Write a self-signed certificate and key (server.crt, server.key) for trials.
    MakeCert {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long, default_value = "localhost")]
        name: String,
    },
    /// Write man pages and shell completions (bash, zsh, fish) under DIR (packaging).
    #[command(hide = true)]
    GenerateAssets {
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Resolved only by the subcommands that read a configuration (make-cert does not).
    let given = cli.config;
    let config = move || mailwarden::service::config_path::resolve(given);
    match cli.command {
        Command::Run { log_format } => with_config(config(), |c| run(c, log_format)),
        Command::CheckConfig => with_config(config(), |config| {
            // The same checks `run` makes before serving (certificates, policy file,
            // admin token file and mode), so `ok` here means `run` starts.
            let checked = Config::load(&config)
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    let warnings = mailwarden::server::preflight(&c)?;
                    // The policy's own tests (`tests = [...]` in the policy file).
                    mailwarden::admin::policy_cli::check_policy_tests(&c)?;
                    Ok(warnings)
                })
                .map(|warnings| {
                    for w in &warnings {
                        eprintln!("warning: {w}");
                    }
                });
            match checked {
                Ok(()) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }),
        Command::Check {
            ip,
            helo,
            mail_from,
            rcpt,
            role,
            json,
            message,
        } => with_config(config(), |config| {
            mailwarden::check::run(&mailwarden::check::Args {
                config,
                ip,
                helo,
                mail_from,
                rcpt,
                role,
                json,
                message,
            })
        }),
        Command::Quarantine { command } => with_config(config(), |c| {
            mailwarden::admin::quarantine_cli::run(&c, &command)
        }),
        Command::Accounts { command } => with_config(config(), |c| {
            mailwarden::admin::accounts_cli::run(&c, &command)
        }),
        Command::Dmarc { command } => with_config(config(), |c| {
            mailwarden::admin::dmarc_reports_cli::run(&c, &command)
        }),
        // `policy test` reads no configuration; `replay` finds the log through it.
        Command::Policy { command } => match command {
            mailwarden::admin::policy_cli::PolicyCommand::Test { .. } => {
                mailwarden::admin::policy_cli::run(std::path::Path::new(""), &command)
            }
            _ => with_config(config(), |c| {
                mailwarden::admin::policy_cli::run(&c, &command)
            }),
        },
        Command::MakeCert { dir, name } => match mailwarden::tls::make_self_signed(&dir, &name) {
            Ok((cert, key)) => {
                println!("wrote {} and {}", cert.display(), key.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("make-cert: {e}");
                ExitCode::from(1)
            }
        },
        Command::GenerateAssets { out } => {
            match mailwarden::service::cli_assets::write_all(Cli::command(), &out) {
                Ok(files) => {
                    for f in files {
                        println!("{}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("generate-assets: {}: {e}", out.display());
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Runs `f` on the resolved configuration path, or says why there is none.
fn with_config(path: Result<PathBuf, String>, f: impl FnOnce(PathBuf) -> ExitCode) -> ExitCode {
    match path {
        Ok(p) => f(p),
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn run(path: PathBuf, log_format: Option<LogFormatArg>) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let format = match log_format {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Text) => LogFormat::Text,
        None => config.log.format,
    };
    mailwarden::telemetry::init(&config.log.level, format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        let token = CancellationToken::new();
        if let Err(e) = shutdown::on_signals(token.clone()) {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::from(1);
        }
        let server = match Server::bind(config, token.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, config = %path.display(), "cannot start");
                return ExitCode::from(1);
            }
        };
        // Listeners are bound: tell systemd (Type=notify) we are up, and that we are
        // going down as soon as shutdown starts (it then waits TimeoutStopSec=, not the
        // start timeout, and shows "deactivating").
        mailwarden::service::sd_notify::ready();
        let stopping = token.clone();
        tokio::spawn(async move {
            stopping.cancelled().await;
            mailwarden::service::sd_notify::stopping();
        });
        let inspector = server.inspector();
        // RELOADING=1 ... READY=1 around each reload: `systemctl reload` shows it, and
        // READY follows whether the reload was applied or refused (the old one runs).
        let reload = move || {
            mailwarden::service::sd_notify::reloading();
            let result = inspector.reload();
            mailwarden::service::sd_notify::ready();
            result
        };
        if let Err(e) = shutdown::on_reload(reload) {
            tracing::error!(error = %e, "cannot install the SIGHUP handler");
            return ExitCode::from(1);
        }
        let left = server.run().await;
        tracing::info!(unfinished_sessions = left, "stopped");
        ExitCode::SUCCESS
    })
}
