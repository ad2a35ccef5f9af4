//! The parties' bells (futex words) and the shutdown flag.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::futex::{futex_wake, wait_for_change, wait_for_change_with, Spin};
use crate::layout::*;

impl Region {
    /// `party`'s bell word.
    pub fn bell(&self, party: Party) -> &AtomicU32 {
        &self.control.bells[party.index()]
    }

    /// Load `party`'s bell (Acquire). Do this *before* checking what you wait for, then pass the
    /// value to [`wait_bell`](Self::wait_bell).
    pub fn bell_value(&self, party: Party) -> u32 {
        self.bell(party).load(Ordering::Acquire)
    }

    /// Ring `party`'s bell: increment it (Release) and wake its sleeper. Call *after* publishing.
    pub fn ring(&self, party: Party) {
        let b = self.bell(party);
        b.fetch_add(1, Ordering::Release);
        futex_wake(b);
    }

    /// Sleep (spinning briefly first) until `party`'s bell differs from `seen` or `timeout`
    /// passes. Returns the new bell value, `None` on timeout. The pattern for a party with several
    /// things to wait for:
    ///
    /// ```
    /// # use amusd_shm::{Region, Party};
    /// # use std::time::Duration;
    /// # let region = Region::new_boxed();
    /// # let mut rounds = 0;
    /// loop {
    ///     let seen = region.bell_value(Party::Draft);
    ///     if region.shutdown_requested() { break; }
    ///     // ... check the request, verified_len, ...; if there is work, do it and `continue` ...
    ///     # rounds += 1; if rounds == 2 { break; }
    ///     region.wait_bell(Party::Draft, seen, Some(Duration::from_millis(1)));
    /// }
    /// ```
    pub fn wait_bell(&self, party: Party, seen: u32, timeout: Option<Duration>) -> Option<u32> {
        wait_for_change(self.bell(party), seen, timeout)
    }

    /// [`wait_bell`](Self::wait_bell) with an explicit spin policy (e.g. [`Spin::NONE`] for an
    /// idle loop that polls with short timeouts and should not burn CPU spinning each time).
    pub fn wait_bell_with(
        &self,
        party: Party,
        seen: u32,
        timeout: Option<Duration>,
        spin: Spin,
    ) -> Option<u32> {
        wait_for_change_with(self.bell(party), seen, timeout, spin)
    }

    /// Coordinator: ask the workers to exit (sets `shutdown`, bumps and wakes `request_word`,
    /// rings both workers' bells).
    pub fn request_shutdown(&self) {
        self.control.shutdown.store(1, Ordering::Release);
        // +2 keeps the parity, so this is safe even against a concurrent seqlock writer.
        self.control.request_word.fetch_add(2, Ordering::Release);
        futex_wake(&self.control.request_word);
        self.ring(Party::Draft);
        self.ring(Party::Verify);
    }

    /// Whether the coordinator asked the workers to exit.
    pub fn shutdown_requested(&self) -> bool {
        self.control.shutdown.load(Ordering::Acquire) != 0
    }
}
