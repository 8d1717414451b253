//! The passages' embeddings of a [`super::rank::KnowledgeIndex`], for the cosine half of the
//! ranking: unit vectors in one contiguous `f32` block per vector size. A block of more than
//! [`RESCORE`] rows also keeps each row's sign bits (64 dimensions to a machine word, 1/32 of
//! the floats): a turn ranks every row by Hamming distance to the query's sign bits (which
//! tracks the angle between them) and scores exactly only the [`RESCORE`] nearest, so 5,000
//! passages cost a pass over 160 KiB (256 dimensions) or 960 KiB (1,536) of bits and 200 dot
//! products, not a pass over 5 or 30 MiB of floats. Both loops run with AVX2, FMA and POPCNT
//! where the processor has them (checked once at run time), portable code elsewhere. Measured
//! by `bench knowledge` (README, Persona knowledge).

use std::cell::RefCell;

/// Candidates the sign-bit prefilter keeps for exact scoring; a block of at most this many
/// rows is scored exactly whole.
pub const RESCORE: usize = 200;

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

/// Per-thread buffers a search reuses (a turn allocates none of them).
#[derive(Default)]
struct Scratch {
    query: Vec<f32>,
    query_signs: Vec<u64>,
    distances: Vec<u32>,
    counts: Vec<u32>,
    nearest: Vec<u32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
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
            if b.passages.len() > RESCORE {
                b.signs = Vec::with_capacity(b.passages.len() * b.words);
                for row in b.rows.chunks_exact(b.dims) {
                    push_signs(row, &mut b.signs);
                }
            }
        }
        Vectors { blocks }
    }

    /// (passage, cosine with `query`) of the passages with a vector of its size, unordered,
    /// appended to `out`: every one of them, or the [`RESCORE`] the sign bits find nearest.
    pub fn scored(&self, query: &[f32], out: &mut Vec<(u32, f32)>) {
        let Some(b) = self.blocks.iter().find(|b| b.dims == query.len()) else {
            return;
        };
        SCRATCH.with_borrow_mut(|s| {
            if !unit_into(query, &mut s.query) {
                return;
            }
            if b.signs.is_empty() {
                out.reserve(b.passages.len());
                kernels::score(&b.rows, b.dims, None, &s.query, |i, cos| {
                    out.push((b.passages[i], cos))
                });
                return;
            }
            s.query_signs.clear();
            push_signs(&s.query, &mut s.query_signs);
            kernels::hamming(&b.signs, b.words, &s.query_signs, &mut s.distances);
            nearest(&s.distances, RESCORE, &mut s.counts, &mut s.nearest);
            out.reserve(s.nearest.len());
            kernels::score(&b.rows, b.dims, Some(&s.nearest), &s.query, |i, cos| {
                out.push((b.passages[i], cos))
            });
        });
    }

    /// Bytes held (rows and sign bits).
    pub fn bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.rows.len() * 4 + b.signs.len() * 8 + b.passages.len() * 4)
            .sum()
    }
}

/// The inner loops: the same code, compiled once for any x86-64 (or other) processor and once
/// with AVX2, FMA and POPCNT, chosen at run time.
mod kernels {
    #[inline(always)]
    fn dot_body(a: &[f32], b: &[f32]) -> f32 {
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

    #[inline(always)]
    fn score_body(
        rows: &[f32],
        dims: usize,
        which: Option<&[u32]>,
        q: &[f32],
        mut each: impl FnMut(usize, f32),
    ) {
        match which {
            None => {
                for (i, row) in rows.chunks_exact(dims).enumerate() {
                    each(i, dot_body(q, row));
                }
            }
            Some(which) => {
                for &i in which {
                    let i = i as usize;
                    each(i, dot_body(q, &rows[i * dims..(i + 1) * dims]));
                }
            }
        }
    }

    #[inline(always)]
    fn hamming_body(signs: &[u64], words: usize, q: &[u64], out: &mut Vec<u32>) {
        out.clear();
        out.extend(signs.chunks_exact(words).map(|s| {
            s.iter()
                .zip(q)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum::<u32>()
        }));
    }

    #[cfg(target_arch = "x86_64")]
    fn fast() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("popcnt")
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,popcnt")]
    fn dot_fast(a: &[f32], b: &[f32]) -> f32 {
        dot_body(a, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,popcnt")]
    fn score_fast(
        rows: &[f32],
        dims: usize,
        which: Option<&[u32]>,
        q: &[f32],
        each: impl FnMut(usize, f32),
    ) {
        score_body(rows, dims, which, q, each)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,popcnt")]
    fn hamming_fast(signs: &[u64], words: usize, q: &[u64], out: &mut Vec<u32>) {
        hamming_body(signs, words, q, out)
    }

    /// The dot product of two slices of the same length.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if fast() {
            // SAFETY: the processor has the features `dot_fast` is compiled for.
            return unsafe { dot_fast(a, b) };
        }
        dot_body(a, b)
    }

    /// `each(row, q · row)` for the rows `which` (all when `None`) of `rows`, `dims` a row.
    pub fn score(
        rows: &[f32],
        dims: usize,
        which: Option<&[u32]>,
        q: &[f32],
        each: impl FnMut(usize, f32),
    ) {
        #[cfg(target_arch = "x86_64")]
        if fast() {
            // SAFETY: as in `dot`.
            return unsafe { score_fast(rows, dims, which, q, each) };
        }
        score_body(rows, dims, which, q, each)
    }

    /// The Hamming distance of each row of `signs` (`words` a row) to `q`, into `out`.
    pub fn hamming(signs: &[u64], words: usize, q: &[u64], out: &mut Vec<u32>) {
        #[cfg(target_arch = "x86_64")]
        if fast() {
            // SAFETY: as in `dot`.
            return unsafe { hamming_fast(signs, words, q, out) };
        }
        hamming_body(signs, words, q, out)
    }
}

pub use kernels::dot;

/// The indexes of the `k` smallest `distances` (ties: the lower index first), unordered, into
/// `out` (`counts`: a buffer).
fn nearest(distances: &[u32], k: usize, counts: &mut Vec<u32>, out: &mut Vec<u32>) {
    out.clear();
    if distances.len() <= k {
        out.extend(0..distances.len() as u32);
        return;
    }
    // Distances are at most the dimensions: a histogram finds the k-th without sorting.
    let max = distances.iter().copied().max().unwrap_or(0) as usize;
    counts.clear();
    counts.resize(max + 1, 0);
    for d in distances {
        counts[*d as usize] += 1;
    }
    let (mut below, mut cut) = (0usize, 0usize);
    for (d, c) in counts.iter().enumerate() {
        if below + *c as usize >= k {
            cut = d;
            break;
        }
        below += *c as usize;
    }
    let mut at_cut = k - below;
    for (i, d) in distances.iter().enumerate() {
        let d = *d as usize;
        if d < cut {
            out.push(i as u32);
        } else if d == cut && at_cut > 0 {
            at_cut -= 1;
            out.push(i as u32);
        }
    }
}

/// Appends the sign bits of `v`, 64 components to a word (a component ≥ 0 is a 1).
fn push_signs(v: &[f32], out: &mut Vec<u64>) {
    out.extend(v.chunks(64).map(|c| {
        c.iter()
            .enumerate()
            .fold(0u64, |w, (j, x)| w | (u64::from(*x >= 0.0) << j))
    }));
}

/// `v` scaled to length 1; empty for a zero vector.
pub fn unit(v: &[f32]) -> Vec<f32> {
    let mut out = Vec::new();
    unit_into(v, &mut out);
    out
}

/// `v` scaled to length 1 into `out`; false (and `out` empty) for a zero vector.
fn unit_into(v: &[f32], out: &mut Vec<f32>) -> bool {
    out.clear();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        return false;
    }
    out.extend(v.iter().map(|x| x / norm));
    true
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

    fn scored(v: &Vectors, q: &[f32]) -> Vec<(u32, f32)> {
        let mut out = Vec::new();
        v.scored(q, &mut out);
        out
    }

    #[test]
    fn the_fast_and_portable_kernels_agree() {
        let dims = 256;
        let rows: Vec<f32> = (0..40).flat_map(|i| vector(i + 1, dims)).collect();
        let q = vector(99, dims);
        let mut fast = Vec::new();
        kernels::score(&rows, dims, None, &q, |i, c| fast.push((i, c)));
        let mut portable = Vec::new();
        for (i, row) in rows.chunks_exact(dims).enumerate() {
            portable.push((i, row.iter().zip(&q).map(|(a, b)| a * b).sum::<f32>()));
        }
        for ((i, a), (j, b)) in fast.iter().zip(&portable) {
            assert_eq!(i, j);
            assert!((a - b).abs() < 1e-2, "{a} {b}");
        }
        let signs: Vec<u64> = (0..40)
            .map(|i| 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 1))
            .collect();
        let mut d = Vec::new();
        kernels::hamming(&signs, 4, &signs[..4], &mut d);
        let plain: Vec<u32> = signs
            .chunks_exact(4)
            .map(|s| {
                s.iter()
                    .zip(&signs[..4])
                    .map(|(a, b)| (a ^ b).count_ones())
                    .sum()
            })
            .collect();
        assert_eq!(d, plain);
        assert_eq!(d[0], 0);
    }

    #[test]
    fn small_blocks_score_every_passage_and_other_sizes_none() {
        let v = Vectors::new([
            (0, vec![1.0, 0.0]),
            (1, vec![0.0, 3.0]),
            (2, vec![0.0, 0.0]),
            (3, vec![1.0, 1.0, 1.0]),
        ]);
        let mut s = scored(&v, &[0.0, 2.0]);
        s.sort_by_key(|s| s.0);
        assert_eq!(s, [(0, 0.0), (1, 1.0)]);
        assert_eq!(scored(&v, &[1.0, 0.0, 0.0]).len(), 1);
        assert!(scored(&v, &[1.0; 4]).is_empty());
        assert!(scored(&v, &[0.0, 0.0]).is_empty());
    }

    #[test]
    fn the_prefilter_keeps_the_nearest_and_scores_them_exactly() {
        // The bench's and the simulator's 256 dimensions, and OpenAI's 1,536.
        for dims in [256, 1536] {
            let n = 5_000;
            let mut rows: Vec<(u32, Vec<f32>)> = (0..n as u32)
                .map(|i| (i, vector(u64::from(i) + 10, dims)))
                .collect();
            // Passages close to the query (as a real question's few relevant passages are),
            // down to the similarity a vector-only match needs.
            let query = vector(7, dims);
            let close = [(17usize, 0.5f32), (900, 1.0), (1400, 1.5), (4321, 1.8)];
            for (k, (i, noise_weight)) in close.into_iter().enumerate() {
                let noise = vector(100 + k as u64, dims);
                rows[i].1 = query
                    .iter()
                    .zip(&noise)
                    .map(|(q, e)| q + noise_weight * e)
                    .collect();
            }
            let v = Vectors::new(rows.clone());
            let s = scored(&v, &query);
            assert_eq!(s.len(), RESCORE);
            for (i, _) in close {
                let exact = dot(&unit(&query), &unit(&rows[i].1));
                let (_, cos) = s.iter().find(|s| s.0 == i as u32).expect("kept");
                assert!(
                    (cos - exact).abs() < 1e-5 && *cos > 0.35,
                    "{dims} {i}: {cos}"
                );
            }
        }
    }

    #[test]
    fn nearest_breaks_ties_by_index() {
        let near = |d: &[u32], k| {
            let mut out = Vec::new();
            nearest(d, k, &mut Vec::new(), &mut out);
            out
        };
        assert_eq!(near(&[3, 1, 2, 1, 0], 3), [1, 3, 4]);
        assert_eq!(near(&[1, 1, 1, 1], 2), [0, 1]);
        assert_eq!(near(&[5, 4], 3), [0, 1]);
    }
}
