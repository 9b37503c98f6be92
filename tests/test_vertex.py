"""Vertex AI service accounts: the standard-library RS256 signer checked against the `cryptography` package,
`llm-mux import vertex`, and a full request through a fake Google token endpoint and a fake Vertex API."""
import base64
import json
import os
import stat
import subprocess
import sys

import openai
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import llm_mux
from harness import ROOT
from fakes import FakeUpstream, Reply


def pem(key, fmt):
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


@pytest.mark.parametrize("bits", [1024, 2048, 3072])
@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL],
                         ids=["pkcs8", "pkcs1"])
def test_rs256_signatures_match_cryptography(bits, fmt):
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    ours = llm_mux.RsaKey.from_pem(pem(key, fmt))
    for message in (b"", b"hello", os.urandom(1000)):
        sig = ours.sign_sha256(message)
        # PKCS#1 v1.5 is deterministic: the same bytes as the reference implementation ...
        assert sig == key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        # ... and it verifies
        key.public_key().verify(sig, message, padding.PKCS1v15(), hashes.SHA256())


def test_jwt_verifies_with_the_public_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = llm_mux.jwt_rs256({"iss": "a@b", "aud": "x", "iat": 1, "exp": 2}, llm_mux.RsaKey.from_pem(
        pem(key, serialization.PrivateFormat.PKCS8)), kid="k1")
    head, body, sig = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)
    assert json.loads(base64.urlsafe_b64decode(pad(head))) == {"alg": "RS256", "typ": "JWT", "kid": "k1"}
    assert json.loads(base64.urlsafe_b64decode(pad(body)))["iss"] == "a@b"
    key.public_key().verify(base64.urlsafe_b64decode(pad(sig)), (head + "." + body).encode(), padding.PKCS1v15(),
                            hashes.SHA256())
    with pytest.raises(InvalidSignature):
        key.public_key().verify(base64.urlsafe_b64decode(pad(sig)), (head + "." + body + "x").encode(),
                                padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("bad", ["", "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----",
                                 "-----BEGIN RSA PRIVATE KEY-----\nMAA=\n-----END RSA PRIVATE KEY-----",
                                 "-----BEGIN EC PRIVATE KEY-----\nMAA=\n-----END EC PRIVATE KEY-----"])
def test_broken_keys_are_clear_errors(bad):
    with pytest.raises(ValueError):
        llm_mux.RsaKey.from_pem(bad)


@pytest.fixture
def service_account(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa = {"type": "service_account", "project_id": "proj-1", "private_key_id": "kid-9",
          "private_key": pem(key, serialization.PrivateFormat.PKCS8), "client_email": "bot@proj-1.iam.example",
          "token_uri": "https://oauth2.googleapis.com/token"}
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(sa))
    return path, key


def test_import_vertex_and_serve_through_vertex(gateway, tmp_path, service_account):
    sa_path, key = service_account
    tokens = []

    def handler(r):
        if r.path == "/token":
            form = dict(x.split("=", 1) for x in r.body.decode().split("&"))
            assert form["grant_type"] == "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
            head, body, sig = form["assertion"].split(".")
            pad = lambda s: s + "=" * (-len(s) % 4)
            key.public_key().verify(base64.urlsafe_b64decode(pad(sig)), (head + "." + body).encode(),
                                    padding.PKCS1v15(), hashes.SHA256())
            claims = json.loads(base64.urlsafe_b64decode(pad(body)))
            tokens.append(claims)
            return Reply(body={"access_token": "ya29.fake", "expires_in": 3599, "token_type": "Bearer"})
        if r.headers.get("authorization") != "Bearer ya29.fake":
            return Reply(status=401, body={"error": {"code": 401, "message": "no", "status": "UNAUTHENTICATED"}})
        return Reply(body={"candidates": [{"content": {"role": "model", "parts": [{"text": "vertex says hi"}]},
                                           "finishReason": "STOP"}],
                           "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 3}})
    up = FakeUpstream(handler).start()
    try:
        auth = tmp_path / "auth"
        cfg = tmp_path / "c.yaml"
        cfg.write_text("auth-dir: %s\n" % auth)
        out = subprocess.run([sys.executable, os.path.join(ROOT, "llm_mux.py"), "import", "vertex", str(sa_path),
                              "--config", str(cfg)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        created = auth / "vertex-proj-1.json"
        assert "Vertex credentials imported: %s" % created in out.stdout
        assert stat.S_IMODE(os.stat(created).st_mode) == 0o600
        saved = json.loads(created.read_text())
        assert saved["type"] == "vertex" and saved["location"] == "us-central1" and saved["email"].startswith("bot@")
        gw = gateway('auth-dir: %s\nupstream-overrides:\n  "https://oauth2.googleapis.com": "%s"\n'
                     '  "https://us-central1-aiplatform.googleapis.com": "%s"\n' % (auth, up.url, up.url))
        r = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
            model="gemini-2.5-pro", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "vertex says hi"
        assert tokens[0]["iss"] == "bot@proj-1.iam.example" and tokens[0]["aud"] == "https://oauth2.googleapis.com/token"
        assert tokens[0]["scope"] == "https://www.googleapis.com/auth/cloud-platform"
        assert tokens[0]["exp"] - tokens[0]["iat"] == 3600
        api = [q for q in up.requests if q.path != "/token"][-1]
        assert api.path == "/v1/projects/proj-1/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent"
    finally:
        up.stop()


def test_import_rejects_what_is_not_a_service_account(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"type": "authorized_user"}')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth-dir: %s\n" % (tmp_path / "auth"))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "llm_mux.py"), "import", "vertex", str(bad), "--config",
                          str(cfg)], capture_output=True, text=True)
    assert out.returncode == 1 and "not a service-account key" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
