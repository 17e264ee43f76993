//! Finding the server binaries (`initdb`, `pg_ctl`, `postgres`) for a
//! cluster, and the major versions of binaries and clusters.

use std::path::{Path, PathBuf};

use super::BINDIR_ENV;
use super::files::read_regular_file;

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

/// A directory of server binaries, and whether it was found as the install
/// of the cluster's major version (so of that version, by its name).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Bindir {
    pub(super) dir: PathBuf,
    pub(super) of_cluster_version: bool,
}

/// `$HERMES_PG_BINDIR`, else the choice of [`choose_bindir`] among the
/// versioned installs and `PATH`, for a cluster of major version `cluster`
/// (`None`: a new cluster).
pub(super) fn find_bindir(cluster: Option<&[u32]>) -> Option<Bindir> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        if has_server_binaries(&dir) {
            return Some(Bindir {
                dir,
                of_cluster_version: false,
            });
        }
        tracing::warn!(dir = %dir.display(), "{BINDIR_ENV} does not hold initdb, pg_ctl and postgres; ignoring it");
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|d| has_server_binaries(d)));
    choose_bindir(cluster, versioned_installs(), on_path)
}

/// The bin directory of the install of the cluster's major version `cluster`
/// among `installs` (version, bin directory), else `on_path` (the first
/// directory of `PATH` with the binaries), else the newest install.
fn choose_bindir(
    cluster: Option<&[u32]>,
    mut installs: Vec<(Vec<u32>, PathBuf)>,
    on_path: Option<PathBuf>,
) -> Option<Bindir> {
    if let Some(i) = cluster.and_then(|major| installs.iter().position(|(v, _)| v == major)) {
        return Some(Bindir {
            dir: installs.swap_remove(i).1,
            of_cluster_version: true,
        });
    }
    let dir = on_path.or_else(|| {
        installs.sort();
        installs.pop().map(|(_, dir)| dir)
    })?;
    Some(Bindir {
        dir,
        of_cluster_version: false,
    })
}

/// The installs under `/usr/lib/postgresql/<version>/bin` and
/// `/usr/pgsql-<version>/bin` that hold the server binaries, with the version
/// in their name (empty when it is not one).
fn versioned_installs() -> Vec<(Vec<u32>, PathBuf)> {
    let mut installs = Vec::new();
    for (root, prefix) in [("/usr/lib/postgresql", ""), ("/usr", "pgsql-")] {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(version) = name.strip_prefix(prefix) else {
                continue;
            };
            let dir = entry.path().join("bin");
            if has_server_binaries(&dir) {
                installs.push((parse_version(version).unwrap_or_default(), dir));
            }
        }
    }
    installs
}

/// The major version in the cluster's `PG_VERSION`, if it has a readable one.
pub(super) fn cluster_version(data_dir: &Path) -> Option<Vec<u32>> {
    let bytes = read_regular_file(&data_dir.join("PG_VERSION"), 64).ok()?;
    parse_version(String::from_utf8_lossy(&bytes).trim())
}

/// The numbers of a version that starts `text` (`16`, `9.6`, `17beta1`, `15.2`).
fn parse_version(text: &str) -> Option<Vec<u32>> {
    let end = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let parts: Vec<u32> = text[..end]
        .split('.')
        .map_while(|part| part.parse().ok())
        .collect();
    (!parts.is_empty()).then_some(parts)
}

/// The version in `pg_ctl --version`'s output (`pg_ctl (PostgreSQL) 15.4 ...`).
pub(super) fn version_in_output(output: &str) -> Option<Vec<u32>> {
    let (_, rest) = output.split_once("(PostgreSQL)")?;
    parse_version(rest.trim_start())
}

/// The major version of a full one: `15` of `15.4`, `9.6` of `9.6.24`.
pub(super) fn major_version(mut version: Vec<u32>) -> Vec<u32> {
    let parts = if version.first() >= Some(&10) { 1 } else { 2 };
    version.truncate(parts);
    version
}

/// `15`, `9.6`.
pub(super) fn version_text(version: &[u32]) -> String {
    let parts: Vec<String> = version.iter().map(u32::to_string).collect();
    parts.join(".")
}

#[cfg(test)]
mod tests {
    use super::super::scratch_dir;
    use super::*;

    #[test]
    fn binaries_of_the_clusters_major_version_are_preferred() {
        let installs = || {
            vec![
                (vec![16], PathBuf::from("/usr/lib/postgresql/16/bin")),
                (vec![15], PathBuf::from("/usr/lib/postgresql/15/bin")),
                (vec![9, 6], PathBuf::from("/usr/pgsql-9.6/bin")),
            ]
        };
        let on_path = || Some(PathBuf::from("/usr/local/bin"));
        let chosen = |cluster: Option<&[u32]>, on_path| {
            choose_bindir(cluster, installs(), on_path).map(|bindir| bindir.dir)
        };

        assert_eq!(
            chosen(Some(&[15]), on_path()),
            Some("/usr/lib/postgresql/15/bin".into())
        );
        // Only an install named for the cluster's version is known to be of it.
        let of_version = |cluster: Option<&[u32]>| {
            choose_bindir(cluster, installs(), on_path()).map(|bindir| bindir.of_cluster_version)
        };
        assert_eq!(of_version(Some(&[15])), Some(true));
        assert_eq!(of_version(Some(&[14])), Some(false));
        assert_eq!(of_version(None), Some(false));
        assert_eq!(
            chosen(Some(&[9, 6]), None),
            Some("/usr/pgsql-9.6/bin".into())
        );
        // No install of the cluster's version, or a new cluster: as before.
        assert_eq!(chosen(Some(&[14]), on_path()), on_path());
        assert_eq!(chosen(None, on_path()), on_path());
        assert_eq!(
            chosen(Some(&[14]), None),
            Some("/usr/lib/postgresql/16/bin".into())
        );
        assert_eq!(
            chosen(None, None),
            Some("/usr/lib/postgresql/16/bin".into())
        );
        assert_eq!(choose_bindir(Some(&[15]), Vec::new(), None), None);
    }

    #[test]
    fn versions_are_read_from_pg_version_and_pg_ctl() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("17beta1"), Some(vec![17]));
        assert_eq!(parse_version("main"), None);
        assert_eq!(parse_version(""), None);
        let major = |output: &str| version_in_output(output).map(major_version);
        assert_eq!(
            major("pg_ctl (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)\n"),
            Some(vec![15])
        );
        assert_eq!(major("pg_ctl (PostgreSQL) 9.6.24"), Some(vec![9, 6]));
        assert_eq!(major("pg_ctl (PostgreSQL) 18devel"), Some(vec![18]));
        assert_eq!(major("something else"), None);
        assert_eq!(version_text(&[9, 6]), "9.6");

        let dir = scratch_dir();
        assert_eq!(cluster_version(&dir), None);
        std::fs::write(dir.join("PG_VERSION"), "15\n").expect("write");
        assert_eq!(cluster_version(&dir), Some(vec![15]));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
