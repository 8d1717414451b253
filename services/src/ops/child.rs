//! `callmeback serve` as a child process of a benchmark (so the benchmark measures it from
//! outside, as a client and a telephone network would): a database and stream of its own, the
//! child started and stopped, its users registered and granted credits, a persona, the calls
//! placed through the API; and what `/proc` says of a process.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cmb_domain::wallet::{Wallet, WalletCommand};
use cmb_domain::{Actor, CommandContext};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::backbone::store::EventStore;
use crate::config::Config;

/// Why a benchmark that drives `serve` as a child stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("starting serve or a simulator")]
    Io(#[from] std::io::Error),
    #[error("a request to serve")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Backbone(#[from] crate::backbone::ConnectError),
    #[error("serve did not come up in 600 s (see {})", .log.display())]
    ServeTimedOut { log: PathBuf },
    #[error("serve exited ({status}); see {}", .log.display())]
    ServeExited {
        status: std::process::ExitStatus,
        log: PathBuf,
    },
    /// Serve answered, but not what the benchmark needs: what it asked, and the answer.
    #[error("{what}: {answer}")]
    Refused { what: String, answer: String },
    /// `bench voice --twilio-apart`: its Twilio simulator did not start.
    #[error("callmeback sim twilio: {what} (see {})", .log.display())]
    TwilioApart { what: &'static str, log: PathBuf },
    #[error("granting {user} credits")]
    Grant {
        user: String,
        #[source]
        source: crate::backbone::store::CommandError<cmb_domain::wallet::WalletError>,
    },
}

/// `base` on a database and stream of a benchmark's own, emptied first: `kind` (`voice`,
/// `calls`) and `n` (its number of calls, so runs of several sizes do not meet) name them.
pub async fn isolated(base: &Config, kind: &str, n: u32) -> Config {
    let mut config = base.clone();
    config.database_url = crate::ops::bench::with_database(
        &config.database_url,
        &format!("callmeback_bench_{kind}_{n}"),
    );
    config.stream.stream = format!("CMB_BENCH_{}_{n}", kind.to_uppercase());
    config.stream.subject_prefix = format!("cmb.bench.{kind}{n}");
    config.consumer_prefix = format!("cmbb{}{n}", &kind[..1]);
    drop_isolated(&config).await;
    config
}

/// Drops the database and deletes the stream of an [`isolated`] configuration (what is not
/// there is not missed).
pub async fn drop_isolated(config: &Config) {
    use sqlx::migrate::MigrateDatabase;
    let _ = sqlx::Postgres::force_drop_database(&config.database_url).await;
    if let Ok(client) = async_nats::connect(&config.nats_url).await {
        let _ = async_nats::jetstream::new(client)
            .delete_stream(&config.stream.stream)
            .await;
    }
}

/// The HTTP client of a benchmark's users: generous timeouts (the machine is loaded), and a
/// pool as large as its crowd.
pub fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(1024)
        .build()
}

/// Who a benchmark's users are: `{kind}{i}@example.com`, calling from `10.<subnet>.x.y`
/// (through `X-Forwarded-For`, so each has its own rate limits), phones `+1555<i:06><digit>`.
pub struct Crowd<'a> {
    pub kind: &'a str,
    pub subnet: u8,
    pub phone_digit: u8,
    /// Credits granted to each.
    pub credits: i64,
}

/// What [`register_users`] made.
pub struct Users {
    /// A bearer token per user.
    pub tokens: Vec<String>,
    /// Registrations answered 5xx.
    pub server_errors: u64,
}

pub struct Serve {
    pub process: tokio::process::Child,
    pub pid: u32,
    pub base_url: String,
    pub log: PathBuf,
}

/// Starts `serve` on `config`'s database and stream, on a free loopback port, with `env` added
/// (the providers' URLs, …), its log in `$TMPDIR/<log_name>.log`; waits until `/healthz`
/// answers (600 s at most: under valgrind it starts slowly).
pub async fn spawn_serve(
    config: &Config,
    env: &[(&str, String)],
    log_name: &str,
) -> Result<Serve, BenchError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let base_url = format!("http://127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("{log_name}.log"));
    // `CMB_BENCH_SERVE_PREFIX` runs serve under another program, e.g. `valgrind
    // --tool=callgrind --instr-atstart=no` to count its instructions (see `bench voice`).
    let prefix: Vec<String> = std::env::var("CMB_BENCH_SERVE_PREFIX")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut command = match prefix.split_first() {
        Some((program, args)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(args).arg(std::env::current_exe()?);
            c
        }
        None => tokio::process::Command::new(std::env::current_exe()?),
    };
    command
        .arg("serve")
        .env("DATABASE_URL", &config.database_url)
        .env("NATS_URL", &config.nats_url)
        .env("NATS_STREAM", &config.stream.stream)
        .env("NATS_SUBJECT_PREFIX", &config.stream.subject_prefix)
        .env("NATS_CONSUMER_PREFIX", &config.consumer_prefix)
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("PUBLIC_BASE_URL", &base_url)
        // The users register from addresses of their own (X-Forwarded-For, believed from
        // this machine: the bench stands in for a proxy).
        .env("TRUSTED_PROXIES", "127.0.0.1,::1")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("LOG_FORMAT", "json");
    for (k, v) in env {
        command.env(k, v);
    }
    let mut process = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()?;
    let pid = process.id().unwrap_or(0);
    eprintln!("serve (pid {pid}) logs to {}", log.display());
    let http = reqwest::Client::new();
    let up = Instant::now();
    loop {
        let ready = http.get(format!("{base_url}/healthz")).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if up.elapsed() > Duration::from_secs(600) {
            return Err(BenchError::ServeTimedOut { log });
        }
        if let Some(status) = process.try_wait()? {
            return Err(BenchError::ServeExited { status, log });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Serve {
        process,
        pid,
        base_url,
        log,
    })
}

impl Serve {
    /// Kills the child and waits for it.
    pub async fn stop(mut self) {
        let _ = self.process.start_kill();
        let _ = self.process.wait().await;
    }
}

/// Registers `n` users of `crowd` through `serve`'s API (eight at a time) and grants each its
/// credits through the command path, as an operator would.
pub async fn register_users(
    http: &reqwest::Client,
    serve: &Serve,
    store: &EventStore,
    n: u32,
    crowd: &Crowd<'_>,
) -> Result<Users, BenchError> {
    eprintln!("registering {n} users…");
    let server_errors = AtomicU64::new(0);
    let reference = format!("bench-{}", crowd.kind);
    let registered: Vec<Result<String, BenchError>> = futures::stream::iter(0..n)
        .map(|i| {
            let (server_errors, reference) = (&server_errors, &reference);
            async move {
                let response = http
                    .post(format!("{}/api/auth/register", serve.base_url))
                    .header(
                        "x-forwarded-for",
                        format!("10.{}.{}.{}", crowd.subnet, i / 250, i % 250 + 1),
                    )
                    .json(&json!({
                        "name": "Bench",
                        "email": format!("{}{i}@example.com", crowd.kind),
                        "password": "Bench!pass1",
                        "phone": format!("+1555{i:06}{}", crowd.phone_digit),
                    }))
                    .send()
                    .await?;
                if response.status().is_server_error() {
                    server_errors.fetch_add(1, Ordering::Relaxed);
                }
                let reply: Value = response.json().await?;
                let token = reply["token"]
                    .as_str()
                    .ok_or_else(|| BenchError::Refused {
                        what: "register".into(),
                        answer: reply.to_string(),
                    })?
                    .to_string();
                let id = reply["user"]["id"].as_str().unwrap_or_default();
                store
                    .execute::<Wallet>(
                        id,
                        WalletCommand::Grant {
                            credits: crowd.credits,
                            reason: "bench".into(),
                            reference: reference.clone(),
                        },
                        &CommandContext::for_request(reference.as_str(), Actor::System),
                    )
                    .await
                    .map_err(|source| BenchError::Grant {
                        user: id.to_string(),
                        source,
                    })?;
                Ok(token)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    Ok(Users {
        tokens: registered.into_iter().collect::<Result<_, _>>()?,
        server_errors: server_errors.load(Ordering::Relaxed),
    })
}

/// Creates a persona (`body` as `POST /api/personas` takes it) as the user of `token`; its id.
pub async fn create_persona(
    http: &reqwest::Client,
    serve: &Serve,
    token: &str,
    body: &Value,
) -> Result<String, BenchError> {
    let persona: Value = http
        .post(format!("{}/api/personas", serve.base_url))
        .bearer_auth(token)
        .json(body)
        .send()
        .await?
        .json()
        .await?;
    Ok(persona["persona"]["id"]
        .as_str()
        .ok_or_else(|| BenchError::Refused {
            what: "persona".into(),
            answer: persona.to_string(),
        })?
        .to_string())
}

/// Every user of `tokens` asks for a 2-minute call from `persona_id`, paid with credits, all at
/// once; the status of each answer (0: no answer).
pub async fn place_calls(
    http: &reqwest::Client,
    serve: &Serve,
    tokens: &[String],
    persona_id: &str,
) -> Vec<u16> {
    eprintln!("placing {} calls at once…", tokens.len());
    futures::future::join_all(tokens.iter().map(|token| {
        let request = http
            .post(format!("{}/api/call", serve.base_url))
            .bearer_auth(token)
            .json(&json!({ "persona_id": persona_id, "use_credits": true, "duration": 2 }));
        async move { request.send().await.map_or(0, |r| r.status().as_u16()) }
    }))
    .await
}

/// The 1, 5 and 15 minute load averages of the machine.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// User + system CPU time of process `pid` (`self` for this one), in milliseconds (Linux).
pub fn cpu_ms(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command name: state is field 0, utime 11, stime 12 (clock ticks of 10 ms).
    (ticks(11) + ticks(12)) * 10.0
}

/// Resident memory of process `pid` (`self` for this one), in MiB (Linux).
pub fn rss_mib(pid: &str) -> f64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// serve run under callgrind: its `--callgrind-out-file` and pid, for `callgrind_control`.
pub struct Callgrind {
    pid: String,
    out_file: String,
}

impl Callgrind {
    pub fn from_env(pid: &str) -> Option<Callgrind> {
        let prefix = std::env::var("CMB_BENCH_SERVE_PREFIX").ok()?;
        if !prefix.contains("callgrind") {
            return None;
        }
        let out_file = prefix
            .split_whitespace()
            .find_map(|a| a.strip_prefix("--callgrind-out-file="))
            .unwrap_or("callgrind.out")
            .to_string();
        Some(Callgrind {
            pid: pid.to_string(),
            out_file,
        })
    }

    pub fn control(&self, flag: &str, value: &str) {
        let mut c = std::process::Command::new("callgrind_control");
        c.arg(flag);
        if !value.is_empty() {
            c.arg(value);
        }
        let ran = c.arg(&self.pid).output();
        if let Err(e) = ran {
            eprintln!("callgrind_control {flag} {value}: {e}");
        }
    }

    /// Instructions in the first dump (`<out file>.1`), the window's.
    pub fn instructions(&self) -> Option<u64> {
        let path = format!("{}.1", self.out_file.replace("%p", &self.pid));
        for _ in 0..60 {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Some(n) = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("summary:")
                            .or_else(|| l.strip_prefix("totals:"))
                    })
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                {
                    return Some(n);
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("no callgrind dump at {path}");
        None
    }
}
