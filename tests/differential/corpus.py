#!/usr/bin/python3
"""Corpus of the DKIM / ARC / DMARC differential test (tests/auth_differential.rs).

Usage: corpus.py OUT_DIR

Writes into OUT_DIR:
  zone.json   the DNS records the test serves from its loopback server:
              [{"name", "type": "TXT", "strings": [...]} | {"name", "type": "A", "ip"}
               | {"name", "type": "SERVFAIL"} (every query for the name fails)]
  cases.json  one entry per message: {"id", "family", "file", "ip", "helo", "mail_from"}
  <id>.eml    the messages (CRLF), signed by dkimpy and mutated afterwards

Everything is deterministic except the RSA keys (fresh from openssl on every run, like
tests/dkim_interop.rs) and the t= time stamps: the Ed25519 key comes from a fixed seed, RSA
PKCS#1 v1.5 and Ed25519 signatures are deterministic, and no case depends on the key bits.
Only dkimpy signs; signatures it refuses to make (h= without From, t= in the future, an
i= outside d=, ...) are made with its own DomainSigner.gen_header on fields we choose.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import time

import dkim
import nacl.signing
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import parse_pem_private_key

OUT = sys.argv[1]
SEED = b"mailwarden issue 11 differential corpus"
NOW = int(time.time())
DAY = 86400

# The SMTP client every case comes from, unless a case says otherwise.
IP_OK = "192.0.2.10"
IP_BAD = "198.51.100.9"
HELO = "mail.sender.example"
BOUNCES = "bounce@bounces.example"

CANONS = ["relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"]

# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


def openssl(*args):
    return subprocess.run(["openssl", *args], check=True, capture_output=True).stdout


def rsa_key(name):
    pem = os.path.join(OUT, name + ".pem")
    try:
        openssl("genrsa", "-traditional", "-out", pem, "2048")
    except subprocess.CalledProcessError:
        openssl("genrsa", "-out", pem, "2048")  # OpenSSL 1.1 writes PKCS#1 already
    der = openssl("rsa", "-in", pem, "-pubout", "-outform", "DER")
    return open(pem, "rb").read(), base64.b64encode(der).decode()


RSA_PEM, RSA_PUB = rsa_key("rsa-a")
# A second RSA key: a record that holds the wrong key.
_, RSA_B_PUB = rsa_key("rsa-b")
_ED_SEED = hashlib.sha256(SEED).digest()
ED_PRIV = base64.b64encode(_ED_SEED)
ED_PUB = base64.b64encode(nacl.signing.SigningKey(_ED_SEED).verify_key.encode()).decode()

RSA = ("rsa", b"rsa-sha256")
ED = ("ed", b"ed25519-sha256")


def privkey(kind):
    return RSA_PEM if kind == "rsa" else ED_PRIV


# ---------------------------------------------------------------------------
# DNS zone
# ---------------------------------------------------------------------------

ZONE = []
_seen = set()


def txt(name, value):
    """One TXT record; values over 255 octets become several character-strings."""
    data = value.encode()
    strings = [data[i : i + 255].decode() for i in range(0, len(data), 255)] or [""]
    ZONE.append({"name": name, "type": "TXT", "strings": strings})


def a_record(name, ip):
    ZONE.append({"name": name, "type": "A", "ip": ip})


def servfail(name):
    """Every query for `name` is answered SERVFAIL (a temporary DNS failure)."""
    ZONE.append({"name": name, "type": "SERVFAIL"})


def key(selector, domain, kind):
    """The ordinary key record of `kind` at selector._domainkey.domain (once)."""
    name = "%s._domainkey.%s" % (selector, domain)
    if name in _seen:
        return
    _seen.add(name)
    if kind == "rsa":
        txt(name, "v=DKIM1; k=rsa; p=" + RSA_PUB)
    else:
        txt(name, "v=DKIM1; k=ed25519; p=" + ED_PUB)


# The envelope domain of most cases: SPF passes but never aligns with a From domain.
txt("bounces.example", "v=spf1 ip4:%s -all" % IP_OK)

# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


def msg(head, body):
    return (head.replace("\n", "\r\n") + "\r\n" + body.replace("\n", "\r\n")).encode()


def base_messages(from_field):
    """The six base messages, with `from_field` ("From: ...") as their From."""
    f = from_field
    return {
        "plain": msg(
            f + "\nTo: bob@receiver.example\nSubject: Quarterly numbers\n"
            "Date: Mon, 13 May 2024 09:12:50 +0000\nMessage-ID: <plain-1@sender.example>\n",
            "Hello Bob,\n\nthe numbers are attached.\n\nAlice\n",
        ),
        "folded": msg(
            "Received: from mail.sender.example (mail.sender.example [192.0.2.10])\n"
            "\tby mx.receiver.example with ESMTPS id 4ABC123; Mon, 13 May 2024 09:12:55 +0000\n"
            + f
            + "\nTo: Bob Receiver <bob@receiver.example>,\n Carol <carol@receiver.example>   \n"
            "Subject: Quarterly report: numbers, plans and a\n rather long subject line  \n"
            "Date: Mon, 13 May 2024 09:12:50 +0000\nMessage-ID: <folded-1@sender.example>\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n"
            "X-Mailer:    Example   Mailer\t 1.0  \n",
            "Hello Bob,   \n\nthe report is attached.\t\n  Indented  line.\n\nAlice\n\n\n\n",
        ),
        "utf8": msg(
            f + "\nTo: bob@receiver.example\nSubject: =?UTF-8?B?R3LDvMOfZSBhdXMgTcO8bmNoZW4=?=\n"
            "Date: Tue, 14 May 2024 10:00:00 +0200\nMessage-ID: <utf8-1@sender.example>\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: 8bit\n",
            "Grüße aus München! Ça va? 日本語 📨.\nTrailing space: \n",
        ),
        "multipart": msg(
            f + "\nTo: undisclosed-recipients:;\nSubject: Newsletter #42\n"
            "Date: Thu, 16 May 2024 12:00:00 +0000\nMessage-ID: <news-42@sender.example>\n"
            "MIME-Version: 1.0\nContent-Type: multipart/alternative;\n boundary=\"=_b42\"\n",
            "Preamble.\n\n--=_b42\nContent-Type: text/plain; charset=us-ascii\n\n"
            ".a line that starts with a dot\nFrom the desk of the editor\n\n"
            "--=_b42\nContent-Type: text/html; charset=us-ascii\n\n"
            "<p>Hello   <b>world</b></p>  \n\n--=_b42--\n",
        ),
        "emptybody": msg(
            f + "\nTo: bob@receiver.example\nSubject: empty body\n"
            "Date: Fri, 17 May 2024 07:00:00 +0000\nMessage-ID: <empty-1@sender.example>\n",
            "",
        ),
        "list": msg(
            f + "\nTo: members@lists.example\nSubject: [members] meeting\n"
            "Date: Sat, 18 May 2024 07:00:00 +0000\nMessage-ID: <list-1@sender.example>\n"
            "List-Id: Members <members.lists.example>\n"
            "List-Unsubscribe: <mailto:leave@lists.example>\n",
            "See you on Monday.\n",
        ),
    }


def split(m):
    i = m.index(b"\r\n\r\n") + 4
    return m[:i], m[i:]


def prepend_header(m, line):
    return line.encode() + b"\r\n" + m


def replace_once(m, old, new):
    assert old in m, (old, m[:200])
    return m.replace(old, new, 1)


def append_body(m, text):
    return m + text.encode()


def header_only_replace(m, old, new):
    h, b = split(m)
    assert old in h, (old, h)
    return h.replace(old, new, 1) + b


# ---------------------------------------------------------------------------
# Signing (dkimpy)
# ---------------------------------------------------------------------------


def sign(m, sel, dom, kind_alg, canon="relaxed/relaxed", include=None, length=False):
    """A dkimpy DKIM.sign() signature, prepended."""
    kind, alg = kind_alg
    key(sel, dom, kind)
    h, b = canon.split("/")
    sig = dkim.DKIM(m, signature_algorithm=alg, linesep=b"\r\n").sign(
        sel.encode(),
        dom.encode(),
        privkey(kind),
        canonicalize=(h.encode(), b.encode()),
        include_headers=[x.encode() for x in include] if include else None,
        length=length,
    )
    return sig + m


def sign_custom(m, sel, dom, kind_alg, canon="relaxed/relaxed", include=None, set_tags=None,
                drop=(), extra=(), body_len=None, publish=True):
    """A signature with tags dkimpy's sign() will not write, made by its gen_header().

    set_tags replaces tag values (or adds the tag), drop removes tags, extra adds tags
    before bh=, body_len hashes only that many octets of the canonical body.
    """
    kind, alg = kind_alg
    if publish:
        key(sel, dom, kind)
    set_tags = dict(set_tags or {})
    if b"a" in set_tags:
        alg = set_tags[b"a"]
    d = dkim.DKIM(m, signature_algorithm=alg, linesep=b"\r\n")
    pk = (
        parse_pem_private_key(RSA_PEM)
        if kind == "rsa"
        else nacl.signing.SigningKey(ED_PRIV, encoder=nacl.encoding.Base64Encoder)
    )
    cp = CanonicalizationPolicy.from_c_value(canon.encode())
    if include is None:
        include = [x.decode() for x in d.default_sign_headers()]
    include = tuple(x.lower().encode() for x in include)
    body = cp.canonicalize_body(d.body)
    if body_len is not None:
        body = body[:body_len]
    d.hasher = dkim.HASH_ALGORITHMS[alg]
    bh = base64.b64encode(d.hasher(body).digest())
    fields = [
        (b"v", b"1"),
        (b"a", alg),
        (b"c", canon.encode()),
        (b"d", dom.encode()),
        (b"i", b"@" + dom.encode()),
        (b"q", b"dns/txt"),
        (b"s", sel.encode()),
        (b"t", str(NOW).encode()),
        (b"h", b" : ".join(include)),
    ]
    fields = [(k, set_tags.pop(k, v)) for k, v in fields if k not in drop]
    fields += list(set_tags.items()) + list(extra)
    fields += [(b"bh", bh), (b"b", b"0" * 60)]
    res = d.gen_header(fields, include, cp, b"DKIM-Signature", pk)
    return b"DKIM-Signature: " + res + m


def ar_header(srv, text):
    return "Authentication-Results: %s; %s" % (srv, text)


def arc_seal(m, hop, ar_text, sel="arc", publish=True):
    """One ARC set by relay<hop>.example over `m`, after adding its A-R field."""
    dom = "relay%d.example" % hop
    srv = "mx.%s" % dom
    if publish:
        key(sel, dom, "rsa")
    m = prepend_header(m, ar_header(srv, ar_text))
    sigs = dkim.arc_sign(m, sel.encode(), dom.encode(), RSA_PEM, srv.encode())
    assert sigs, "dkimpy made no ARC set for hop %d" % hop
    return b"".join(sigs) + m


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

CASES = []


def case(cid, family, m, ip=IP_OK, mail_from=BOUNCES, helo=HELO):
    assert all(c["id"] != cid for c in CASES), cid
    path = os.path.join(OUT, cid + ".eml")
    with open(path, "wb") as f:
        f.write(m)
    CASES.append({"id": cid, "family": family, "file": path, "ip": ip, "helo": helo,
                  "mail_from": mail_from})


SIGNER = "signer.example"
txt(SIGNER, "v=spf1 ip4:%s -all" % IP_OK)
txt("_dmarc." + SIGNER, "v=DMARC1; p=reject")
FROM = "From: Alice Example <alice@signer.example>"
BASE = base_messages(FROM)


def family_baseline():
    """Every base message x RSA-2048 / Ed25519 x the four canonicalizations."""
    for name, m in BASE.items():
        for ka in (RSA, ED):
            for canon in CANONS:
                cid = "base-%s-%s-%s" % (name, ka[0], canon.replace("/", "-"))
                case(cid, "baseline", sign(m, ka[0], SIGNER, ka, canon))


EDITS = {
    "subject-changed": lambda m: replace_once(m, b"Subject: ", b"Subject: [changed] "),
    "from-display-changed": lambda m: replace_once(m, b"Alice Example <", b"Mallory <"),
    "from-domain-changed": lambda m: replace_once(m, b"alice@signer.example", b"ceo@reject.example"),
    "unsigned-field-added": lambda m: prepend_header(m, "X-Added-Later: yes"),
    "signed-field-removed": lambda m: header_only_replace(m, b"Date: Mon, 13 May 2024 09:12:50 +0000\r\n", b""),
    "second-subject-added": lambda m: prepend_header(m, "Subject: a second subject"),
    "second-from-added": lambda m: prepend_header(m, "From: ceo@reject.example"),
    "second-from-appended": lambda m: header_only_replace(m, b"\r\n\r\n", b"\r\nFrom: ceo@reject.example\r\n\r\n"),
    "body-appended": lambda m: append_body(m, "P.S. unsigned\r\n"),
    "body-whitespace": lambda m: replace_once(m, b"Hello Bob,", b"Hello  Bob, \t"),
    "header-whitespace": lambda m: replace_once(m, b"Subject: ", b"SUBJECT:   "),
    "subject-refolded": lambda m: replace_once(m, b"Subject: ", b"Subject:\r\n "),
    "empty-lines-appended": lambda m: append_body(m, "\r\n\r\n"),
}


def family_edits():
    """Header and body edits after signing: the plain message with both key types, the
    folded one with RSA, each in relaxed and simple canonicalization."""
    for name, kas in (("plain", (RSA, ED)), ("folded", (RSA,))):
        for ka in kas:
            for canon in ("relaxed/relaxed", "simple/simple"):
                signed = sign(BASE[name], ka[0], SIGNER, ka, canon)
                for edit, f in EDITS.items():
                    cid = "edit-%s-%s-%s-%s" % (edit, name, ka[0], canon.split("/")[0])
                    case(cid, "edits", f(signed))


FROM_VARIANTS = {
    "dup-same": "From: alice@signer.example\nFrom: alice@signer.example",
    "dup-spoof-first": "From: ceo@reject.example\nFrom: alice@signer.example",
    "dup-spoof-second": "From: alice@signer.example\nFrom: ceo@reject.example",
    "two-mailboxes-same-domain": "From: alice@signer.example, bob@signer.example",
    "two-mailboxes-spoof": "From: x@signer.example, Boss <boss@reject.example>",
    "two-mailboxes-spoof-first": "From: Boss <boss@reject.example>, x@signer.example",
    "folded": "From: Alice Example\n <alice@signer.example>",
    "folded-twice": "From:\n Alice\n Example\n <alice@signer.example>",
    "encoded": "From: =?UTF-8?Q?Al=C3=AFce_Ex=C3=A4mple?= <alice@signer.example>",
    "encoded-address-in-name": "From: =?UTF-8?B?Y2VvQHJlamVjdC5leGFtcGxl?= <alice@signer.example>",
    "quoted-address-in-name": "From: \"ceo@reject.example\" <alice@signer.example>",
    "comment": "From: alice@signer.example (Alice Example)",
    "quoted-local-part": "From: \"alice example\"@signer.example",
    "uppercase-domain": "From: alice@SIGNER.EXAMPLE",
    "uppercase-field-name": "FROM: alice@signer.example",
    "group": "From: undisclosed-recipients:;",
    "empty": "From: ",
    "no-domain": "From: alice",
    "angle-no-name": "From: <alice@signer.example>",
    "route-addr-spoof": "From: alice@signer.example <ceo@reject.example>",
}


def family_from():
    """From field variants, each signed by signer.example (RSA) and unsigned."""
    for name, field in FROM_VARIANTS.items():
        m = msg(
            field + "\nTo: bob@receiver.example\nSubject: from variant %s\n"
            "Date: Mon, 13 May 2024 09:12:50 +0000\nMessage-ID: <from-%s@sender.example>\n"
            % (name, name),
            "Body of the %s case.\n" % name,
        )
        case("from-%s-unsigned" % name, "from", m)
        include = ["from", "to", "subject", "date", "message-id"]
        case("from-%s-signed" % name, "from", sign(m, "rsa", SIGNER, RSA, include=include))
    # No From at all (a signature that covers the absent field, and an unsigned copy).
    m = msg("To: bob@receiver.example\nSubject: no from\nDate: Mon, 13 May 2024 09:12:50 +0000\n",
            "No From field.\n")
    case("from-missing-unsigned", "from", m)
    case("from-missing-signed", "from",
         sign(m, "rsa", SIGNER, RSA, include=["from", "to", "subject", "date"]))
    sender_only = msg("Sender: alice@signer.example\nTo: bob@receiver.example\nSubject: sender\n",
                      "Only a Sender field.\n")
    case("from-missing-sender-only-signed", "from",
         sign(sender_only, "rsa", SIGNER, RSA, include=["from", "sender", "to", "subject"]))


def family_h_without_from():
    """Signatures whose h= does not list From (RFC 6376 5.4: From MUST be signed)."""
    for ka in (RSA, ED):
        inc = ["to", "subject", "date", "message-id"]
        s = sign_custom(BASE["plain"], ka[0], SIGNER, ka, include=inc)
        case("hfrom-absent-%s" % ka[0], "h-from", s)
        case("hfrom-absent-from-changed-%s" % ka[0], "h-from",
             replace_once(s, b"alice@signer.example", b"ceo@reject.example"))
        s2 = sign_custom(BASE["plain"], ka[0], SIGNER, ka,
                         include=["from", "from", "to", "subject", "date"])
        case("hfrom-oversigned-%s" % ka[0], "h-from", s2)
        case("hfrom-oversigned-from-added-%s" % ka[0], "h-from",
             prepend_header(s2, "From: ceo@reject.example"))


def family_length():
    """l= signatures, with nothing or something appended after signing."""
    appended = {
        "intact": lambda m: m,
        "text-appended": lambda m: append_body(m, "-- \r\nmailing list footer\r\n"),
        "html-appended": lambda m: append_body(m, "<p>injected</p>\r\n"),
    }
    for ka in (RSA, ED):
        for canon in ("relaxed/relaxed", "simple/simple"):
            s = sign(BASE["plain"], ka[0], SIGNER, ka, canon, length=True)
            for what, f in appended.items():
                case("l-%s-%s-%s" % (what, ka[0], canon.split("/")[0]), "l=", f(s))
        s0 = sign_custom(BASE["plain"], ka[0], SIGNER, ka, set_tags={b"l": b"0"}, body_len=0)
        case("l-zero-%s" % ka[0], "l=", s0)
        case("l-zero-replaced-body-%s" % ka[0], "l=",
             split(s0)[0] + b"Entirely different body.\r\n")
        big = sign_custom(BASE["plain"], ka[0], SIGNER, ka, set_tags={b"l": b"100000"})
        case("l-beyond-body-%s" % ka[0], "l=", big)


# Key records: (selector, record text with {RSA}/{ED}/{RSA_B}, which key signs).
KEY_VARIANTS = [
    ("k-hsha1", "v=DKIM1; h=sha1; k=rsa; p={RSA}", RSA),
    ("k-hsha256", "v=DKIM1; h=sha256; k=rsa; p={RSA}", RSA),
    ("k-hboth", "v=DKIM1; h=sha1:sha256; k=rsa; p={RSA}", RSA),
    ("k-hunknown", "v=DKIM1; h=sha512; k=rsa; p={RSA}", RSA),
    ("k-kmismatch-rsa", "v=DKIM1; k=ed25519; p={RSA}", RSA),
    ("k-kunknown", "v=DKIM1; k=foo; p={RSA}", RSA),
    ("k-knone-rsa", "v=DKIM1; p={RSA}", RSA),
    ("k-semail", "v=DKIM1; k=rsa; s=email; p={RSA}", RSA),
    ("k-sstar", "v=DKIM1; k=rsa; s=*; p={RSA}", RSA),
    ("k-sother", "v=DKIM1; k=rsa; s=tlsrpt; p={RSA}", RSA),
    ("k-sunknown", "v=DKIM1; k=rsa; s=foo; p={RSA}", RSA),
    ("k-slist", "v=DKIM1; k=rsa; s=foo:email; p={RSA}", RSA),
    ("k-tstrict", "v=DKIM1; k=rsa; t=s; p={RSA}", RSA),
    ("k-ttesting", "v=DKIM1; k=rsa; t=y; p={RSA}", RSA),
    ("k-tunknown", "v=DKIM1; k=rsa; t=q:s; p={RSA}", RSA),
    ("k-revoked", "v=DKIM1; k=rsa; p=", RSA),
    ("k-unknown-tags", "v=DKIM1; k=rsa; zz=top; n=notes here; p={RSA}; yy=1", RSA),
    ("k-garbage", "this is not a DKIM key record", RSA),
    ("k-nov", "k=rsa; p={RSA}", RSA),
    ("k-badv", "v=DKIM2; k=rsa; p={RSA}", RSA),
    ("k-vnotfirst", "k=rsa; v=DKIM1; p={RSA}", RSA),
    ("k-wrongkey", "v=DKIM1; k=rsa; p={RSA_B}", RSA),
    ("k-badbase64", "v=DKIM1; k=rsa; p=!!not*base64!!", RSA),
    ("k-truncated", "v=DKIM1; k=rsa; p={RSA_HALF}", RSA),
    ("k-uppercase-tags", "V=DKIM1; K=rsa; P={RSA}", RSA),
    ("k-ed-ok", "v=DKIM1; k=ed25519; p={ED}", ED),
    ("k-ed-krsa", "v=DKIM1; k=rsa; p={ED}", ED),
    ("k-ed-knone", "v=DKIM1; p={ED}", ED),
    ("k-ed-hsha1", "v=DKIM1; k=ed25519; h=sha1; p={ED}", ED),
    ("k-ed-revoked", "v=DKIM1; k=ed25519; p=", ED),
]


def family_keys():
    """Key record variants (RFC 6376 3.6.1, RFC 8463) for otherwise good signatures."""
    for sel, rec, ka in KEY_VARIANTS:
        txt("%s._domainkey.%s" % (sel, SIGNER),
            rec.format(RSA=RSA_PUB, ED=ED_PUB, RSA_B=RSA_B_PUB, RSA_HALF=RSA_PUB[: len(RSA_PUB) // 2]))
        _seen.add("%s._domainkey.%s" % (sel, SIGNER))
        case("key-%s" % sel, "key-record", sign_custom(BASE["plain"], sel, SIGNER, ka, publish=False))
    # t=s with an i= in a subdomain of d= (RFC 6376 3.6.1: must not verify).
    case("key-k-tstrict-i-subdomain", "key-record",
         sign_custom(BASE["plain"], "k-tstrict", SIGNER, RSA, publish=False,
                     set_tags={b"i": b"alice@mail.signer.example"}))
    case("key-k-tstrict-i-same", "key-record",
         sign_custom(BASE["plain"], "k-tstrict", SIGNER, RSA, publish=False,
                     set_tags={b"i": b"alice@signer.example"}))
    # Two TXT records at one selector (RFC 6376 3.6.2.2: the result is undefined; we
    # publish a good and a garbage one).
    name = "k-two._domainkey." + SIGNER
    txt(name, "v=DKIM1; k=rsa; p=" + RSA_PUB)
    txt(name, "v=DKIM1; k=rsa; p=")
    _seen.add(name)
    case("key-k-two-records", "key-record",
         sign_custom(BASE["plain"], "k-two", SIGNER, RSA, publish=False))
    # No record at all.
    case("key-k-missing", "key-record",
         sign_custom(BASE["plain"], "k-missing", SIGNER, RSA, publish=False))


def family_sig_tags():
    """Signature tag variants (RFC 6376 3.5)."""
    variants = [
        ("i-subdomain", {"set_tags": {b"i": b"@mail.signer.example"}}),
        ("i-localpart", {"set_tags": {b"i": b"alice@signer.example"}}),
        ("i-outside-d", {"set_tags": {b"i": b"@other.example"}}),
        ("i-suffix-not-subdomain", {"set_tags": {b"i": b"@evilsigner.example"}}),
        ("unknown-tag", {"extra": [(b"zz", b"whatever")]}),
        ("t-future", {"set_tags": {b"t": str(NOW + 30 * DAY).encode()}}),
        ("x-past", {"set_tags": {b"t": str(NOW - 30 * DAY).encode(), b"x": str(NOW - 20 * DAY).encode()}}),
        ("x-future", {"set_tags": {b"x": str(NOW + 30 * DAY).encode()}}),
        # x= earlier than t=, both in the future (RFC 6376 3.5: x= MUST be greater than t=).
        ("x-before-t", {"set_tags": {b"t": str(NOW + 120).encode(), b"x": str(NOW + 60).encode()}}),
        ("no-t", {"drop": (b"t",)}),
        ("no-i", {"drop": (b"i",)}),
        ("no-q", {"drop": (b"q",)}),
        ("v-2", {"set_tags": {b"v": b"2"}}),
        ("no-v", {"drop": (b"v",)}),
        ("q-unknown", {"set_tags": {b"q": b"dns/foo"}}),
        ("c-unknown", {"set_tags": {b"c": b"fancy/relaxed"}}),
        ("c-header-only", {"set_tags": {b"c": b"relaxed"}}),
        ("h-uppercase", {"include": ["FROM", "To", "SUBJECT", "Date"]}),
        ("h-absent-field", {"include": ["from", "to", "subject", "x-not-there"]}),
        ("d-uppercase", {"set_tags": {b"d": b"SIGNER.EXAMPLE", b"i": b"@SIGNER.EXAMPLE"}}),
    ]
    for name, kw in variants:
        for ka in (RSA, ED):
            case("sig-%s-%s" % (name, ka[0]), "sig-tags",
                 sign_custom(BASE["plain"], ka[0], SIGNER, ka, **kw))
    # Duplicate tags (RFC 6376 3.2: "if a tag name does occur more than once, the entire
    # tag-list is invalid"), in the signature and in the key record.
    case("sig-duplicate-tag-rsa", "sig-tags",
         sign_custom(BASE["plain"], "rsa", SIGNER, RSA, extra=[(b"zz", b"1"), (b"zz", b"2")]))
    case("sig-duplicate-d-rsa", "sig-tags",
         sign_custom(BASE["plain"], "rsa", SIGNER, RSA, extra=[(b"d", SIGNER.encode())]))
    name = "k-duptag._domainkey." + SIGNER
    txt(name, "v=DKIM1; k=rsa; p=%s; p=%s" % (RSA_PUB, RSA_PUB))
    _seen.add(name)
    case("key-k-duplicate-p", "key-record",
         sign_custom(BASE["plain"], "k-duptag", SIGNER, RSA, publish=False))
    # rsa-sha1 (RFC 8301: must not pass), dkimpy's own signer.
    case("sig-rsa-sha1", "sig-tags", sign(BASE["plain"], "rsa", SIGNER, ("rsa", b"rsa-sha1")))
    # An Ed25519 signature under an RSA selector and the other way round.
    case("sig-ed-on-rsa-key", "sig-tags", sign_custom(BASE["plain"], "rsa", SIGNER, ED, publish=False))
    case("sig-rsa-on-ed-key", "sig-tags", sign_custom(BASE["plain"], "ed", SIGNER, RSA, publish=False))
    # A signature whose b= was damaged, and one with no b= at all.
    s = sign(BASE["plain"], "rsa", SIGNER, RSA)
    h, b = split(s)
    i = h.index(b" b=") + 3
    damaged = h[:i] + (b"A" if h[i:i + 1] != b"A" else b"B") + h[i + 1:] + b
    case("sig-b-damaged", "sig-tags", damaged)
    case("sig-bh-damaged", "sig-tags", replace_once(s, b"bh=", b"bh=AAAA"))


# DMARC domains: (name, records, From domain(s), DKIM d=).
DMARC_DOMAINS = [
    ("reject.example", ["v=DMARC1; p=reject"], ["reject.example"]),
    ("quarantine.example", ["v=DMARC1; p=quarantine"], ["quarantine.example"]),
    ("none.example", ["v=DMARC1; p=none"], ["none.example"]),
    ("tworec.example", ["v=DMARC1; p=reject", "v=DMARC1; p=none"], ["tworec.example"]),
    ("badp.example", ["v=DMARC1; p=bogus; rua=mailto:dmarc@badp.example"], ["badp.example"]),
    ("badp-norua.example", ["v=DMARC1; p=bogus"], ["badp-norua.example"]),
    ("nop.example", ["v=DMARC1; rua=mailto:dmarc@nop.example"], ["nop.example"]),
    ("pct0.example", ["v=DMARC1; p=reject; pct=0"], ["pct0.example"]),
    ("testing.example", ["v=DMARC1; p=reject; t=y"], ["testing.example"]),
    ("sp.example", ["v=DMARC1; p=reject; sp=none"], ["sp.example", "news.sp.example"]),
    ("np.example", ["v=DMARC1; p=quarantine; sp=none; np=reject"],
     ["live.np.example", "ghost.np.example"]),
    ("strict.example", ["v=DMARC1; p=reject; adkim=s; aspf=s"], ["strict.example"]),
    ("relaxed.example", ["v=DMARC1; p=reject"], ["relaxed.example"]),
    ("norecord.example", [], ["norecord.example"]),
    ("org.example", ["v=DMARC1; p=reject"], ["sub.org.example", "deep.sub.org.example"]),
    ("nov.example", ["p=reject; v=DMARC1"], ["nov.example"]),
    ("uppercase.example", ["v=DMARC1; p=REJECT"], ["uppercase.example"]),
    ("badtag.example", ["v=DMARC1; p=reject; adkim=x"], ["badtag.example"]),
    ("unknowntag.example", ["v=DMARC1; p=quarantine; zz=1"], ["unknowntag.example"]),
    ("spaces.example", ["v=DMARC1 ; p = reject ; sp = quarantine"], ["spaces.example", "sub.spaces.example"]),
]


def family_dmarc():
    """DMARC record variants x how the message authenticates."""
    for org, records, froms in DMARC_DOMAINS:
        for r in records:
            txt("_dmarc." + org, r)
        for frm in froms:
            ghost = frm.startswith("ghost.")
            if not ghost:
                txt(frm, "v=spf1 ip4:%s -all" % IP_OK)
            if frm.startswith("live."):
                a_record(frm, IP_OK)
            # strict/relaxed: sign with a subdomain of the From domain; else with the
            # organizational domain (relaxed alignment for subdomain From domains).
            d = "mail." + frm if org in ("strict.example", "relaxed.example") else org
            m = base_messages("From: Someone <someone@%s>" % frm)["plain"]
            t = frm.replace(".example", "")
            case("dmarc-%s-dkim-aligned" % t, "dmarc", sign(m, "s1", d, RSA))
            if org in ("reject.example", "strict.example", "org.example", "sp.example"):
                case("dmarc-%s-dkim-ed-aligned" % t, "dmarc", sign(m, "s2", d, ED))
            case("dmarc-%s-unsigned" % t, "dmarc", m)
            case("dmarc-%s-dkim-broken" % t, "dmarc",
                 append_body(sign(m, "s1", d, RSA), "tampered\r\n"))
            case("dmarc-%s-dkim-unaligned" % t, "dmarc", sign(m, "s1", "thirdparty.example", RSA))
            if not ghost:
                spf_from = "bounce@%s" % ("mail." + frm if org in ("strict.example", "relaxed.example") else frm)
                if org in ("strict.example", "relaxed.example"):
                    txt("mail." + frm, "v=spf1 ip4:%s -all" % IP_OK)
                case("dmarc-%s-spf-aligned" % t, "dmarc", m, mail_from=spf_from)
                case("dmarc-%s-spf-aligned-fail" % t, "dmarc", m, ip=IP_BAD, mail_from=spf_from)


def family_arc():
    """ARC chains of one to three sets (dkimpy arc_sign), intact and damaged."""
    for name in ("plain", "multipart"):
        m0 = sign(BASE[name], "rsa", SIGNER, RSA)
        hop1 = arc_seal(m0, 1, "dkim=pass header.d=signer.example; spf=pass smtp.mailfrom=bounces.example; arc=none")
        hop2 = arc_seal(hop1, 2, "dkim=pass header.d=signer.example; arc=pass")
        hop3 = arc_seal(hop2, 3, "dkim=pass header.d=signer.example; arc=pass")
        p = "arc-%s-" % name
        case(p + "1-set", "arc", hop1)
        case(p + "2-sets", "arc", hop2)
        case(p + "3-sets", "arc", hop3)
        # A forwarder changed the message before sealing it: DKIM breaks, ARC holds.
        changed = replace_once(hop1, b"Subject: ", b"Subject: [list] ")
        hop2c = arc_seal(changed, 2, "dkim=fail header.d=signer.example; arc=pass")
        case(p + "2-sets-changed-before-seal", "arc", hop2c)
        # Changes after the last seal.
        case(p + "1-set-body-changed", "arc", append_body(hop1, "after the seal\r\n"))
        case(p + "2-sets-subject-changed", "arc", replace_once(hop2, b"Subject: ", b"Subject: x "))
        case(p + "3-sets-body-changed", "arc", append_body(hop3, "after the seal\r\n"))
        # A damaged seal, message signature and recorded results.
        case(p + "2-sets-latest-cv-edited", "arc",
             replace_once(hop2, b"cv=pass", b"cv=none"))
        case(p + "2-sets-oldest-aar-edited", "arc",
             replace_once(hop2, b"i=1; mx.relay1.example; dkim=pass", b"i=1; mx.relay1.example; dkim=fail"))
        case(p + "2-sets-seal-b-damaged", "arc", damage_tag(hop2, b"ARC-Seal: i=2", b" b="))
        case(p + "2-sets-ams-b-damaged", "arc", damage_tag(hop2, b"ARC-Message-Signature: i=2", b" b="))
        # Structure: instances renumbered, a set removed, duplicated, incomplete.
        case(p + "2-sets-instances-swapped", "arc", swap_instances(hop2))
        case(p + "3-sets-middle-removed", "arc", drop_instance(hop3, 2))
        case(p + "3-sets-oldest-removed", "arc", drop_instance(hop3, 1))
        case(p + "2-sets-newest-duplicated", "arc", duplicate_instance(hop2, 2))
        case(p + "1-set-aar-missing", "arc", drop_field(hop1, b"ARC-Authentication-Results: i=1"))
        case(p + "2-sets-reordered-fields", "arc", move_set_down(hop2, 2))
        # A sealer whose ARC-Seal recorded cv=fail, and one whose key is missing.
        hop2f = arc_seal(hop1, 2, "dkim=pass header.d=signer.example; arc=fail")
        case(p + "2-sets-cv-fail", "arc", hop2f)
        case(p + "2-sets-sealer-key-missing", "arc",
             arc_seal(hop1, 2, "dkim=pass header.d=signer.example; arc=pass", sel="nokey", publish=False))
        # A genuine set copied onto a forged message plus the attacker's own seal.
        forged = base_messages("From: Boss <boss@reject.example>")[name]
        forged = b"".join(l + b"\r\n" for l in arc_fields(hop1)) + forged
        case(p + "replayed-set-plus-new-seal", "arc",
             arc_seal(forged, 2, "dkim=none; arc=pass"))
        # A chain over an unsigned message.
        case(p + "unsigned-1-set", "arc", arc_seal(BASE[name], 1, "dkim=none; spf=pass smtp.mailfrom=bounces.example; arc=none"))


def header_fields(m):
    """The header fields of `m`, each with its continuation lines, without CRLF."""
    h, _ = split(m)
    fields = []
    for line in h[:-4].split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def rebuild(fields, m):
    return b"".join(f + b"\r\n" for f in fields) + b"\r\n" + split(m)[1]


def arc_fields(m):
    return [f for f in header_fields(m) if f.lower().startswith(b"arc-")]


def instance_of(f):
    import re
    mm = re.search(br"[\s;:]i\s*=\s*(\d+)", f)
    return int(mm.group(1)) if mm else None


def damage_tag(m, field_start, tag):
    fields = header_fields(m)
    for n, f in enumerate(fields):
        if f.startswith(field_start):
            i = f.index(tag) + len(tag)
            while f[i:i + 1] in (b"\r", b"\n", b" ", b"\t"):
                i += 1
            fields[n] = f[:i] + (b"A" if f[i:i + 1] != b"A" else b"B") + f[i + 1:]
            return rebuild(fields, m)
    raise AssertionError(field_start)


def swap_instances(m):
    out = []
    for f in header_fields(m):
        if f.lower().startswith(b"arc-"):
            f = f.replace(b"i=1;", b"i=X;", 1).replace(b"i=2;", b"i=1;", 1).replace(b"i=X;", b"i=2;", 1)
        out.append(f)
    return rebuild(out, m)


def drop_instance(m, inst):
    return rebuild([f for f in header_fields(m)
                    if not (f.lower().startswith(b"arc-") and instance_of(f) == inst)], m)


def duplicate_instance(m, inst):
    fields = header_fields(m)
    dup = [f for f in fields if f.lower().startswith(b"arc-") and instance_of(f) == inst]
    return rebuild(dup + fields, m)


def drop_field(m, start):
    return rebuild([f for f in header_fields(m) if not f.startswith(start)], m)


def move_set_down(m, inst):
    """Moves the fields of ARC set `inst` below every other header field."""
    fields = header_fields(m)
    moved = [f for f in fields if f.lower().startswith(b"arc-") and instance_of(f) == inst]
    rest = [f for f in fields if f not in moved]
    return rebuild(rest + moved, m)


def family_multi():
    """Several signatures on one message."""
    m = BASE["plain"]
    dual = sign(sign(m, "rsa", SIGNER, RSA), "ed", SIGNER, ED)
    case("multi-rsa-and-ed", "multi", dual)
    case("multi-rsa-and-ed-body-changed", "multi", append_body(dual, "x\r\n"))
    good_then_bad = sign_custom(sign(m, "rsa", SIGNER, RSA), "k-missing", SIGNER, RSA, publish=False)
    case("multi-good-and-keyless", "multi", good_then_bad)
    third = sign(m, "s1", "thirdparty.example", RSA)
    case("multi-unaligned-only", "multi", third)
    case("multi-unaligned-and-aligned", "multi", sign(third, "ed", SIGNER, ED))
    broken_aligned = append_body(sign(m, "rsa", SIGNER, RSA), "x\r\n")
    case("multi-aligned-broken-unaligned-l", "multi",
         sign(broken_aligned, "s1", "thirdparty.example", RSA, length=True))
    three = sign(sign(sign(m, "rsa", SIGNER, RSA), "ed", SIGNER, ED), "s1", "thirdparty.example", RSA)
    case("multi-three", "multi", three)
    # An attacker's own signature with no key, next to a spoof of a p=reject domain.
    spoof = base_messages("From: Boss <boss@reject.example>")["plain"]
    case("multi-spoof-attacker-signed", "multi", sign(spoof, "s1", "attacker.example", RSA))
    case("multi-spoof-attacker-keyless", "multi",
         sign_custom(spoof, "gone", "attacker.example", RSA, publish=False))


def family_dns_errors():
    """Temporary DNS failures (SERVFAIL) for a key or a DMARC record."""
    servfail("servfail._domainkey.attacker.example")
    servfail("servfail._domainkey." + SIGNER)
    spoof = base_messages("From: Boss <boss@reject.example>")["plain"]
    # An unrelated signature whose key lookup fails must not decide DMARC (issue 11).
    case("dnserr-spoof-unaligned-key-servfail", "dns-errors",
         sign_custom(spoof, "servfail", "attacker.example", RSA, publish=False))
    # The aligned signature's key lookup fails: DMARC cannot be decided now.
    case("dnserr-aligned-key-servfail", "dns-errors",
         sign_custom(BASE["plain"], "servfail", SIGNER, RSA, publish=False))
    # Aligned key fails, a second aligned signature passes.
    case("dnserr-aligned-key-servfail-other-pass", "dns-errors",
         sign(sign_custom(BASE["plain"], "servfail", SIGNER, RSA, publish=False), "ed", SIGNER, ED))
    # The DMARC record itself cannot be fetched.
    servfail("_dmarc.dnsfail.example")
    txt("dnsfail.example", "v=spf1 ip4:%s -all" % IP_OK)
    m = base_messages("From: Someone <someone@dnsfail.example>")["plain"]
    case("dnserr-dmarc-record-servfail-unsigned", "dns-errors", m)
    case("dnserr-dmarc-record-servfail-aligned", "dns-errors", sign(m, "s1", "dnsfail.example", RSA))


def main():
    family_baseline()
    family_edits()
    family_from()
    family_h_without_from()
    family_length()
    family_keys()
    family_sig_tags()
    family_dmarc()
    family_arc()
    family_multi()
    family_dns_errors()
    # Other domains' plain records.
    for d in ("thirdparty.example", "attacker.example"):
        txt(d, "v=spf1 -all")
    txt("_dmarc.attacker.example", "v=DMARC1; p=none")
    with open(os.path.join(OUT, "zone.json"), "w") as f:
        json.dump(ZONE, f, indent=1)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(CASES, f, indent=1)
    print("%d cases, %d DNS records" % (len(CASES), len(ZONE)))


main()
