//! Running the server binaries, as the unprivileged `postgres` user when
//! we are root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::LocalPostgresError;
use super::binaries::{
    Bindir, cluster_version, find_bindir, major_version, version_in_output, version_text,
};

/// Runs a command, turning a failure into [`LocalPostgresError::Command`].
pub(super) fn run(mut cmd: Command) -> Result<Output, LocalPostgresError> {
    let command = format!("{cmd:?}");
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(out),
        Ok(out) => Err(LocalPostgresError::Command {
            command,
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        }),
        Err(e) => Err(LocalPostgresError::Command {
            command,
            status: "could not run".into(),
            output: e.to_string(),
        }),
    }
}

/// Output of a command that must succeed, trimmed.
fn run_stdout(cmd: Command) -> Result<String, LocalPostgresError> {
    let out = run(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The unprivileged user the server runs as when we are root.
#[derive(Debug, Clone)]
pub(super) struct RunAs {
    pub(super) user: String,
    pub(super) uid: u32,
    /// Its primary group.
    pub(super) gid: u32,
    /// All its groups, the primary one first.
    pub(super) groups: Vec<u32>,
    pub(super) tool: DropTool,
}

/// The tool that runs a command as [`RunAs::user`].
#[derive(Debug, Clone)]
pub(super) enum DropTool {
    Runuser(PathBuf),
    Setpriv(PathBuf),
}

/// Runs the server binaries, as the `postgres` user when we are root.
#[derive(Debug, Clone)]
pub(super) struct Runner {
    pub(super) bindir: PathBuf,
    pub(super) run_as: Option<RunAs>,
}

impl Runner {
    /// The binaries for the cluster in `data_dir` (see [`find_bindir`]), run
    /// as the `postgres` user when we are root. Binaries of another major
    /// version than an existing cluster's are an error: asked of those not
    /// found as the install of its version.
    pub(super) fn detect(data_dir: &Path) -> Result<Self, LocalPostgresError> {
        let cluster = cluster_version(data_dir);
        let Bindir {
            dir: bindir,
            of_cluster_version,
        } = find_bindir(cluster.as_deref()).ok_or(LocalPostgresError::BinariesNotFound)?;
        let mut id = Command::new("id");
        id.arg("-u");
        let uid = run_stdout(id)?;
        let run_as = if uid == "0" {
            Some(postgres_user()?)
        } else {
            None
        };
        let runner = Runner { bindir, run_as };
        if let Some(cluster) = cluster
            && !of_cluster_version
        {
            runner.check_version(data_dir, &cluster)?;
        }
        Ok(runner)
    }

    /// Fails with [`LocalPostgresError::VersionMismatch`] when the binaries'
    /// major version is not `cluster`'s (an unknown version passes: the
    /// server itself will say what is wrong).
    fn check_version(&self, data_dir: &Path, cluster: &[u32]) -> Result<(), LocalPostgresError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("--version");
        let Some(binaries) = version_in_output(&run_stdout(cmd)?).map(major_version) else {
            return Ok(());
        };
        if binaries == cluster {
            return Ok(());
        }
        Err(LocalPostgresError::VersionMismatch {
            data_dir: data_dir.to_path_buf(),
            cluster: version_text(cluster),
            bindir: self.bindir.clone(),
            binaries: version_text(&binaries),
        })
    }

    /// A command running `program` from the binaries directory.
    pub(super) fn command(&self, program: &str) -> Command {
        let exe = self.bindir.join(program);
        let mut cmd = match &self.run_as {
            None => Command::new(exe),
            Some(RunAs {
                user,
                tool: DropTool::Runuser(tool),
                ..
            }) => {
                let mut cmd = Command::new(tool);
                cmd.args(["-u", user, "--"]).arg(exe);
                cmd
            }
            Some(RunAs {
                user,
                tool: DropTool::Setpriv(tool),
                ..
            }) => {
                let mut cmd = Command::new(tool);
                cmd.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={user}"))
                    .args(["--init-groups", "--"])
                    .arg(exe);
                cmd
            }
        };
        // The unprivileged user may not be able to enter our working directory.
        cmd.current_dir("/");
        for var in ["PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE"] {
            cmd.env_remove(var);
        }
        cmd
    }
}

fn postgres_user() -> Result<RunAs, LocalPostgresError> {
    let user = "postgres".to_owned();
    let ids = |flag: &str| -> Option<Vec<u32>> {
        let out = Command::new("id").arg(flag).arg(&user).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|id| id.parse().ok())
            .collect()
    };
    // `id -G`: the primary group, then the supplementary ones.
    let (Some(&[uid]), Some(groups)) = (ids("-u").as_deref(), ids("-G")) else {
        return Err(LocalPostgresError::NoUnprivilegedUser);
    };
    let Some(&gid) = groups.first() else {
        return Err(LocalPostgresError::NoUnprivilegedUser);
    };
    let tool = if let Some(path) = find_on_path("runuser") {
        DropTool::Runuser(path)
    } else if let Some(path) = find_on_path("setpriv") {
        DropTool::Setpriv(path)
    } else {
        return Err(LocalPostgresError::NoPrivilegeDropTool);
    };
    Ok(RunAs {
        user,
        uid,
        gid,
        groups,
        tool,
    })
}

/// `program` in a directory of `PATH` or a system `bin`/`sbin` directory.
pub(super) fn find_on_path(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
