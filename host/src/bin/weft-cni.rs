//! `weft-cni`: the CNI plugin binary. All logic is in `weft::cni`; this is the process edge.

use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(|s| s.as_str()).map(str::to_string))
        .unwrap_or_else(|| "1.0.0".into());
    let result = weft::cni::Invocation::from_env(&env).and_then(|inv| weft::cni::run(&inv, &stdin));
    let mut out = std::io::stdout();
    match result {
        Ok(bytes) => {
            let _ = out.write_all(&bytes);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
