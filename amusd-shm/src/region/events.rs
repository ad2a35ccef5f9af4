//! The workers' metric rings: each worker pushes its events, anyone reads the recent ones.

use std::sync::atomic::{fence, Ordering};

use super::READABLE_EVENTS;
use crate::layout::*;

/// A copy of one metric event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRecord {
    /// The event's index in its ring's history (assigned by `push`).
    pub seq: u64,
    /// Start, CLOCK_MONOTONIC µs.
    pub t_start_us: u64,
    /// End, CLOCK_MONOTONIC µs.
    pub t_end_us: u64,
    /// Request.
    pub request_id: u64,
    /// Kind.
    pub kind: EventKind,
    /// Position.
    pub position: u32,
    /// Count.
    pub count: u32,
    /// Accepted.
    pub accepted: u32,
}

/// Events read by [`EventRing::events_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventBatch {
    /// The events, oldest first.
    pub events: Vec<EventRecord>,
    /// The cursor to pass next time.
    pub next: u64,
    /// Events in the requested range that were overwritten before they could be read.
    pub lost: u64,
}

impl Region {
    /// `role`'s metric ring.
    pub fn events(&self, role: Role) -> &EventRing {
        match role {
            Role::Draft => &self.draft_events,
            Role::Verify => &self.verify_events,
        }
    }
}

impl EventRing {
    /// Events pushed so far (Acquire).
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// The ring's single writer: append `ev` (its `seq` is ignored and assigned). Stores the slot
    /// (Relaxed, after a `fence(Release)` that orders it after the previous `head` store), then
    /// `head + 1` (Release). Returns the event's seq.
    pub fn push(&self, ev: &EventRecord) -> u64 {
        let h = self.head.load(Ordering::Relaxed);
        // Any reader that sees one of the slot stores below also sees head >= h (pairs with the
        // reader's fence(Acquire)), so it knows this slot's previous event is being overwritten.
        fence(Ordering::Release);
        let s = &self.events[(h % EVENT_CAPACITY as u64) as usize];
        let r = Ordering::Relaxed;
        s.seq.store(h, r);
        s.t_start_us.store(ev.t_start_us, r);
        s.t_end_us.store(ev.t_end_us, r);
        s.request_id.store(ev.request_id, r);
        s.kind.store(ev.kind.as_u32(), r);
        s.position.store(ev.position, r);
        s.count.store(ev.count, r);
        s.accepted.store(ev.accepted, r);
        self.head.store(h.wrapping_add(1), Ordering::Release);
        h
    }

    /// Read events `lo..hi` (requires `hi <= head` as loaded with Acquire, `hi - lo <= CAP`),
    /// dropping those whose slot may have been overwritten during the read.
    fn read_range(&self, lo: u64, hi: u64) -> Vec<EventRecord> {
        let r = Ordering::Relaxed;
        let mut raw = Vec::with_capacity((hi - lo) as usize);
        for i in lo..hi {
            let s = &self.events[(i % EVENT_CAPACITY as u64) as usize];
            raw.push((
                i,
                s.seq.load(r),
                s.t_start_us.load(r),
                s.t_end_us.load(r),
                s.request_id.load(r),
                s.kind.load(r),
                s.position.load(r),
                s.count.load(r),
                s.accepted.load(r),
            ));
        }
        fence(Ordering::Acquire);
        let h2 = self.head.load(Ordering::Relaxed);
        // Event i's slot is next written by event i + CAP, which starts only once head reaches
        // i + CAP. If we saw none of that write, h2 < i + CAP.
        let intact_from = h2.saturating_add(1).saturating_sub(EVENT_CAPACITY as u64);
        raw.into_iter()
            .filter(|e| e.0 >= intact_from && e.1 == e.0)
            .filter_map(|e| {
                Some(EventRecord {
                    seq: e.1,
                    t_start_us: e.2,
                    t_end_us: e.3,
                    request_id: e.4,
                    kind: EventKind::from_u32(e.5)?,
                    position: e.6,
                    count: e.7,
                    accepted: e.8,
                })
            })
            .collect()
    }

    /// The last `n` (at most [`READABLE_EVENTS`]) events, oldest first, without any whose slot
    /// was overwritten while reading.
    pub fn recent_events(&self, n: usize) -> Vec<EventRecord> {
        let hi = self.head();
        let n = n.min(READABLE_EVENTS) as u64;
        self.read_range(hi.saturating_sub(n), hi)
    }

    /// Events from index `cursor` on (at most `max`), oldest first, for a reader that drains the
    /// ring incrementally; `lost` counts those already overwritten.
    pub fn events_since(&self, cursor: u64, max: usize) -> EventBatch {
        let head = self.head();
        let oldest = head.saturating_sub(READABLE_EVENTS as u64);
        let lo = cursor.clamp(oldest, head);
        let hi = lo.saturating_add(max.min(READABLE_EVENTS) as u64).min(head);
        let events = self.read_range(lo, hi);
        let first = events.first().map_or(hi, |e| e.seq);
        EventBatch {
            lost: (lo - cursor.min(lo)) + (first - lo),
            next: hi,
            events,
        }
    }
}
