//! Bounds on a GGUF header, checked before candle parses it.
//!
//! candle's header reader bounds most counts by the file's size, but not everything a malformed
//! (or hostile) file can ask for: `general.alignment = 0` divides by zero (a panic), and each
//! element of a metadata array becomes a 32-byte value, so a file of 200 MB of junk bytes asks
//! for gigabytes. This walk reads the header as the format defines it (versions 1-3), keeping
//! only names, and refuses what amusd would not load anyway (llama.cpp refuses the same): an
//! unknown version, an alignment that is not a power of two, metadata arrays past
//! [`MAX_ARRAY_ELEMENTS`] elements in all, a key or tensor named twice (candle keeps the last),
//! a tensor whose data does not start at a multiple of the alignment.

use std::collections::HashSet;
use std::io::{self, BufRead, Seek};

/// Metadata array elements a header may hold in all: ~16x the largest vocabulary and merges
/// shipped today (Llama 3's 128k tokens, their types and 280k merges), and at most ~0.5 GB of
/// candle's values.
pub const MAX_ARRAY_ELEMENTS: u64 = 1 << 23;

/// The largest `general.alignment` accepted (llama.cpp writes 32).
const MAX_ALIGNMENT: u64 = 1 << 20;

/// What is wrong with a header, in words for the user.
#[derive(Debug)]
pub enum HeaderError {
    /// A version this reader (and candle's) does not know.
    Version(u32),
    /// The header is cut short, or says something no GGUF file says.
    Malformed(String),
    Io(io::Error),
}

impl From<io::Error> for HeaderError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => Self::Malformed("the header is cut short".into()),
            _ => Self::Io(e),
        }
    }
}

/// GGUF value types, by their ids in the format.
const STRING: u32 = 8;
const ARRAY: u32 = 9;

/// Bytes of a fixed-size value of type `t`, `None` for strings, arrays and unknown ids.
fn fixed_size(t: u32) -> Option<u64> {
    match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Walks the header at the start of `r` (its magic already checked by the caller).
pub fn check<R: BufRead + Seek>(r: &mut R) -> Result<(), HeaderError> {
    let mut walk = Walk {
        r,
        wide: true,
        elements: 0,
    };
    walk.u32()?; // magic
    let version = walk.u32()?;
    if !(1..=3).contains(&version) {
        return Err(HeaderError::Version(version));
    }
    walk.wide = version > 1;
    let tensors = walk.len()?;
    let kvs = walk.len()?;
    let mut alignment = 32;
    let mut keys = HashSet::new();
    for _ in 0..kvs {
        let key = walk.name("metadata key", &mut keys)?;
        let t = walk.u32()?;
        match key.as_slice() {
            b"general.alignment" => alignment = walk.alignment(t)?,
            _ => walk.skip_value(t, 0)?,
        }
    }
    let mut names = HashSet::new();
    for _ in 0..tensors {
        walk.tensor_info(alignment, &mut names)?;
    }
    Ok(())
}

/// The reader and what the walk has counted so far.
struct Walk<'a, R> {
    r: &'a mut R,
    /// Lengths and counts are u64 (versions 2-3), not u32 (version 1).
    wide: bool,
    elements: u64,
}

impl<R: BufRead + Seek> Walk<'_, R> {
    fn u32(&mut self) -> io::Result<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> io::Result<u64> {
        self.bytes().map(u64::from_le_bytes)
    }

    fn len(&mut self) -> io::Result<u64> {
        match self.wide {
            true => self.u64(),
            false => self.u32().map(u64::from),
        }
    }

    /// A key or tensor name, new in `seen`: short, so read (a value string's bytes are only
    /// skipped, [`Self::skip_value`]).
    fn name(&mut self, what: &str, seen: &mut HashSet<Vec<u8>>) -> Result<Vec<u8>, HeaderError> {
        let n = self.len()?;
        if n > 1 << 16 {
            return Err(HeaderError::Malformed(format!(
                "a {what} is {n} bytes long"
            )));
        }
        let mut name = vec![0; n as usize];
        self.r.read_exact(&mut name)?;
        if !seen.insert(name.clone()) {
            return Err(HeaderError::Malformed(format!(
                "the {what} '{}' appears twice",
                String::from_utf8_lossy(&name).escape_default()
            )));
        }
        Ok(name)
    }

    /// A tensor's name, dimensions, type and data offset; the offset must be aligned.
    fn tensor_info(
        &mut self,
        alignment: u64,
        seen: &mut HashSet<Vec<u8>>,
    ) -> Result<(), HeaderError> {
        let name = self.name("tensor name", seen)?;
        let dims = self.u32()?;
        if dims > 4 {
            return Err(HeaderError::Malformed(format!(
                "tensor '{}' has {dims} dimensions (GGUF allows 4)",
                String::from_utf8_lossy(&name).escape_default()
            )));
        }
        self.skip(u64::from(dims) * if self.wide { 8 } else { 4 })?;
        let _dtype = self.u32()?;
        let offset = self.u64()?;
        if offset % alignment != 0 {
            return Err(HeaderError::Malformed(format!(
                "tensor '{}' starts at offset {offset}, not a multiple of the alignment {alignment}",
                String::from_utf8_lossy(&name).escape_default()
            )));
        }
        Ok(())
    }

    fn skip(&mut self, bytes: u64) -> Result<(), HeaderError> {
        let n = i64::try_from(bytes)
            .map_err(|_| HeaderError::Malformed(format!("a value claims {bytes} bytes")))?;
        // Past the end is found by the next read (or by candle, for the last value).
        self.r.seek_relative(n)?;
        Ok(())
    }

    fn skip_value(&mut self, t: u32, depth: usize) -> Result<(), HeaderError> {
        if let Some(size) = fixed_size(t) {
            return self.skip(size);
        }
        match t {
            STRING => {
                let n = self.len()?;
                self.skip(n)
            }
            ARRAY => self.skip_array(depth),
            _ => Err(HeaderError::Malformed(format!(
                "a metadata value has type {t}, which GGUF does not define"
            ))),
        }
    }

    fn skip_array(&mut self, depth: usize) -> Result<(), HeaderError> {
        if depth >= 8 {
            return Err(HeaderError::Malformed(
                "metadata arrays nest too deep".into(),
            ));
        }
        let t = self.u32()?;
        let n = self.len()?;
        self.elements = self.elements.saturating_add(n);
        if self.elements > MAX_ARRAY_ELEMENTS {
            return Err(HeaderError::Malformed(format!(
                "its metadata arrays hold more than {MAX_ARRAY_ELEMENTS} elements"
            )));
        }
        match fixed_size(t) {
            Some(size) => self.skip(n * size),
            None => (0..n).try_for_each(|_| self.skip_value(t, depth + 1)),
        }
    }

    /// `general.alignment`: an integer, a power of two (the offset of the tensor data is rounded
    /// up to it).
    fn alignment(&mut self, t: u32) -> Result<u64, HeaderError> {
        let value = match t {
            0 | 1 => self.bytes::<1>()?[0] as u64,
            2 | 3 => u16::from_le_bytes(self.bytes()?) as u64,
            4 | 5 => self.u32()? as u64,
            10 | 11 => self.u64()?,
            _ => {
                return Err(HeaderError::Malformed(format!(
                    "general.alignment has type {t}, not an integer"
                )))
            }
        };
        if !value.is_power_of_two() || value > MAX_ALIGNMENT {
            return Err(HeaderError::Malformed(format!(
                "general.alignment is {value}, not a power of two up to {MAX_ALIGNMENT}"
            )));
        }
        Ok(value)
    }

    fn bytes<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut b = [0; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }
}
