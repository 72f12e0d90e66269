#!/usr/bin/python3
"""The independent side of the differential test (tests/auth_differential.rs).

Usage: oracle.py CASES_JSON DNS_HOST DNS_PORT OUT_JSON

Verifies every case of cases.json (written by corpus.py) with implementations that share
no code with mailwarden, all from Debian (python3-dkim, python3-authheaders, python3-spf):

  spf    pyspf check2() for the MAIL FROM identity (the input of DMARC's SPF alignment)
  dkim   dkimpy, every DKIM-Signature on its own (DKIM.verify_headerprep, load_pk_from_dns,
         verify_sig_process: the steps of DKIM.verify(), kept apart to tell the errors apart)
  arc    dkimpy ARC.verify(): the chain validation status
  dmarc  authheaders.check_dmarc() (record discovery, alignment, policy)

Every DNS query goes to the test's loopback server: dnspython's default resolver is
replaced before anything else runs, and dkimpy, authheaders and pyspf all use it.

Result words follow RFC 8601 2.7.1 for DKIM: "fail" when the signature or the body hash
does not verify, "permerror" when the signature cannot be verified at all (bad tags, no
or unusable key record), "temperror" for a DNS timeout.
"""

import copy
import json
import sys
from email.utils import getaddresses

import dns.resolver

CASES, HOST, PORT, OUT = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

_resolver = dns.resolver.Resolver(configure=False)
_resolver.nameservers = [HOST]
_resolver.port = PORT
# Generous, like mailwarden's in the test: a loaded machine must not make a timeout.
_resolver.timeout = 10.0
_resolver.lifetime = 20.0
_resolver.cache = None
dns.resolver.default_resolver = _resolver

import functools  # noqa: E402
import os  # noqa: E402

import authheaders  # noqa: E402  (after the resolver is in place)
import authheaders.dmarc_lookup  # noqa: E402
import authheaders.findpsl  # noqa: E402
import dkim  # noqa: E402
import spf  # noqa: E402
from authres import DKIMAuthenticationResult, SPFAuthenticationResult  # noqa: E402
from authres.dmarc import DMARCAuthenticationResult  # noqa: E402


# The corpus uses RFC 2606 names under the reserved TLD "example". The Public Suffix List
# algorithm's implicit "*" rule makes such an unlisted TLD a public suffix (so the
# organizational domain of a.b.example is b.example), but publicsuffix2 2.20191221 gives
# the bare TLD instead, which would align every .example domain with every other. The
# rule is added explicitly to a copy of Debian's list; authheaders' code is unchanged.
# Its get_org_domain() parses the whole list on every call, so results are memoized.
_psl = os.path.join(os.path.dirname(os.path.abspath(OUT)), "public_suffix_list.dat")
with open(_psl, "w") as _f:
    _f.write(open(authheaders.findpsl.location).read())
    _f.write("\n// added by tests/differential/oracle.py: RFC 2606 test TLD\nexample\n")
authheaders.findpsl.location = _psl
_org = functools.lru_cache(maxsize=None)(authheaders.dmarc_lookup.get_org_domain)
authheaders.dmarc_lookup.get_org_domain = _org
authheaders.get_org_domain = _org


def text(b):
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)


def dkim_one(d, idx):
    """(result, d, s, reason) for the idx-th DKIM-Signature field."""
    sigs = [v for n, v in d.headers if n.lower() == b"dkim-signature"]
    dom, sel = "", ""
    try:
        tags = dkim.util.parse_tag_value(sigs[idx])
        dom = text(tags.get(b"d", b"")).lower()
        sel = text(tags.get(b"s", b""))
    except Exception:
        pass
    try:
        prep = d.verify_headerprep(idx)
    except dkim.DKIMException as e:
        return "permerror", dom, sel, "signature: %s" % e
    sig, include, sigheaders = prep
    name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
    try:
        d.pk, d.keysize, d.ktag, d.seqtlsrpt = dkim.load_pk_from_dns(name, timeout=20)
    except dkim.DnsTimeoutError as e:
        return "temperror", dom, sel, "key: %s" % e
    except Exception as e:
        return "permerror", dom, sel, "key: %s" % e
    try:
        ok = d.verify_sig_process(sig, include, sigheaders[idx], None)
    except dkim.ValidationError as e:
        word = "fail" if "body hash mismatch" in str(e) else "permerror"
        return word, dom, sel, str(e)
    except Exception as e:
        return "permerror", dom, sel, "%s: %s" % (type(e).__name__, e)
    return ("pass" if ok else "fail"), dom, sel, "" if ok else "signature did not verify"


def check_dkim(m):
    d = dkim.DKIM(m, minkey=1024, timeout=20)
    n = len([1 for name, _ in d.headers if name.lower() == b"dkim-signature"])
    out = []
    for i in range(n):
        result, dom, sel, reason = dkim_one(d, i)
        out.append({"result": result, "domain": dom, "selector": sel, "reason": reason})
    return out


def check_arc(m):
    try:
        cv, _, comment = dkim.ARC(m, minkey=1024, timeout=20).verify()
    except Exception as e:
        return "fail", "%s: %s" % (type(e).__name__, e)
    if cv is None:
        # dkimpy: an ARC-Seal recorded cv=fail, the chain ended there (RFC 8617 5.2).
        return "fail", comment
    return text(cv), comment


def check_spf(c):
    try:
        res, expl = spf.check2(i=c["ip"], s=c["mail_from"], h=c["helo"])
    except Exception as e:
        return "temperror", str(e)
    return res, expl


def from_domains(m):
    """The From addresses as authheaders.check_dmarc() reads them."""
    headers, _ = dkim.rfc822_parse(m)
    return [a[1] for a in getaddresses(
        x[1].decode(errors="ignore").strip() for x in headers if x[0].lower() == b"from")]


def dmarc_once(m, c, spf_word, dk):
    """authheaders' DMARC result for one DKIM result (or none).

    check_dmarc() handles one From mailbox itself. For several it calls dmarc_per_from()
    per mailbox with one SPF result object, which its first call rewrites (smtp_mailfrom
    becomes a bare domain), so the second call raises IndexError. Here each call gets a
    fresh SPF result and the choice is check_dmarc()'s own: the first reject, else the
    first quarantine, else the first none (RFC 7489 6.6.1: the most strict policy).
    """
    def spf_res():
        return SPFAuthenticationResult(result=spf_word, smtp_mailfrom=c["mail_from"],
                                       smtp_helo=c["helo"])
    froms = from_domains(m)
    if len(froms) <= 1:
        return authheaders.check_dmarc(m, spf_result=spf_res(), dkim_result=copy.copy(dk))
    per = [authheaders.dmarc_per_from(authheaders.get_domain_part(f), spf_res(), copy.copy(dk))
           for f in froms]
    chosen = next((r for p in ("reject", "quarantine", "none") for r in per if r[3] == p), per[-1])
    result, comment, from_domain, policy = chosen
    return DMARCAuthenticationResult(result=result, result_comment=comment,
                                     header_from=from_domain, policy=policy)


def check_dmarc(m, c, spf_word, dkim_entries):
    """authheaders' DMARC once without DKIM and once per passing signature; pass wins.

    authheaders.check_dkim() looks at the first signature only; giving check_dmarc()
    each passing signature in turn is RFC 7489 4.2 (any aligned pass identifier).
    """
    dkims = [None] + [
        DKIMAuthenticationResult(result="pass", header_d=e["domain"])
        for e in dkim_entries
        if e["result"] == "pass"
    ]
    results = []
    for dk in dkims:
        try:
            results.append(dmarc_once(m, c, spf_word, dk))
        except Exception as e:
            return {"result": "error", "policy": "", "header_from": "",
                    "reason": "%s: %s" % (type(e).__name__, e)}
    best = next((r for r in results if r.result == "pass"), results[0])
    return {
        "result": best.result,
        "policy": getattr(best, "policy", None) or "",
        "header_from": getattr(best, "header_from", None) or "",
        "reason": getattr(best, "result_comment", None) or "",
    }


def versions():
    """The oracle's package versions (the accepted disagreements are for these)."""
    from importlib import metadata
    out = {}
    for names in (("dkimpy",), ("authheaders",), ("pyspf", "spf"), ("dnspython",)):
        for n in names:
            try:
                out[names[0]] = metadata.version(n)
                break
            except metadata.PackageNotFoundError:
                out[names[0]] = getattr(sys.modules.get(n), "__version__", "?")
    return out


def main():
    cases = json.load(open(CASES))
    out = {"_versions": versions()}
    for c in cases:
        m = open(c["file"], "rb").read()
        spf_word, spf_expl = check_spf(c)
        dk = check_dkim(m)
        arc_word, arc_comment = check_arc(m)
        out[c["id"]] = {
            "spf": {"result": spf_word, "reason": spf_expl},
            "dkim": dk,
            "arc": {"result": arc_word, "reason": arc_comment or ""},
            "dmarc": check_dmarc(m, c, spf_word, dk),
        }
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)


main()
