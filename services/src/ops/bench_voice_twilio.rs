//! The Twilio side of `bench voice`: the simulator that places the calls, plays the callers
//! and times what they notice — in the bench process (the default), or apart
//! (`--twilio-apart`): `callmeback sim twilio` as a process of its own, which the bench starts
//! with the same settings and reads over HTTP (`/_sim/calls`, `/_sim/observations`), so the
//! measuring side shares its process with nothing else (not the bench's Deepgram, LLM and
//! ElevenLabs simulators, nor its users).

use std::process::Stdio;
use std::time::Duration;

use cmb_sims::twilio::{CallState, Observations, Settings, TwilioSim};

use crate::ops::child::BenchError;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub enum Twilio {
    Here(TwilioSim),
    Apart {
        process: Box<tokio::process::Child>,
        pid: u32,
        url: String,
        http: reqwest::Client,
    },
}

impl Twilio {
    /// Starts the simulator with `vars` (`SIM_TWILIO_*`, `TWILIO_ACCOUNT_SID`,
    /// `TWILIO_AUTH_TOKEN`): here, served until `shutdown`, or apart as a child process.
    /// Returns it and its base URL.
    pub async fn start(
        apart: bool,
        vars: &[(&str, String)],
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<(Twilio, String), BenchError> {
        if !apart {
            let get = |k: &str| {
                vars.iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| v.clone())
            };
            let settings = Settings::from_lookup(&get);
            let sim = TwilioSim::new(settings);
            let url = cmb_sims::serve("twilio", sim.router(), shutdown.clone(), tasks).await?;
            return Ok((Twilio::Here(sim), url));
        }
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command
            .args(["sim", "twilio", "--addr", "127.0.0.1:0"])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        for (k, v) in vars {
            command.env(k, v);
        }
        let log = std::env::temp_dir().join("callmeback-bench-voice-twilio.log");
        let mut process = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        let pid = process.id().unwrap_or(0);
        let stdout = process.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut url = None;
        let read = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(u) = line.strip_prefix("TWILIO_BASE_URL=") {
                    url = Some(u.to_string());
                }
                if line.starts_with("# simulators ready") {
                    break;
                }
            }
            Ok::<_, std::io::Error>(())
        };
        let started = tokio::time::timeout(Duration::from_secs(60), read).await;
        let apart = |what| BenchError::TwilioApart {
            what,
            log: log.clone(),
        };
        match started {
            Err(_) => return Err(apart("did not start in 60 s")),
            Ok(read) => read?,
        }
        let Some(url) = url else {
            return Err(apart("printed no TWILIO_BASE_URL"));
        };
        eprintln!(
            "the Twilio simulator runs apart (pid {pid}, {url}), logs to {}",
            log.display()
        );
        Ok((
            Twilio::Apart {
                process: Box::new(process),
                pid,
                url: url.clone(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()?,
            },
            url,
        ))
    }

    /// The process measuring the calls when it is not this one.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Twilio::Here(_) => None,
            Twilio::Apart { pid, .. } => Some(*pid),
        }
    }

    /// Every call created so far (empty when the simulator apart does not answer).
    pub async fn calls(&self) -> Vec<CallState> {
        match self {
            Twilio::Here(sim) => sim.calls().into_iter().map(CallState::from).collect(),
            Twilio::Apart { url, http, .. } => {
                match http.get(format!("{url}/_sim/calls")).send().await {
                    Ok(r) => r.json().await.unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!(error = %e, "the Twilio simulator apart did not answer");
                        Vec::new()
                    }
                }
            }
        }
    }

    /// What the callers measured on every stream that ended.
    pub async fn observations(&self) -> Result<Observations, BenchError> {
        Ok(match self {
            Twilio::Here(sim) => Observations::merge(sim.observations()),
            Twilio::Apart { url, http, .. } => {
                http.get(format!("{url}/_sim/observations"))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?
            }
        })
    }

    /// Stops the simulator apart (the one here stops with the bench's shutdown).
    pub async fn stop(self) {
        if let Twilio::Apart { mut process, .. } = self {
            let _ = process.start_kill();
            let _ = process.wait().await;
        }
    }
}
