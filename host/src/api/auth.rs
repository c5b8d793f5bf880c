//! Bearer-token authentication: every mutation needs the token; reads too when asked to.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::ApiState;

/// Where the token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Given (flag or environment).
    Given,
    /// Read from a file.
    File(PathBuf),
    /// Generated at this start into a 0600 file.
    Generated(PathBuf),
}

/// Why the token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the admin token file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the admin token file {0} is empty")]
    Empty(PathBuf),
    #[error("cannot write a new admin token to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The token: `given` if set, else the file at `path` if it exists, else a new random token
/// written there with mode 0600.
pub fn load_or_create(given: Option<&str>, path: &Path) -> Result<(String, TokenSource), TokenError> {
    if let Some(t) = given.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok((t.to_string(), TokenSource::Given));
    }
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let t = s.trim();
            if t.is_empty() {
                return Err(TokenError::Empty(path.into()));
            }
            return Ok((t.to_string(), TokenSource::File(path.into())));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(TokenError::Read {
                path: path.into(),
                source,
            })
        }
    }
    let token: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    // Written in full to a private temp file, then published with link(): agents starting
    // together never see a half-written token, and exactly one of them creates it.
    let tmp = path.with_extension(format!("tmp{}-{:08x}", std::process::id(), rand::random::<u32>()));
    let write = || -> std::io::Result<bool> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    };
    match write() {
        Ok(true) => Ok((token, TokenSource::Generated(path.into()))),
        // Another agent published one first: use it.
        Ok(false) => load_or_create(None, path),
        Err(source) => Err(TokenError::Write {
            path: path.into(),
            source,
        }),
    }
}

/// Equal in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware: refuses mutations (and reads, with `protect_reads`) without the token.
pub async fn require_token(State(s): State<Arc<ApiState>>, req: Request, next: Next) -> Result<Response, ApiError> {
    let read = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if read && !s.protect_reads {
        return Ok(next.run(req).await);
    }
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if same(t.as_bytes(), s.token.as_bytes()) => Ok(next.run(req).await),
        _ => Err(ApiError::Unauthorized),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_token_is_generated_once_with_mode_0600_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/admin-token");
        let (t, src) = load_or_create(None, &p).unwrap();
        assert_eq!(src, TokenSource::Generated(p.clone()));
        assert_eq!(t.len(), 64);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, src) = load_or_create(None, &p).unwrap();
        assert_eq!((again, src), (t, TokenSource::File(p.clone())));
        assert_eq!(load_or_create(Some(" given "), &p).unwrap().0, "given");
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(load_or_create(None, &p), Err(TokenError::Empty(_))));
    }

    #[test]
    fn agents_starting_together_agree_on_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin-token");
        let tokens: Vec<String> = (0..8)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || load_or_create(None, &p).unwrap().0)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert!(tokens.iter().all(|t| *t == tokens[0] && t.len() == 64), "{tokens:?}");
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "temp files are cleaned up");
    }

    #[test]
    fn comparison_needs_every_byte() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
