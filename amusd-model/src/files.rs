//! Opening a model's files: regular files only, so that a FIFO or a device named as a model (or
//! found inside a checkpoint directory) is refused at once instead of blocking the reader forever
//! or streaming without end.

use std::fs::File;
use std::io;
use std::path::Path;

/// `path` opened for reading, if it is a regular file (after symbolic links).
pub fn open(path: &Path) -> io::Result<File> {
    check_regular(path)?;
    File::open(path)
}

/// The text of `path`, if it is a regular file.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    check_regular(path)?;
    std::fs::read_to_string(path)
}

/// An error unless `path` is a regular file. Checked before opening: opening a FIFO for reading
/// blocks until a writer comes.
pub fn check_regular(path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    match meta.is_file() {
        true => Ok(()),
        false => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            match meta.is_dir() {
                true => "a directory, not a file",
                false => "not a regular file (a FIFO, socket or device)",
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("model.gguf");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo only reads the NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = open(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = read_to_string(dir.path()).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
        let text = dir.path().join("config.json");
        std::fs::write(&text, "{}").unwrap();
        assert_eq!(read_to_string(&text).unwrap(), "{}");
    }
}
