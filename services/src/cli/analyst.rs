//! The analysts' commands beside `replay`: `mcp` (the MCP server on stdin/stdout, for an
//! assistant or notebook that starts it) and `analyst-token` (tokens for `/mcp` on `serve`).

use std::io::Write as _;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;
use crate::ops::mcp::log::{read_only_pool, Log, Source};

#[derive(clap::Args)]
pub struct McpArgs {
    /// Where the tools read the log: `postgres` (the event store, one consistent snapshot per
    /// question) or `nats` (the stream, as `replay --source nats`).
    #[arg(long, default_value = "postgres")]
    source: Source,
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// A new token for NAME (an analyst, a notebook): printed once, stored hashed.
    Create { name: String },
    /// Revoke NAME's token: refused at once by every instance.
    Revoke { name: String },
    /// Every token's name, creation and revocation (never the token).
    List {
        #[arg(long)]
        json: bool,
    },
}

/// `callmeback mcp`: serves the tools over stdio until the client hangs up. Logs go to
/// stderr; stdout carries only the protocol.
pub async fn mcp(config: Config, args: McpArgs) -> anyhow::Result<ExitCode> {
    let b = crate::backbone::connect(&config, 2).await?;
    let log = Log {
        pool: read_only_pool(&b.pool, 4),
        js: b.js.clone(),
        stream: config.stream.clone(),
        nats_url: config.nats_url.clone(),
        source: args.source,
    };
    b.pool.close().await;
    crate::ops::mcp::serve_stdio(log).await?;
    Ok(ExitCode::SUCCESS)
}

/// `callmeback analyst-token create|revoke|list`.
pub async fn token(config: Config, command: TokenCommand) -> anyhow::Result<ExitCode> {
    use crate::usecases::analysts;
    let pool = crate::backbone::db::connect(&config.database_url, 2).await?;
    crate::backbone::db::migrate(&pool).await?;
    let mut out = std::io::stdout().lock();
    match command {
        TokenCommand::Create { name } => {
            let token = analysts::create(&pool, &name).await?;
            writeln!(out, "{token}")?;
            eprintln!("analyst token for {name:?}: shown this once, stored only as a hash; send it as `Authorization: Bearer <token>` to /mcp");
        }
        TokenCommand::Revoke { name } => {
            analysts::revoke(&pool, &name).await?;
            eprintln!("revoked {name:?}");
        }
        TokenCommand::List { json } => {
            let tokens = analysts::list(&pool).await?;
            if json {
                serde_json::to_writer(&mut out, &tokens)?;
                writeln!(out)?;
            } else {
                for t in tokens {
                    let state = match t.revoked_at {
                        Some(at) => format!("revoked {}", at.to_rfc3339()),
                        None => "in force".into(),
                    };
                    writeln!(
                        out,
                        "{}\tcreated {}\t{state}",
                        t.name,
                        t.created_at.to_rfc3339()
                    )?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
