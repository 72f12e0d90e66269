//! `mailwarden dkim keygen|check-dns`: make a signing key and the record to publish, and
//! check that what DNS publishes is the configured key.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{Name, RData, RecordType};

use super::key::{self, Algorithm};
use crate::config::{Config, Purpose};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Algo {
    Ed25519,
    Rsa,
}

#[derive(Debug, clap::Subcommand)]
pub enum DkimCommand {
    /// Write a new signing key (PKCS#8 PEM, mode 0600) and print the TXT record to publish.
    Keygen {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        #[arg(long, value_enum)]
        algo: Algo,
        /// RSA modulus size: 2048 (default), 3072 or 4096.
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Where to write the key (default: `<domain>.<selector>.key` here). An existing
        /// file is never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Fetch `<selector>._domainkey.<domain>` and confirm it publishes the configured key.
    CheckDns {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
    },
}

/// `config` is the global `-c` resolved by `main`; only `check-dns` reads it (keygen
/// needs no configuration, so it runs on a machine that has none yet).
pub fn run(config: Result<PathBuf, String>, command: &DkimCommand) -> ExitCode {
    let result = match command {
        DkimCommand::Keygen {
            domain,
            selector,
            algo,
            bits,
            out,
        } => keygen(domain, selector, *algo, *bits, out.as_deref()),
        DkimCommand::CheckDns { domain, selector } => {
            config.and_then(|path| check_dns(domain, selector, &path))
        }
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dkim: {e}");
            ExitCode::from(1)
        }
    }
}

/// `<selector>._domainkey.<domain>`, lower case, no trailing dot.
pub fn record_name(domain: &str, selector: &str) -> String {
    format!(
        "{}._domainkey.{}",
        selector.to_ascii_lowercase(),
        domain.trim_end_matches('.').to_ascii_lowercase()
    )
}

fn keygen(
    domain: &str,
    selector: &str,
    algo: Algo,
    bits: usize,
    out: Option<&Path>,
) -> Result<String, String> {
    check_names(domain, selector)?;
    let algorithm = match algo {
        Algo::Ed25519 => Algorithm::Ed25519,
        Algo::Rsa => Algorithm::Rsa(bits),
    };
    let pem = key::generate(algorithm)?;
    let loaded = key::parse_pem(pem.as_bytes())?;
    let path = out.map(Path::to_path_buf).unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}.{}.key",
            domain.trim_end_matches('.').to_ascii_lowercase(),
            selector.to_ascii_lowercase()
        ))
    });
    // Created 0600 from the start (never readable by others, not even for an instant);
    // create_new: a live key is never overwritten by a second run.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let name = record_name(domain, selector);
    let value = loaded.txt_record();
    let quoted: Vec<String> = key::txt_strings(&value)
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect();
    Ok(format!(
        "wrote {} ({}, mode 0600)\n\
         Publish this TXT record, then run `mailwarden dkim check-dns --domain {domain} --selector {selector}`:\n\
         name:  {name}\n\
         value: {value}\n\
         zone:  {name}. 3600 IN TXT ( {} )\n\
         config:\n  [[dkim.sign]]\n  domain = \"{domain}\"\n  selector = \"{selector}\"\n  key_file = \"{}\"\n",
        path.display(),
        loaded.algorithm,
        quoted.join(" "),
        path.display(),
    ))
}

fn check_names(domain: &str, selector: &str) -> Result<(), String> {
    if !crate::wire::domain::looks_like_domain(domain.trim_end_matches('.')) {
        return Err(format!("--domain {domain:?} is not a domain name"));
    }
    if selector.is_empty()
        || !selector
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!("--selector {selector:?} is not a selector"));
    }
    Ok(())
}

fn check_dns(domain: &str, selector: &str, config_path: &Path) -> Result<String, String> {
    check_names(domain, selector)?;
    let config = Config::load_for(config_path, Purpose::Offline).map_err(|e| e.to_string())?;
    let entry = config
        .dkim
        .sign
        .iter()
        .find(|s| {
            s.domain
                .trim_end_matches('.')
                .eq_ignore_ascii_case(domain.trim_end_matches('.'))
                && s.selector.eq_ignore_ascii_case(selector)
        })
        .ok_or_else(|| {
            format!(
                "{}: no [[dkim.sign]] with domain = \"{domain}\" and selector = \"{selector}\"",
                config_path.display()
            )
        })?;
    let loaded = key::load(&entry.key_file)?;
    let name = record_name(domain, selector);
    let records = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(fetch_txt(&config, &name))?;
    judge(&name, &records, &loaded, &entry.key_file)
}

/// Every TXT record at `name`, each one's strings concatenated (RFC 6376 §3.6.2.2).
async fn fetch_txt(config: &Config, name: &str) -> Result<Vec<Vec<u8>>, String> {
    let resolver = crate::auth::dns::authenticator(&config.dns)?.0;
    let qname = Name::from_ascii(format!("{name}.")).map_err(|e| format!("{name}: {e}"))?;
    match resolver.lookup(qname, RecordType::TXT).await {
        Ok(lookup) => Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => Some(txt.txt_data.iter().flatten().copied().collect()),
                _ => None,
            })
            .collect()),
        Err(NetError::Dns(DnsError::NoRecordsFound(_))) => Ok(Vec::new()),
        Err(e) => Err(format!("{name}: DNS lookup failed: {e}")),
    }
}

/// Whether the published record is usable and holds `key`'s public half.
fn judge(
    name: &str,
    records: &[Vec<u8>],
    key: &key::SigningKey,
    path: &Path,
) -> Result<String, String> {
    let record = match records {
        [] => return Err(format!("{name}: no TXT record published (yet?)")),
        [one] => one,
        _ => {
            // RFC 6376 §3.6.2.2: with several records verifiers may use any of them;
            // results then differ from one receiver to the next.
            return Err(format!(
                "{name}: {} TXT records; publish exactly one",
                records.len()
            ));
        }
    };
    let text = String::from_utf8_lossy(record);
    let tags = parse_tags(&text);
    let tag = |t: &str| {
        tags.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(t))
            .map(|(_, v)| v.as_str())
    };
    if tag("v").is_some_and(|v| v != "DKIM1") {
        return Err(format!("{name}: v= is not DKIM1: {text}"));
    }
    let k = tag("k").unwrap_or("rsa").to_ascii_lowercase();
    if k != key.algorithm.key_type() {
        return Err(format!(
            "{name}: publishes a k={k} key, {} holds {} (k={})",
            path.display(),
            key.algorithm,
            key.algorithm.key_type()
        ));
    }
    if let Some(h) = tag("h")
        && !h
            .split(':')
            .any(|a| a.trim().eq_ignore_ascii_case("sha256"))
    {
        return Err(format!(
            "{name}: h={h} does not allow sha256, the only hash we sign with"
        ));
    }
    let p: String = tag("p")
        .ok_or_else(|| format!("{name}: record has no p=: {text}"))?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if p.is_empty() {
        return Err(format!("{name}: the key is revoked (empty p=)"));
    }
    let published = base64::engine::general_purpose::STANDARD
        .decode(&p)
        .map_err(|e| format!("{name}: p= is not base64: {e}"))?;
    if !key.matches_public(&published) {
        return Err(format!(
            "{name}: the published key is NOT the key in {}; publish:\n{}\n",
            path.display(),
            key.txt_record()
        ));
    }
    let testing = tag("t").is_some_and(|t| t.split(':').any(|f| f.trim() == "y"));
    Ok(format!(
        "ok: {name} publishes the key in {} ({}){}\n",
        path.display(),
        key.algorithm,
        if testing {
            "; note: t=y (testing): receivers may treat failures as unsigned"
        } else {
            ""
        }
    ))
}

/// `tag=value; ...` (RFC 6376 §3.2), values trimmed.
fn parse_tags(text: &str) -> Vec<(String, String)> {
    text.split(';')
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(algorithm: Algorithm) -> key::SigningKey {
        key::parse_pem(key::generate(algorithm).unwrap().as_bytes()).unwrap()
    }

    #[test]
    fn judges_the_published_record() {
        let ed = key(Algorithm::Ed25519);
        let other = key(Algorithm::Ed25519);
        let path = Path::new("k.pem");
        let n = "s._domainkey.example.org";
        let ok = judge(n, &[ed.txt_record().into_bytes()], &ed, path).unwrap();
        assert!(ok.starts_with("ok: "), "{ok}");
        // Split into strings and with spaces inside p=: the same record.
        let spaced = ed.txt_record().replacen("p=", "p= ", 1);
        assert!(judge(n, &[spaced.into_bytes()], &ed, path).is_ok());
        // Another key, a revoked key, several records, none, the wrong k=.
        let e = judge(n, &[other.txt_record().into_bytes()], &ed, path).unwrap_err();
        assert!(e.contains("NOT the key"), "{e}");
        let e = judge(n, &[b"v=DKIM1; k=ed25519; p=".to_vec()], &ed, path).unwrap_err();
        assert!(e.contains("revoked"), "{e}");
        let two = [ed.txt_record().into_bytes(), ed.txt_record().into_bytes()];
        assert!(judge(n, &two, &ed, path).unwrap_err().contains("2 TXT"));
        assert!(judge(n, &[], &ed, path).unwrap_err().contains("no TXT"));
        let rsa_claim = ed.txt_record().replace("k=ed25519", "k=rsa");
        assert!(
            judge(n, &[rsa_claim.into_bytes()], &ed, path)
                .unwrap_err()
                .contains("k=rsa")
        );
        let sha1_only = ed.txt_record().replace("k=ed25519;", "k=ed25519; h=sha1;");
        assert!(
            judge(n, &[sha1_only.into_bytes()], &ed, path)
                .unwrap_err()
                .contains("sha256")
        );
    }

    #[test]
    fn rsa_records_match_spki_and_pkcs1() {
        let rsa = key(Algorithm::Rsa(2048));
        let n = "s._domainkey.example.org";
        let path = Path::new("k.pem");
        assert!(judge(n, &[rsa.txt_record().into_bytes()], &rsa, path).is_ok());
        // The same key published as a bare RSAPublicKey (some generators do that).
        let pkcs1 = format!(
            "v=DKIM1; p={}",
            base64::engine::general_purpose::STANDARD.encode(&rsa.public_alternates[0])
        );
        assert!(judge(n, &[pkcs1.into_bytes()], &rsa, path).is_ok());
    }

    #[test]
    fn keygen_writes_0600_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("k.pem");
        let text = keygen("example.org", "ed1", Algo::Ed25519, 2048, Some(&out)).unwrap();
        assert!(text.contains("name:  ed1._domainkey.example.org"), "{text}");
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(key::load(&out).unwrap().algorithm, Algorithm::Ed25519);
        let before = std::fs::read(&out).unwrap();
        assert!(keygen("example.org", "ed1", Algo::Ed25519, 2048, Some(&out)).is_err());
        assert_eq!(
            std::fs::read(&out).unwrap(),
            before,
            "the key was overwritten"
        );
        assert!(
            keygen(
                "example.org",
                "r",
                Algo::Rsa,
                1024,
                Some(&dir.path().join("r"))
            )
            .is_err()
        );
        assert!(keygen("example.org", "bad selector", Algo::Ed25519, 0, None).is_err());
    }
}
