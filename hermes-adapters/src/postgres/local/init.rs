//! Making a new cluster: `initdb` into a staged sibling directory renamed
//! into place or, for an existing empty directory, in place; and opening the
//! way to it for the user the server runs as.

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::files::{SMALL_FILE_LIMIT, read_regular_file, unique_suffix, write_owned};
use super::runner::{RunAs, Runner, run};
use super::settings::HERMES_CONF;
use super::{LocalPostgresError, SUPERUSER, io_err};

/// Runs initdb into a fresh sibling directory of `data_dir` (which does not
/// exist), then renames it to `data_dir`. If another process got there first,
/// its cluster is kept and ours discarded.
pub(super) fn init_staged(
    runner: &Runner,
    data_dir: &Path,
    parent: &Path,
) -> Result<(), LocalPostgresError> {
    let name = data_dir
        .file_name()
        .unwrap_or_else(|| OsStr::new("pg"))
        .to_string_lossy()
        .into_owned();
    let staging = parent.join(format!(".{name}.init-{}", unique_suffix()));
    std::fs::create_dir(&staging).map_err(io_err("creating", &staging))?;
    tracing::info!(data_dir = %data_dir.display(), bindir = %runner.bindir.display(), "initialising a private PostgreSQL cluster");
    if let Err(e) = initdb(runner, &staging) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&staging, data_dir) {
        let _ = std::fs::remove_dir_all(&staging);
        if data_dir.join("PG_VERSION").exists() {
            // Lost the race to a concurrent initialisation: use theirs.
            return Ok(());
        }
        return Err(io_err("moving the new cluster to", data_dir)(e));
    }
    Ok(())
}

/// Runs initdb in `data_dir`, an existing directory, which must be empty (a
/// mount point cannot be replaced by a rename). The caller holds the
/// directory's lock ([`lock_dir`](super::lock::lock_dir)), so no other start
/// sees the cluster half-made; when the initialisation fails, what it wrote is
/// removed.
pub(super) fn init_in_place(runner: &Runner, data_dir: &Path) -> Result<(), LocalPostgresError> {
    let mut names = std::fs::read_dir(data_dir)
        .and_then(|entries| {
            entries
                .map(|entry| entry.map(|entry| entry.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<Vec<_>>>()
        })
        .map_err(io_err("reading", data_dir))?;
    if !names.is_empty() {
        names.sort();
        return Err(LocalPostgresError::NotADataDirectory {
            path: data_dir.to_path_buf(),
            contents: list_names(&names, 5),
        });
    }
    tracing::info!(data_dir = %data_dir.display(), bindir = %runner.bindir.display(), "initialising a private PostgreSQL cluster in the existing empty directory");
    let result = initdb(runner, data_dir);
    if result.is_err()
        && let Ok(entries) = std::fs::read_dir(data_dir)
    {
        for entry in entries.flatten() {
            let path = entry.path();
            let _ = match entry.file_type() {
                Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
        }
    }
    result
}

/// The first `count` of `names`, and how many more there are.
fn list_names(names: &[String], count: usize) -> String {
    let shown = names[..names.len().min(count)].join(", ");
    match names.len().saturating_sub(count) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// Makes `dir` (existing and empty) private to the user the server runs as,
/// runs initdb into it, and has its `postgresql.conf` include [`HERMES_CONF`].
pub(super) fn initdb(runner: &Runner, dir: &Path) -> Result<(), LocalPostgresError> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("setting permissions of", dir))?;
    if let Some(run_as) = &runner.run_as {
        std::os::unix::fs::chown(dir, Some(run_as.uid), Some(run_as.gid))
            .map_err(io_err("changing the owner of", dir))?;
    }
    let mut cmd = runner.command("initdb");
    cmd.arg("-D")
        .arg(dir)
        .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-locale"]);
    run(cmd)?;
    let conf = dir.join("postgresql.conf");
    let text = read_regular_file(&conf, SMALL_FILE_LIMIT).map_err(io_err("reading", &conf))?;
    let mut text = String::from_utf8_lossy(&text).into_owned();
    text.push_str(&format!(
        "\n# Settings managed by Hermes (rewritten on every start).\ninclude_if_exists = '{HERMES_CONF}'\n"
    ));
    write_owned(dir, "postgresql.conf", &text, runner)
}

/// Grants search (`x`) permission to `run_as` on `dir` and each of its
/// ancestors that lacks it, so the server can reach its data directory.
pub(super) fn make_traversable(dir: &Path, run_as: &RunAs) -> Result<(), LocalPostgresError> {
    for ancestor in dir.ancestors() {
        let meta = std::fs::metadata(ancestor).map_err(io_err("reading", ancestor))?;
        let mode = meta.mode() & 0o7777;
        let (bit, class) = search_bit(meta.uid(), meta.gid(), run_as);
        if mode & bit == 0 {
            tracing::warn!(
                dir = %ancestor.display(),
                "granting search permission ({class}+x) so the 'postgres' user can reach the data directory"
            );
            std::fs::set_permissions(ancestor, std::fs::Permissions::from_mode(mode | bit))
                .map_err(io_err("granting search permission on", ancestor))?;
        }
    }
    Ok(())
}

/// The permission bit that lets `run_as` search a directory owned by `uid`
/// and group `gid`, and its class as `chmod` names it: the owner's if it is
/// the owner, else the group's if it is in the group, else the others' (the
/// kernel checks the first class that applies, and that class's bit only).
fn search_bit(uid: u32, gid: u32, run_as: &RunAs) -> (u32, char) {
    if uid == run_as.uid {
        (0o100, 'u')
    } else if run_as.groups.contains(&gid) {
        (0o010, 'g')
    } else {
        (0o001, 'o')
    }
}

#[cfg(test)]
mod tests {
    use super::super::runner::DropTool;
    use super::super::scratch_dir;
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn a_directory_without_a_cluster_is_described_by_its_first_names() {
        let names =
            |count: usize| -> Vec<String> { (1..=count).map(|i| format!("f{i}")).collect() };
        assert_eq!(list_names(&names(1), 5), "f1");
        assert_eq!(list_names(&names(5), 5), "f1, f2, f3, f4, f5");
        assert_eq!(list_names(&names(7), 5), "f1, f2, f3, f4, f5 and 2 more");
        let message = LocalPostgresError::NotADataDirectory {
            path: "/data/pg".into(),
            contents: "lost+found".into(),
        }
        .to_string();
        assert_eq!(
            message,
            "/data/pg is not empty and is not a PostgreSQL data directory (no PG_VERSION; it \
             holds lost+found): point the data directory at a missing or empty directory \
             instead (on a mounted volume, which may hold lost+found, a subdirectory such as \
             /data/pg/pgdata), or move what it holds away"
        );
    }

    #[test]
    fn search_permission_is_granted_to_the_class_the_server_user_is_in() {
        let dir = scratch_dir();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let owner = std::fs::metadata(&dir).expect("stat");
        let run_as = |uid: u32, groups: &[u32]| RunAs {
            user: "postgres".into(),
            uid,
            gid: groups[0],
            groups: groups.to_vec(),
            tool: DropTool::Runuser(PathBuf::from("/sbin/runuser")),
        };
        make_traversable(&dir, &run_as(owner.uid(), &[owner.gid()])).expect("make traversable");
        let mode = std::fs::metadata(&dir).expect("stat").mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir_all(&dir).expect("clean up");

        // The owner's bit for the owner, whatever its groups; the group's for
        // a member (primary or supplementary); else the others'.
        let (uid, gid) = (1000, 2000);
        assert_eq!(search_bit(uid, gid, &run_as(1000, &[2000])), (0o100, 'u'));
        assert_eq!(search_bit(uid, gid, &run_as(1001, &[2000])), (0o010, 'g'));
        assert_eq!(
            search_bit(uid, gid, &run_as(1001, &[3000, 2000])),
            (0o010, 'g')
        );
        assert_eq!(search_bit(uid, gid, &run_as(1001, &[3000])), (0o001, 'o'));
    }
}
