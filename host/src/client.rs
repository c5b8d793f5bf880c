//! The command line's client of the admin API (`weft status`, `weft lease` and `weft module`
//! with `--server`): reqwest over rustls, so `https://` agents work, with the system's CAs or a
//! CA file, and a client certificate for agents that ask for one.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid --server {0:?}: use http://host:port or https://host:port")]
    Server(String),
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("cannot reach the agent at {addr}: {why} (is `weft agent` running there, with --admin-listen?)")]
    Connect { addr: String, why: String },
    #[error("the agent at {addr} is not trusted: {why} (give its CA with --server-ca)")]
    Untrusted { addr: String, why: String },
    #[error("talking to the agent at {addr}: {why}")]
    Io { addr: String, why: String },
    #[error("the agent at {0} did not answer in time")]
    Timeout(String),
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    #[error("unexpected JSON from the agent: {0}")]
    Json(String),
}

/// TLS settings for `https://` servers.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// A CA (PEM) to trust besides the system's.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM).
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// One field of a multipart form.
pub struct Field<'a> {
    /// Field name.
    pub name: &'a str,
    /// File name, for a file field.
    pub filename: Option<&'a str>,
    /// Contents.
    pub value: &'a [u8],
}

/// A multipart/form-data body and its content type.
pub fn multipart(fields: &[Field<'_>]) -> (String, Vec<u8>) {
    let boundary = format!("weft{:016x}", rand::random::<u64>());
    let mut body = Vec::new();
    for f in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"", f.name).as_bytes(),
        );
        if let Some(n) = f.filename {
            body.extend_from_slice(format!("; filename=\"{n}\"\r\nContent-Type: application/octet-stream").as_bytes());
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(f.value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// An API client for one agent.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::File {
        path: path.clone(),
        why: e.to_string(),
    })
}

/// `server` as a base URL: `http://` assumed without a scheme, port 8286 without a port.
fn base_url(server: &str) -> Result<String, ClientError> {
    let bad = || ClientError::Server(server.into());
    let (scheme, rest) = match server.split_once("://") {
        Some((s @ ("http" | "https"), rest)) => (s, rest),
        Some(_) => return Err(bad()),
        None => ("http", server),
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') {
        return Err(bad());
    }
    // A bracketed IPv6 literal has colons of its own; the port follows the bracket.
    let has_port = match hostport.rsplit_once(']') {
        Some((_, after)) => after.starts_with(':'),
        None => hostport.contains(':'),
    };
    let url = if has_port {
        format!("{scheme}://{hostport}")
    } else {
        format!("{scheme}://{hostport}:8286")
    };
    reqwest::Url::parse(&url).map_err(|_| bad())?;
    Ok(url)
}

impl Client {
    /// A client of `server` (`http://host:port`, `https://host:port` or `host:port`), sending
    /// `token` if given.
    pub fn new(server: &str, token: Option<String>, tls: &TlsOptions) -> Result<Client, ClientError> {
        let base = base_url(server)?;
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10));
        if let Some(ca) = &tls.ca {
            let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?).map_err(|e| ClientError::File {
                path: ca.clone(),
                why: format!("not a PEM certificate: {e}"),
            })?;
            if certs.is_empty() {
                return Err(ClientError::File {
                    path: ca.clone(),
                    why: "no PEM certificate in it".into(),
                });
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if let Some((cert, key)) = &tls.identity {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend_from_slice(&read(key)?);
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| ClientError::File {
                path: cert.clone(),
                why: format!("not a PEM certificate and key: {e}"),
            })?;
            b = b.identity(id);
        }
        let http = b.build().map_err(|e| ClientError::Server(format!("{server}: {e}")))?;
        Ok(Client { base, token, http })
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends one request under `/api/v1`.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        ctype: Option<&str>,
        body: &[u8],
    ) -> Result<Response, ClientError> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| ClientError::Io {
            addr: self.base.clone(),
            why: e.to_string(),
        })?;
        let mut req = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base))
            .body(body.to_vec());
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(ct) = ctype {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        let r = req.send().await.map_err(|e| self.failed(e))?;
        let status = r.status().as_u16();
        let body = r.bytes().await.map_err(|e| self.failed(e))?.to_vec();
        Ok(Response { status, body })
    }

    /// One line saying what went wrong, the innermost cause included (a refused certificate,
    /// a refused connection), as reqwest nests them.
    fn failed(&self, e: reqwest::Error) -> ClientError {
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why = format!("{why}: {s}");
            source = s.source();
        }
        let addr = self.base.clone();
        if e.is_timeout() {
            ClientError::Timeout(addr)
        } else if why.contains("invalid peer certificate") {
            ClientError::Untrusted { addr, why }
        } else if e.is_connect() {
            ClientError::Connect { addr, why }
        } else {
            ClientError::Io { addr, why }
        }
    }

    /// Sends a request and decodes a JSON answer; API errors become [`ClientError::Api`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        ctype: Option<&str>,
        body: &[u8],
    ) -> Result<T, ClientError> {
        let r = self.request(method, path, ctype, body).await?;
        if !(200..300).contains(&r.status) {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            let message = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&r.body).trim().to_string());
            return Err(ClientError::Api {
                status: r.status,
                message,
            });
        }
        let body = if r.body.is_empty() { b"null".as_slice() } else { &r.body };
        serde_json::from_slice(body).map_err(|e| ClientError::Json(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_parse_with_either_scheme() {
        assert_eq!(base_url("http://127.0.0.1:9000/").unwrap(), "http://127.0.0.1:9000");
        assert_eq!(base_url("localhost").unwrap(), "http://localhost:8286");
        assert_eq!(base_url("https://node-1").unwrap(), "https://node-1:8286");
        assert_eq!(base_url("https://[fd00::1]").unwrap(), "https://[fd00::1]:8286");
        assert_eq!(base_url("[fd00::1]:9").unwrap(), "http://[fd00::1]:9");
        for bad in ["ftp://x:1", "http://x:1/api", "", "http://", "http://x:port"] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_ca_file_that_is_not_pem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "hello").unwrap();
        let tls = TlsOptions {
            ca: Some(ca),
            identity: None,
        };
        let e = Client::new("https://x:1", None, &tls)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("ca.pem"), "{e}");
    }

    #[test]
    fn multipart_bodies_carry_every_field() {
        let (ct, body) = multipart(&[
            Field {
                name: "name",
                filename: None,
                value: b"fw",
            },
            Field {
                name: "wasm",
                filename: Some("fw.wasm"),
                value: b"\0asm",
            },
        ]);
        let b = ct.strip_prefix("multipart/form-data; boundary=").unwrap();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(text.matches(&format!("--{b}")).count(), 3);
        assert!(text.contains("name=\"wasm\"; filename=\"fw.wasm\""));
    }
}
