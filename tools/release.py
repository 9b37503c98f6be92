#!/usr/bin/env python3
"""Make a release: build the zipapp and write the signed manifest `llm-mux update` trusts.

    python3 tools/release.py --key release-key.pem --out dist/       # dist/llm_mux-<version>.pyz + manifest
    python3 tools/release.py pubkey --key release-key.pem            # the PEM to put in RELEASE_PUBLIC_KEYS

Make the key once, keep it offline: `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out
release-key.pem`. Upload the .pyz and `llm-mux-manifest.json` to the release; the manifest names the .pyz
relative to itself, so both go in the same place. The manifest is `{"payload": base64url(JSON), "alg": "RS256",
"signature": base64url(RSASSA-PKCS1-v1_5 SHA-256 over the payload bytes)}`; the payload holds name, version, url,
sha256, size and published_at.
"""
import argparse
import base64
import hashlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import build_zipapp  # noqa: E402
import llm_mux  # noqa: E402


def b64url(data):
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def sign_manifest(release, key_pem):
    """The signed manifest (bytes) for `release` (a dict), signed with the PEM private key."""
    key = llm_mux.RsaKey.from_pem(key_pem)
    payload = json.dumps(release, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return json.dumps({"payload": b64url(payload), "alg": "RS256",
                       "signature": b64url(key.sign_sha256(payload))}, indent=1).encode("utf-8") + b"\n"


def release(out_dir, key_pem, source=None, url=None):
    """Build the .pyz into out_dir and write llm-mux-manifest.json beside it; returns (pyz path, manifest path)."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "llm_mux.pyz.build")
    version, digest = build_zipapp.build(tmp, source_path=source)
    name = "llm_mux-%s.pyz" % version
    pyz = os.path.join(out_dir, name)
    os.replace(tmp, pyz)
    meta = {"name": "llm-mux", "version": version, "url": url or name, "sha256": digest,
            "size": os.path.getsize(pyz), "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    manifest = os.path.join(out_dir, "llm-mux-manifest.json")
    with open(manifest, "wb") as f:
        f.write(sign_manifest(meta, key_pem))
    return pyz, manifest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", default="release", choices=["release", "pubkey"])
    p.add_argument("--key", required=True, help="the release private key (PEM)")
    p.add_argument("--out", default=os.path.join(ROOT, "dist"), help="where the .pyz and manifest go")
    p.add_argument("--source", help="the llm_mux.py to release (default: this checkout's)")
    args = p.parse_args(argv)
    with open(args.key) as f:
        key_pem = f.read()
    if args.command == "pubkey":
        print(llm_mux.RsaKey.from_pem(key_pem).public().to_pem(), end="")
        return 0
    pyz, manifest = release(args.out, key_pem, args.source)
    with open(manifest) as f:
        verified = llm_mux.RsaKey.from_pem(key_pem).public()
        envelope = json.load(f)
    payload = base64.urlsafe_b64decode(envelope["payload"] + "=" * (-len(envelope["payload"]) % 4))
    sig = base64.urlsafe_b64decode(envelope["signature"] + "=" * (-len(envelope["signature"]) % 4))
    assert verified.verify_sha256(payload, sig), "the signature does not verify"
    print("built %s (sha256 %s)\nsigned %s" % (pyz, hashlib.sha256(open(pyz, "rb").read()).hexdigest(), manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
