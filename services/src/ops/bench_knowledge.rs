//! `bench knowledge` (and the closing table of `bench voice`): what persona knowledge adds to a
//! caller's turn. Builds a call's in-process index over N synthetic passages (about 200 words
//! each, vectors of 1,536 dimensions like OpenAI's `text-embedding-3-small`, or 256 like the
//! embeddings simulator's) and times retrievals of caller-like utterances with their vectors,
//! one at a time on one thread: wall-clock p50/p99 per retrieval, and the thread's CPU time per
//! retrieval (p50/p99 and mean: the load-independent figures), from which the CPU share at 500
//! concurrent calls follows.

use std::time::Instant;

use cmb_domain::knowledge::rank::{KnowledgeIndex, PassageIn};

use crate::ops::child::BenchError;

/// Figures for one passage count.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub passages: usize,
    pub dims: usize,
    pub retrievals: usize,
    pub build_ms: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// The thread's CPU time per retrieval.
    pub cpu_p50_us: f64,
    pub cpu_p99_us: f64,
    pub cpu_us_per_retrieval: f64,
    /// CPU share of one core at 500 calls, each with a caller turn every 4 s.
    pub cores_at_500_calls: f64,
}

const VOCABULARY: usize = 6_000;
const STOP: &[&str] = &[
    "the", "and", "what", "how", "is", "my", "do", "you", "about", "a",
];

/// A deterministic generator (xorshift64*), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Zipf-like: small indexes much more often, as words in text.
    fn word(&mut self) -> String {
        let u = (self.next() % 1_000_000) as f64 / 1_000_000.0;
        let i = ((VOCABULARY as f64).powf(u) as usize).min(VOCABULARY - 1);
        format!("w{i}x")
    }
    fn vector(&mut self, dims: usize) -> Vec<f32> {
        (0..dims)
            .map(|_| (self.next() % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }
}

fn passages(n: usize, dims: usize, rng: &mut Rng) -> Vec<PassageIn> {
    (0..n)
        .map(|i| {
            let words: Vec<String> = (0..200)
                .map(|j| {
                    if j % 5 == 0 {
                        STOP[(rng.next() % STOP.len() as u64) as usize].to_string()
                    } else {
                        rng.word()
                    }
                })
                .collect();
            PassageIn {
                id: format!("doc{}:{}", i / 20, i % 20),
                document_title: format!("Document {}", i / 20),
                heading: Some(format!("Section {}", i % 20)),
                text: words.join(" "),
                tokens: 267,
                embedding: rng.vector(dims),
            }
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Times `retrievals` retrievals over `n` passages with vectors of `dims` dimensions.
pub fn measure(n: usize, dims: usize, retrievals: usize) -> Figures {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
    let corpus = passages(n, dims, &mut rng);
    let started = Instant::now();
    let index = KnowledgeIndex::new(corpus);
    let build_ms = started.elapsed().as_secs_f64() * 1000.0;
    let queries: Vec<(String, Vec<f32>)> = (0..retrievals)
        .map(|_| {
            let words: Vec<String> = (0..12)
                .map(|j| {
                    if j % 3 == 0 {
                        STOP[(rng.next() % STOP.len() as u64) as usize].to_string()
                    } else {
                        rng.word()
                    }
                })
                .collect();
            (words.join(" "), rng.vector(dims))
        })
        .collect();
    let mut times = Vec::with_capacity(retrievals);
    let mut cpu = Vec::with_capacity(retrievals);
    let mut found = 0usize;
    for (text, vector) in &queries {
        let t = Instant::now();
        let c = crate::telemetry::thread_cpu_ns();
        let hits = index.search(text, Some(vector), 3, 600);
        cpu.push(crate::telemetry::thread_cpu_ns().saturating_sub(c) as f64 / 1e3);
        times.push(t.elapsed().as_secs_f64() * 1e6);
        found += hits.len();
    }
    std::hint::black_box(found);
    times.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    let cpu_per = cpu.iter().sum::<f64>() / retrievals.max(1) as f64;
    Figures {
        passages: n,
        dims,
        retrievals,
        build_ms,
        p50_us: percentile(&times, 0.5),
        p99_us: percentile(&times, 0.99),
        max_us: times.last().copied().unwrap_or(0.0),
        cpu_p50_us: percentile(&cpu, 0.5),
        cpu_p99_us: percentile(&cpu, 0.99),
        cpu_us_per_retrieval: cpu_per,
        cores_at_500_calls: cpu_per * (500.0 / 4.0) / 1e6,
    }
}

pub fn print(rows: &[Figures]) {
    println!("knowledge retrieval per caller turn (in process, one thread):");
    println!(
        "{:>9} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>13} {:>14}",
        "passages",
        "dims",
        "retrievals",
        "build ms",
        "p50 µs",
        "p99 µs",
        "max µs",
        "CPU p50 µs",
        "CPU p99 µs",
        "CPU µs/turn",
        "cores@500calls"
    );
    for f in rows {
        println!(
            "{:>9} {:>5} {:>10} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11.1} {:>11.1} {:>13.1} {:>14.4}",
            f.passages,
            f.dims,
            f.retrievals,
            f.build_ms,
            f.p50_us,
            f.p99_us,
            f.max_us,
            f.cpu_p50_us,
            f.cpu_p99_us,
            f.cpu_us_per_retrieval,
            f.cores_at_500_calls
        );
    }
    println!("{}", serde_json::json!({ "knowledge_retrieval": rows }));
}

/// `bench voice --knowledge N`: the callers' questions (the Deepgram simulator's script, one
/// per turn), about what the persona's documents cover.
pub const QUESTIONS: &str = "how should I pace my first marathon|what do I eat before a long run|\
how much sleep do I need when I train hard|what if my knee hurts after a run|\
how do I keep the habit when work gets busy";

/// Real words the documents use among their made-up ones (the questions' subjects).
const TOPICS: &[&str] = &[
    "pace", "marathon", "eat", "long", "run", "sleep", "train", "hard", "knee", "hurts", "habit",
    "work", "busy", "rest", "week", "plan", "goal", "water", "stretch", "coach", "race", "mile",
];

/// A made-up word of four letters, consonant-vowel twice (short words let 5,000 passages fit
/// under the documents' character limit), Zipf-distributed; now and then one of [`TOPICS`].
fn short_word(rng: &mut Rng) -> String {
    const C: &[u8] = b"bdfgklmnprstvz";
    const V: &[u8] = b"aeiou";
    if rng.next().is_multiple_of(40) {
        return TOPICS[(rng.next() % TOPICS.len() as u64) as usize].to_string();
    }
    let n = C.len() * V.len() * C.len() * V.len();
    let u = (rng.next() % 1_000_000) as f64 / 1_000_000.0;
    let i = ((n as f64).powf(u) as usize).min(n - 1);
    let letters = [
        C[i % C.len()],
        V[i / C.len() % V.len()],
        C[i / (C.len() * V.len()) % C.len()],
        V[i / (C.len() * V.len() * C.len())],
    ];
    letters.iter().map(|b| char::from(*b)).collect()
}

/// Documents (at most [`cmb_domain::knowledge::MAX_DOCUMENTS`], each within the character
/// limit) that split into about `passages` passages: paragraphs of 30 words, six to a passage,
/// the next passage starting with the last paragraph of the one before.
pub fn documents(passages: usize) -> Vec<(String, String)> {
    use cmb_domain::knowledge::MAX_DOCUMENTS;
    let docs = passages.div_ceil(250).clamp(1, MAX_DOCUMENTS);
    let mut rng = Rng(0x5eed_cafe ^ passages as u64);
    (0..docs)
        .map(|d| {
            let mine = passages / docs + usize::from(d < passages % docs);
            let paragraphs = 5 * mine + 1;
            let text: Vec<String> = (0..paragraphs)
                .map(|_| {
                    (0..30)
                        .map(|_| short_word(&mut rng))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            (format!("Training notes {}", d + 1), text.join("\n\n"))
        })
        .collect()
}

/// Gives persona `persona_id` (of the user of `token`) the [`documents`] for `passages`, and
/// waits until they are indexed; returns the passages indexed.
pub async fn give_persona(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    persona_id: &str,
    passages: usize,
) -> Result<u64, BenchError> {
    let path = format!("{base_url}/api/personas/{persona_id}/knowledge");
    for (title, content) in documents(passages) {
        let r = http
            .post(&path)
            .bearer_auth(token)
            .json(&serde_json::json!({ "title": title, "format": "text", "content": content }))
            .send()
            .await?;
        if r.status().as_u16() != 202 {
            return Err(BenchError::Refused {
                what: format!("adding {title}"),
                answer: r.text().await?,
            });
        }
    }
    let deadline = Instant::now() + std::time::Duration::from_secs(900);
    loop {
        let list: serde_json::Value = http
            .get(&path)
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        let docs = list["documents"].as_array().cloned().unwrap_or_default();
        if let Some(failed) = docs.iter().find(|d| d["status"] == "failed") {
            return Err(BenchError::Refused {
                what: "a document failed to index".into(),
                answer: failed.to_string(),
            });
        }
        if !docs.is_empty() && docs.iter().all(|d| d["status"] == "indexed") {
            return Ok(docs.iter().filter_map(|d| d["passages"].as_u64()).sum());
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Refused {
                what: "documents not indexed in 15 minutes".into(),
                answer: list.to_string(),
            });
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// The persona's side of `bench voice --knowledge N`, from serve's own `TurnCompleted`
/// timings: the retrieval on each caller turn's path, and how often the caller's words had
/// been embedded in time.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct InCalls {
    pub passages: u64,
    pub turns: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// The thread's CPU time for it (serve's `knowledge_cpu_us`): the rest is waiting.
    pub cpu_p50_us: f64,
    pub cpu_p99_us: f64,
    /// Turns ranked with the caller's vector too, of `turns`.
    pub with_vector: usize,
    /// Turns whose passages were ranked ahead (off the turn's path), of `turns`.
    pub preranked: usize,
    /// Wall p50/p99 of the turns ranked ahead, and of the others (which ranked on the turn's
    /// path), with the others' thread CPU p99: which of the two makes the tail.
    pub preranked_p50_us: f64,
    pub preranked_p99_us: f64,
    pub ranked_on_path_p50_us: f64,
    pub ranked_on_path_p99_us: f64,
    pub ranked_on_path_cpu_p99_us: f64,
    /// Requests the OpenAI simulator's `/embeddings` answered while the calls ran (the
    /// callers' words; the documents were indexed before).
    pub embedding_requests: u64,
}

impl InCalls {
    /// From `TurnCompleted` timings (JSON objects) and the `/embeddings` requests counted
    /// while the calls ran.
    pub fn from_timings(
        passages: u64,
        embedding_requests: u64,
        timings: &[serde_json::Value],
    ) -> InCalls {
        let sorted = |preranked: Option<bool>, field: &str| {
            let mut v: Vec<f64> = timings
                .iter()
                .filter(|t| preranked.is_none_or(|p| (t["knowledge_preranked"] == true) == p))
                .filter_map(|t| t[field].as_f64())
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let us = sorted(None, "knowledge_us");
        let cpu = sorted(None, "knowledge_cpu_us");
        let ahead = sorted(Some(true), "knowledge_us");
        let on_path = sorted(Some(false), "knowledge_us");
        InCalls {
            passages,
            turns: us.len(),
            p50_us: percentile(&us, 0.5),
            p99_us: percentile(&us, 0.99),
            max_us: us.last().copied().unwrap_or(0.0),
            cpu_p50_us: percentile(&cpu, 0.5),
            cpu_p99_us: percentile(&cpu, 0.99),
            with_vector: timings
                .iter()
                .filter(|t| t["knowledge_vector"] == true)
                .count(),
            preranked: ahead.len(),
            preranked_p50_us: percentile(&ahead, 0.5),
            preranked_p99_us: percentile(&ahead, 0.99),
            ranked_on_path_p50_us: percentile(&on_path, 0.5),
            ranked_on_path_p99_us: percentile(&on_path, 0.99),
            ranked_on_path_cpu_p99_us: percentile(&sorted(Some(false), "knowledge_cpu_us"), 0.99),
            embedding_requests,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmb_domain::knowledge::{split, MAX_DOCUMENTS, MAX_DOCUMENT_CHARS};

    #[test]
    fn the_documents_split_into_about_the_passages_asked_within_the_limits() {
        for n in [100, 5_000] {
            let docs = documents(n);
            assert!(docs.len() <= MAX_DOCUMENTS);
            let mut total = 0;
            for (_, text) in &docs {
                assert!(text.chars().count() <= MAX_DOCUMENT_CHARS, "{}", text.len());
                total += split::split(text).len();
            }
            assert!(total.abs_diff(n) <= n / 50, "{n}: {total}");
        }
    }
}
