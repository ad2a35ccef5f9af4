use super::*;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn region() -> Arc<Region> {
    Arc::from(Region::new_boxed())
}

#[test]
fn coordinator_repairs_an_epoch_left_odd_by_a_killed_draft_worker() {
    let r = region();
    r.draft_rewrite(4, 0, &[1, 2, 3]).unwrap();
    assert!(!r.repair_draft_epoch(), "an even epoch needs no repair");
    assert_eq!(r.read_draft(0, 8).unwrap().tokens, vec![1, 2, 3]);
    // A draft worker killed between the odd and the even store of a rewrite.
    seq_open(&r.draft.draft_epoch);
    assert!(matches!(r.read_draft(0, 8), Err(ShmError::Unstable { .. })));
    assert!(r.repair_draft_epoch());
    let d = r.read_draft(0, 8).unwrap();
    assert_eq!((d.request_id, d.len, d.epoch % 2), (0, 0, 0));
    // The replacement's appends work again.
    r.draft_rewrite(4, 0, &[1]).unwrap();
    r.draft_append(&[5]).unwrap();
    assert_eq!(r.read_draft(0, 8).unwrap().tokens, vec![1, 5]);
}

#[test]
fn logprob_rows_roundtrip() {
    let r = region();
    let rows = vec![
        vec![
            (7, (-0.5f32).to_bits()),
            (7, (-0.5f32).to_bits()),
            (2, (-1.5f32).to_bits()),
        ],
        vec![
            (9, (-3.0f32).to_bits()),
            (4, (-0.1f32).to_bits()),
            (9, (-3.0f32).to_bits()),
        ],
    ];
    r.store_logprobs(3, &rows).unwrap();
    assert_eq!(r.read_logprobs(3, 5, 3), rows);
    assert_eq!(r.read_logprobs(4, 5, 1), vec![vec![rows[1][0]]]);
    assert!(matches!(
        r.store_logprobs(TOKEN_CAPACITY - 1, &rows),
        Err(ShmError::CapacityExceeded { .. })
    ));
}

#[test]
fn request_roundtrip_and_errors() {
    let r = region();
    let snap = r.read_request().unwrap();
    assert_eq!(snap.state, RequestState::Idle);
    assert_eq!(snap.request_id, 0);

    let spec = RequestSpec {
        request_id: 9,
        prompt: &[1, 2, 3],
        max_new_tokens: 100,
        stop_tokens: &[2, 7],
        sampling: SamplingFields {
            seed: u64::MAX - 1,
            temperature_bits: 0.7f32.to_bits(),
            dynatemp_range_bits: 0.3f32.to_bits(),
            dynatemp_exponent_bits: 2.0f32.to_bits(),
            top_k: 40,
            top_p_bits: 0.9f32.to_bits(),
            min_p_bits: 0.05f32.to_bits(),
            top_n_sigma_bits: 1.5f32.to_bits(),
            typical_p_bits: 0.95f32.to_bits(),
            xtc_probability_bits: 0.5f32.to_bits(),
            xtc_threshold_bits: 0.2f32.to_bits(),
            dry_multiplier_bits: 0.8f32.to_bits(),
            dry_base_bits: 2.0f32.to_bits(),
            dry_allowed_length: 3,
            dry_last_n: 500,
            dry_breakers: vec![0, 1 << 63, 5],
            repeat_penalty_bits: 1.1f32.to_bits(),
            frequency_penalty_bits: (-0.5f32).to_bits(),
            presence_penalty_bits: 0.25f32.to_bits(),
            penalty_last_n: u32::MAX,
            greedy_draft: true,
            no_draft_lookup: true,
            cache_prompt: true,
            logit_bias: vec![(5, 2.5f32.to_bits()), (49151, f32::NEG_INFINITY.to_bits())],
            logprobs: 4,
            prompt_logprobs: true,
            grammar_kind: 2,
            grammar: r#"{"type": "object", "title": "caf\u00e9 ☕"}"#.into(),
        },
    };
    let too_long = SamplingFields {
        grammar_kind: 3,
        grammar: "a".repeat(GRAMMAR_TEXT_LEN + 1),
        ..SamplingFields::GREEDY
    };
    assert!(matches!(
        r.submit_request(&RequestSpec {
            sampling: too_long,
            ..spec.clone()
        }),
        Err(ShmError::GrammarTooLong { given, max: GRAMMAR_TEXT_LEN }) if given == GRAMMAR_TEXT_LEN + 1
    ));
    let too_many = SamplingFields {
        logit_bias: vec![(1, 0); MAX_LOGIT_BIAS + 1],
        ..SamplingFields::GREEDY
    };
    assert!(matches!(
        r.submit_request(&RequestSpec {
            sampling: too_many,
            ..spec.clone()
        }),
        Err(ShmError::TooManyLogitBias {
            given: 257,
            max: 256
        })
    ));
    let w0 = r.request_word();
    r.submit_request(&spec).unwrap();
    assert_eq!(r.request_word(), w0 + 2);
    let snap = r.read_request().unwrap();
    assert_eq!(snap.request_id, 9);
    assert_eq!(snap.state, RequestState::Running);
    assert_eq!(snap.prompt_len, 3);
    assert_eq!(snap.max_new_tokens, 100);
    assert_eq!(snap.stop_tokens, vec![2, 7]);
    assert_eq!(snap.sampling, spec.sampling);
    assert_eq!(snap.finish_reason, FinishReason::None);
    assert_eq!(r.verified_len(), 3);
    assert_eq!(r.read_verified(0, usize::MAX), vec![1, 2, 3]);

    assert!(matches!(
        r.submit_request(&RequestSpec {
            request_id: 10,
            ..spec.clone()
        }),
        Err(ShmError::RequestRunning { request_id: 9 })
    ));
    assert!(matches!(
        r.finish_request(8, FinishReason::Stop, ""),
        Err(ShmError::NotCurrentRequest { given: 8, .. })
    ));
    r.finish_request(9, FinishReason::Error, "verify worker died: CUDA OOM")
        .unwrap();
    let snap = r.read_request().unwrap();
    assert_eq!(snap.state, RequestState::Failed);
    assert_eq!(snap.finish_reason, FinishReason::Error);
    assert_eq!(snap.error_text, "verify worker died: CUDA OOM");

    assert!(matches!(
        r.submit_request(&RequestSpec {
            request_id: 0,
            ..spec.clone()
        }),
        Err(ShmError::InvalidRequestId)
    ));
    assert!(matches!(
        r.submit_request(&RequestSpec {
            request_id: 11,
            stop_tokens: &[0; 9],
            ..spec.clone()
        }),
        Err(ShmError::TooManyStopTokens { given: 9, max: 8 })
    ));
    assert!(matches!(
        r.submit_request(&RequestSpec {
            request_id: 11,
            max_new_tokens: TOKEN_CAPACITY as u32,
            ..spec.clone()
        }),
        Err(ShmError::CapacityExceeded { .. })
    ));
    // A second request replaces the prompt and the finish state.
    r.submit_request(&RequestSpec {
        request_id: 12,
        prompt: &[5],
        max_new_tokens: 1,
        stop_tokens: &[],
        sampling: SamplingFields::GREEDY,
    })
    .unwrap();
    let snap = r.read_request().unwrap();
    assert_eq!((snap.request_id, snap.prompt_len), (12, 1));
    assert_eq!(
        snap.sampling,
        SamplingFields::GREEDY,
        "the grammar is cleared too"
    );
    assert_eq!(snap.finish_reason, FinishReason::None);
    assert_eq!(snap.error_text, "");
    assert!(snap.stop_tokens.is_empty());
    r.finish_request(12, FinishReason::Length, "").unwrap();
    assert_eq!(r.request_state(), Some(RequestState::Done));

    assert!(!r.shutdown_requested());
    r.request_shutdown();
    assert!(r.shutdown_requested());
    assert!(r.read_request().unwrap().shutdown);
}

#[test]
fn corrupt_values_are_reported_not_trusted() {
    let r = region();
    r.request.state.store(77, Ordering::Relaxed);
    assert!(matches!(
        r.read_request(),
        Err(ShmError::Corrupt {
            field: "request.state",
            value: 77
        })
    ));
    r.request.state.store(0, Ordering::Relaxed);
    r.request.prompt_len.store(u32::MAX, Ordering::Relaxed);
    r.request.n_stop_tokens.store(u32::MAX, Ordering::Relaxed);
    let s = r.read_request().unwrap();
    assert_eq!(s.prompt_len, TOKEN_CAPACITY);
    assert_eq!(s.stop_tokens.len(), MAX_STOP_TOKENS);

    r.verified.verified_len.store(u32::MAX, Ordering::Relaxed);
    assert_eq!(r.verified_len(), TOKEN_CAPACITY);
    assert_eq!(r.read_verified(0, usize::MAX).len(), TOKEN_CAPACITY);
    assert_eq!(r.read_verified(usize::MAX, 3).len(), 0);
    r.draft.draft_len.store(u32::MAX, Ordering::Relaxed);
    let d = r.read_draft(TOKEN_CAPACITY - 2, usize::MAX).unwrap();
    assert_eq!((d.len, d.tokens.len()), (TOKEN_CAPACITY, 2));
    r.worker(Role::Draft).state.store(99, Ordering::Relaxed);
    assert_eq!(r.worker_state(Role::Draft), None);
    r.events(Role::Draft)
        .head
        .store(u64::MAX, Ordering::Relaxed);
    // All slots are zero (seq 0, kind 0): nothing valid, nothing out of bounds.
    assert!(r.events(Role::Draft).recent_events(10).is_empty());
    let b = r.events(Role::Draft).events_since(0, 10);
    assert!(b.events.is_empty());
}

#[test]
fn verified_is_append_only() {
    let r = region();
    r.submit_request(&RequestSpec {
        request_id: 1,
        prompt: &[10, 11],
        max_new_tokens: 10,
        stop_tokens: &[],
        sampling: SamplingFields::GREEDY,
    })
    .unwrap();
    assert_eq!(r.publish_verified(2, &[12, 13]).unwrap(), 4);
    assert!(matches!(
        r.publish_verified(3, &[99]),
        Err(ShmError::VerifiedOutOfOrder {
            expected: 4,
            got: 3
        })
    ));
    assert_eq!(r.read_verified(1, 3), vec![11, 12]);
    let s = r.verified_snapshot(1, 100).unwrap();
    assert_eq!((s.request_id, s.len, s.from), (1, 4, 1));
    assert_eq!(s.tokens, vec![11, 12, 13]);
    let big = vec![0; TOKEN_CAPACITY];
    assert!(matches!(
        r.publish_verified(4, &big),
        Err(ShmError::CapacityExceeded { .. })
    ));
}

#[test]
fn draft_sources_travel_with_their_tokens() {
    use TokenSource::{Lookup, Model};
    let r = region();
    r.draft_rewrite_from(2, 0, &[1, 2, 3], &[Model, Model, Lookup])
        .unwrap();
    r.draft_append_from(&[4, 5], &[Lookup]).unwrap();
    let s = r.read_draft(1, 10).unwrap();
    assert_eq!(s.tokens, vec![2, 3, 4, 5]);
    assert_eq!(
        s.sources,
        vec![Model, Lookup, Lookup, Model],
        "unsaid: model"
    );
    // A rollback rewrites the sources with the tokens.
    r.draft_rewrite_from(2, 2, &[30], &[Model]).unwrap();
    r.draft_append(&[6]).unwrap();
    assert_eq!(r.read_draft(0, 10).unwrap().sources, vec![Model; 4]);
}

#[test]
fn draft_append_rewrite_and_repair() {
    let r = region();
    assert_eq!(r.draft_rewrite(5, 0, &[1, 2, 3]).unwrap(), 3);
    assert_eq!(r.draft_append(&[4, 5]).unwrap(), 5);
    let s = r.read_draft(1, 3).unwrap();
    assert_eq!(s.tokens, vec![2, 3, 4]);
    assert_eq!((s.request_id, s.len, s.from, s.epoch), (5, 5, 1, 2));
    // Roll back to 3 and draft two new tokens.
    assert_eq!(r.draft_rewrite(5, 3, &[40, 50]).unwrap(), 5);
    let s = r.read_draft(0, 100).unwrap();
    assert_eq!(s.tokens, vec![1, 2, 3, 40, 50]);
    assert_eq!(s.epoch, 4);
    assert!(matches!(
        r.draft_rewrite(5, 6, &[]),
        Err(ShmError::DraftRewriteBeyondEnd { from: 6, len: 5 })
    ));
    assert_eq!(r.read_draft(9, 3).unwrap().tokens, Vec::<u32>::new());

    // A writer killed mid-rewrite leaves the epoch odd: readers give up (bounded), appends
    // refuse, and the next rewrite repairs it.
    r.draft.draft_epoch.store(7, Ordering::Relaxed);
    let t = Instant::now();
    assert!(matches!(
        r.read_draft(0, 10),
        Err(ShmError::Unstable {
            what: "draft buffer",
            word: 7,
            ..
        })
    ));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(matches!(
        r.draft_append(&[1]),
        Err(ShmError::DraftMidRewrite { epoch: 7 })
    ));
    r.draft_rewrite(6, 0, &[9]).unwrap();
    let s = r.read_draft(0, 10).unwrap();
    assert_eq!((s.request_id, s.epoch, s.tokens), (6, 10, vec![9]));
}

/// Token at position p (13 bits) written in generation g (19 bits; = rewrites so far).
fn tok(p: usize, g: u32) -> u32 {
    assert!(p < 1 << 13 && g < 1 << 19);
    ((p as u32) << 19) | g
}

#[test]
fn draft_seqlock_readers_never_see_torn_snapshots() {
    let r = region();
    r.draft_rewrite(1, 0, &[]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::spawn(move || {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut gen = 1u32; // rewrites done == epoch / 2
            let mut len = 0usize;
            let mut ops = 0u64;
            while !stop.load(Ordering::Relaxed) || ops < 20_000 {
                ops += 1;
                if rng.gen_bool(0.3) || len + 8 > 4096 {
                    gen += 1;
                    let from = rng.gen_range(0..=len);
                    let n = rng.gen_range(0..64);
                    let toks: Vec<u32> = (from..from + n).map(|p| tok(p, gen)).collect();
                    len = r.draft_rewrite(gen as u64, from, &toks).unwrap();
                } else {
                    let n = rng.gen_range(1..8);
                    let toks: Vec<u32> = (len..len + n).map(|p| tok(p, gen)).collect();
                    len = r.draft_append(&toks).unwrap();
                }
                if ops > 2_000_000 || gen >= (1 << 19) - 2 {
                    break;
                }
            }
            ops
        })
    };
    let mut snapshots = 0u64;
    let mut nonempty = 0u64;
    let mut epochs = std::collections::BTreeSet::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        let from = (snapshots as usize * 37) % 600;
        match r.read_draft(from, 512) {
            Ok(s) => {
                snapshots += 1;
                epochs.insert(s.epoch);
                assert_eq!(s.epoch % 2, 0);
                let gen = s.epoch / 2;
                assert_eq!(s.request_id, gen as u64, "request id torn from epoch");
                let mut prev_gen = 0;
                for (i, &t) in s.tokens.iter().enumerate() {
                    let p = s.from + i;
                    assert_eq!((t >> 19) as usize, p, "token at wrong position");
                    let g = t & ((1 << 19) - 1);
                    assert!(g <= gen, "token from a rewrite after the snapshot");
                    assert!(g >= prev_gen, "mixed generations: torn snapshot");
                    prev_gen = g;
                }
                if !s.tokens.is_empty() {
                    nonempty += 1;
                }
            }
            Err(ShmError::Unstable { .. }) => {} // a descheduled writer; retry
            Err(e) => panic!("{e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let ops = writer.join().unwrap();
    assert!(snapshots > 100 && nonempty > 10, "{snapshots} snapshots");
    assert!(
        epochs.len() > 10,
        "reader saw too few epochs to mean anything"
    );
    eprintln!(
        "seqlock: {ops} writer ops, {snapshots} snapshots over {} epochs",
        epochs.len()
    );
}

#[test]
fn verified_snapshot_never_mixes_requests() {
    // The coordinator submits requests with prompts derived from the request id while a
    // reader takes snapshots: every snapshot's tokens must belong to its request id.
    let r = region();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut id = 0u64;
            while !stop.load(Ordering::Relaxed) || id < 2000 {
                id += 1;
                let n = 1 + (id as usize * 131) % 3000;
                let prompt: Vec<u32> = (0..n).map(|p| (id as u32) ^ ((p as u32) << 12)).collect();
                r.submit_request(&RequestSpec {
                    request_id: id,
                    prompt: &prompt,
                    max_new_tokens: 0,
                    stop_tokens: &[],
                    sampling: SamplingFields::GREEDY,
                })
                .unwrap();
                r.finish_request(id, FinishReason::Length, "").unwrap();
            }
        })
    };
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < Duration::from_millis(500) {
        if let Ok(s) = r.verified_snapshot(0, 3000) {
            n += 1;
            for (p, &tk) in s.tokens.iter().enumerate() {
                assert_eq!(tk, (s.request_id as u32) ^ ((p as u32) << 12));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(n > 10);
}

fn ev(i: u64) -> EventRecord {
    EventRecord {
        seq: 0,
        t_start_us: i * 3,
        t_end_us: i * 3 + 1,
        request_id: i ^ 0x5555,
        kind: [
            EventKind::DraftToken,
            EventKind::VerifyStep,
            EventKind::Rollback,
        ][(i % 3) as usize],
        position: (i as u32).wrapping_mul(7),
        count: (i % 17) as u32,
        accepted: (i % 13) as u32,
    }
}

fn check_ev(e: &EventRecord) {
    let want = EventRecord {
        seq: e.seq,
        ..ev(e.seq)
    };
    assert_eq!(*e, want, "half-written event");
}

#[test]
fn ring_basics() {
    let r = region();
    let ring = r.events(Role::Verify);
    assert!(ring.recent_events(5).is_empty());
    for i in 0..10 {
        assert_eq!(ring.push(&ev(i)), i);
    }
    let got = ring.recent_events(4);
    assert_eq!(
        got.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![6, 7, 8, 9]
    );
    got.iter().for_each(check_ev);
    let b = ring.events_since(0, 100);
    assert_eq!((b.events.len(), b.next, b.lost), (10, 10, 0));
    for i in 10..(10 + EVENT_CAPACITY as u64) {
        ring.push(&ev(i));
    }
    // head = 4106: events 3..10 were overwritten and 10's slot is the next to be written.
    let b = ring.events_since(3, 100);
    assert_eq!(b.lost, 8);
    assert_eq!(b.events[0].seq, 11);
    assert_eq!(b.next, 111);
    let all = ring.recent_events(usize::MAX);
    assert_eq!(all.len(), READABLE_EVENTS);
    assert_eq!(all.last().unwrap().seq, 10 + EVENT_CAPACITY as u64 - 1);
    all.iter().for_each(check_ev);
}

#[test]
fn ring_reader_never_returns_half_written_events() {
    let r = region();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::spawn(move || {
            let ring = r.events(Role::Draft);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) || i < 100_000 {
                ring.push(&ev(i));
                i += 1;
            }
            i
        })
    };
    let ring = r.events(Role::Draft);
    let t = Instant::now();
    let (mut reads, mut seen, mut cursor, mut lost) = (0u64, 0u64, 0u64, 0u64);
    while t.elapsed() < Duration::from_millis(800) {
        let got = ring.recent_events(EVENT_CAPACITY);
        for w in got.windows(2) {
            assert_eq!(w[0].seq + 1, w[1].seq, "gap inside the intact range");
        }
        got.iter().for_each(check_ev);
        let b = ring.events_since(cursor, 1000);
        b.events.iter().for_each(check_ev);
        assert_eq!(
            b.events.first().map(|e| e.seq),
            (b.next > cursor + b.lost).then_some(cursor + b.lost)
        );
        lost += b.lost;
        cursor = b.next;
        seen += got.len() as u64;
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let pushed = writer.join().unwrap();
    assert!(reads > 10 && seen > 0);
    eprintln!("ring: {pushed} pushed, {reads} reads, drain lost {lost}");
}

#[test]
fn worker_status_and_bells() {
    let r = region();
    let seen = r.bell_value(Party::Coordinator);
    r.register_worker(Role::Verify, "cuda:0", "llama-3.1-8b-instruct.Q8_0.gguf");
    assert!(r.bell_value(Party::Coordinator) != seen);
    assert_eq!(r.worker_state(Role::Verify), Some(WorkerState::Starting));
    r.set_worker_state(Role::Verify, WorkerState::Ready);
    r.set_worker_request(Role::Verify, 3);
    r.worker(Role::Verify).steps.fetch_add(2, Ordering::Relaxed);
    r.worker(Role::Verify)
        .last_error
        .set("CUDA error: out of memory");
    let s = r.worker_snapshot(Role::Verify);
    assert_eq!(s.pid, std::process::id());
    assert_eq!(s.state, Some(WorkerState::Ready));
    assert_eq!((s.request_id, s.steps), (3, 2));
    assert_eq!(s.device, "cuda:0");
    assert_eq!(s.model, "llama-3.1-8b-instruct.Q8_0.gguf");
    assert_eq!(s.last_error, "CUDA error: out of memory");
    assert!(r.heartbeat_age_ms(Role::Verify).unwrap() < 10_000);
    assert_eq!(r.heartbeat_age_ms(Role::Draft), None);
    assert_eq!(r.count_restart(Role::Verify), 1);
    r.mark_worker_dead(Role::Verify, ExitStatus::Signal(9));
    let s = r.worker_snapshot(Role::Verify);
    assert_eq!(s.state, Some(WorkerState::Dead));
    assert_eq!(s.exit_status, ExitStatus::Signal(9));
    assert_eq!((s.restarts, s.request_id), (1, 0));

    // A bell wakes a waiter in another thread.
    let seen = r.bell_value(Party::Draft);
    let waiter = {
        let r = r.clone();
        std::thread::spawn(move || r.wait_bell(Party::Draft, seen, Some(Duration::from_secs(20))))
    };
    r.submit_request(&RequestSpec {
        request_id: 1,
        prompt: &[1],
        max_new_tokens: 1,
        stop_tokens: &[],
        sampling: SamplingFields::GREEDY,
    })
    .unwrap();
    assert!(waiter.join().unwrap().is_some());
}
