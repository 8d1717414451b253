//! Ranking a persona's passages against what the caller just said, in process: BM25 over
//! stemmed words (English Snowball stemmer, common words left out), fused by reciprocal rank
//! with cosine similarity against the passages' embeddings when the caller's words were
//! embedded in time. Built from the passages loaded at session start, once for all the calls
//! of a persona that run at the same time (`serve::voice::knowledge`); a search adds up the
//! precomputed BM25 weights in the postings of the query's few terms and, with a vector, scores
//! the passages' vectors (`super::vectors`: every one, or past a few thousand the nearest by
//! their sign bits), then fuses the two short lists (measured by `bench knowledge` and `bench
//! voice --knowledge`: README, Persona knowledge).

use std::collections::HashMap;

use rust_stemmers::{Algorithm, Stemmer};

use super::vectors::Vectors;

/// BM25's parameters (the usual ones).
const K1: f32 = 1.2;
const B: f32 = 0.75;
/// Reciprocal-rank fusion's constant.
const RRF_K: f32 = 60.0;
/// Only the best of each ranking take part in the fusion.
const CANDIDATES: usize = 50;
/// A passage found only by its vector must be at least this similar.
const COSINE_FLOOR: f32 = 0.35;

/// A passage as loaded for a call.
#[derive(Debug, Clone, PartialEq)]
pub struct PassageIn {
    /// `<document id>:<ord>`.
    pub id: String,
    pub document_title: String,
    pub heading: Option<String>,
    pub text: String,
    pub tokens: u32,
    /// Empty when the passage was never embedded (and once in a [`KnowledgeIndex`], which
    /// keeps it as a unit vector of its own).
    pub embedding: Vec<f32>,
}

/// A passage chosen for a reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit<'a> {
    pub passage: &'a PassageIn,
    pub score: f32,
}

/// The passages nearest a query's vector, best first (see [`KnowledgeIndex::near`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Near(Vec<(u32, f32)>);

pub struct KnowledgeIndex {
    passages: Vec<PassageIn>,
    /// The passages' unit vectors (see [`Vectors`]).
    vectors: Vectors,
    terms: HashMap<String, u32>,
    /// Per term: (passage, the term's BM25 weight in it) — fixed once the passages are known,
    /// so a search only adds them up.
    postings: Vec<Vec<(u32, f32)>>,
    stemmer: Stemmer,
}

thread_local! {
    /// BM25 sums by passage, reused by the thread's searches.
    static SCORES: std::cell::RefCell<Vec<f32>> = std::cell::RefCell::default();
}

/// Words a question is full of and that say nothing about its subject.
const STOPWORDS: &[&str] = &[
    "a", "about", "after", "all", "also", "am", "an", "and", "any", "are", "as", "at", "be",
    "been", "but", "by", "can", "could", "did", "do", "does", "for", "from", "get", "got", "had",
    "has", "have", "he", "her", "him", "his", "how", "i", "if", "in", "into", "is", "it", "its",
    "just", "know", "like", "me", "my", "no", "not", "of", "okay", "on", "one", "or", "our",
    "really", "she", "so", "some", "tell", "than", "that", "the", "their", "them", "then", "there",
    "these", "they", "think", "this", "to", "too", "up", "us", "was", "we", "were", "what", "when",
    "where", "which", "who", "why", "will", "with", "would", "yeah", "you", "your",
];

fn is_stopword(w: &str) -> bool {
    STOPWORDS.binary_search(&w).is_ok()
}

impl KnowledgeIndex {
    pub fn new(mut passages: Vec<PassageIn>) -> Self {
        let stemmer = Stemmer::create(Algorithm::English);
        let mut terms: HashMap<String, u32> = HashMap::new();
        let mut counted: Vec<Vec<(u32, u16)>> = Vec::new();
        let mut lengths = Vec::with_capacity(passages.len());
        for (i, p) in passages.iter().enumerate() {
            let mut counts: HashMap<u32, u16> = HashMap::new();
            let mut len = 0u32;
            let fields = [
                p.document_title.as_str(),
                p.heading.as_deref().unwrap_or(""),
                p.text.as_str(),
            ];
            for field in fields {
                for stem in analyze(&stemmer, field) {
                    len += 1;
                    let next = terms.len() as u32;
                    let id = *terms.entry(stem).or_insert(next);
                    if id as usize == counted.len() {
                        counted.push(Vec::new());
                    }
                    let c = counts.entry(id).or_insert(0);
                    *c = c.saturating_add(1);
                }
            }
            for (term, tf) in counts {
                counted[term as usize].push((i as u32, tf));
            }
            lengths.push(len);
        }
        let avg_len = if lengths.is_empty() {
            1.0
        } else {
            (lengths.iter().map(|l| *l as f32).sum::<f32>() / lengths.len() as f32).max(1.0)
        };
        let n = passages.len() as f32;
        let postings = counted
            .into_iter()
            .map(|list| {
                let df = list.len() as f32;
                let idf = ((n - df + 0.5) / (df + 0.5) + 1.0).ln();
                list.into_iter()
                    .map(|(i, tf)| {
                        let tf = tf as f32;
                        let len = lengths[i as usize] as f32;
                        let w = idf * tf * (K1 + 1.0) / (tf + K1 * (1.0 - B + B * len / avg_len));
                        (i, w)
                    })
                    .collect()
            })
            .collect();
        // The index keeps the vectors (a 1536-dimension vector is 6 KiB, more than its
        // passage's text), the passages none.
        let vectors = Vectors::new(
            passages
                .iter_mut()
                .enumerate()
                .map(|(i, p)| (i as u32, std::mem::take(&mut p.embedding))),
        );
        KnowledgeIndex {
            passages,
            vectors,
            terms,
            postings,
            stemmer,
        }
    }

    pub fn len(&self) -> usize {
        self.passages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.passages.is_empty()
    }

    /// The best passages for `query` (and its embedding, when there is one), best first, at
    /// most `max` of them and together at most `budget_tokens`.
    pub fn search(
        &self,
        query: &str,
        query_vector: Option<&[f32]>,
        max: usize,
        budget_tokens: usize,
    ) -> Vec<Hit<'_>> {
        let near = query_vector.map(|q| self.near(q));
        self.search_near(query, near.as_ref(), max, budget_tokens)
    }

    /// The passages nearest `query_vector`: the costly half of a search, to do ahead (off a
    /// turn's path) and fuse later with the words' ranking ([`KnowledgeIndex::search_near`]).
    pub fn near(&self, query_vector: &[f32]) -> Near {
        Near(self.cosine(query_vector))
    }

    /// [`KnowledgeIndex::search`] with the vector's half done already (`near`, of this index).
    pub fn search_near(
        &self,
        query: &str,
        near: Option<&Near>,
        max: usize,
        budget_tokens: usize,
    ) -> Vec<Hit<'_>> {
        if self.passages.is_empty() || max == 0 {
            return Vec::new();
        }
        let lexical = self.bm25(query);
        let semantic: &[(u32, f32)] = near.map_or(&[], |n| &n.0);
        let mut fused: HashMap<u32, f32> = HashMap::new();
        for (rank, (i, _)) in lexical.iter().enumerate() {
            *fused.entry(*i).or_default() += 1.0 / (RRF_K + rank as f32 + 1.0);
        }
        for (rank, (i, cos)) in semantic.iter().enumerate() {
            // A vector-only match must be close; one the words found too is reinforced.
            if *cos >= COSINE_FLOOR || fused.contains_key(i) {
                *fused.entry(*i).or_default() += 1.0 / (RRF_K + rank as f32 + 1.0);
            }
        }
        let mut ranked: Vec<(u32, f32)> = fused.into_iter().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut out = Vec::new();
        let mut used = 0usize;
        for (i, score) in ranked {
            let p = &self.passages[i as usize];
            if used + p.tokens as usize > budget_tokens {
                continue;
            }
            used += p.tokens as usize;
            out.push(Hit { passage: p, score });
            if out.len() == max {
                break;
            }
        }
        out
    }

    /// (passage, BM25 score) of the passages sharing a term with `query`, best first.
    fn bm25(&self, query: &str) -> Vec<(u32, f32)> {
        let mut stems = analyze(&self.stemmer, query);
        stems.sort();
        stems.dedup();
        // Every weight is positive: a passage's first one marks it found. The scores' array
        // is the thread's, all zeros between searches (only the entries found are reset).
        SCORES.with_borrow_mut(|scores| {
            if scores.len() < self.passages.len() {
                scores.resize(self.passages.len(), 0.0);
            }
            let mut found = Vec::new();
            for stem in &stems {
                let Some(&term) = self.terms.get(stem) else {
                    continue;
                };
                for &(i, w) in &self.postings[term as usize] {
                    let s = &mut scores[i as usize];
                    if *s == 0.0 {
                        found.push(i);
                    }
                    *s += w;
                }
            }
            let scored = found
                .into_iter()
                .map(|i| (i, std::mem::take(&mut scores[i as usize])))
                .collect();
            top(scored)
        })
    }

    /// (passage, cosine) of the passages with a vector of the query's size (or the nearest
    /// of them by their vectors' sign bits, when there are thousands), best first.
    fn cosine(&self, q: &[f32]) -> Vec<(u32, f32)> {
        let mut scored = Vec::new();
        self.vectors.scored(q, &mut scored);
        top(scored)
    }

    /// Bytes the passages' vectors take.
    pub fn vector_bytes(&self) -> usize {
        self.vectors.bytes()
    }
}

/// The best [`CANDIDATES`], best first.
fn top(mut scored: Vec<(u32, f32)>) -> Vec<(u32, f32)> {
    let by_score = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if scored.len() > CANDIDATES {
        scored.select_nth_unstable_by(CANDIDATES - 1, by_score);
        scored.truncate(CANDIDATES);
    }
    scored.sort_by(by_score);
    scored
}

/// Lower-cased words without stopwords, stemmed.
fn analyze(stemmer: &Stemmer, text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty() && !is_stopword(w))
        .map(|w| stemmer.stem(&w).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passage(id: &str, text: &str, embedding: Vec<f32>) -> PassageIn {
        PassageIn {
            id: id.into(),
            document_title: "Notes".into(),
            heading: None,
            text: text.into(),
            tokens: super::super::tokens(text) as u32,
            embedding,
        }
    }

    #[test]
    fn a_search_with_its_vector_s_half_done_ahead_is_the_same_search() {
        let index = KnowledgeIndex::new(vec![
            passage("d:0", "Run intervals every Tuesday.", vec![1.0, 0.0, 0.0]),
            passage(
                "d:1",
                "Sleep eight hours before a race.",
                vec![0.0, 1.0, 0.0],
            ),
            passage("d:2", "Eat oats before a long run.", vec![0.6, 0.8, 0.0]),
        ]);
        let q = [0.1, 0.9, 0.1];
        let near = index.near(&q);
        for query in [
            "what do I eat before a long run",
            "how much sleep",
            "tuesday",
        ] {
            let ids = |hits: Vec<Hit<'_>>| -> Vec<String> {
                hits.iter().map(|h| h.passage.id.clone()).collect()
            };
            let whole = ids(index.search(query, Some(&q), 3, 500));
            assert!(!whole.is_empty(), "{query}");
            assert_eq!(
                ids(index.search_near(query, Some(&near), 3, 500)),
                whole,
                "{query}"
            );
        }
        // Without a vector, words alone.
        assert_eq!(
            index.search_near("tuesday", None, 3, 500)[0].passage.id,
            "d:0"
        );
    }

    #[test]
    fn stopwords_are_sorted_for_the_binary_search() {
        let mut sorted = STOPWORDS.to_vec();
        sorted.sort();
        assert_eq!(sorted, STOPWORDS);
    }

    #[test]
    fn stemmed_words_find_the_passage_and_common_words_find_nothing() {
        let index = KnowledgeIndex::new(vec![
            passage(
                "d:0",
                "Brad's rule: run intervals every Tuesday morning.",
                vec![],
            ),
            passage("d:1", "Sleep eight hours before a race.", vec![]),
        ]);
        let hits = index.search(
            "when should I be running my interval sessions?",
            None,
            3,
            500,
        );
        assert_eq!(hits[0].passage.id, "d:0");
        assert_eq!(hits.len(), 1);
        assert!(index
            .search("what do you think about that", None, 3, 500)
            .is_empty());
    }

    #[test]
    fn the_caller_vector_finds_a_passage_the_words_miss_and_the_budget_holds() {
        let index = KnowledgeIndex::new(vec![
            passage("d:0", "alpha beta gamma", vec![1.0, 0.0]),
            passage("d:1", "delta epsilon", vec![0.0, 1.0]),
            passage("d:2", "delta zeta", vec![0.6, 0.8]),
        ]);
        let hits = index.search("nothing in common", Some(&[0.0, 2.0]), 3, 500);
        let ids: Vec<_> = hits.iter().map(|h| h.passage.id.as_str()).collect();
        assert_eq!(ids, ["d:1", "d:2"]);
        let hits = index.search("delta", Some(&[0.0, 1.0]), 3, 500);
        assert_eq!(hits[0].passage.id, "d:1", "both rankings agree");
        // Only what fits the budget.
        let hits = index.search("delta", None, 3, 3);
        assert_eq!(hits.len(), 1);
    }
}
