//! Weights on transparent huge pages, asked for once a model is loaded.
//!
//! A one-token forward of the draft streams ~80 MB of weights: 20,000 4 KiB pages, each a TLB miss
//! and a page walk. On the 2-core Zen 4 VM the same draft forward ran 10-15% slower in a process's
//! first-loaded copy than in later ones (whose pages happened to lie contiguously), and as fast in
//! both once the process's heap was on 2 MiB pages (`examples/fwd_probe`, see the README).
//!
//! The weights are many separate allocations (a few hundred KB to a few MB each) that the allocator
//! places as it likes, so instead of allocating them specially we ask Linux (6.1 and later) to
//! collapse every 2 MiB-aligned region they touch into a huge page now (`MADV_COLLAPSE`). That
//! changes how the memory is mapped, never what it holds, whatever else lives in the region; a
//! region the kernel cannot collapse (not all mapped, no huge page free, an older kernel, THP
//! disabled) stays as it was. Elsewhere this does nothing. It costs a load ~30 ms for the draft's
//! ~58 regions (more when the kernel must first compact memory to find free huge pages).

use std::collections::BTreeSet;

/// Bytes of an x86-64 / aarch64 (4 KiB granule) transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Collapses the huge-page regions that `ranges` (start address, length in bytes) touch, each
/// region once; returns how many the kernel collapsed.
pub fn collapse(ranges: impl IntoIterator<Item = (usize, usize)>) -> usize {
    let mut regions = BTreeSet::new();
    for (start, len) in ranges.into_iter().filter(|&(_, len)| len > 0) {
        let first = start / HUGE_PAGE;
        let last = (start + len - 1) / HUGE_PAGE;
        regions.extend(first..=last);
    }
    regions
        .into_iter()
        .filter(|&r| collapse_region(r * HUGE_PAGE))
        .count()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn collapse_region(at: usize) -> bool {
    // SAFETY: MADV_COLLAPSE only remaps the region's pages (copying them into a huge page); the
    // contents every thread sees stay the same, so it cannot break any Rust object living there.
    // An address range that is not wholly mapped is refused with an error, not touched.
    unsafe { libc::madvise(at as *mut libc::c_void, HUGE_PAGE, libc::MADV_COLLAPSE) == 0 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn collapse_region(_at: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer spanning several huge pages: collapsing it leaves every byte as it was (whether
    /// or not this kernel collapses), and never reports more regions than the range touches.
    #[test]
    fn collapsing_keeps_the_contents() {
        let data: Vec<u8> = (0..5 * HUGE_PAGE).map(|i| (i * 31 % 251) as u8).collect();
        let done = collapse([(data.as_ptr() as usize, data.len())]);
        assert!(done <= 6);
        assert!(data
            .iter()
            .enumerate()
            .all(|(i, &v)| v == (i * 31 % 251) as u8));
        assert_eq!(collapse([(data.as_ptr() as usize, 0)]), 0);
    }
}
