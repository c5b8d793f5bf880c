//! Signed modules. A module's code runs on every node, so whoever can write the store can run
//! code in every node's data path; signatures narrow that to whoever holds a trusted key. An
//! Ed25519 signature covers the module's code and its config together (a firewall is its code
//! *and* its rules): the signed message is a fixed context string, then the sha256 of the code
//! and the sha256 of the config. Agents started with trusted public keys refuse a module that
//! is unsigned or whose signature does not verify, both when it is added and when it is loaded
//! (so a module written to the store by hand runs nowhere).
//!
//! Files are plain Ed25519 as OpenSSL writes it: the secret key is a PKCS#8 PEM, the public key
//! an SPKI PEM, so keys can be made, kept and checked with standard tools. A key is named by its
//! id: the first 16 hex digits of the sha256 of its 32 public-key bytes.

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use super::runtime::{hex, sha256};

/// What every signed message starts with: a signature made for anything else never verifies.
const CONTEXT: &[u8] = b"weft module signature v1\n";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// Why a key or a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("unsigned, and this node only runs modules signed by a trusted key")]
    Unsigned,
    #[error("signed by key {0}, which this node does not trust")]
    UnknownKey(String),
    #[error("signature by key {0} does not match this code and config")]
    Mismatch(String),
    #[error("{0}")]
    Key(String),
}

/// A module's signature, as stored with it and as `weft module sign` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Id of the key that made it.
    pub key_id: String,
    /// The 64 signature bytes, base64.
    pub signature: String,
}

/// The message a signature covers.
fn message(wasm: &[u8], config: &[u8]) -> Vec<u8> {
    let mut m = CONTEXT.to_vec();
    m.extend_from_slice(&sha256(wasm));
    m.extend_from_slice(&sha256(config));
    m
}

/// A key's id.
pub fn key_id(public: &[u8]) -> String {
    hex(&sha256(public))[..16].to_string()
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .filter_map(|c| std::str::from_utf8(c).ok())
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// The DER inside every `label` block of `text`.
fn unpem(text: &str, label: &str) -> Vec<Result<Vec<u8>, SignatureError>> {
    let (begin, end) = (format!("-----BEGIN {label}-----"), format!("-----END {label}-----"));
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let body = &rest[start + begin.len()..];
        let Some(stop) = body.find(&end) else {
            out.push(Err(SignatureError::Key(format!("{label} block without an end line"))));
            break;
        };
        let b64: String = body[..stop].split_whitespace().collect();
        out.push(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| SignatureError::Key(format!("{label} block is not base64: {e}"))),
        );
        rest = &body[stop + end.len()..];
    }
    out
}

/// A secret key that signs modules.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// A new random key: (the key, its secret PKCS#8 PEM).
    pub fn generate() -> Result<(SigningKey, String), SignatureError> {
        let rng = ring::rand::SystemRandom::new();
        let doc =
            Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| SignatureError::Key("cannot generate a key".into()))?;
        let pem = pem("PRIVATE KEY", doc.as_ref());
        Ok((SigningKey::from_pem(&pem)?, pem))
    }

    /// Reads a PKCS#8 PEM secret key (as `weft module keygen` or `openssl genpkey -algorithm ed25519` write).
    pub fn from_pem(text: &str) -> Result<SigningKey, SignatureError> {
        let der = unpem(text, "PRIVATE KEY")
            .into_iter()
            .next()
            .ok_or_else(|| SignatureError::Key("no PRIVATE KEY block: not an Ed25519 secret key".into()))??;
        // OpenSSL writes PKCS#8 v1 (no public key inside); ring's own keys are v2.
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| SignatureError::Key(format!("not an Ed25519 secret key: {e}")))?;
        Ok(SigningKey { pair })
    }

    /// The public half as an SPKI PEM, with the key id in a comment line above it.
    pub fn public_pem(&self) -> String {
        let public = self.pair.public_key().as_ref();
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(public);
        format!("# weft module key {}\n{}", key_id(public), pem("PUBLIC KEY", &der))
    }

    /// This key's id.
    pub fn id(&self) -> String {
        key_id(self.pair.public_key().as_ref())
    }

    /// Signs `wasm` with `config`.
    pub fn sign(&self, wasm: &[u8], config: &[u8]) -> Signature {
        let sig = self.pair.sign(&message(wasm, config));
        Signature {
            key_id: self.id(),
            signature: base64::engine::general_purpose::STANDARD.encode(sig.as_ref()),
        }
    }
}

/// The public keys a node accepts module signatures from.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl TrustedKeys {
    /// Reads every PUBLIC KEY block of `text` (several keys may be concatenated in one file).
    pub fn parse(text: &str) -> Result<TrustedKeys, SignatureError> {
        let mut keys = Vec::new();
        for der in unpem(text, "PUBLIC KEY") {
            let der = der?;
            let raw = der
                .strip_prefix(&SPKI_PREFIX[..])
                .filter(|k| k.len() == 32)
                .ok_or_else(|| SignatureError::Key("a PUBLIC KEY block is not an Ed25519 key".into()))?;
            keys.push((key_id(raw), raw.to_vec()));
        }
        if keys.is_empty() {
            return Err(SignatureError::Key("no PUBLIC KEY block in the trusted keys".into()));
        }
        Ok(TrustedKeys { keys })
    }

    /// The ids of the keys trusted.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Checks `sig` over `wasm` and `config`; returns the key id that made it.
    pub fn verify(&self, wasm: &[u8], config: &[u8], sig: Option<&Signature>) -> Result<String, SignatureError> {
        let sig = sig.ok_or(SignatureError::Unsigned)?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(id, _)| *id == sig.key_id)
            .ok_or_else(|| SignatureError::UnknownKey(sig.key_id.clone()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&sig.signature)
            .map_err(|_| SignatureError::Mismatch(sig.key_id.clone()))?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&message(wasm, config), &bytes)
            .map_err(|_| SignatureError::Mismatch(sig.key_id.clone()))?;
        Ok(sig.key_id.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(k: &SigningKey) -> TrustedKeys {
        TrustedKeys::parse(&k.public_pem()).unwrap()
    }

    #[test]
    fn a_signature_covers_code_and_config_and_names_its_key() {
        let (k, secret) = SigningKey::generate().unwrap();
        let again = SigningKey::from_pem(&secret).unwrap();
        assert_eq!(again.id(), k.id());
        let t = trusted(&k);
        assert_eq!(t.ids(), vec![k.id()]);
        let sig = k.sign(b"\0asm code", b"{\"rules\":[]}");
        assert_eq!(t.verify(b"\0asm code", b"{\"rules\":[]}", Some(&sig)), Ok(k.id()));
        assert_eq!(
            t.verify(b"\0asm codf", b"{\"rules\":[]}", Some(&sig)),
            Err(SignatureError::Mismatch(k.id()))
        );
        assert_eq!(
            t.verify(b"\0asm code", b"{\"rules\":[1]}", Some(&sig)),
            Err(SignatureError::Mismatch(k.id()))
        );
        assert_eq!(t.verify(b"\0asm code", b"", None), Err(SignatureError::Unsigned));
        let mut forged = sig.clone();
        forged.signature = "AAAA".into();
        assert!(t.verify(b"\0asm code", b"{\"rules\":[]}", Some(&forged)).is_err());
    }

    #[test]
    fn only_trusted_keys_verify() {
        let (a, _) = SigningKey::generate().unwrap();
        let (b, _) = SigningKey::generate().unwrap();
        let sig = b.sign(b"x", b"");
        assert_eq!(
            trusted(&a).verify(b"x", b"", Some(&sig)),
            Err(SignatureError::UnknownKey(b.id()))
        );
        // A key claiming another's id is checked against the key it names.
        let mut claimed = sig.clone();
        claimed.key_id = a.id();
        assert_eq!(
            trusted(&a).verify(b"x", b"", Some(&claimed)),
            Err(SignatureError::Mismatch(a.id()))
        );
        let both = TrustedKeys::parse(&format!("{}{}", a.public_pem(), b.public_pem())).unwrap();
        assert_eq!(both.verify(b"x", b"", Some(&sig)), Ok(b.id()));
    }

    #[test]
    fn bad_key_files_say_what_they_are_not() {
        for bad in [
            "",
            "hello",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        ] {
            assert!(TrustedKeys::parse(bad).is_err(), "{bad:?}");
        }
        assert!(SigningKey::from_pem("-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----").is_err());
        assert!(SigningKey::from_pem("").is_err());
    }
}
