//! What Hermes writes for the server on every start (`hermes.conf`,
//! `pg_hba.conf`), and the superuser's TCP password.

use std::io;
use std::path::Path;

use rand::Rng;

use super::files::{read_regular_file, write_owned};
use super::runner::Runner;
use super::{Durability, LocalPostgresConfig, LocalPostgresError, TCP_PASSWORD_FILE};

/// The configuration file, inside the data directory, that Hermes rewrites on
/// every start and that `postgresql.conf` includes.
pub(super) const HERMES_CONF: &str = "hermes.conf";

/// How many letters and digits a generated TCP password has.
const TCP_PASSWORD_LEN: usize = 32;

/// The longest socket directory the server can use: a socket address holds
/// 107 bytes of path, and the server adds `/.s.PGSQL.<port>` to it.
const MAX_SOCKET_DIR_LEN: usize = 107 - "/.s.PGSQL.65535".len();

/// Writes `hermes.conf` and `pg_hba.conf`.
pub(super) fn write_hermes_conf(
    data_dir: &Path,
    port: u16,
    config: &LocalPostgresConfig,
    runner: &Runner,
) -> Result<(), LocalPostgresError> {
    let durability = match config.durability {
        Durability::Durable => "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n",
        Durability::Relaxed => "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
    };
    let socket_dir = socket_dir_setting(data_dir);
    let text = format!(
        "# Written by Hermes on every start; edit the Hermes configuration instead.\n\
         listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = '{socket_dir}'\n\
         max_connections = {}\n\
         {durability}",
        config.max_connections
    );
    write_owned(data_dir, HERMES_CONF, &text, runner)?;
    write_owned(
        data_dir,
        "pg_hba.conf",
        &hba_conf(data_dir, socket_dir),
        runner,
    )
}

/// The port `hermes.conf` last gave the server, if it can be read.
pub(super) fn last_port(data_dir: &Path) -> Option<u16> {
    let text = read_regular_file(&data_dir.join(HERMES_CONF), 4096).ok()?;
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|line| line.strip_prefix("port = ")?.trim().parse().ok())
}

/// Who may connect: through the socket, whoever can enter the data directory
/// (mode 0700: its owner), without a password; over TCP, every local user can
/// reach the server, so only with the password of [`TCP_PASSWORD_FILE`]. A
/// cluster without a socket has only TCP, so it must trust it.
fn hba_conf(data_dir: &Path, socket_dir: &str) -> String {
    let tcp = if socket_dir.is_empty() {
        tracing::warn!(
            data_dir = %data_dir.display(),
            "the data directory's path is too long for a Unix socket, or holds a character \
             unix_socket_directories cannot take (' \\ , or trailing whitespace): the private \
             cluster trusts every connection on 127.0.0.1, from any local user"
        );
        "trust"
    } else {
        "scram-sha-256"
    };
    format!(
        "# Written by Hermes on every start.\n\
         local all all trust\n\
         host all all 127.0.0.1/32 {tcp}\n"
    )
}

/// The superuser's TCP password: read from [`TCP_PASSWORD_FILE`] if that holds
/// exactly a generated password, else made (random letters and digits) and
/// written there, readable by its owner only.
pub(super) fn tcp_password(data_dir: &Path, runner: &Runner) -> Result<String, LocalPostgresError> {
    let path = data_dir.join(TCP_PASSWORD_FILE);
    match read_regular_file(&path, TCP_PASSWORD_LEN as u64 + 1) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(password) if is_generated_password(&password) => return Ok(password),
            _ => tracing::warn!(path = %path.display(), "not a generated password; replacing it"),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "replacing the password file"),
    }
    let password = generate_password();
    write_owned(data_dir, TCP_PASSWORD_FILE, &password, runner)?;
    Ok(password)
}

/// [`TCP_PASSWORD_LEN`] random ASCII letters and digits.
fn generate_password() -> String {
    rand::thread_rng()
        .sample_iter(rand::distributions::Alphanumeric)
        .take(TCP_PASSWORD_LEN)
        .map(char::from)
        .collect()
}

/// Whether `text` has the shape of [`generate_password`]'s passwords (which
/// makes it safe inside a quoted SQL literal).
fn is_generated_password(text: &str) -> bool {
    text.len() == TCP_PASSWORD_LEN && text.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `unix_socket_directories` for a cluster in `data_dir`: the data directory
/// itself, or none (empty) when its path is too long for a socket address,
/// would need quoting in the configuration file, or would not be read back as
/// one directory by the server (which splits the setting at commas and trims
/// whitespace around each directory).
fn socket_dir_setting(data_dir: &Path) -> &str {
    match data_dir.to_str() {
        Some(dir)
            if dir.len() <= MAX_SOCKET_DIR_LEN
                && !dir.contains(['\'', '\\', ','])
                && !dir.ends_with(char::is_whitespace) =>
        {
            dir
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::super::{scratch_dir, unprivileged_runner};
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn only_the_generated_password_shape_is_accepted() {
        let generated = generate_password();
        assert!(is_generated_password(&generated), "{generated}");
        assert!(is_generated_password(&format!(
            "{}Zz9",
            "a".repeat(TCP_PASSWORD_LEN - 3)
        )));
        for bad in [
            String::new(),
            "a".repeat(TCP_PASSWORD_LEN - 1),
            "a".repeat(TCP_PASSWORD_LEN + 1),
            format!("{}\n", "a".repeat(TCP_PASSWORD_LEN - 1)),
            format!("{}'", "a".repeat(TCP_PASSWORD_LEN - 1)),
            format!("{};", "a".repeat(TCP_PASSWORD_LEN - 1)),
            format!("{}é", "a".repeat(TCP_PASSWORD_LEN - 2)),
        ] {
            assert!(!is_generated_password(&bad), "{bad:?}");
        }
    }

    #[test]
    fn password_file_is_kept_only_when_it_holds_a_generated_password() {
        let dir = scratch_dir();
        let runner = unprivileged_runner();
        let path = dir.join(TCP_PASSWORD_FILE);

        let first = tcp_password(&dir, &runner).expect("make a password");
        assert!(is_generated_password(&first));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), first);
        let mode = std::fs::metadata(&path).expect("stat").mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(tcp_password(&dir, &runner).expect("reuse"), first);

        let injected = format!("x'; DROP ROLE x; --{}", "a".repeat(20));
        std::fs::write(&path, &injected).expect("write");
        let replaced = tcp_password(&dir, &runner).expect("replace");
        assert!(is_generated_password(&replaced));
        assert_ne!(replaced, first);

        // A symlink is replaced, and what it points at left alone.
        let target = dir.join("target");
        std::fs::write(&target, &first).expect("write target");
        std::fs::remove_file(&path).expect("remove");
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        let fresh = tcp_password(&dir, &runner).expect("replace the symlink");
        assert_ne!(fresh, first, "read through a symlink");
        assert!(std::fs::symlink_metadata(&path).expect("stat").is_file());
        assert_eq!(std::fs::read_to_string(&target).expect("read"), first);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn socket_dir_is_refused_for_paths_the_setting_cannot_hold() {
        assert_eq!(
            socket_dir_setting(Path::new("/srv/hermes/pg")),
            "/srv/hermes/pg"
        );
        assert_eq!(socket_dir_setting(Path::new("/srv/a b/pg")), "/srv/a b/pg");
        for refused in [
            "/srv/a,b/pg",
            "/srv/it's/pg",
            "/srv/a\\b/pg",
            "/srv/pg ",
            "/srv/pg\t",
        ] {
            assert_eq!(socket_dir_setting(Path::new(refused)), "", "{refused:?}");
        }
        let long = format!("/{}", "d".repeat(MAX_SOCKET_DIR_LEN));
        assert_eq!(socket_dir_setting(Path::new(&long)), "");
        let tcp = hba_conf(
            Path::new("/srv/a,b/pg"),
            socket_dir_setting(Path::new("/srv/a,b/pg")),
        );
        assert!(tcp.contains("127.0.0.1/32 trust"), "{tcp}");
    }
}
