//! [`ShmText`]: a fixed-capacity string made of atomics.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

/// A string of at most `N` bytes living in shared memory: a length word and `N` byte atomics.
///
/// One process writes it ([`set`](Self::set)), others read it ([`get`](Self::get)). There is no
/// lock, so a read racing a write may see a mix of old and new bytes; `get` then returns whatever
/// it saw, decoded lossily. What it never does is read out of bounds or panic: the length is
/// clamped to `N`, whatever value (torn, stale or garbage) the length word holds.
///
/// Ordering: `set` stores the length 0 (Relaxed), the bytes (Relaxed), then the new length with
/// Release; `get` loads the length with Acquire, then the bytes below it (Relaxed). A reader that
/// sees the new length therefore sees the new bytes (unless yet another `set` is racing it).
#[repr(C, align(8))]
pub struct ShmText<const N: usize> {
    len: AtomicU32,
    bytes: [AtomicU8; N],
}

impl<const N: usize> ShmText<N> {
    /// The capacity in bytes.
    pub const CAPACITY: usize = N;

    /// Store `s`, truncated at a char boundary to fit `N` bytes. Returns the bytes stored.
    pub fn set(&self, s: &str) -> usize {
        let mut n = s.len().min(N);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.len.store(0, Ordering::Relaxed);
        for (slot, b) in self.bytes.iter().zip(&s.as_bytes()[..n]) {
            slot.store(*b, Ordering::Relaxed);
        }
        self.len.store(n as u32, Ordering::Release);
        n
    }

    /// Read the string (lossy UTF-8; the length is clamped to `N`).
    pub fn get(&self) -> String {
        let n = (self.len.load(Ordering::Acquire) as usize).min(N);
        let bytes: Vec<u8> = self.bytes[..n]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Store the empty string.
    pub fn clear(&self) {
        self.len.store(0, Ordering::Release);
    }

    /// The raw length word (unclamped; for tests and dumps).
    pub fn raw_len(&self) -> &AtomicU32 {
        &self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeroed<const N: usize>() -> Box<ShmText<N>> {
        // SAFETY: all-zero bytes are a valid value for atomics (and so for ShmText).
        unsafe { Box::<ShmText<N>>::new_zeroed().assume_init() }
    }

    #[test]
    fn roundtrip_and_truncation_at_char_boundary() {
        let t = zeroed::<8>();
        assert_eq!(t.get(), "");
        assert_eq!(t.set("cuda:0"), 6);
        assert_eq!(t.get(), "cuda:0");
        // 'é' is 2 bytes: "abcdefé" is 8 bytes and fits; "abcdefgé" is 9 and must drop 'é' whole.
        assert_eq!(t.set("abcdefé"), 8);
        assert_eq!(t.get(), "abcdefé");
        assert_eq!(t.set("abcdefgé"), 7);
        assert_eq!(t.get(), "abcdefg");
        assert_eq!(t.set("€€€"), 6); // 3 bytes each: only two fit
        assert_eq!(t.get(), "€€");
        t.clear();
        assert_eq!(t.get(), "");
    }

    #[test]
    fn garbage_length_never_reads_out_of_bounds() {
        let t = zeroed::<32>();
        t.set("hello");
        for bad in [33, 1000, u32::MAX] {
            t.raw_len().store(bad, Ordering::Relaxed);
            let s = t.get();
            assert!(
                s.len() <= 32 * 3,
                "lossy decoding may expand, but only from 32 bytes"
            );
            assert!(s.starts_with("hello"));
        }
    }

    #[test]
    fn invalid_utf8_is_lossy() {
        let t = zeroed::<4>();
        for (i, b) in [0xffu8, b'a', 0xc3, 0x28].iter().enumerate() {
            t.bytes[i].store(*b, Ordering::Relaxed);
        }
        t.raw_len().store(4, Ordering::Release);
        assert_eq!(t.get(), "\u{fffd}a\u{fffd}(");
    }
}
