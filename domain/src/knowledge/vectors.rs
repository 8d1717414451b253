//! The passages' embeddings of a [`super::rank::KnowledgeIndex`], for the cosine half of the
//! ranking: unit vectors in one contiguous `f32` block per vector size, scored with a dot
//! product the compiler vectorises (sixteen independent sums). Up to [`EXACT_FLOATS`] floats
//! every passage is scored; above (thousands of 1,536-dimension passages: tens of megabytes a
//! turn would stream through the cache), a prefilter on the vectors' sign bits (Hamming
//! distance, 64 dimensions to a machine word) keeps the [`RESCORE`] nearest, and only those
//! are scored exactly. Measured by `bench knowledge` (README, Persona knowledge).

/// Every passage is scored exactly while a block holds at most this many floats (8 MiB: 500
/// passages of 1,536 dimensions, 8,000 of 256).
pub const EXACT_FLOATS: usize = 2 << 20;
/// Candidates the sign-bit prefilter keeps for exact scoring.
pub const RESCORE: usize = 400;

/// The vectors of one size.
struct Block {
    dims: usize,
    /// The passage of each row.
    passages: Vec<u32>,
    /// Rows of `dims` unit-vector components.
    rows: Vec<f32>,
    /// Sign bits of each row, `words` machine words a row (empty while scored exactly).
    signs: Vec<u64>,
    words: usize,
}

#[derive(Default)]
pub struct Vectors {
    blocks: Vec<Block>,
}

impl Vectors {
    /// From (passage, embedding); an empty or all-zero embedding is left out.
    pub fn new(embeddings: impl IntoIterator<Item = (u32, Vec<f32>)>) -> Self {
        let mut blocks: Vec<Block> = Vec::new();
        for (passage, v) in embeddings {
            let v = unit(&v);
            if v.is_empty() {
                continue;
            }
            let block = match blocks.iter().position(|b| b.dims == v.len()) {
                Some(i) => &mut blocks[i],
                None => {
                    blocks.push(Block {
                        dims: v.len(),
                        passages: Vec::new(),
                        rows: Vec::new(),
                        signs: Vec::new(),
                        words: v.len().div_ceil(64),
                    });
                    blocks.last_mut().expect("just pushed")
                }
            };
            block.passages.push(passage);
            block.rows.extend_from_slice(&v);
        }
        for b in &mut blocks {
            b.rows.shrink_to_fit();
            if b.rows.len() > EXACT_FLOATS {
                b.signs = b.rows.chunks_exact(b.dims).flat_map(signs).collect();
            }
        }
        Vectors { blocks }
    }

    /// (passage, cosine with `query`) of the passages with a vector of its size, unordered:
    /// every one of them, or the [`RESCORE`] the sign bits find nearest.
    pub fn scored(&self, query: &[f32]) -> Vec<(u32, f32)> {
        let q = unit(query);
        let Some(b) = self.blocks.iter().find(|b| b.dims == q.len()) else {
            return Vec::new();
        };
        let row = |i: usize| &b.rows[i * b.dims..(i + 1) * b.dims];
        if b.signs.is_empty() {
            return (0..b.passages.len())
                .map(|i| (b.passages[i], dot(&q, row(i))))
                .collect();
        }
        let qs = signs(&q);
        let distances: Vec<u32> = b
            .signs
            .chunks_exact(b.words)
            .map(|s| s.iter().zip(&qs).map(|(a, b)| (a ^ b).count_ones()).sum())
            .collect();
        nearest(&distances, RESCORE)
            .into_iter()
            .map(|i| (b.passages[i], dot(&q, row(i))))
            .collect()
    }

    /// Bytes held (rows and sign bits).
    pub fn bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.rows.len() * 4 + b.signs.len() * 8 + b.passages.len() * 4)
            .sum()
    }
}

/// The indexes of the `k` smallest `distances` (ties: the lower index first), unordered.
fn nearest(distances: &[u32], k: usize) -> Vec<usize> {
    if distances.len() <= k {
        return (0..distances.len()).collect();
    }
    // Distances are at most the dimensions: a histogram finds the k-th without sorting.
    let max = distances.iter().copied().max().unwrap_or(0) as usize;
    let mut counts = vec![0usize; max + 1];
    for d in distances {
        counts[*d as usize] += 1;
    }
    let (mut below, mut cut) = (0usize, 0usize);
    for (d, c) in counts.iter().enumerate() {
        if below + c >= k {
            cut = d;
            break;
        }
        below += c;
    }
    let mut at_cut = k - below;
    let mut out = Vec::with_capacity(k);
    for (i, d) in distances.iter().enumerate() {
        let d = *d as usize;
        if d < cut {
            out.push(i);
        } else if d == cut && at_cut > 0 {
            at_cut -= 1;
            out.push(i);
        }
    }
    out
}

/// The sign bits of `v`, 64 components to a word (a component ≥ 0 is a 1).
fn signs(v: &[f32]) -> Vec<u64> {
    v.chunks(64)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u64, |w, (j, x)| w | (u64::from(*x >= 0.0) << j))
        })
        .collect()
}

/// The dot product of two slices of the same length, in sixteen independent sums so that the
/// compiler keeps them in vector registers.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ac, ar) = a.as_chunks::<16>();
    let (bc, br) = b.as_chunks::<16>();
    let mut acc = [0.0f32; 16];
    for (x, y) in ac.iter().zip(bc) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `v` scaled to length 1; empty for a zero vector.
pub fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        return Vec::new();
    }
    v.iter().map(|x| x / norm).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random vector.
    fn vector(seed: u64, dims: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..dims)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn the_dot_product_is_the_plain_one() {
        for dims in [2, 15, 16, 17, 256, 1536] {
            let (a, b) = (vector(1, dims), vector(2, dims));
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-3, "{dims}");
        }
    }

    #[test]
    fn small_blocks_score_every_passage_and_other_sizes_none() {
        let v = Vectors::new([
            (0, vec![1.0, 0.0]),
            (1, vec![0.0, 3.0]),
            (2, vec![0.0, 0.0]),
            (3, vec![1.0, 1.0, 1.0]),
        ]);
        let mut scored = v.scored(&[0.0, 2.0]);
        scored.sort_by_key(|s| s.0);
        assert_eq!(scored, [(0, 0.0), (1, 1.0)]);
        assert_eq!(v.scored(&[1.0, 0.0, 0.0]).len(), 1);
        assert!(v.scored(&[1.0; 4]).is_empty());
        assert!(v.scored(&[0.0, 0.0]).is_empty());
    }

    #[test]
    fn the_prefilter_keeps_the_nearest_and_scores_them_exactly() {
        let dims = 1536;
        let n = EXACT_FLOATS / dims + 500;
        let mut rows: Vec<(u32, Vec<f32>)> = (0..n as u32)
            .map(|i| (i, vector(u64::from(i) + 10, dims)))
            .collect();
        // Passages close to the query (as a real question's few relevant passages are).
        let query = vector(7, dims);
        for (k, i) in [17usize, 900, 1400].into_iter().enumerate() {
            let noise = vector(100 + k as u64, dims);
            rows[i].1 = query.iter().zip(&noise).map(|(q, e)| q + 0.5 * e).collect();
        }
        let v = Vectors::new(rows.clone());
        let scored = v.scored(&query);
        assert_eq!(scored.len(), RESCORE);
        for i in [17u32, 900, 1400] {
            let (_, cos) = scored.iter().find(|s| s.0 == i).expect("kept");
            let exact = dot(&unit(&query), &unit(&rows[i as usize].1));
            assert!((cos - exact).abs() < 1e-6 && *cos > 0.8, "{i}: {cos}");
        }
    }

    #[test]
    fn nearest_breaks_ties_by_index() {
        assert_eq!(nearest(&[3, 1, 2, 1, 0], 3), [1, 3, 4]);
        assert_eq!(nearest(&[1, 1, 1, 1], 2), [0, 1]);
        assert_eq!(nearest(&[5, 4], 3), [0, 1]);
    }
}
