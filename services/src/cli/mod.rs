//! The command line: `serve`, `migrate`, `seed`, `events verify`, `projections …`,
//! `simulate`, `sim`, `bench …`; the analysts' `replay …` is in `replay`, `mcp` and
//! `analyst-token` in `analyst`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

mod analyst;
mod dlq;
mod replay;

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
    /// Analysts: read the event log (JetStream or Postgres), print it or reconcile costs.
    Replay {
        #[command(flatten)]
        range: Box<replay::ReplayRange>,
        #[command(subcommand)]
        command: replay::ReplayCommand,
    },
    /// Analysts: the MCP server (tools over the event log, read only) on stdin/stdout, for an
    /// assistant or notebook that starts it.
    Mcp(analyst::McpArgs),
    /// Analysts' tokens for `/mcp` on `serve`: create (printed once), revoke, list.
    AnalystToken {
        #[command(subcommand)]
        command: analyst::TokenCommand,
    },
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
    /// A realistic history through the real command path, fast: users, credits, calls of
    /// varied lengths with holds, failures, costs, settlements and refunds. Backdated over
    /// the days when no other instance is publishing (see the README).
    Simulate {
        #[arg(long, default_value_t = 30)]
        days: u32,
        #[arg(long, default_value_t = 20)]
        calls_per_day: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Then run the publisher until every event is on the stream (without it, `serve`
        /// publishes them when it runs).
        #[arg(long)]
        publish: bool,
    },
    /// Events set aside after consumers kept failing on them (dead letters).
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Personal data in the event log: seal what an older build wrote in clear.
    Privacy {
        #[command(subcommand)]
        command: crate::ops::privacy::PrivacyCommand,
    },
    /// Run the providers' simulators as one shared service, for several `serve` instances
    /// (each simulator keeps state — Stripe's payment intents, Twilio's calls — that every
    /// instance must see). Prints the `*_BASE_URL` settings that point an instance at them.
    Sim {
        /// `all`, or some of: twilio, stripe, deepgram, cerebras, openai, elevenlabs.
        #[arg(default_value = "all", value_delimiter = ',')]
        which: Vec<String>,
        /// The first simulator's address; the others take the next ports (twilio, stripe,
        /// deepgram, cerebras, openai, elevenlabs). Port 0: each a free port.
        #[arg(long, default_value = "127.0.0.1:9100")]
        addr: std::net::SocketAddr,
        /// Where Stripe's webhooks go (the instances' load balancer); default
        /// `$PUBLIC_BASE_URL/api/stripe/webhook`.
        #[arg(long)]
        stripe_webhook_url: Option<String>,
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
    /// Concurrent conversations measured from outside: `serve` runs as a child, this process
    /// plays Twilio (a caller who talks over the persona), Deepgram, the LLMs and ElevenLabs.
    /// Reply latency (and net of the simulated delays), barge-in → clear, outbound jitter, and
    /// serve's CPU and memory per call, for each N of `--calls`.
    #[cfg(feature = "sims")]
    Voice {
        /// Numbers of concurrent calls, comma-separated, one run each.
        #[arg(long, default_value = "100,200,500", value_delimiter = ',')]
        calls: Vec<u32>,
        /// How long each simulated call lasts.
        #[arg(long, default_value_t = 16)]
        seconds: u32,
        /// Give the persona documents of about this many passages (persona knowledge; the
        /// callers then ask about them) and report the retrieval on each turn's path.
        #[arg(long, default_value_t = 0)]
        knowledge: usize,
        /// Run the Twilio simulator (the callers, and what they measure) as a process of its
        /// own, `callmeback sim twilio`, instead of in the bench process beside the other
        /// simulators.
        #[arg(long)]
        twilio_apart: bool,
    },
    /// N concurrent calls through the real HTTP API against the simulators, measured from
    /// outside: this process plays Twilio (REST, webhooks, media streams) and the users,
    /// `callmeback serve` runs as a child. Calls placed, answered, sessions started/failed,
    /// 5xx answers, projection lag p50/p99.
    #[cfg(feature = "sims")]
    Calls {
        #[arg(long, default_value_t = 200)]
        calls: u32,
        /// How long each answered call lasts.
        #[arg(long, default_value_t = 12)]
        seconds: u32,
    },
    /// Persona knowledge's retrieval per caller turn, in process over synthetic passages:
    /// p50/p99 and CPU time per retrieval (also printed at the end of `bench voice`).
    Knowledge {
        /// Passage counts, comma-separated.
        #[arg(long, default_value = "100,5000", value_delimiter = ',')]
        passages: Vec<usize>,
        #[arg(long, default_value_t = 2_000)]
        retrievals: usize,
        /// Vector sizes, comma-separated (1,536: OpenAI's `text-embedding-3-small`; 256: the
        /// embeddings simulator's, as in `bench voice`).
        #[arg(long, default_value = "256,1536", value_delimiter = ',')]
        dims: Vec<usize>,
    },
    /// Writes N events of the real shapes (thirty days of calls) to a stream of its own
    /// (`<stream>_BENCH_REPLAY`) or an event table of its own (`<db>_bench_replay`), both
    /// recreated, then replays and reconciles them as `replay reconcile` does: events per
    /// second, and the report checked against the events folded one by one.
    Replay {
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// `nats` (parallel ordered consumers) or `postgres` (the reconcile in SQL).
        #[arg(long, default_value = "nats")]
        source: String,
        /// Consumers of the call subjects (`nats`), each on a connection of its own.
        #[arg(long, default_value_t = crate::ops::reconcile::stream::PARTITIONS)]
        partitions: u64,
        /// Leaves the bench's stream or database in place at the end (to study the queries).
        #[arg(long)]
        keep: bool,
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
            if let Err(missing) = config.check_run_mode() {
                eprintln!(
                    "callmeback serve: production mode (a real provider key or \
                     CMB_ENV=production) refuses to start without:"
                );
                for line in missing.0 {
                    eprintln!("configuration error: {line}");
                }
                return Ok(ExitCode::from(2));
            }
            let running = crate::app::start(config).await?;
            wait_for_signal().await;
            tracing::info!("shutting down");
            running.stop().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Seed => {
            let b = crate::backbone::connect(&config, 4).await?;
            let store = crate::backbone::store::EventStore::new(b.pool.clone());
            let demo = crate::ops::seed::demo(&store).await?;
            println!("system personas: brad_001, sarah_001, alex_001");
            println!("demo user:       {} ({})", demo.email, demo.user_id);
            println!("password:        {}", crate::ops::seed::DEMO_PASSWORD);
            println!("credits:         {}", demo.credits);
            println!(
                "sign in:         POST /api/auth/login {{\"email\": \"{}\", \"password\": \"…\"}}",
                demo.email
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay { range, command } => Ok(replay::run(config, *range, command).await?),
        Command::Mcp(args) => analyst::mcp(config, args).await,
        Command::AnalystToken { command } => analyst::token(config, command).await,
        Command::Sim {
            which,
            addr,
            stripe_webhook_url,
        } => sim(&config, which, addr, stripe_webhook_url).await,
        Command::Privacy { command } => {
            crate::ops::privacy::run(config, command).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { command } => {
            let b = crate::backbone::connect(&config, 2).await?;
            dlq::run(&b.pool, command).await
        }
        Command::Simulate {
            days,
            calls_per_day,
            seed,
            publish,
        } => {
            let summary = crate::ops::simulate::run(
                config,
                crate::ops::simulate::Options {
                    days,
                    calls_per_day,
                    seed,
                    publish,
                },
            )
            .await?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let pool = crate::backbone::db::connect(&config.database_url, 2).await?;
            crate::backbone::db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Events {
            command: EventsCommand::Verify { dry_run },
        } => {
            let b = crate::backbone::connect(&config, 4).await?;
            let report = crate::backbone::verify::verify(&b.pool, &b.js, &config.stream, !dry_run)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
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
            if !report.unrepairable.is_empty() {
                println!(
                    "not repairable in order:                {}",
                    report.unrepairable.len()
                );
                for id in report.unrepairable.iter().take(20) {
                    println!("  {id}");
                }
                eprintln!("{}", crate::backbone::verify::UNREPAIRABLE_HINT);
            }
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
            let b = crate::backbone::connect(&config, 4).await?;
            use std::io::IsTerminal;
            let applied = crate::backbone::projector::rebuild(
                &b.pool,
                &b.js,
                &config.stream,
                projection.as_ref(),
                std::io::stderr().is_terminal(),
            )
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
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
            crate::ops::bench::events(config, commands, concurrency, aggregates).await?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "sims")]
        Command::Bench {
            command:
                BenchCommand::Voice {
                    calls,
                    seconds,
                    knowledge,
                    twilio_apart,
                },
        } => {
            let mut rows = Vec::new();
            for n in calls {
                let f = crate::ops::bench_voice::run(&config, n, seconds, knowledge, twilio_apart)
                    .await?;
                let cpu = f
                    .cpu_pct_per_call
                    .map_or("not sampled".into(), |c| format!("{c:.3} % per call"));
                eprintln!(
                    "{n} calls: net p99 {:.1} ms, jitter p99 {:.1} ms, CPU {cpu}",
                    f.net_p99_ms, f.jitter_p99_ms
                );
                rows.push(f);
            }
            crate::ops::bench_voice::print(&rows);
            knowledge_bench(&[100, 5_000], &[256, 1536], 2_000);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command:
                BenchCommand::Knowledge {
                    passages,
                    retrievals,
                    dims,
                },
        } => {
            knowledge_bench(&passages, &dims, retrievals);
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "sims")]
        Command::Bench {
            command: BenchCommand::Calls { calls, seconds },
        } => {
            let figures = crate::ops::bench_calls::run(&config, calls, seconds).await?;
            crate::ops::bench_calls::print(&figures);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command:
                BenchCommand::Replay {
                    events,
                    source,
                    partitions,
                    keep,
                },
        } => {
            crate::ops::bench_replay::replay(config, events, &source, partitions, keep).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn knowledge_bench(passages: &[usize], dims: &[usize], retrievals: usize) {
    let rows: Vec<_> = dims
        .iter()
        .flat_map(|d| passages.iter().map(move |n| (*n, *d)))
        .map(|(n, d)| crate::ops::bench_knowledge::measure(n, d, retrievals))
        .collect();
    crate::ops::bench_knowledge::print(&rows);
}

#[cfg(feature = "sims")]
async fn sim(
    config: &Config,
    which: Vec<String>,
    addr: std::net::SocketAddr,
    stripe_webhook_url: Option<String>,
) -> anyhow::Result<ExitCode> {
    use crate::serve::simulators;
    let mut chosen = Vec::new();
    for name in &which {
        match simulators::ALL.iter().find(|n| **n == name.as_str()) {
            Some(n) => chosen.push(*n),
            None if name == "all" => chosen.extend(simulators::ALL),
            None => anyhow::bail!(
                "unknown simulator {name:?}: all, or some of {}",
                simulators::ALL.join(", ")
            ),
        }
    }
    let webhook = stripe_webhook_url
        .unwrap_or_else(|| format!("{}/api/stripe/webhook", config.public_base_url));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let served =
        simulators::serve_shared(config, &chosen, addr, &webhook, &shutdown, &tasks).await?;
    for s in &served {
        tracing::info!(simulator = s.name, url = %s.url, "simulator listening");
        println!("{}={}", s.variable, s.url);
    }
    // Whoever started us reads the settings above, then waits for this line.
    println!("# simulators ready; Stripe webhooks to {webhook}");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    wait_for_signal().await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "sims"))]
async fn sim(
    _: &Config,
    _: Vec<String>,
    _: std::net::SocketAddr,
    _: Option<String>,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("this build has no simulators (build with the `sims` feature)")
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
