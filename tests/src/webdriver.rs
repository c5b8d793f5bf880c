//! A small W3C WebDriver client for the browser tests: `chromedriver` from Debian, run in a
//! node's namespace, drives a headless Chromium there. Only what the tests use: sessions,
//! navigation, script execution, elements, keys, clicks and screenshots.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft::lab::netns::enter_and_run;

/// A chromedriver process in a namespace, and one browser session on it.
pub struct Browser {
    ns: String,
    port: u16,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn request(ns: &str, port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = enter_and_run(ns, move || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.write_all(req.as_bytes())?;
        // chromedriver keeps connections open whatever the request says: read by length.
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if complete(&out) {
                break;
            }
        }
        Ok(out)
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("webdriver {method} {path}: {e}"))?;
    let resp = weft::lab::http::parse_response(&raw).ok_or("no HTTP response from chromedriver")?;
    let body = String::from_utf8_lossy(&resp.body);
    let v: Value =
        serde_json::from_str(&body).map_err(|e| format!("webdriver reply is not JSON ({e}): {body:.300}"))?;
    if let Some(err) = v["value"]["error"].as_str() {
        return Err(format!("webdriver {method} {path}: {err}: {}", v["value"]["message"]));
    }
    Ok(v["value"].clone())
}

/// Whether `raw` holds a whole HTTP response (by Content-Length, or a chunked body's end).
fn complete(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let head = head.to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with("0\r\n\r\n");
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    len.is_some_and(|n| body.len() >= n)
}

impl Browser {
    /// Starts chromedriver on `port` inside namespace `ns` and opens a headless Chromium session.
    pub fn start(ns: &str, port: u16) -> Browser {
        let driver = Command::new("ip")
            .args(["netns", "exec", ns, "chromedriver", &format!("--port={port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (apt-get install chromium-driver)");
        let profile = tempfile::tempdir().expect("profile dir");
        let deadline = Instant::now() + Duration::from_secs(20);
        while request(ns, port, "GET", "/status", None).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not come up in {ns}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                         format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let v = request(ns, port, "POST", "/session", Some(&caps)).expect("new session");
        let session = v["sessionId"].as_str().expect("session id").to_string();
        Browser {
            ns: ns.to_string(),
            port,
            session,
            driver,
            _profile: profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let p = format!("/session/{}{path}", self.session);
        request(&self.ns, self.port, method, &p, body).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Opens `url`.
    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(&json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` available) and returns its value.
    pub fn eval(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// Polls `script` until it returns true.
    pub fn wait_for(&self, script: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.eval(script, json!([])) == json!(true) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The element matching a CSS selector.
    pub fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(&json!({ "using": "css selector", "value": css })),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string()
    }

    /// Types `text` into the element (a path, for a file input).
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/value"), Some(&json!({ "text": text })));
    }

    /// Clicks the element.
    pub fn click(&self, css: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/click"), Some(&json!({})));
    }

    /// A PNG screenshot of the element.
    pub fn screenshot(&self, css: &str) -> Vec<u8> {
        use base64::Engine as _;
        let id = self.find(css);
        let v = self.call("GET", &format!("/element/{id}/screenshot"), None);
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("screenshot is base64")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = request(
            &self.ns,
            self.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
