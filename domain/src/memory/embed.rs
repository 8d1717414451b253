//! A deterministic text embedding: hashed word and character-3-gram features, signed, in
//! [`DIMS`] dimensions, L2-normalised. The embeddings simulator answers with it, and a voice
//! session uses it to rank the few remembered facts against each caller turn in microseconds,
//! with no network call. Similar wording ranks close; meaning does not (that is the real
//! provider's job).

pub const DIMS: usize = 256;

/// FNV-1a, 64 bits: stable across builds and platforms (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn add(v: &mut [f32], feature: &str, weight: f32) {
    let h = fnv1a(feature.as_bytes());
    let i = (h % DIMS as u64) as usize;
    let sign = if (h >> 63) == 0 { 1.0 } else { -1.0 };
    v[i] += sign * weight;
}

/// The words of `text`, lower-cased, without punctuation.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

pub fn embed(text: &str) -> Vec<f32> {
    let mut v = vec![0.0f32; DIMS];
    for word in words(text) {
        add(&mut v, &format!("w:{word}"), 1.0);
        let padded: Vec<char> = format!("#{word}#").chars().collect();
        for gram in padded.windows(3) {
            let gram: String = gram.iter().collect();
            add(&mut v, &format!("c:{gram}"), 0.5);
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Cosine similarity; 0 for vectors of different lengths or a zero vector.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// The indices of the `k` vectors most similar to `query` with a similarity above `floor`,
/// best first.
pub fn top_k(query: &[f32], vectors: &[Vec<f32>], k: usize, floor: f32) -> Vec<(usize, f32)> {
    let mut scored: Vec<(usize, f32)> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| (i, cosine(query, v)))
        .filter(|(_, s)| *s > floor)
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored.truncate(k);
    scored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_deterministic_and_normalised() {
        let a = embed("I am training for a 10k race");
        assert_eq!(a, embed("I am training for a 10k race"));
        assert_eq!(a.len(), DIMS);
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
        assert_eq!(embed("").iter().sum::<f32>(), 0.0);
    }

    #[test]
    fn similar_wording_ranks_close() {
        let facts = [
            embed("Is training for a 10k race in May"),
            embed("Has a sister called Anna"),
            embed("Loves pizza with olives"),
        ];
        let q = embed("how's the race training going");
        let best = top_k(&q, &facts, 3, 0.0);
        assert_eq!(best[0].0, 0, "{best:?}");
        let q = embed("my sister Anna called me");
        assert_eq!(top_k(&q, &facts, 1, 0.0)[0].0, 1);
    }

    #[test]
    fn among_a_few_hundred_facts_the_closest_ones_rank_first() {
        // How fast ranking is, is `bench voice`'s business (timed tests fail on a busy
        // machine); here only that it ranks the right ones first among many.
        let mut facts: Vec<Vec<f32>> = (0..300)
            .map(|i| embed(&format!("fact number {i} about gardening and weather")))
            .collect();
        facts.push(embed("goes running with friends on saturdays"));
        let q = embed("tell me about running with my friends today");
        let best = top_k(&q, &facts, 3, 0.1);
        assert_eq!(best.len(), 3);
        assert_eq!(best[0].0, 300, "{best:?}");
    }
}
