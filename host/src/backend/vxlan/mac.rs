//! The VTEP MAC address, kept across restarts (and reboots) in the agent's state directory:
//! peers hold it in permanent neighbour and FDB entries, so a node that came back with a new
//! one would be unreachable until every peer caught up (flannel's "stale VTEP MAC" bug).

use std::path::{Path, PathBuf};

use super::wire::Mac;

/// The file holding the MAC of the VXLAN device `device`.
pub fn path(state_dir: &Path, device: &str) -> PathBuf {
    state_dir.join(format!("vtep-mac.{device}"))
}

/// Why the VTEP MAC could not be kept.
#[derive(Debug, thiserror::Error)]
#[error("cannot keep the VTEP MAC in {path}: {source} (the state directory must be writable and persistent, see --state-dir)")]
pub struct MacFileError {
    path: PathBuf,
    source: std::io::Error,
}

/// The MAC this node's VTEP uses: the one kept in `file`, else a new random one, kept there.
/// A file that does not hold a unicast, locally administered MAC is replaced (and logged).
pub fn load_or_create(file: &Path) -> Result<Mac, MacFileError> {
    let err = |source| MacFileError {
        path: file.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(file) {
        Ok(text) => match text.trim().parse::<Mac>() {
            Ok(m) if m.is_local_unicast() => return Ok(m),
            Ok(m) => {
                tracing::warn!(file = %file.display(), mac = %m, "kept VTEP MAC is not local unicast; making a new one")
            }
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "kept VTEP MAC is unreadable; making a new one")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mac = Mac::random_local();
    // Written aside and renamed, so a crash never leaves a torn file that would change the MAC.
    crate::atomic::write(file, format!("{mac}\n").as_bytes(), None).map_err(err)?;
    tracing::info!(file = %file.display(), %mac, "new VTEP MAC");
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mac_survives_a_restart_and_bad_files_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let f = path(&dir.path().join("state"), "weft.1");
        let first = load_or_create(&f).unwrap();
        assert!(first.is_local_unicast());
        assert_eq!(load_or_create(&f).unwrap(), first, "same MAC after a restart");
        std::fs::write(&f, "garbage").unwrap();
        let second = load_or_create(&f).unwrap();
        assert!(second.is_local_unicast());
        assert_eq!(load_or_create(&f).unwrap(), second);
        std::fs::write(&f, "01:00:5e:00:00:01\n").unwrap();
        assert_ne!(load_or_create(&f).unwrap().0[0] & 1, 1, "never a multicast MAC");
    }

    #[test]
    fn an_unwritable_state_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let e = load_or_create(&path(&blocker, "weft.1")).unwrap_err();
        assert!(e.to_string().contains("--state-dir"), "{e}");
    }
}
