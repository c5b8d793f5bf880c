//! A small HTTP/1.1 client for the admin API, used by `weft status`, `weft lease` and
//! `weft module` with `--server`, and by the lab. Plain HTTP: the API listens on loopback by
//! default, and a remote agent is reached through whatever secures that path (SSH, a proxy).

use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid --server {0:?}: use http://host:port")]
    Server(String),
    #[error("cannot reach the agent at {addr}: {source} (is `weft agent` running there, with --admin-listen?)")]
    Connect { addr: String, source: std::io::Error },
    #[error("talking to the agent at {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("the agent at {0} did not answer in time")]
    Timeout(String),
    #[error("the agent answered with something that is not HTTP")]
    BadResponse,
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    #[error("unexpected JSON from the agent: {0}")]
    Json(String),
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header lines (names lowercased).
    pub headers: Vec<(String, String)>,
    /// The body, chunked encoding undone.
    pub body: Vec<u8>,
}

/// Parses a whole HTTP/1.1 response.
pub fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_vec() };
    Some(Response { status, headers, body })
}

/// Undoes chunked transfer encoding.
pub fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..eol]);
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let rest = &s[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
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
    addr: String,
    token: Option<String>,
}

impl Client {
    /// A client of `server` (`http://host:port` or `host:port`), sending `token` if given.
    pub fn new(server: &str, token: Option<String>) -> Result<Client, ClientError> {
        let hostport = server.strip_prefix("http://").unwrap_or(server).trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') || server.starts_with("https://") {
            return Err(ClientError::Server(server.into()));
        }
        let addr = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:8286")
        };
        Ok(Client { addr, token })
    }

    /// Sends one request under `/api/v1`.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        ctype: Option<&str>,
        body: &[u8],
    ) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            addr: self.addr.clone(),
            source,
        };
        let fut = async {
            let mut s = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(|source| ClientError::Connect {
                    addr: self.addr.clone(),
                    source,
                })?;
            let mut head = format!(
                "{method} /api/v1{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
                self.addr,
                body.len()
            );
            if let Some(t) = &self.token {
                head.push_str(&format!("Authorization: Bearer {t}\r\n"));
            }
            if let Some(ct) = ctype {
                head.push_str(&format!("Content-Type: {ct}\r\n"));
            }
            head.push_str("\r\n");
            s.write_all(head.as_bytes()).await.map_err(io)?;
            s.write_all(body).await.map_err(io)?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.map_err(io)?;
            parse_response(&raw).ok_or(ClientError::BadResponse)
        };
        tokio::time::timeout(Duration::from_secs(60), fut)
            .await
            .map_err(|_| ClientError::Timeout(self.addr.clone()))?
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
    fn responses_parse_plain_and_chunked() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, b"{}".as_slice()));
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"garbage").is_none());
    }

    #[test]
    fn servers_parse_and_https_is_refused() {
        assert_eq!(
            Client::new("http://127.0.0.1:9000/", None).unwrap().addr,
            "127.0.0.1:9000"
        );
        assert_eq!(Client::new("localhost", None).unwrap().addr, "localhost:8286");
        assert!(Client::new("https://x:1", None).is_err());
        assert!(Client::new("http://x:1/api", None).is_err());
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
