//! The `mailwarden` command: dispatch only; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mailwarden::config::{Config, LogFormat};
use mailwarden::server::{Server, shutdown};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "mailwarden",
    version,
    about = "SMTP proxy that verifies sender authentication"
)]
struct Cli {
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
        #[arg(long, short)]
        config: PathBuf,
        /// Overrides `[log] format`.
        #[arg(long)]
        log_format: Option<LogFormatArg>,
    },
    /// Validate a configuration file and exit (0: valid); the old name of `config check`.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The configuration: check it, show what is in effect.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Ask the running proxy (`[process] pid_file`) to reload its configuration, and
    /// report the outcome (0 reloaded, 1 failed: running configuration kept, 2 reloaded
    /// but some changes need a restart, 3 no answer).
    Reload {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Evaluate one message offline, through the same checks and policy as the proxy.
    Check {
        #[arg(long, short)]
        config: PathBuf,
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
        #[arg(long, short, default_value = "config/mailwarden.toml")]
        config: PathBuf,
        #[command(subcommand)]
        command: mailwarden::admin::quarantine_cli::QuarantineCommand,
    },
    /// Outbound accounts: burst counters, freezes.
    Accounts {
        #[arg(long, short, default_value = "config/mailwarden.toml")]
        config: PathBuf,
        #[command(subcommand)]
        command: mailwarden::admin::accounts_cli::AccountsCommand,
    },
    /// Write a self-signed certificate and key (server.crt, server.key) for trials.
    MakeCert {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long, default_value = "localhost")]
        name: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and exit (0: valid).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the configuration in effect: every key, defaults included, as TOML.
    Show {
        #[arg(long, short)]
        config: PathBuf,
        /// Only the keys the file sets to something else than the default.
        #[arg(long)]
        non_default: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, log_format } => run(config, log_format),
        Command::CheckConfig { config }
        | Command::Config {
            command: ConfigCommand::Check { config },
        } => mailwarden::admin::config_cli::check(&config),
        Command::Config {
            command:
                ConfigCommand::Show {
                    config,
                    non_default,
                },
        } => mailwarden::admin::config_cli::show(&config, non_default),
        Command::Reload { config } => mailwarden::admin::reload_cli::run(&config),
        Command::Check {
            config,
            ip,
            helo,
            mail_from,
            rcpt,
            role,
            json,
            message,
        } => mailwarden::check::run(&mailwarden::check::Args {
            config,
            ip,
            helo,
            mail_from,
            rcpt,
            role,
            json,
            message,
        }),
        Command::Quarantine { config, command } => {
            mailwarden::admin::quarantine_cli::run(&config, &command)
        }
        Command::Accounts { config, command } => {
            mailwarden::admin::accounts_cli::run(&config, &command)
        }
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
        let server = match Server::bind_reloadable(config, &path, token).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, config = %path.display(), "cannot start");
                return ExitCode::from(1);
            }
        };
        let left = server.run().await;
        tracing::info!(unfinished_sessions = left, "stopped");
        ExitCode::SUCCESS
    })
}
