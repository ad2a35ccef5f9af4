//! The split prefill between two threads standing for the workers, on a tiny model and a real
//! region: the verify side's cache has the bits of a whole prefill, the draft side adopts every
//! position (through an exchange holding every block, or a ring of fewer), and a draft side that
//! never takes the job or stops midway costs a wait, never a bit.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::OnceLock;
use std::time::Instant;

use amusd_model::testing::TinyModel;
use amusd_shm::{JobWord, Region, RequestSpec, SamplingFields, SplitState, KV_EXCHANGE_BYTES};
use candle_core::quantized::GgmlDType;

use super::*;
use crate::decoder::Decoder;
use crate::LlamaDecoder;

/// A tiny q4_1 checkpoint, as the default pair shares one; five blocks, so that a ring of two
/// slots reuses each.
fn model_file() -> &'static str {
    static FILE: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    &FILE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny-q4_1.gguf");
            let tiny = TinyModel {
                layers: 5,
                ..TinyModel::default()
            };
            tiny.write_gguf(&path, GgmlDType::Q4_1).unwrap();
            let path = path.to_str().unwrap().to_string();
            (dir, path)
        })
        .1
}

fn verify_spec() -> String {
    format!("{}:f32", model_file())
}

fn decoder(spec: &str) -> LlamaDecoder {
    let (model, _) = amusd_model::loader::load_weights(&spec.parse().unwrap()).unwrap();
    LlamaDecoder::new(model)
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 259).collect()
}

/// A region running request 1 with `prompt`.
fn region_with(prompt: &[u32]) -> Box<Region> {
    let r = Region::new_boxed();
    let spec = RequestSpec {
        request_id: 1,
        prompt,
        max_new_tokens: 4,
        stop_tokens: &[],
        sampling: SamplingFields::default(),
    };
    r.submit_request(&spec).unwrap();
    r
}

/// Every block's keys and values at positions `0..n`, as bits.
fn cached_bits(d: &mut LlamaDecoder, n: usize) -> Vec<Vec<u32>> {
    let ops = d.split_ops().unwrap();
    let (layers, kv_dim) = ops.shape();
    (0..layers)
        .map(|l| {
            let (mut k, mut v) = (vec![0.0; n * kv_dim], vec![0.0; n * kv_dim]);
            ops.read_positions(l, 0, &mut k, &mut v);
            k.iter().chain(&v).map(|x| x.to_bits()).collect()
        })
        .collect()
}

/// The verify side of request 1: offers the job and runs it; returns whether it split and
/// the decoder.
fn verify_side(region: &Region, prompt: &[u32]) -> (bool, LlamaDecoder) {
    verify_side_within(region, prompt, KV_EXCHANGE_BYTES / 4)
}

/// [`verify_side`] with an exchange of `capacity` f32 words.
fn verify_side_within(region: &Region, prompt: &[u32], capacity: usize) -> (bool, LlamaDecoder) {
    let mut d = decoder(&verify_spec());
    d.start(prompt, 64, false).unwrap();
    let own = fingerprint(&verify_spec());
    region.announce_verifier(own.unwrap());
    let at = (1, prompt.len(), 0, false);
    let word = verify::offer_within(region, own, d.split_ops(), at, capacity)
        .unwrap()
        .expect("a job");
    let split = verify_prefill(region, d.split_ops().unwrap(), prompt, word).unwrap();
    (split, d)
}

/// Spins until `ready` gives a value; fails the test after 30 s rather than hang it.
fn spin_until<T>(what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(t) = ready() {
            return t;
        }
        assert!(Instant::now() < deadline, "no {what} within 30 s");
        std::thread::yield_now();
    }
}

/// The draft side's part by hand: waits for the offered job and takes it.
fn take_offered(region: &Region) -> JobWord {
    let offered = spin_until("an offered job", || {
        let w = region.split_word();
        (w.state == SplitState::Offered).then_some(w)
    });
    let taken = JobWord {
        state: SplitState::Taken,
        ..offered
    };
    assert!(region.move_split(offered, taken));
    taken
}

/// f32 words of one slot of the exchange: a block's keys and values of the 59 positions a
/// 60-token prompt splits (the tiny model's `kv_dim` is 32).
const SLOT: usize = 2 * 59 * 32;

/// Both helpers: the draft's own matrices in the verify model's arithmetic (`shared`), and a
/// second instance of the verify model; the exchange holding every block, two of the five at
/// a time, or one.
#[test]
fn a_split_prefill_has_the_bits_of_a_whole_one_and_the_draft_adopts_it() {
    for shared in [true, false] {
        split_and_adopt(shared, KV_EXCHANGE_BYTES / 4);
    }
    for capacity in [2 * SLOT, 3 * SLOT - 1, SLOT] {
        split_and_adopt(true, capacity);
    }
}

/// The draft worker's side, loaded, with its helper (sharing the draft's matrices or not); both
/// workers say so in `region` once loaded, before any request.
fn draft_side(region: &Region, shared: bool) -> (LlamaDecoder, Helper) {
    let draft_spec = format!("{}:stored:kv=f16", model_file());
    let mut draft = decoder(&draft_spec);
    let ops = draft.split_ops().map(|o| &*o).filter(|_| shared);
    let helper = Helper::new(&verify_spec(), &draft_spec, ops).unwrap();
    assert_eq!(helper.shared, shared);
    region.advertise_helper(helper.fingerprint);
    region.announce_verifier(helper.fingerprint);
    (draft, helper)
}

fn split_and_adopt(shared: bool, capacity: usize) {
    let prompt = prompt(60);
    let end = prompt.len() - 1;
    let region = region_with(&prompt);
    let (mut draft, mut helper) = draft_side(&region, shared);
    let (split, mut verify, adopted) = std::thread::scope(|s| {
        let drafting = s.spawn(|| {
            draft.start(&prompt, 64, false).unwrap();
            let ops = draft.split_ops().unwrap();
            help(&region, &mut helper, ops, &prompt, 1).unwrap()
        });
        let (split, verify) = verify_side_within(&region, &prompt, capacity);
        (split, verify, drafting.join().unwrap())
    });
    assert!(split && adopted, "shared {shared}, capacity {capacity}");
    let job = region.split_job();
    assert_eq!(job.slots as usize, (capacity / SLOT).min(5));
    let w = region.split_word();
    assert_eq!((w.state, w.blocks), (SplitState::Handed, 5));
    assert_eq!((region.taken_in(w.seq), region.adopted(w.seq)), (5, 5));
    assert_eq!((verify.cached(), draft.cached()), (end, end));
    let mut whole = decoder(&verify_spec());
    whole.start(&prompt, 64, false).unwrap();
    whole.prefill_bulk(&prompt[..end], 0).unwrap();
    let want = cached_bits(&mut whole, end);
    assert_eq!(
        cached_bits(&mut verify, end),
        want,
        "shared {shared}, capacity {capacity}"
    );
    // The draft holds the verify model's keys and values at its own precision (f16).
    let f16 = |bits: Vec<Vec<u32>>| -> Vec<Vec<u16>> {
        let round = |b: &u32| half::f16::from_f32(f32::from_bits(*b)).to_bits();
        bits.iter().map(|l| l.iter().map(round).collect()).collect()
    };
    assert_eq!(f16(cached_bits(&mut draft, end)), f16(want));
}

#[test]
fn a_job_nobody_takes_is_dropped_after_the_grace_and_costs_no_bit() {
    let prompt = prompt(60);
    let region = region_with(&prompt);
    region.advertise_helper(fingerprint(&verify_spec()).unwrap());
    let t0 = Instant::now();
    let (split, d) = verify_side(&region, &prompt);
    assert!(!split);
    assert!(t0.elapsed() >= TAKE_GRACE);
    assert_eq!(d.cached(), 0, "a dropped split leaves nothing cached");
    assert_eq!(region.split_word().state, SplitState::Dropped);
}

/// The draft side takes the job and publishes one block, then stops (a worker killed or
/// stopped): the verify side drops the job once it stalls.
#[test]
fn a_draft_side_that_stops_midway_is_waited_out() {
    let prompt = prompt(60);
    let region = region_with(&prompt);
    let helper = Helper::new(&verify_spec(), "", None).unwrap();
    region.advertise_helper(helper.fingerprint);
    let t0 = Instant::now();
    let split = std::thread::scope(|s| {
        s.spawn(|| {
            let taken = take_offered(&region);
            let one = JobWord { blocks: 1, ..taken };
            assert!(region.move_split(taken, one));
        });
        verify_side(&region, &prompt).0
    });
    assert!(!split);
    assert!(t0.elapsed() >= STALL, "{:?}", t0.elapsed());
    assert_eq!(region.split_word().state, SplitState::Dropped);
}

/// The coordinator clears a dead draft worker's word: the verify side stops waiting at once.
#[test]
fn a_draft_worker_reaped_midway_ends_the_wait_at_once() {
    let prompt = prompt(60);
    let region = region_with(&prompt);
    let fp = fingerprint(&verify_spec()).unwrap();
    region.advertise_helper(fp);
    let split = std::thread::scope(|s| {
        s.spawn(|| {
            take_offered(&region);
            region.advertise_helper(0);
            region.ring(amusd_shm::Party::Verify);
        });
        let t0 = Instant::now();
        let split = verify_side(&region, &prompt).0;
        assert!(t0.elapsed() < STALL, "{:?}", t0.elapsed());
        split
    });
    assert!(!split);
}

/// A ring of one slot, the verify side by hand: the draft side publishes block 0, then waits
/// (heartbeating) rather than overwrite it with block 1 until the verify side took it in.
#[test]
fn a_draft_side_reuses_a_slot_only_once_its_block_was_taken_in() {
    let prompt = prompt(60);
    let region = region_with(&prompt);
    let (mut draft, mut helper) = draft_side(&region, true);
    let mut verify = decoder(&verify_spec());
    let own = Some(helper.fingerprint);
    let at = (1, prompt.len(), 0, false);
    let adopted = std::thread::scope(|s| {
        let drafting = s.spawn(|| {
            draft.start(&prompt, 64, false).unwrap();
            help(&region, &mut helper, draft.split_ops().unwrap(), &prompt, 1).unwrap()
        });
        let offered = verify::offer_within(&region, own, verify.split_ops(), at, SLOT);
        assert!(offered.unwrap().is_some());
        let blocks_when = |n: u32| {
            spin_until("published block", || {
                let w = region.split_word();
                (w.blocks >= n).then_some(w)
            })
        };
        let one = blocks_when(1);
        // Waited out by its heartbeats: the draft side is alive and waiting, not computing.
        let start = region.worker(Role::Draft).heartbeat_ms.load(Relaxed);
        spin_until("heartbeat 60 ms on", || {
            let now = region.worker(Role::Draft).heartbeat_ms.load(Relaxed);
            (now >= start + 60).then_some(())
        });
        assert_eq!(region.split_word(), one, "block 1 overwrote block 0's slot");
        region.count_taken_in(one.seq, 1);
        let two = blocks_when(2);
        // Nothing more: the verify side drops the job; the draft side prefills alone.
        assert!(region.move_split(
            two,
            JobWord {
                state: SplitState::Dropped,
                ..two
            }
        ));
        drafting.join().unwrap()
    });
    assert!(!adopted);
    assert_eq!(draft.cached(), 0);
}

/// A ring of one slot: the draft side publishes every block but adopts none (killed after its
/// share, say). The verify side keeps its whole prefill and gives the handover up once stalled.
#[test]
fn a_handover_nobody_adopts_is_waited_out_and_keeps_the_verify_cache() {
    let prompt = prompt(60);
    let region = region_with(&prompt);
    let fp = fingerprint(&verify_spec()).unwrap();
    region.advertise_helper(fp);
    let t0 = Instant::now();
    let (split, verify) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut w = take_offered(&region);
            let job = region.split_job();
            let zeros = vec![0.0; job.split as usize * job.kv_dim as usize];
            for layer in 0..job.layers {
                // The one slot is free once the verify side took the block before in.
                spin_until("block taken in", || {
                    (region.taken_in(w.seq) >= layer).then_some(())
                });
                for values in [false, true] {
                    let at = job.word_of(layer as usize, values, 0);
                    region.write_exchange(at, &zeros).unwrap();
                }
                let next = JobWord {
                    blocks: layer + 1,
                    ..w
                };
                assert!(region.move_split(w, next));
                w = next;
            }
        });
        verify_side_within(&region, &prompt, SLOT)
    });
    assert!(split, "the verify side's prefill ran to its end");
    assert_eq!(verify.cached(), prompt.len() - 1);
    assert!(t0.elapsed() >= STALL, "{:?}", t0.elapsed());
    let w = region.split_word();
    // It handed block 0 over into the one slot, then waited for its adoption in vain.
    assert_eq!((w.state, w.blocks), (SplitState::Dropped, 1));
}

/// A request cancelled during the split (a client gone) frees each side at its next block: the
/// verify side with every block of the draft side's published already, the draft side before
/// it publishes its first.
#[test]
fn a_request_that_ends_midway_ends_the_split_at_the_next_block() {
    let prompt = prompt(60);
    // The verify side: the draft side (by hand) has published every block.
    let region = region_with(&prompt);
    let fp = fingerprint(&verify_spec()).unwrap();
    region.advertise_helper(fp);
    region.announce_verifier(fp);
    let mut d = decoder(&verify_spec());
    d.start(&prompt, 64, false).unwrap();
    let at = (1, prompt.len(), 0, false);
    let word = offer(&region, Some(fp), d.split_ops(), at)
        .unwrap()
        .unwrap();
    let mut w = take_offered(&region);
    let job = region.split_job();
    for layer in 0..job.layers {
        let next = JobWord {
            blocks: layer + 1,
            ..w
        };
        assert!(region.move_split(w, next));
        w = next;
    }
    let cancelled = amusd_shm::FinishReason::Cancelled;
    region.finish_request(1, cancelled, "").unwrap();
    let split = verify_prefill(&region, d.split_ops().unwrap(), &prompt, word).unwrap();
    assert!(!split);
    assert_eq!(d.cached(), 0);
    assert_eq!(region.split_word().state, SplitState::Dropped);

    // The draft side: it takes the job of a request that has just ended.
    let region = region_with(&prompt);
    let (mut draft, mut helper) = draft_side(&region, true);
    let own = Some(helper.fingerprint);
    offer(&region, own, d.split_ops(), at).unwrap().unwrap();
    region.finish_request(1, cancelled, "").unwrap();
    draft.start(&prompt, 64, false).unwrap();
    let ops = draft.split_ops().unwrap();
    assert!(!help(&region, &mut helper, ops, &prompt, 1).unwrap());
    let w = region.split_word();
    assert_eq!((w.state, w.blocks), (SplitState::Dropped, 0));
}

#[test]
fn short_prompts_kept_prefixes_and_resumed_requests_are_not_split() {
    let region = region_with(&prompt(60));
    let own = fingerprint(&verify_spec());
    region.advertise_helper(own.unwrap());
    let mut d = decoder(&verify_spec());
    let short = MIN_SPLIT_POSITIONS;
    // (prompt length, kept, resumed): too short; a kept prefix past the verify side's share;
    // a restarted verify worker (more than the prompt committed).
    for (n, kept, resumed) in [(short, 0, false), (100, 60, false), (100, 0, true)] {
        let before = region.split_word().seq;
        assert_eq!(
            offer(&region, own, d.split_ops(), (1, n, kept, resumed)).unwrap(),
            None
        );
        // A dropped job still says so, for the draft worker not to wait.
        let w = region.split_word();
        assert_eq!((w.seq, w.state), (before + 1, SplitState::Dropped));
    }
    assert!(offer(&region, own, d.split_ops(), (1, 100, 20, false))
        .unwrap()
        .is_some());
    // Without a helper advertised, no job at all.
    region.advertise_helper(0);
    let before = region.split_word();
    assert_eq!(
        offer(&region, own, d.split_ops(), (1, 100, 0, false)).unwrap(),
        None
    );
    assert_eq!(region.split_word(), before);
}

/// SmolLM2-135M's context cost (`2 * 576 / 3,538,944` multiply-adds a position): half of a short
/// prompt, more of a long one's first positions; both shares cost the same to a position.
#[test]
fn a_balanced_split_gives_the_draft_worker_more_of_a_long_prompt() {
    let r = 1152.0 / 3_538_944.0;
    let share = |e: usize| balanced_split(e, r) as f64 / e as f64;
    assert!((0.50..0.52).contains(&share(191)), "{}", share(191));
    assert!((0.51..0.54).contains(&share(525)), "{}", share(525));
    assert!((0.57..0.61).contains(&share(2832)), "{}", share(2832));
    let work = |from: usize, to: usize| -> f64 {
        let rr = r * ATTENTION_SLOWDOWN;
        (from..to).map(|p| 1.0 + rr * p as f64).sum()
    };
    for e in [48, 191, 1240, 8191] {
        let s = balanced_split(e, r);
        let (draft, verify) = (work(0, s), work(s, e));
        assert!(
            (draft - verify).abs() <= 1.0 + r * ATTENTION_SLOWDOWN * e as f64,
            "{e}: {s}"
        );
    }
    assert_eq!(balanced_split(100, 0.0), 50);
    assert_eq!(balanced_split(0, r), 0);
}

#[test]
fn the_fingerprint_names_the_file_its_contents_and_the_arithmetic() {
    let a = fingerprint(&verify_spec()).unwrap();
    assert_eq!(fingerprint(&verify_spec()), Some(a));
    assert_ne!(fingerprint(&format!("{}:stored", model_file())), Some(a));
    assert_eq!(fingerprint("/no/such/model.gguf:f32"), None);
}
