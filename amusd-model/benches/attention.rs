//! Cost of attention per forward ([`amusd_model::attention::attend_rows`]) at SmolLM2-135M's shape
//! (9 query heads, 3 key/value heads of 64, 30 layers), for a cache of f32 (the verify model's),
//! of f16 with keys in rows, and of f16 with keys in tiles (the draft's), at a few context lengths
//! and row counts.
//!
//! `taskset -c 1 cargo bench -p amusd-model --bench attention` prints, per cache type, positions
//! and rows, the ms one forward spends in attention over all 30 layers (each layer its own cache,
//! so the caches do not stay in L2 from one layer to the next, as in a real forward) and the GB/s
//! of cache bytes read. `AMUSD_BENCH_REPS` sets the samples (default 15; the minimum is printed,
//! the steadiest figure on a shared machine), `AMUSD_BENCH_POSITIONS` the context lengths (e.g.
//! `300,1000`), `AMUSD_BENCH_ROWS` the row counts (default `1,4,8,16`) and `AMUSD_BENCH_CACHES`
//! which caches (`f32,f16,f16-tiled`, the default all three).

use std::time::Instant;

use amusd_model::attention::{attend_rows, KvElem, KvLayout, QueryRows};
use amusd_model::testing::test_values;

const LAYERS: usize = 30;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;

/// Every layer's keys and values, head-major as the KV cache lays them out.
struct Caches<T> {
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
    layout: KvLayout,
}

impl<T: KvElem> Caches<T> {
    fn new(capacity: usize, tiled: bool) -> Self {
        let layout = match tiled {
            true => KvLayout::head_major_tiled(capacity, HEAD_DIM),
            false => KvLayout::head_major(capacity, HEAD_DIM),
        };
        let len = KV_HEADS * layout.head_stride;
        let fill = |seed| test_values(len, seed).into_iter().map(T::narrow).collect();
        Self {
            keys: (0..LAYERS).map(|l| fill(2 * l as u64)).collect(),
            values: (0..LAYERS).map(|l| fill(2 * l as u64 + 1)).collect(),
            layout,
        }
    }

    /// Ms of one forward's attention over `positions` (the rows' last included), minimum over
    /// `reps` samples.
    fn time(&self, positions: usize, rows: usize, reps: usize) -> f64 {
        let width = HEADS * HEAD_DIM;
        let q = test_values(rows * width, 7);
        let (mut scores, mut out) = (Vec::new(), vec![0.0; rows * width]);
        let mut forward = || {
            for l in 0..LAYERS {
                let rows = QueryRows {
                    q: &q,
                    stride: width,
                    rows,
                    first_pos: positions - rows,
                };
                let (k, v) = (&self.keys[l], &self.values[l]);
                let heads = (HEADS, KV_HEADS, HEAD_DIM);
                attend_rows(
                    rows,
                    k,
                    v,
                    self.layout,
                    heads.0,
                    heads.1,
                    heads.2,
                    &mut scores,
                    &mut out,
                );
            }
        };
        forward();
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                forward();
                t.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min)
    }
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn report<T: KvElem>(name: &str, tiled: bool, positions: &[usize], rows: &[usize], reps: usize) {
    let wanted = std::env::var("AMUSD_BENCH_CACHES").unwrap_or_else(|_| "f32,f16,f16-tiled".into());
    if !wanted
        .split(',')
        .any(|w| w.trim() == name.replace(' ', "-"))
    {
        return;
    }
    let most = positions.iter().copied().max().unwrap_or(0);
    let caches = Caches::<T>::new(most + 1, tiled);
    for &n in positions {
        print!("{name:<9} {n:>9}");
        for &m in rows {
            let ms = caches.time(n, m, reps);
            let bytes = (2 * LAYERS * KV_HEADS * n * HEAD_DIM * std::mem::size_of::<T>()) as f64;
            print!(" {:>16}", format!("{ms:.3} ({:.1})", bytes / ms / 1e6));
        }
        println!();
    }
}

fn main() {
    let reps = env_list("AMUSD_BENCH_REPS", &[15])[0];
    let positions = env_list("AMUSD_BENCH_POSITIONS", &[300, 1000]);
    let rows = env_list("AMUSD_BENCH_ROWS", &[1, 4, 8, 16]);
    println!("attention of one forward, {LAYERS} layers; ms (GB/s of cache read), min of {reps}");
    print!("{:<9} {:>9}", "cache", "positions");
    for m in &rows {
        print!(" {:>16}", format!("rows={m}"));
    }
    println!();
    report::<f32>("f32", false, &positions, &rows, reps);
    report::<half::f16>("f16", false, &positions, &rows, reps);
    report::<half::f16>("f16 tiled", true, &positions, &rows, reps);
}
