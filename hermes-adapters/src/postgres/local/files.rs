//! Files in the data directory, which the user the server runs as controls:
//! read only when regular with a single link, written as new files renamed
//! into place; and the end of the server log, for error messages.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::runner::{RunAs, Runner};
use super::{LocalPostgresError, SERVER_LOG, io_err};

/// The largest small file (`PG_VERSION`, `postmaster.pid`, `postgresql.conf`)
/// read from the data directory.
pub(super) const SMALL_FILE_LIMIT: u64 = 1024 * 1024;

/// How much of the end of the server log error messages quote at most.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// Writes `name` in `data_dir` atomically, readable by its owner only and
/// owned by the user the server runs as: into a new file (never through an
/// existing one), renamed over `name` (which replaces a symlink, not its target).
pub(super) fn write_owned(
    data_dir: &Path,
    name: &str,
    text: &str,
    runner: &Runner,
) -> Result<(), LocalPostgresError> {
    let tmp = data_dir.join(format!(".{name}.{}", unique_suffix()));
    let dest = data_dir.join(name);
    let written = write_new_file(&tmp, text, runner.run_as.as_ref())
        .map_err(io_err("writing", &tmp))
        .and_then(|()| std::fs::rename(&tmp, &dest).map_err(io_err("writing", &dest)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Creates `path` (which must not exist, not even as a symlink) with mode
/// 0600, writes `text` into it and gives the open file to `run_as`.
fn write_new_file(path: &Path, text: &str, run_as: Option<&RunAs>) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    if let Some(run_as) = run_as {
        std::os::unix::fs::fchown(&file, Some(run_as.uid), Some(run_as.gid))?;
    }
    Ok(())
}

/// Opens `path` for reading if it is a regular file with a single link, not
/// following a symlink: the user the server runs as controls the data
/// directory, and could point a name in it at a file only we may read. Anything
/// else is an [`io::ErrorKind::InvalidData`] error.
fn open_regular_file(path: &Path) -> io::Result<File> {
    // Not through a symlink (ELOOP), nor blocking on a FIFO; what was opened
    // is then checked, so no earlier look can be raced.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| match error.raw_os_error() {
            Some(libc::ELOOP) => not_a_regular_file(),
            _ => error,
        })?;
    let opened = file.metadata()?;
    if !opened.file_type().is_file() || opened.nlink() != 1 {
        return Err(not_a_regular_file());
    }
    Ok(file)
}

fn not_a_regular_file() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "not a regular file with a single link",
    )
}

/// At most `limit` bytes from the start of `path` (see [`open_regular_file`]).
pub(super) fn read_regular_file(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular_file(path)?
        .take(limit)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Removes the file at `path`, if there is one.
pub(super) fn remove_if_present(path: &Path) -> Result<(), LocalPostgresError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

/// A suffix no other name made by this or another process at the same time
/// has: pid, a counter and the clock's nanoseconds.
pub(super) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The last lines of the server log, for error messages (none when it is not
/// a regular file: see [`open_regular_file`]).
pub(super) fn log_tail(data_dir: &Path) -> String {
    read_log_end(&data_dir.join(SERVER_LOG))
        .map(|text| last_lines(&text, 20))
        .unwrap_or_default()
}

/// The last [`LOG_TAIL_BYTES`] of the log at `path`, from a line start.
fn read_log_end(path: &Path) -> io::Result<String> {
    let mut file = open_regular_file(path)?;
    let start = file.metadata()?.len().saturating_sub(LOG_TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let text = match text.split_once('\n') {
        Some((_, rest)) if start > 0 => rest, // skip a partial first line
        _ => &text,
    };
    Ok(text.to_owned())
}

/// The last `count` lines of `text`.
fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::super::settings::HERMES_CONF;
    use super::super::{scratch_dir, unprivileged_runner};
    use super::*;

    #[test]
    fn only_regular_files_with_one_link_are_read() {
        let dir = scratch_dir();
        let file = dir.join("file");
        std::fs::write(&file, "content").expect("write");
        assert_eq!(read_regular_file(&file, 100).expect("read"), b"content");
        assert_eq!(read_regular_file(&file, 3).expect("read"), b"con");

        let missing = read_regular_file(&dir.join("missing"), 100).expect_err("missing");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        let hard = dir.join("hard");
        std::fs::hard_link(&file, &hard).expect("hard link");
        for refused in [link.as_path(), hard.as_path(), dir.as_path()] {
            let err = read_regular_file(refused, 100).expect_err("refused");
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidData,
                "{}",
                refused.display()
            );
        }
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn log_tail_is_the_end_of_a_regular_log_only() {
        let dir = scratch_dir();
        let lines: Vec<String> = (0..30_000).map(|i| format!("line {i}")).collect();
        std::fs::write(dir.join("real.log"), lines.join("\n")).expect("write");
        std::os::unix::fs::symlink(dir.join("real.log"), dir.join(SERVER_LOG)).expect("symlink");
        assert_eq!(log_tail(&dir), "");

        std::fs::rename(dir.join("real.log"), dir.join(SERVER_LOG)).expect("rename");
        assert_eq!(log_tail(&dir), lines[lines.len() - 20..].join("\n"));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn write_owned_replaces_a_symlink_instead_of_writing_through_it() {
        let dir = scratch_dir();
        let target = dir.join("target");
        std::fs::write(&target, "untouched").expect("write");
        std::os::unix::fs::symlink(&target, dir.join(HERMES_CONF)).expect("symlink");
        write_owned(&dir, HERMES_CONF, "port = 1\n", &unprivileged_runner()).expect("write");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "untouched");
        let written = dir.join(HERMES_CONF);
        assert!(std::fs::symlink_metadata(&written).expect("stat").is_file());
        assert_eq!(
            std::fs::read_to_string(&written).expect("read"),
            "port = 1\n"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
