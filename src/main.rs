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
    /// Validate a configuration file and exit (0: valid); the old name of `config check`.
    CheckConfig,
    /// The configuration: check it, show what is in effect.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Ask the running proxy (`[process] pid_file`) to reload its configuration, and
    /// report the outcome (0 reloaded, 1 failed: running configuration kept, 2 reloaded
    /// but some changes need a restart, 3 no answer).
    Reload,
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
        /// What the outbound stage found (submission; offline there is no account
        /// state): none, alert, defer, hold, freeze, reject, or frozen.
        #[arg(long)]
        outbound: Option<String>,
        /// A flag the outbound stage raised (repeatable): outbound-burst,
        /// outbound-from-mismatch.
        #[arg(long = "outbound-flag")]
        outbound_flag: Vec<String>,
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
    /// Outbound DKIM signing keys: make one, check its DNS record.
    Dkim {
        #[command(subcommand)]
        command: mailwarden::signing::cli::DkimCommand,
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

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and exit (0: valid).
    Check,
    /// Print the configuration in effect: every key, defaults included, as TOML.
    Show {
        /// Only the keys the file sets to something else than the default.
        #[arg(long)]
        non_default: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Resolved only by the subcommands that read a configuration (make-cert does not).
    let given = cli.config;
    let config = move || mailwarden::service::config_path::resolve(given);
    match cli.command {
        Command::Run { log_format } => with_config(config(), |c| run(c, log_format)),
        Command::CheckConfig
        | Command::Config {
            command: ConfigCommand::Check,
        } => with_config(config(), |c| mailwarden::admin::config_cli::check(&c)),
        Command::Config {
            command: ConfigCommand::Show { non_default },
        } => with_config(config(), |c| {
            mailwarden::admin::config_cli::show(&c, non_default)
        }),
        Command::Reload => with_config(config(), |c| mailwarden::admin::reload_cli::run(&c)),
        Command::Check {
            ip,
            helo,
            mail_from,
            rcpt,
            role,
            json,
            outbound,
            outbound_flag,
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
                outbound,
                outbound_flags: outbound_flag,
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
        Command::Dkim { command } => mailwarden::signing::cli::run(config(), &command),
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
        // Also installs the SIGHUP handler (a full reload, see `server::reload`) and
        // writes `[process] pid_file`.
        let mut server = match Server::bind_reloadable(config, &path, token.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, config = %path.display(), "cannot start");
                return ExitCode::from(1);
            }
        };
        if let Err(e) = mailwarden::admin::http::start(&mut server, token.clone()).await {
            tracing::error!(error = %e, config = %path.display(), "cannot start");
            server.live().remove_pid_file();
            return ExitCode::from(1);
        }
        // Listeners are bound: tell systemd (Type=notify) we are up, and that we are
        // going down as soon as shutdown starts (it then waits TimeoutStopSec=, not the
        // start timeout, and shows "deactivating").
        mailwarden::service::sd_notify::ready();
        let stopping = token.clone();
        tokio::spawn(async move {
            stopping.cancelled().await;
            mailwarden::service::sd_notify::stopping();
        });
        let left = server.run().await;
        tracing::info!(unfinished_sessions = left, "stopped");
        ExitCode::SUCCESS
    })
}
