//! The command line: `serve`, `migrate`, `events verify`, `projections rebuild`, `bench …`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "callmeback",
    version,
    about = "Call Me Back: AI personas that call you back"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API and every worker (creates the database and applies migrations first).
    Serve,
    /// Create the database if missing and apply pending migrations, then exit.
    Migrate,
    /// Create (idempotently) the system personas and a demo user with 100 credits; print its
    /// sign-in.
    Seed,
    /// Operate on the event log.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Operate on read models.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Benchmarks (figures as a table, then one line of JSON).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Compare the JetStream stream with the event store and republish what is missing.
    Verify {
        /// Only report; republish nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// List the projections.
    List,
    /// Rebuild a projection from the first event of the stream.
    Rebuild { name: String },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Concurrent commands through the real command path: committed and published per
    /// second, and publication lag. Uses its own database (`<name>_bench`) and stream.
    Events {
        #[arg(long, default_value_t = 20_000)]
        commands: u64,
        #[arg(long, default_value_t = 16)]
        concurrency: u64,
        #[arg(long, default_value_t = 2_000)]
        aggregates: u64,
    },
}

pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init_logs(config.log_format);
    match run(cli.command, config).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve => {
            if config.jwt_secret.expose() == crate::config::DEVELOPMENT_JWT_SECRET {
                tracing::warn!(
                    "JWT_SECRET is not set: tokens are signed with the development secret"
                );
            }
            let running = crate::app::start(config).await?;
            wait_for_signal().await;
            tracing::info!("shutting down");
            running.stop().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Seed => {
            let b = crate::app::backbone(&config, 4).await?;
            let store = crate::store::EventStore::new(b.pool.clone());
            let demo = crate::seed::demo(&store).await?;
            println!("system personas: brad_001, sarah_001, alex_001");
            println!("demo user:       {} ({})", demo.email, demo.user_id);
            println!("password:        {}", crate::seed::DEMO_PASSWORD);
            println!("credits:         {}", demo.credits);
            println!(
                "sign in:         POST /api/auth/login {{\"email\": \"{}\", \"password\": \"…\"}}",
                demo.email
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let pool = crate::db::connect(&config.database_url, 2).await?;
            crate::db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Events {
            command: EventsCommand::Verify { dry_run },
        } => {
            let b = crate::app::backbone(&config, 4).await?;
            let report = crate::outbox::verify(&b.pool, &b.js, &config.stream, !dry_run)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "events in the store (published so far): {}",
                report.in_store
            );
            println!(
                "events in the stream:                   {}",
                report.in_stream
            );
            println!(
                "missing from the stream:                {}",
                report.missing.len()
            );
            for id in report.missing.iter().take(20) {
                println!("  {id}");
            }
            println!(
                "republished:                            {}",
                report.republished
            );
            Ok(
                if report.missing.is_empty() || report.republished as usize == report.missing.len()
                {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
        Command::Projections {
            command: ProjectionsCommand::List,
        } => {
            for p in cmb_projections::all() {
                println!("{}\t{}", p.name(), p.tables().join(","));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Projections {
            command: ProjectionsCommand::Rebuild { name },
        } => {
            let Some(projection) = cmb_projections::by_name(&name) else {
                let names: Vec<_> = cmb_projections::all().iter().map(|p| p.name()).collect();
                anyhow::bail!("no projection {name:?}; there are: {}", names.join(", "));
            };
            let b = crate::app::backbone(&config, 4).await?;
            use std::io::IsTerminal;
            let applied = crate::projector::rebuild(
                &b.pool,
                &b.js,
                &config.stream,
                projection.as_ref(),
                std::io::stderr().is_terminal(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("rebuilt {name}: {applied} events applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command:
                BenchCommand::Events {
                    commands,
                    concurrency,
                    aggregates,
                },
        } => {
            crate::bench::events(config, commands, concurrency, aggregates).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
