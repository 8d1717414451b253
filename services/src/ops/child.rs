//! `callmeback serve` as a child process of a benchmark (so the benchmark measures it from
//! outside, as a client and a telephone network would), and what `/proc` says of a process.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::config::Config;

pub struct Serve {
    pub process: tokio::process::Child,
    pub pid: u32,
    pub base_url: String,
    pub log: PathBuf,
}

/// Starts `serve` on `config`'s database and stream, on a free loopback port, with `env` added
/// (the providers' URLs, …), its log in `$TMPDIR/<log_name>.log`; waits until `/healthz`
/// answers (120 s at most).
pub async fn spawn_serve(
    config: &Config,
    env: &[(&str, String)],
    log_name: &str,
) -> anyhow::Result<Serve> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let base_url = format!("http://127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("{log_name}.log"));
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
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
        if up.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("serve did not come up in 120 s (see {})", log.display());
        }
        if let Some(status) = process.try_wait()? {
            anyhow::bail!("serve exited ({status}); see {}", log.display());
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
