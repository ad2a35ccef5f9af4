//! [`Shm`]: creating, attaching to, validating, listing and garbage-collecting regions.

use std::io::Read;
use std::mem::offset_of;
use std::num::NonZeroUsize;
use std::ops::Deref;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::mman::{mmap, munmap, shm_open, shm_unlink, MapFlags, ProtFlags};
use nix::sys::stat::{fstat, Mode};

use crate::error::ShmError;
use crate::layout::*;

/// Prefix of every region name amusd creates (after the leading `/`).
pub const NAME_PREFIX: &str = "amusd-";

/// Where Linux exposes POSIX shared-memory objects as files.
const SHM_DIR: &str = "/dev/shm";

const REGION_LEN: NonZeroUsize = match NonZeroUsize::new(REGION_SIZE) {
    Some(n) => n,
    None => panic!("empty region"),
};

/// A mapping of the region. Dereferences to [`Region`]. Dropping it unmaps it; it never unlinks
/// the name (the creator does that: [`Shm::unlink`], [`Shm::unlink_on_drop`]).
///
/// If another process of the same user shrinks the region file after mapping, accesses past the
/// new end raise SIGBUS; amusd never does that.
pub struct Shm {
    region: NonNull<Region>,
    name: String,
}

// SAFETY: the mapping is valid until Drop, and Region consists of atomics only, so it may be used
// from any thread.
unsafe impl Send for Shm {}
// SAFETY: as above; all access through &Region is atomic.
unsafe impl Sync for Shm {}

impl Deref for Shm {
    type Target = Region;
    fn deref(&self) -> &Region {
        self.region()
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: `region` came from mmap of REGION_SIZE bytes and no reference into it outlives
        // `self` (every borrow is tied to `&self`).
        let _ = unsafe { munmap(self.region.cast(), REGION_SIZE) };
    }
}

impl std::fmt::Debug for Shm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shm").field("name", &self.name).finish()
    }
}

/// The header fields, as parsed by [`parse_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    /// Layout version.
    pub version: u32,
    /// Tokens per buffer.
    pub token_capacity: u32,
    /// Region size in bytes.
    pub region_size: u64,
    /// The coordinator's euid.
    pub owner_uid: u32,
    /// The coordinator's pid.
    pub coordinator_pid: u32,
    /// Creation time, Unix ms.
    pub created_unix_ms: u64,
    /// The coordinator's start time (clock ticks since boot; 0 = unknown).
    pub coordinator_start_ticks: u64,
}

/// One entry of [`Shm::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region's name (`/amusd-...`).
    pub name: String,
    /// File size in bytes.
    pub size: u64,
    /// File owner.
    pub owner_uid: u32,
    /// The header, when it is valid for this build (and the size matches).
    pub header: Option<HeaderInfo>,
    /// Why the region cannot be attached by this build, if it cannot.
    pub problem: Option<String>,
    /// The coordinator's pid: from the header if valid, else from the name (`/amusd-<pid>-...`).
    pub coordinator_pid: Option<u32>,
    /// Whether the coordinator is alive: `kill(pid, 0)` succeeds or fails with EPERM, and (when
    /// the header records it) the process's start time matches. `None` when unknown.
    pub coordinator_alive: Option<bool>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_ne_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_ne_bytes(a)
}

/// Check that `bytes` (the first bytes of a region, at least [`HEADER_LEN`]) hold a header this
/// build can attach to: magic, layout version, region size and token capacity. Pure; never panics
/// or reads out of bounds, whatever `bytes` holds.
pub fn validate_header(bytes: &[u8]) -> Result<(), ShmError> {
    parse_header(bytes).map(|_| ())
}

/// [`validate_header`], returning the parsed fields.
pub fn parse_header(bytes: &[u8]) -> Result<HeaderInfo, ShmError> {
    parse_header_for("(buffer)", bytes)
}

fn parse_header_for(name: &str, bytes: &[u8]) -> Result<HeaderInfo, ShmError> {
    let name = name.to_string();
    if bytes.len() < HEADER_LEN {
        return Err(ShmError::HeaderTooShort {
            name,
            len: bytes.len(),
            expected: HEADER_LEN,
        });
    }
    let magic = u64_at(bytes, offset_of!(Header, magic));
    if magic != MAGIC {
        return Err(ShmError::BadMagic { name, found: magic });
    }
    let version = u32_at(bytes, offset_of!(Header, version));
    if version != LAYOUT_VERSION {
        return Err(ShmError::WrongVersion {
            name,
            found: version,
            expected: LAYOUT_VERSION,
        });
    }
    let region_size = u64_at(bytes, offset_of!(Header, region_size));
    if region_size != REGION_SIZE as u64 {
        return Err(ShmError::WrongRegionSize {
            name,
            found: region_size,
            expected: REGION_SIZE as u64,
        });
    }
    let token_capacity = u32_at(bytes, offset_of!(Header, token_capacity));
    if token_capacity != TOKEN_CAPACITY as u32 {
        return Err(ShmError::WrongTokenCapacity {
            name,
            found: token_capacity,
            expected: TOKEN_CAPACITY as u32,
        });
    }
    Ok(HeaderInfo {
        version,
        token_capacity,
        region_size,
        owner_uid: u32_at(bytes, offset_of!(Header, owner_uid)),
        coordinator_pid: u32_at(bytes, offset_of!(Header, coordinator_pid)),
        created_unix_ms: u64_at(bytes, offset_of!(Header, created_unix_ms)),
        coordinator_start_ticks: u64_at(bytes, offset_of!(Header, coordinator_start_ticks)),
    })
}

fn check_name(name: &str) -> Result<(), ShmError> {
    let bad = |reason| {
        Err(ShmError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if !name.starts_with('/') {
        return bad("it must start with '/'");
    }
    if name.len() < 2 || name.len() > 255 {
        return bad("it must be 2 to 255 bytes long");
    }
    if name[1..].contains('/') {
        return bad("it may contain no '/' after the first");
    }
    if name.contains('\0') || name == "/." || name == "/.." {
        return bad("it must be a plain file name");
    }
    Ok(())
}

fn os_err<'a>(op: &'static str, name: &'a str) -> impl FnOnce(Errno) -> ShmError + 'a {
    move |source| ShmError::Os {
        op,
        name: name.to_string(),
        error: source,
    }
}

/// `posix_fallocate` of `len` bytes from `offset` of the region `name`.
fn reserve(fd: &OwnedFd, name: &str, offset: usize, len: usize) -> Result<(), ShmError> {
    nix::fcntl::posix_fallocate(fd, offset as libc::off_t, len as libc::off_t).map_err(
        |e| match e {
            Errno::ENOSPC => ShmError::NoSpace {
                name: name.to_string(),
                size: (offset + len) as u64,
            },
            e => os_err("posix_fallocate", name)(e),
        },
    )
}

fn map_region(fd: &OwnedFd, name: &str, prot: ProtFlags) -> Result<NonNull<Region>, ShmError> {
    // SAFETY: a fresh shared mapping of a shm object at least REGION_SIZE bytes long (checked or
    // set by the caller); it aliases no Rust object of this process.
    let p = unsafe { mmap(None, REGION_LEN, prot, MapFlags::MAP_SHARED, fd, 0) }
        .map_err(os_err("mmap", name))?;
    Ok(p.cast())
}

/// The start time of process `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22).
pub(crate) fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` (with start time `start_ticks`, 0 = unknown) is alive; `None` if `pid` cannot be
/// a process id.
pub(crate) fn process_alive(pid: u32, start_ticks: u64) -> Option<bool> {
    // Never pass 0 or a negative pid to kill(2): those address process groups.
    if pid == 0 || pid > i32::MAX as u32 {
        return None;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None) {
        Ok(()) | Err(Errno::EPERM) => {}
        Err(Errno::ESRCH) => return Some(false),
        Err(_) => return None,
    }
    if start_ticks != 0 {
        if let Some(t) = process_start_ticks(pid) {
            // Same pid, different start time: the coordinator died and its pid was reused.
            return Some(t == start_ticks);
        }
    }
    Some(true)
}

/// `name` with everything but printable ASCII escaped (`\u{1b}`, `\n`, ...), for terminals.
pub fn escape_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_graphic() {
                c.to_string()
            } else {
                c.escape_default().to_string()
            }
        })
        .collect()
}

/// A `/dev/shm` entry's metadata and first [`HEADER_LEN`] bytes; `None` if it is not a regular
/// file (a FIFO, a socket, a link...). The entry is opened with `O_NONBLOCK | O_NOFOLLOW` and
/// judged by `fstat` on what was opened, so an entry swapped for a FIFO or a link after the
/// directory was read can neither block the open nor be followed.
fn read_entry(
    path: &std::path::Path,
) -> Option<(std::fs::Metadata, Result<Vec<u8>, std::io::Error>)> {
    use std::os::unix::fs::OpenOptionsExt;
    let lmeta = std::fs::symlink_metadata(path).ok()?;
    if !lmeta.is_file() {
        return None;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        // Listed with the reason (e.g. another user's region, unreadable to us).
        Err(e) => return Some((lmeta, Err(e))),
    };
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN);
    let read = (&mut file)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut bytes)
        .map(|_| bytes);
    Some((meta, read))
}

fn pid_from_name(file_name: &str) -> Option<u32> {
    file_name
        .strip_prefix(NAME_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

impl Shm {
    /// A fresh region name, `/amusd-<pid>-<16 hex digits>`. The pid lets `list`/`gc` find the
    /// coordinator of a region whose header is unreadable.
    pub fn fresh_name() -> String {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        // RandomState is seeded from the OS's randomness; mix in a counter and the time so two
        // names from one process differ even if the seed were fixed.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u64(crate::futex::now_ns());
        format!("/{NAME_PREFIX}{}-{:016x}", std::process::id(), h.finish())
    }

    /// Coordinator: create the region `name` (`O_CREAT | O_EXCL`, mode 0600), size it, map it and
    /// write its header (magic last, with Release). Fails with [`ShmError::AlreadyExists`] if the
    /// name exists. On failure nothing is left behind.
    pub fn create(name: &str) -> Result<Shm, ShmError> {
        check_name(name)?;
        let fd = shm_open(
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .map_err(|e| match e {
            Errno::EEXIST => ShmError::AlreadyExists {
                name: name.to_string(),
            },
            Errno::EACCES => ShmError::PermissionDenied {
                name: name.to_string(),
            },
            e => os_err("shm_open", name)(e),
        })?;
        let setup = || -> Result<Shm, ShmError> {
            nix::unistd::ftruncate(&fd, REGION_SIZE as libc::off_t)
                .map_err(os_err("ftruncate", name))?;
            // Reserve every page now: on a full /dev/shm (Docker gives containers 64 MiB) a lazily
            // backed region would raise SIGBUS at some later store, mid-request. The KV exchange
            // is reserved as a split prefill needs it (`Region::reserve_exchange`).
            reserve(&fd, name, 0, FIXED_REGION_BYTES)?;
            let region = map_region(&fd, name, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE)?;
            let shm = Shm {
                region,
                name: name.to_string(),
            };
            // The new pages are zero-filled: every field starts at 0 / Idle / Absent / empty.
            let pid = std::process::id();
            shm.init_header(
                nix::unistd::geteuid().as_raw(),
                pid,
                crate::futex::unix_ms(),
                process_start_ticks(pid).unwrap_or(0),
            );
            Ok(shm)
        };
        setup().inspect_err(|_| {
            let _ = shm_unlink(name);
        })
    }

    /// Worker: attach to the region `name`. Refuses a region owned by another user, of the wrong
    /// size, or whose header does not validate ([`validate_header`]); each with its own
    /// [`ShmError`] variant.
    pub fn attach(name: &str) -> Result<Shm, ShmError> {
        // O_NONBLOCK: a FIFO put in a region's place must not block the open (shm_open adds
        // O_NOFOLLOW itself); the fstat below then refuses what is not a region.
        let oflag = OFlag::O_RDWR | OFlag::O_NONBLOCK;
        Shm::attach_with(name, oflag, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE)
    }

    /// [`attach`](Self::attach) for inspection (`amusd dump`): opened and mapped read-only, so a
    /// reader can never disturb a live run. Only the reading methods of [`Region`] may be used on
    /// it: a store into the read-only mapping faults (SIGSEGV).
    pub fn attach_read_only(name: &str) -> Result<Shm, ShmError> {
        Shm::attach_with(
            name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK,
            ProtFlags::PROT_READ,
        )
    }

    fn attach_with(name: &str, oflag: OFlag, prot: ProtFlags) -> Result<Shm, ShmError> {
        check_name(name)?;
        let euid = nix::unistd::geteuid().as_raw();
        let fd = shm_open(name, oflag, Mode::empty()).map_err(|e| match e {
            Errno::ENOENT => ShmError::NotFound {
                name: name.to_string(),
            },
            Errno::EACCES => match std::fs::metadata(format!("{SHM_DIR}{name}")) {
                Ok(m) if m.uid() != euid => ShmError::WrongOwner {
                    name: name.to_string(),
                    owner_uid: m.uid(),
                    euid,
                },
                _ => ShmError::PermissionDenied {
                    name: name.to_string(),
                },
            },
            e => os_err("shm_open", name)(e),
        })?;
        let st = fstat(&fd).map_err(os_err("fstat", name))?;
        if st.st_uid != euid {
            return Err(ShmError::WrongOwner {
                name: name.to_string(),
                owner_uid: st.st_uid,
                euid,
            });
        }
        let size = st.st_size.max(0) as u64;
        if size < REGION_SIZE as u64 {
            return Err(ShmError::Truncated {
                name: name.to_string(),
                size,
                expected: REGION_SIZE as u64,
            });
        }
        if size != REGION_SIZE as u64 {
            return Err(ShmError::SizeMismatch {
                name: name.to_string(),
                size,
                expected: REGION_SIZE as u64,
            });
        }
        let shm = Shm {
            region: map_region(&fd, name, prot)?,
            name: name.to_string(),
        };
        parse_header_for(name, &shm.header_bytes())?;
        Ok(shm)
    }

    /// The region.
    pub fn region(&self) -> &Region {
        // SAFETY: the mapping is REGION_SIZE bytes, page-aligned (>= align_of::<Region>()), valid
        // until Drop, and every bit pattern is a valid Region (atomics only).
        unsafe { self.region.as_ref() }
    }

    /// The region's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Remove the name (the memory lives on until every process unmaps it). Creator only. An
    /// already-removed name is not an error.
    pub fn unlink(&self) -> Result<(), ShmError> {
        Shm::unlink_name(&self.name)
    }

    /// Remove a region name (missing is not an error).
    pub fn unlink_name(name: &str) -> Result<(), ShmError> {
        check_name(name)?;
        match shm_unlink(name) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(os_err("shm_unlink", name)(e)),
        }
    }

    /// Coordinator: wrap in a guard that unlinks the name when dropped (including on unwinding).
    pub fn unlink_on_drop(self) -> UnlinkOnDrop {
        UnlinkOnDrop { shm: Some(self) }
    }

    /// The `amusd-*` regions in `/dev/shm`, with their headers when valid and whether their
    /// coordinators are alive. Unreadable entries are listed with a `problem`.
    pub fn list() -> Vec<RegionInfo> {
        let Ok(dir) = std::fs::read_dir(SHM_DIR) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !file_name.starts_with(NAME_PREFIX) {
                continue;
            }
            let name = format!("/{file_name}");
            // Names are chosen by whoever made the entry (any user may write /dev/shm): never
            // print one raw.
            let shown = escape_name(&name);
            let Some((meta, read)) = read_entry(&entry.path()) else {
                continue;
            };
            let parsed = match read {
                Err(e) => Err(format!("cannot read {shown}: {e}")),
                Ok(bytes) => parse_header_for(&shown, &bytes).map_err(|e| e.to_string()),
            };
            let size_problem = if meta.size() < REGION_SIZE as u64 {
                Some(ShmError::Truncated {
                    name: shown.clone(),
                    size: meta.size(),
                    expected: REGION_SIZE as u64,
                })
            } else if meta.size() != REGION_SIZE as u64 {
                Some(ShmError::SizeMismatch {
                    name: shown.clone(),
                    size: meta.size(),
                    expected: REGION_SIZE as u64,
                })
            } else {
                None
            };
            let (header, problem) = match (parsed, size_problem) {
                (Ok(h), None) => (Some(h), None),
                (Ok(_), Some(e)) => (None, Some(e.to_string())),
                (Err(e), _) => (None, Some(e)),
            };
            let (pid, ticks) = match &header {
                Some(h) => (Some(h.coordinator_pid), h.coordinator_start_ticks),
                None => (pid_from_name(&file_name), 0),
            };
            out.push(RegionInfo {
                name,
                size: meta.size(),
                owner_uid: meta.uid(),
                header,
                problem,
                coordinator_pid: pid,
                coordinator_alive: pid.and_then(|p| process_alive(p, ticks)),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Unlink the regions owned by this user whose coordinator is known to be dead; returns their
    /// names. Regions whose coordinator is alive or unknown are left alone.
    pub fn gc() -> Vec<String> {
        let euid = nix::unistd::geteuid().as_raw();
        Shm::list()
            .into_iter()
            .filter(|r| r.owner_uid == euid && r.coordinator_alive == Some(false))
            .filter(|r| Shm::unlink_name(&r.name).is_ok())
            .map(|r| r.name)
            .collect()
    }
}

/// A [`Shm`] that unlinks its name when dropped: the coordinator holds one for the region's
/// lifetime, so the name disappears on normal exit and on panics. (A SIGKILLed coordinator leaves
/// the name behind; [`Shm::gc`] removes it later.)
#[derive(Debug)]
pub struct UnlinkOnDrop {
    shm: Option<Shm>,
}

impl UnlinkOnDrop {
    /// Disarm: give back the [`Shm`] without unlinking.
    pub fn into_inner(mut self) -> Shm {
        self.shm
            .take()
            .expect("UnlinkOnDrop holds its Shm until dropped")
    }
}

impl Deref for UnlinkOnDrop {
    type Target = Shm;
    fn deref(&self) -> &Shm {
        self.shm
            .as_ref()
            .expect("UnlinkOnDrop holds its Shm until dropped")
    }
}

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        if let Some(shm) = &self.shm {
            let _ = shm.unlink();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::futex::wait_until;
    use crate::region::RequestSpec;
    use std::path::Path;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    fn path_of(name: &str) -> String {
        format!("{SHM_DIR}{name}")
    }

    fn assert_gone(name: &str) {
        assert!(!Path::new(&path_of(name)).exists(), "{name} left behind");
    }

    fn deadline() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(30))
    }

    #[test]
    fn create_attach_same_process() {
        let name = Shm::fresh_name();
        assert!(name.starts_with(&format!("/amusd-{}-", std::process::id())));
        {
            let owner = Shm::create(&name).unwrap().unlink_on_drop();
            let meta = std::fs::metadata(path_of(&name)).unwrap();
            assert_eq!(meta.len(), REGION_SIZE as u64);
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            let h = parse_header(&owner.header_bytes()).unwrap();
            assert_eq!(h.coordinator_pid, std::process::id());
            assert_eq!(h.owner_uid, nix::unistd::geteuid().as_raw());
            assert!(h.coordinator_start_ticks > 0);

            let other = Shm::attach(&name).unwrap();
            assert_eq!(other.header_bytes(), owner.header_bytes());
            // Two mappings of one object: a write through one is seen through the other.
            owner.publish_verified(0, &[42]).unwrap();
            assert_eq!(other.read_verified(0, 1), vec![42]);
            drop(other);
            assert!(matches!(
                Shm::create(&name),
                Err(ShmError::AlreadyExists { name: n }) if n == name
            ));
        }
        assert_gone(&name);
        assert!(matches!(Shm::attach(&name), Err(ShmError::NotFound { .. })));
    }

    #[test]
    fn invalid_names() {
        for bad in [
            "amusd",
            "/",
            "/a/b",
            "/..",
            &format!("/{}", "x".repeat(300)),
        ] {
            assert!(
                matches!(Shm::create(bad), Err(ShmError::InvalidName { .. })),
                "{bad}"
            );
            assert!(matches!(
                Shm::attach(bad),
                Err(ShmError::InvalidName { .. })
            ));
        }
    }

    #[test]
    fn attach_rejects_bad_headers() {
        let name = Shm::fresh_name();
        let owner = Shm::create(&name).unwrap().unlink_on_drop();
        let h = &owner.header;

        h.magic.store(0x1234, Ordering::Release);
        let e = Shm::attach(&name).unwrap_err();
        assert!(
            matches!(&e, ShmError::BadMagic { name: n, found: 0x1234 } if *n == name),
            "{e}"
        );
        h.magic.store(MAGIC, Ordering::Release);

        let other = LAYOUT_VERSION + 1;
        h.version.store(other, Ordering::Relaxed);
        let e = Shm::attach(&name).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "region {name} has layout version {other}, this amusd speaks {LAYOUT_VERSION}: it \
                 was made by another amusd build; use matching binaries, or remove it with `amusd \
                 dump --gc`"
            )
        );
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);

        h.region_size.store(12, Ordering::Relaxed);
        assert!(matches!(
            Shm::attach(&name),
            Err(ShmError::WrongRegionSize { found: 12, .. })
        ));
        h.region_size.store(REGION_SIZE as u64, Ordering::Relaxed);

        h.token_capacity.store(4096, Ordering::Relaxed);
        assert!(matches!(
            Shm::attach(&name),
            Err(ShmError::WrongTokenCapacity { found: 4096, .. })
        ));
        h.token_capacity
            .store(TOKEN_CAPACITY as u32, Ordering::Relaxed);

        Shm::attach(&name).unwrap();
        drop(owner);
        assert_gone(&name);
    }

    /// A shm object made by hand (not by `create`) with the given size; unlinked by the guard.
    struct RawObject(String, OwnedFd);
    impl RawObject {
        fn new(size: usize) -> RawObject {
            let name = Shm::fresh_name();
            let fd = shm_open(
                name.as_str(),
                OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
                Mode::S_IRUSR | Mode::S_IWUSR,
            )
            .unwrap();
            nix::unistd::ftruncate(&fd, size as libc::off_t).unwrap();
            RawObject(name, fd)
        }
    }
    impl Drop for RawObject {
        fn drop(&mut self) {
            shm_unlink(self.0.as_str()).unwrap();
            assert_gone(&self.0);
        }
    }

    #[test]
    fn attach_rejects_wrong_sizes() {
        let small = RawObject::new(100);
        assert!(matches!(
            Shm::attach(&small.0),
            Err(ShmError::Truncated { size: 100, .. })
        ));
        let big = RawObject::new(REGION_SIZE + 4096);
        let e = Shm::attach(&big.0).unwrap_err();
        assert!(matches!(e, ShmError::SizeMismatch { .. }), "{e}");
        // Right size, but all zeros: the coordinator died before writing the header.
        let zero = RawObject::new(REGION_SIZE);
        assert!(matches!(
            Shm::attach(&zero.0),
            Err(ShmError::BadMagic { found: 0, .. })
        ));
    }

    #[test]
    fn attach_rejects_other_users_regions() {
        let euid = nix::unistd::geteuid();
        if !euid.is_root() {
            eprintln!("skipped: needs root to chown a region to another user");
            return;
        }
        let obj = RawObject::new(REGION_SIZE);
        nix::unistd::fchown(&obj.1, Some(nix::unistd::Uid::from_raw(12345)), None).unwrap();
        let e = Shm::attach(&obj.0).unwrap_err();
        assert!(
            matches!(
                e,
                ShmError::WrongOwner {
                    owner_uid: 12345,
                    euid: 0,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("uid 12345") && e.to_string().contains("euid 0"));
    }

    /// Runs in a child process spawned by `cross_process_attach_and_futex` (and does nothing when
    /// run by the test harness normally): attach as the verify worker, wait for the request via
    /// the futex, answer through the verified buffer.
    #[test]
    fn child_process_helper() {
        let Ok(name) = std::env::var("AMUSD_SHM_TEST_CHILD") else {
            return;
        };
        let shm = Shm::attach(&name).unwrap();
        assert_eq!(
            shm.coordinator_pid(),
            nix::unistd::getppid().as_raw() as u32
        );
        shm.register_worker(Role::Verify, "cpu", "child");
        // Wait for a running request (futex on request_word, woken by the parent).
        let spec = loop {
            let seen = shm.request_word();
            let r = shm.read_request().unwrap();
            if r.state == RequestState::Running {
                break r;
            }
            crate::futex::wait_for_change(
                &shm.control.request_word,
                seen,
                Some(Duration::from_secs(30)),
            )
            .expect("no request within 30 s");
        };
        let prompt = shm.read_verified(0, spec.prompt_len);
        shm.set_worker_request(Role::Verify, spec.request_id);
        let sum: u32 = prompt.iter().sum();
        shm.publish_verified(spec.prompt_len, &[sum, sum + 1])
            .unwrap();
        shm.set_worker_request(Role::Verify, 0);
        shm.set_worker_state(Role::Verify, WorkerState::Ready);
    }

    #[test]
    fn cross_process_attach_and_futex() {
        let name = Shm::fresh_name();
        {
            let shm = Shm::create(&name).unwrap().unlink_on_drop();
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "shm::tests::child_process_helper",
                    "--test-threads=1",
                ])
                .env("AMUSD_SHM_TEST_CHILD", &name)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // Wait (bell + futex) for the child to register.
            let registered = loop {
                let seen = shm.bell_value(Party::Coordinator);
                if shm.worker_state(Role::Verify) == Some(WorkerState::Starting) {
                    break true;
                }
                if shm
                    .wait_bell(Party::Coordinator, seen, Some(Duration::from_secs(30)))
                    .is_none()
                {
                    break false;
                }
            };
            assert!(registered, "child never registered");
            assert_eq!(
                shm.worker(Role::Verify).pid.load(Ordering::Relaxed),
                child.id()
            );
            shm.submit_request(&RequestSpec {
                request_id: 77,
                prompt: &[1, 2, 3],
                max_new_tokens: 8,
                stop_tokens: &[],
                sampling: Default::default(),
            })
            .unwrap();
            let len = wait_until(&shm.verified.verified_len, |v| v >= 5, deadline())
                .expect("child never published");
            assert_eq!(len, 5);
            assert_eq!(shm.read_verified(3, 5), vec![6, 7]);
            let status = child.wait().unwrap();
            assert!(status.success(), "child failed: {status}");
            assert_eq!(shm.worker_request(Role::Verify), 0);
            assert_eq!(shm.worker_state(Role::Verify), Some(WorkerState::Ready));
        }
        assert_gone(&name);
    }

    #[test]
    fn list_and_gc() {
        // A pid that just exited.
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = c.id();
        c.wait().unwrap();

        let alive = Shm::create(&Shm::fresh_name()).unwrap().unlink_on_drop();
        // A region whose header names a dead coordinator.
        let orphan = Shm::create(&Shm::fresh_name()).unwrap().unlink_on_drop();
        orphan
            .header
            .coordinator_pid
            .store(dead_pid, Ordering::Relaxed);
        // A region whose coordinator died before writing the header: pid from the name.
        let headless_name = format!("/amusd-{dead_pid}-00000000deadbeef");
        let _ = Shm::unlink_name(&headless_name);
        let headless = Shm::create(&headless_name).unwrap().unlink_on_drop();
        headless.header.magic.store(0, Ordering::Release);
        // A region of another layout version, also orphaned.
        let old = Shm::create(&Shm::fresh_name()).unwrap().unlink_on_drop();
        old.header.version.store(99, Ordering::Relaxed);
        old.header
            .coordinator_pid
            .store(dead_pid, Ordering::Relaxed);

        let list = Shm::list();
        let find = |n: &str| list.iter().find(|r| r.name == n).cloned().unwrap();
        let a = find(alive.name());
        assert_eq!(a.coordinator_pid, Some(std::process::id()));
        assert_eq!(a.coordinator_alive, Some(true));
        assert_eq!(a.problem, None);
        assert_eq!(a.size, REGION_SIZE as u64);
        assert!(a.header.is_some());
        let o = find(orphan.name());
        assert_eq!(
            (o.coordinator_pid, o.coordinator_alive),
            (Some(dead_pid), Some(false))
        );
        let h = find(&headless_name);
        assert!(h.header.is_none());
        assert!(h.problem.as_deref().unwrap().contains("magic"), "{h:?}");
        assert_eq!(
            (h.coordinator_pid, h.coordinator_alive),
            (Some(dead_pid), Some(false))
        );
        let v = find(old.name());
        assert!(v.problem.as_deref().unwrap().contains("layout version 99"));
        // The header is not trusted across versions: the pid comes from the name (ours, alive).
        assert_eq!(v.coordinator_alive, Some(true));

        // Another amusd starting meanwhile (any user's, any test's) may collect the orphans first:
        // check that they are gone, not who removed them.
        let removed = Shm::gc();
        assert!(!removed.contains(&alive.name().to_string()));
        assert!(!removed.contains(&old.name().to_string()));
        assert_gone(orphan.name());
        assert_gone(&headless_name);
        assert!(Path::new(&path_of(alive.name())).exists());
        // Still mapped and usable after the name is gone.
        orphan.publish_verified(0, &[1]).unwrap();

        let names = [alive.name().to_string(), old.name().to_string()];
        drop((alive, orphan, headless, old));
        names.iter().for_each(|n| assert_gone(n));
    }

    #[test]
    fn create_reserves_every_page() {
        // A lazily backed region would SIGBUS mid-request on a full /dev/shm; a reserved one fails
        // at creation with NoSpace instead.
        let shm = Shm::create(&Shm::fresh_name()).unwrap().unlink_on_drop();
        let reserved = || std::fs::metadata(path_of(shm.name())).unwrap().blocks() * 512;
        let fixed = FIXED_REGION_BYTES as u64;
        assert!(
            reserved() >= fixed,
            "{} of {fixed} bytes reserved",
            reserved()
        );
        // The KV exchange only as asked.
        assert!(
            reserved() < fixed + (1 << 20),
            "{} bytes reserved",
            reserved()
        );
        shm.region().reserve_exchange(3 << 20).unwrap();
        assert!(
            reserved() >= fixed + (3 << 20),
            "{} bytes reserved",
            reserved()
        );
    }

    #[test]
    fn list_neither_blocks_on_nor_follows_what_is_not_a_region() {
        let region = Shm::create(&Shm::fresh_name()).unwrap().unlink_on_drop();
        let fifo = format!("{SHM_DIR}/amusd-fifo-{}", std::process::id());
        let link = format!("{SHM_DIR}/amusd-link-{}", std::process::id());
        let _ = std::fs::remove_file(&fifo);
        let _ = std::fs::remove_file(&link);
        nix::unistd::mkfifo(fifo.as_str(), Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
        std::os::unix::fs::symlink(path_of(region.name()), &link).unwrap();
        // In a thread, so that a blocking open fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let paths = (fifo.clone(), link.clone());
        std::thread::spawn(move || {
            // Called directly, as if the entries had been swapped in after the directory was read.
            let fifo = read_entry(Path::new(&paths.0)).is_none();
            let link = read_entry(Path::new(&paths.1)).is_none();
            let listed = Shm::list();
            let _ = tx.send((fifo, link, listed));
        });
        let got = rx.recv_timeout(Duration::from_secs(20));
        std::fs::remove_file(&fifo).unwrap();
        std::fs::remove_file(&link).unwrap();
        let (fifo_skipped, link_skipped, listed) = got.expect("reading a FIFO entry blocked");
        assert!(fifo_skipped && link_skipped);
        assert!(listed.iter().any(|r| r.name == region.name()));
        assert!(!listed
            .iter()
            .any(|r| r.name.contains("-fifo-") || r.name.contains("-link-")));
    }

    #[test]
    fn names_are_escaped_for_terminals() {
        assert_eq!(escape_name("/amusd-1-ab"), "/amusd-1-ab");
        assert_eq!(
            escape_name("/amusd-\u{1b}[2J\n\u{202e}"),
            "/amusd-\\u{1b}[2J\\n\\u{202e}"
        );
    }

    #[test]
    fn read_only_attach_reads_a_live_region() {
        let owner = Shm::create(&Shm::fresh_name()).unwrap().unlink_on_drop();
        owner.publish_verified(0, &[7, 8]).unwrap();
        let view = Shm::attach_read_only(owner.name()).unwrap();
        assert_eq!(view.read_verified(0, 2), vec![7, 8]);
        assert_eq!(view.read_draft(0, 4).unwrap().len, 0);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| l.contains(&format!("{}{}", SHM_DIR, owner.name())) && l.contains(" r--s "))
            .unwrap_or_else(|| panic!("no read-only mapping of the region:\n{maps}"));
        assert!(line.contains("r--s"));
    }

    #[test]
    fn process_liveness() {
        let me = std::process::id();
        let ticks = process_start_ticks(me).unwrap();
        assert_eq!(process_alive(me, ticks), Some(true));
        assert_eq!(process_alive(me, 0), Some(true));
        assert_eq!(
            process_alive(me, ticks + 1),
            Some(false),
            "pid reuse detection"
        );
        assert_eq!(process_alive(0, 0), None);
        assert_eq!(process_alive(u32::MAX, 0), None);
        assert_eq!(pid_from_name("amusd-123-abc"), Some(123));
        assert_eq!(pid_from_name("amusd-x-abc"), None);
        assert_eq!(pid_from_name("other-1-2"), None);
    }

    #[test]
    fn unlink_guard_can_be_disarmed() {
        let name = Shm::fresh_name();
        let shm = Shm::create(&name).unwrap().unlink_on_drop().into_inner();
        assert!(Path::new(&path_of(&name)).exists());
        shm.unlink().unwrap();
        shm.unlink().unwrap(); // idempotent
        assert_gone(&name);
    }

    mod validator {
        use super::*;
        use proptest::prelude::*;

        fn valid() -> Vec<u8> {
            // Once: a boxed region is ~50 MB to zero, and the properties take thousands of cases.
            static VALID: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            VALID
                .get_or_init(|| Region::new_boxed().header_bytes().to_vec())
                .clone()
        }

        #[test]
        fn valid_header_validates_and_errors_name_their_field() {
            let b = valid();
            assert_eq!(validate_header(&b), Ok(()));
            assert!(matches!(
                validate_header(&b[..10]),
                Err(ShmError::HeaderTooShort {
                    len: 10,
                    expected: 64,
                    ..
                })
            ));
            let mut c = b.clone();
            c[8] = 99;
            assert!(matches!(
                validate_header(&c),
                Err(ShmError::WrongVersion { found: 99, .. })
            ));
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            #[test]
            fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let r = validate_header(&bytes);
                if bytes.len() < HEADER_LEN {
                    let is_short = matches!(r, Err(ShmError::HeaderTooShort { .. }));
                    prop_assert!(is_short);
                }
            }

            #[test]
            fn corrupted_valid_headers(
                idx in 0..HEADER_LEN,
                val in any::<u8>(),
                extra in proptest::collection::vec(any::<u8>(), 0..32),
                cut in 0..HEADER_LEN + 32,
            ) {
                let orig = valid();
                let mut b = orig.clone();
                b.extend(extra);
                b[idx] = val;
                b.truncate(cut);
                let r = validate_header(&b);
                if cut < HEADER_LEN {
                    let is_short = matches!(r, Err(ShmError::HeaderTooShort { .. }));
                    prop_assert!(is_short);
                } else if val != orig[idx] && idx < 24 {
                    // magic, version, token_capacity and region_size are validated.
                    prop_assert!(r.is_err(), "corruption at {} not caught", idx);
                } else {
                    prop_assert_eq!(r, Ok(()));
                }
            }

            #[test]
            fn field_values(magic in any::<u64>(), version in any::<u32>(), cap in any::<u32>(),
                            size in any::<u64>(), pick in 0..4u8) {
                let mut b = valid();
                match pick {
                    0 => b[0..8].copy_from_slice(&magic.to_ne_bytes()),
                    1 => b[8..12].copy_from_slice(&version.to_ne_bytes()),
                    2 => b[12..16].copy_from_slice(&cap.to_ne_bytes()),
                    _ => b[16..24].copy_from_slice(&size.to_ne_bytes()),
                }
                let r = validate_header(&b);
                let ok = match pick {
                    0 => magic == MAGIC,
                    1 => version == LAYOUT_VERSION,
                    2 => cap == TOKEN_CAPACITY as u32,
                    _ => size == REGION_SIZE as u64,
                };
                prop_assert_eq!(r.is_ok(), ok);
            }
        }
    }
}
