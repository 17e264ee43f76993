//! Whether a server of a data directory runs, from its `postmaster.pid` and
//! the process that names; clearing the file when it is stale.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::files::{SMALL_FILE_LIMIT, read_regular_file, remove_if_present};
use super::runner::Runner;
use super::{LocalPostgresError, io_err};

impl Runner {
    /// What the `postmaster.pid` of `data_dir` says about its server.
    pub(super) fn server_state(&self, data_dir: &Path) -> Result<ServerState, LocalPostgresError> {
        let pid_file = data_dir.join("postmaster.pid");
        // postmaster.pid: pid, data dir, start time, port, socket dir, listen address, ...
        let text = match read_regular_file(&pid_file, SMALL_FILE_LIMIT) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ServerState::NotRunning),
            Err(e) => return Err(io_err("reading", &pid_file)(e)),
        };
        // The pid is whole once the line after it has begun.
        let Some((pid, rest)) = text.split_once('\n') else {
            return Ok(ServerState::NotRunning);
        };
        let Ok(pid) = pid.trim().parse() else {
            return Ok(ServerState::NotRunning);
        };
        let lines: Vec<&str> = rest.lines().map(str::trim).collect();
        let port = lines.get(2).and_then(|line| line.parse().ok());
        if !self.is_server_of(pid, data_dir) {
            return Ok(ServerState::Stale { pid, port });
        }
        let Some(port) = port else {
            return Ok(ServerState::NotRunning);
        };
        // The first socket directory; empty when the server has no socket.
        let socket_dir = lines
            .get(3)
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from);
        Ok(ServerState::Running(Running {
            pid,
            port,
            socket_dir,
        }))
    }

    /// Whether process `pid` is a PostgreSQL server of `data_dir`. Where
    /// `/proc` shows processes, it must run the `postgres` executable in
    /// `data_dir` (a server works in its data directory); when where it
    /// works cannot be seen (another user's process, to a root without
    /// `CAP_SYS_PTRACE`), its `-D` argument must name `data_dir`, if it has an
    /// absolute one. Without `/proc`, any live process will do, as for
    /// `pg_ctl status`.
    fn is_server_of(&self, pid: u32, data_dir: &Path) -> bool {
        if !Path::new("/proc/self").exists() {
            let mut status = self.command("pg_ctl");
            status.arg("status").arg("-D").arg(data_dir);
            return status.output().is_ok_and(|out| out.status.success());
        }
        let process = PathBuf::from(format!("/proc/{pid}"));
        // Empty for a zombie; a thread id shows its process's command line.
        let Ok(cmdline) = std::fs::read(process.join("cmdline")) else {
            return false;
        };
        let args: Vec<&OsStr> = cmdline
            .split(|&byte| byte == 0)
            .map(OsStr::from_bytes)
            .collect();
        let runs_postgres = args
            .first()
            .and_then(|program| Path::new(program).file_name())
            .is_some_and(|name| name == "postgres" || name == "postmaster");
        if !runs_postgres {
            return false;
        }
        let Ok(dir) = std::fs::metadata(data_dir) else {
            return false;
        };
        let is_data_dir = |path: &Path| {
            std::fs::metadata(path).is_ok_and(|m| m.dev() == dir.dev() && m.ino() == dir.ino())
        };
        // Its working directory is its data directory; without the right to
        // read it (root without CAP_SYS_PTRACE), its `-D`.
        match std::fs::metadata(process.join("cwd")) {
            Ok(_) => is_data_dir(&process.join("cwd")),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                match data_dir_argument(&args) {
                    Some(arg) if arg.is_absolute() => is_data_dir(arg),
                    _ => true,
                }
            }
            Err(_) => false,
        }
    }
}

/// A running server, from its `postmaster.pid`.
#[derive(Debug, Clone)]
pub(super) struct Running {
    /// The postmaster's process id.
    pub(super) pid: u32,
    /// Its loopback TCP port.
    pub(super) port: u16,
    /// The directory of its Unix socket, if it has one.
    pub(super) socket_dir: Option<PathBuf>,
}

/// What the `postmaster.pid` of a data directory says about its server.
#[derive(Debug)]
pub(super) enum ServerState {
    /// None runs: there is no `postmaster.pid`, or one still being written by
    /// a server that is starting.
    NotRunning,
    /// A server of the directory runs.
    Running(Running),
    /// The `postmaster.pid` of a server that is gone: its process has exited,
    /// or its pid now names another process (after a restart of the machine
    /// or container without a clean shutdown).
    Stale {
        /// The pid it names.
        pid: u32,
        /// The port it names, if it got that far.
        port: Option<u16>,
    },
}

/// The data directory in a `postgres` command line (`-D <dir>` or `-D<dir>`).
fn data_dir_argument<'a>(args: &[&'a OsStr]) -> Option<&'a Path> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg.as_bytes() == b"-D" {
            return args.next().map(|arg| Path::new(*arg));
        }
        if let Some(dir) = arg.as_bytes().strip_prefix(b"-D") {
            return Some(Path::new(OsStr::from_bytes(dir)));
        }
    }
    None
}

/// Removes the stale `postmaster.pid` of `data_dir` (see
/// [`ServerState::Stale`]), and the lock file of the gone server's socket in
/// the data directory if it names the same pid: a server finding a live pid in
/// either takes it for another server of the directory and refuses to start.
pub(super) fn remove_stale_pid_file(
    data_dir: &Path,
    pid: u32,
    port: Option<u16>,
) -> Result<(), LocalPostgresError> {
    tracing::warn!(
        data_dir = %data_dir.display(),
        pid,
        "postmaster.pid names a process that is not a PostgreSQL server of this directory \
         (the server was not shut down cleanly): removing it and starting the server"
    );
    remove_if_present(&data_dir.join("postmaster.pid"))?;
    let Some(port) = port else {
        return Ok(());
    };
    let socket_lock = data_dir.join(format!(".s.PGSQL.{port}.lock"));
    let names_pid = read_regular_file(&socket_lock, SMALL_FILE_LIMIT).is_ok_and(|bytes| {
        String::from_utf8_lossy(&bytes)
            .lines()
            .next()
            .map(str::trim)
            == Some(&pid.to_string())
    });
    if names_pid {
        remove_if_present(&socket_lock)?;
        remove_if_present(&data_dir.join(format!(".s.PGSQL.{port}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::runner::find_on_path;
    use super::super::{scratch_dir, unprivileged_runner};
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    #[test]
    fn only_a_postgres_process_working_in_the_data_directory_is_its_server() {
        let dir = scratch_dir();
        let other = scratch_dir();
        let runner = unprivileged_runner();
        // This process (and each of its threads) runs no `postgres`.
        assert!(!runner.is_server_of(std::process::id(), &dir));
        assert!(!runner.is_server_of(u32::MAX, &dir), "no such process");

        // A process of the `postgres` program (as its command line names it)
        // counts, in the data directory only.
        let sleep = find_on_path("sleep").expect("sleep");
        let spawn = |program: &str, cwd: &Path| {
            std::process::Command::new(&sleep)
                .arg0(program)
                .arg("30")
                .current_dir(cwd)
                .spawn()
                .expect("spawn sleep")
        };
        let postgres = "/usr/lib/postgresql/15/bin/postgres";
        let mut children = [
            (spawn(postgres, &dir), true),
            (spawn(postgres, &other), false),
            (spawn("sleep", &dir), false),
        ];
        for (child, expected) in &children {
            assert_eq!(runner.is_server_of(child.id(), &dir), *expected);
        }
        for (child, _) in &mut children {
            child.kill().expect("kill");
            child.wait().expect("reap");
        }
        // A zombie runs nothing (its command line is empty).
        let mut exited = spawn(postgres, &dir);
        exited.kill().expect("kill");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read(format!("/proc/{}/cmdline", exited.id())).is_ok_and(|c| !c.is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!runner.is_server_of(exited.id(), &dir));
        exited.wait().expect("reap");

        fn args(args: &[&'static str]) -> Vec<&'static OsStr> {
            args.iter().map(|arg| OsStr::new(*arg)).collect()
        }
        let pg = "/usr/lib/postgresql/15/bin/postgres";
        assert_eq!(
            data_dir_argument(&args(&[pg, "-D", "/srv/pg"])),
            Some(Path::new("/srv/pg"))
        );
        assert_eq!(
            data_dir_argument(&args(&[pg, "-c", "x=y", "-D/srv/pg"])),
            Some(Path::new("/srv/pg"))
        );
        assert_eq!(data_dir_argument(&args(&[pg])), None);
        assert_eq!(data_dir_argument(&args(&[pg, "-D"])), None);
        std::fs::remove_dir_all(&dir).expect("clean up");
        std::fs::remove_dir_all(&other).expect("clean up");
    }
}
