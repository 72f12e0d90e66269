//! DKIM private keys: loading and checking a key file, generating a key, and the public
//! half as it is published in DNS (`p=`). A leaf (imports nothing of ours), so the
//! configuration can check `key_file` when it loads; `signing::key` names it too.
//!
//! A key file is PEM: PKCS#8 (`PRIVATE KEY`, what `mailwarden dkim keygen` and `openssl
//! genpkey` write, RSA or Ed25519) or PKCS#1 (`RSA PRIVATE KEY`, what `opendkim-genkey`
//! writes, so an OpenDKIM key moves over as it is). The crypto is aws-lc-rs, the provider
//! rustls and mail-auth already use.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

/// RFC 8301 §3.2 sets 1024 bits as the floor a verifier must accept; 1024-bit RSA is
/// within reach of a well-funded attacker, and every major receiver handles 2048. We
/// sign with nothing weaker (the "RSA 2048+").
pub const MIN_RSA_BITS: usize = 2048;

/// What a key signs with: the DKIM `k=` / `a=` family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// rsa-sha256 with the modulus size in bits.
    Rsa(usize),
    /// ed25519-sha256 (RFC 8463).
    Ed25519,
}

impl Algorithm {
    /// The `k=` tag value of the key record.
    pub fn key_type(self) -> &'static str {
        match self {
            Algorithm::Rsa(_) => "rsa",
            Algorithm::Ed25519 => "ed25519",
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Algorithm::Rsa(bits) => write!(f, "rsa-{bits}"),
            Algorithm::Ed25519 => f.write_str("ed25519"),
        }
    }
}

/// A loaded private key and its public half.
pub struct SigningKey {
    pub algorithm: Algorithm,
    /// The key mail-auth signs with (shared by every message's signer).
    pub key: Arc<DkimKey>,
    /// The public key as published in `p=`: SubjectPublicKeyInfo DER for RSA (what
    /// OpenDKIM, dkimpy and every large receiver read), the raw 32 octets for Ed25519
    /// (RFC 8463 §4.2).
    pub public: Vec<u8>,
    /// Other encodings of the same public key found in published records: PKCS#1
    /// `RSAPublicKey` (RFC 6376 §3.6.1 is read both ways by verifiers).
    pub public_alternates: Vec<Vec<u8>>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// The TXT record value to publish at `<selector>._domainkey.<domain>`.
    pub fn txt_record(&self) -> String {
        format!(
            "v=DKIM1; k={}; p={}",
            self.algorithm.key_type(),
            base64::engine::general_purpose::STANDARD.encode(&self.public)
        )
    }

    /// Whether `published` (the decoded `p=` of a record) is this key's public half.
    pub fn matches_public(&self, published: &[u8]) -> bool {
        published == self.public.as_slice() || self.public_alternates.iter().any(|a| a == published)
    }
}

/// Reads and checks the key file: it must exist, be a regular file nobody but its owner
/// and group can read, and hold an RSA key of at least [`MIN_RSA_BITS`] or an Ed25519
/// key. Errors say which of these failed (the caller adds file, line and key).
pub fn load(path: &Path) -> Result<SigningKey, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    // World-readable: any local user (a web application, a shell account) could sign
    // mail as the domain. OpenDKIM refuses the same.
    if meta.permissions().mode() & 0o007 != 0 {
        return Err(format!(
            "{} is readable or writable by every user (mode {:o}): chmod 600 (or 640 with a group) it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a PEM private key (PKCS#8 RSA or Ed25519, PKCS#1 RSA).
pub fn parse_pem(pem: &[u8]) -> Result<SigningKey, String> {
    let der = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("no PEM private key in the file ({e})"))?;
    match der {
        PrivateKeyDer::Pkcs1(k) => rsa(
            RsaKeyPair::from_der(k.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs1(k.clone_key()),
        ),
        PrivateKeyDer::Pkcs8(k) => {
            let bytes = k.secret_pkcs8_der();
            // An Ed25519 PKCS#8 is v1 (openssl) or v2 (with the public key, keygen).
            if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(bytes) {
                let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(bytes)
                    .map_err(|e| format!("Ed25519 key: {e}"))?;
                return Ok(SigningKey {
                    algorithm: Algorithm::Ed25519,
                    key: Arc::new(DkimKey::from(key)),
                    public: pair.public_key().as_ref().to_vec(),
                    public_alternates: Vec::new(),
                });
            }
            rsa(
                RsaKeyPair::from_pkcs8(bytes),
                PrivateKeyDer::Pkcs8(k.clone_key()),
            )
        }
        _ => Err("not an RSA or Ed25519 key (DKIM signs with nothing else)".into()),
    }
}

fn rsa(
    pair: Result<RsaKeyPair, aws_lc_rs::error::KeyRejected>,
    der: PrivateKeyDer<'_>,
) -> Result<SigningKey, String> {
    let pair = pair.map_err(|e| match e.description_() {
        // aws-lc-rs itself refuses RSA keys under 2048 bits for signing.
        "TooSmall" => format!("RSA key too weak: at least {MIN_RSA_BITS} bits are required"),
        other => format!("not a usable RSA or Ed25519 key ({other})"),
    })?;
    let bits = pair.public_modulus_len() * 8;
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA key too weak: {bits} bits, at least {MIN_RSA_BITS} are required"
        ));
    }
    let spki = pair
        .public_key()
        .as_der()
        .map_err(|_| "cannot encode the RSA public key".to_string())?;
    let key = RsaKey::<Sha256>::from_key_der(der).map_err(|e| format!("RSA key: {e}"))?;
    Ok(SigningKey {
        algorithm: Algorithm::Rsa(bits),
        key: Arc::new(DkimKey::from(key)),
        public: spki.as_ref().to_vec(),
        public_alternates: vec![pair.public_key().as_ref().to_vec()],
    })
}

/// A new private key as PKCS#8 PEM.
pub fn generate(algorithm: Algorithm) -> Result<String, String> {
    let der: Vec<u8> = match algorithm {
        Algorithm::Ed25519 => Ed25519KeyPair::generate()
            .and_then(|k| AsDer::<Pkcs8V1Der>::as_der(&k))
            .map_err(|_| "Ed25519 key generation failed".to_string())?
            .as_ref()
            .to_vec(),
        Algorithm::Rsa(bits) => {
            let size = match bits {
                2048 => KeySize::Rsa2048,
                3072 => KeySize::Rsa3072,
                4096 => KeySize::Rsa4096,
                other => {
                    return Err(format!(
                        "--bits {other}: use 2048, 3072 or 4096 (2048 is the usual choice: larger keys make TXT records some DNS hosting panels refuse)"
                    ));
                }
            };
            RsaKeyPair::generate(size)
                .and_then(|k| AsDer::<Pkcs8V1Der>::as_der(&k))
                .map_err(|_| "RSA key generation failed".to_string())?
                .as_ref()
                .to_vec()
        }
    };
    Ok(pem("PRIVATE KEY", &der))
}

/// PEM armour: base64 in 64-column lines (RFC 7468).
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A TXT record value cut into character-strings of at most 255 octets (RFC 1035
/// §3.3.14); verifiers concatenate them (RFC 6376 §3.6.2.2).
pub fn txt_strings(value: &str) -> Vec<&str> {
    // The value is ASCII (tags and base64), so byte offsets are char boundaries.
    value
        .as_bytes()
        .chunks(255)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_load_back() {
        for algorithm in [Algorithm::Ed25519, Algorithm::Rsa(2048)] {
            let pem = generate(algorithm).unwrap();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
            let key = parse_pem(pem.as_bytes()).unwrap();
            assert_eq!(key.algorithm, algorithm);
            let txt = key.txt_record();
            assert!(
                txt.starts_with(&format!("v=DKIM1; k={}; p=", algorithm.key_type())),
                "{txt}"
            );
        }
        // Ed25519: the raw 32-octet key (RFC 8463), not an SPKI.
        let ed = parse_pem(generate(Algorithm::Ed25519).unwrap().as_bytes()).unwrap();
        assert_eq!(ed.public.len(), 32);
    }

    #[test]
    fn refuses_what_must_not_sign() {
        assert!(generate(Algorithm::Rsa(1024)).is_err());
        assert!(parse_pem(b"not a key").is_err());
        // An EC (SEC1) key is a key, but not one DKIM signs with.
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let err = parse_pem(ec.serialize_pem().as_bytes()).unwrap_err();
        assert!(
            err.contains("not a usable") || err.contains("not an RSA"),
            "{err}"
        );
    }

    #[test]
    fn permissions_and_absence_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        assert!(load(&path).unwrap_err().contains("k.pem"));
        std::fs::write(&path, generate(Algorithm::Ed25519).unwrap()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.contains("every user") && err.contains("644"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load(&path).unwrap().algorithm, Algorithm::Ed25519);
        assert!(load(dir.path()).unwrap_err().contains("not a regular file"));
    }

    #[test]
    fn txt_strings_are_at_most_255_octets() {
        let key = parse_pem(generate(Algorithm::Rsa(2048)).unwrap().as_bytes()).unwrap();
        let txt = key.txt_record();
        let strings = txt_strings(&txt);
        assert!(strings.len() >= 2, "an RSA-2048 record needs two strings");
        assert!(strings.iter().all(|s| s.len() <= 255));
        assert_eq!(strings.concat(), txt);
    }
}
