use super::*;
use crate::config::dkim_sign::{DEFAULT_OVERSIGN_HEADERS, DEFAULT_SIGN_HEADERS};
use crate::relay::writer::{Edit, edited};

const MSG: &[u8] = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hi\r\n\
Authentication-Results: mailwarden.test; dkim=pass\r\n\r\nBody line\r\n";

fn entry(selector: &str) -> SignConfig {
    SignConfig {
        domain: "example.org".into(),
        selector: selector.into(),
        key_file: "unused".into(),
        headers: DEFAULT_SIGN_HEADERS.iter().map(|s| s.to_string()).collect(),
        oversign: DEFAULT_OVERSIGN_HEADERS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        canonicalization: "relaxed/relaxed".into(),
        expiry: Duration::ZERO,
    }
}

fn signer(algorithms: &[(key::Algorithm, &str)]) -> Signer {
    let mut domains = HashMap::new();
    let keys = algorithms
        .iter()
        .map(|(a, sel)| {
            let k = key::parse_pem(key::generate(*a).unwrap().as_bytes()).unwrap();
            Signer::domain_key(&entry(sel), k).unwrap()
        })
        .collect();
    domains.insert("example.org".to_string(), keys);
    Signer { domains }
}

fn tag<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    let unfolded = header.split_once(':').unwrap().1;
    unfolded
        .split(';')
        .map(str::trim)
        .find_map(|t| t.strip_prefix(&format!("{name}=")))
}

#[test]
fn signs_with_the_from_domain_and_oversigns() {
    let s = signer(&[(key::Algorithm::Ed25519, "ed")]);
    let out = s.sign(&[], &[MSG]);
    let Signing::Signed {
        domain,
        selectors,
        headers,
    } = &out
    else {
        panic!("{out:?}")
    };
    assert_eq!(domain, "example.org");
    assert_eq!(selectors, &["ed"]);
    let h = headers[0].replace("\r\n\t", "");
    assert!(
        h.starts_with("DKIM-Signature: v=1; a=ed25519-sha256;"),
        "{h}"
    );
    assert_eq!(tag(&h, "d"), Some("example.org"));
    assert_eq!(tag(&h, "c"), Some("relaxed/relaxed"));
    assert!(tag(&h, "x").is_none(), "no expiry configured: {h}");
    let list: Vec<String> = tag(&h, "h")
        .unwrap()
        .split(':')
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let count = |n: &str| list.iter().filter(|x| *x == n).count();
    // Present and oversigned: twice; absent and oversigned: once (signed as absent);
    // absent and only signed: not listed; never our own A-R.
    assert_eq!(count("from"), 2, "{list:?}");
    assert_eq!(count("subject"), 2, "{list:?}");
    assert_eq!(count("cc"), 1, "{list:?}");
    assert_eq!(count("list-id"), 0, "{list:?}");
    assert_eq!(count("authentication-results"), 0, "{list:?}");
}

#[test]
fn dual_signing_gives_one_signature_per_key() {
    let s = signer(&[
        (key::Algorithm::Rsa(2048), "rsa"),
        (key::Algorithm::Ed25519, "ed"),
    ]);
    let out = s.sign(&[], &[MSG]);
    assert_eq!(out.headers().len(), 2, "{out:?}");
    assert!(out.headers()[0].contains("a=rsa-sha256"));
    assert!(out.headers()[1].contains("a=ed25519-sha256"));
    assert_eq!(out.summary(), "signed d=example.org s=rsa,ed");
}

#[test]
fn unsigned_without_a_key_or_a_single_from_domain() {
    let s = signer(&[(key::Algorithm::Ed25519, "ed")]);
    let other = b"From: x@example.net\r\n\r\nb\r\n";
    assert_eq!(
        s.sign(&[], &[other]),
        Signing::NoKey {
            domain: "example.net".into()
        }
    );
    // The key's domain must be the From domain itself, not a parent or a look-alike.
    let sub = b"From: x@mail.example.org\r\n\r\nb\r\n";
    assert!(matches!(s.sign(&[], &[sub]), Signing::NoKey { .. }));
    for bad in [
        &b"To: y@example.org\r\n\r\nb\r\n"[..],
        b"From: a@example.org, b@example.net\r\n\r\nb\r\n",
        b"From: a@example.org\r\nFrom: b@example.net\r\n\r\nb\r\n",
        b"From: undisclosed\r\n\r\nb\r\n",
    ] {
        assert_eq!(
            s.sign(&[], &[bad]),
            Signing::NoFromDomain,
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    // Case and a trailing dot do not matter.
    let upper = b"From: A <A@EXAMPLE.ORG.>\r\n\r\nb\r\n";
    assert!(matches!(s.sign(&[], &[upper]), Signing::Signed { .. }));
}

#[test]
fn header_section_is_gathered_and_the_body_borrowed() {
    // An edit (forged A-R left out) splits the header section in two parts.
    let start = MSG
        .windows(22)
        .position(|w| w == b"Authentication-Results")
        .unwrap();
    let end = start + MSG[start..].windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    let edits = [Edit::remove(start..end)];
    let parts = edited(MSG, &edits);
    assert_eq!(parts.len(), 2);
    let added = vec!["X-Added: 1".to_string()];
    let (head, body) = split_header_section(&added, &parts);
    assert_eq!(
        head,
        b"X-Added: 1\r\nFrom: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hi\r\n"
    );
    assert_eq!(&*body, b"\r\nBody line\r\n");
    assert!(matches!(body, std::borrow::Cow::Borrowed(_)));
    // The empty line straddling two parts is still found.
    let (head, body) = split_header_section(&[], &[b"A: 1\r\n", b"\r\nbody\r\n"]);
    assert_eq!(head, b"A: 1\r\n");
    assert_eq!(&*body, b"\r\nbody\r\n");
    // No body at all.
    let (head, body) = split_header_section(&[], &[b"A: 1\r\n"]);
    assert_eq!(head, b"A: 1\r\n");
    assert!(body.is_empty());
}

#[test]
fn expiry_sets_x() {
    let k = key::parse_pem(key::generate(key::Algorithm::Ed25519).unwrap().as_bytes()).unwrap();
    let mut e = entry("ed");
    e.expiry = Duration::from_secs(86_400);
    e.canonicalization = "simple".into();
    let s = Signer::single(&e, k).unwrap();
    let h = s.sign(&[], &[MSG]).headers()[0].replace("\r\n\t", "");
    let t: u64 = tag(&h, "t").unwrap().parse().unwrap();
    let x: u64 = tag(&h, "x").unwrap().parse().unwrap();
    assert_eq!(x - t, 86_400);
    assert_eq!(tag(&h, "c"), Some("simple/simple"));
}

#[test]
fn unsigned_mail_is_counted_by_reason() {
    let count = |result: &str| {
        let text = crate::metrics::global().render();
        let needle = format!("mailwarden_dkim_signing_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map_or(0, |n| n.trim().parse::<u64>().unwrap())
    };
    let before = count("no_key");
    let s = signer(&[(key::Algorithm::Ed25519, "ed")]);
    let out = record(s.sign(&[], &[b"From: x@example.net\r\n\r\nb\r\n"]));
    assert_eq!(out.summary(), "unsigned: no key for example.net");
    assert!(count("no_key") > before, "the metric did not count it");
}
