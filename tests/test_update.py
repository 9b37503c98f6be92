"""`llm-mux update` against a local release server: a good update (and --check, and rollback), a bad checksum, a
bad or missing signature, a truncated download, an unwritable target, a downgrade; the installed file is never left
broken or half-written. RSA verification is checked against the `cryptography` package. The management API's
latest-version reads the same signed manifest."""
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import llm_mux
from harness import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import release as release_tool  # noqa: E402

CURRENT = llm_mux.__version__


def make_key(directory, name):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = os.path.join(str(directory), name + ".pub.pem")
    with open(public, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, private, public


def test_rsa_verification_agrees_with_cryptography(tmp_path):
    key, private, public = make_key(tmp_path, "k")
    ours = llm_mux.RsaPublicKey.from_pem(open(public).read())
    msg = b"the manifest bytes"
    sig = key.sign(msg, padding.PKCS1v15(), hashes.SHA256())
    assert ours.verify_sha256(msg, sig)
    assert not ours.verify_sha256(msg + b"!", sig)
    assert not ours.verify_sha256(msg, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not ours.verify_sha256(msg, key.sign(msg, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()))
    assert not ours.verify_sha256(msg, key.sign(msg, padding.PKCS1v15(), hashes.SHA1()))
    # and the other way: our signatures verify with cryptography, our PEM encoding is the standard one
    mine = llm_mux.RsaKey.from_pem(private)
    key.public_key().verify(mine.sign_sha256(msg), msg, padding.PKCS1v15(), hashes.SHA256())
    assert mine.public().to_pem().encode() == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    # the built-in release key is a real RSA key
    assert llm_mux.release_keys()[0].n.bit_length() >= 3072


class ReleaseServer:
    """Files from a directory; `/short/<name>` sends a file cut in half under its full Content-Length."""

    def __init__(self, directory):
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path.startswith("/short/"):
                    data = open(os.path.join(directory, self.path[7:]), "rb").read()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                outer.hits.append(self.path)
                super().do_GET()
        self.hits = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(directory)))
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]

    def stop(self):
        self.httpd.shutdown()


@pytest.fixture
def channel(tmp_path):
    """An installed llm_mux.pyz of this version, and a release server offering 9.9.9 signed with a test key."""
    key, private, public = make_key(tmp_path, "release")
    src = tmp_path / "src"
    src.mkdir()
    text = open(os.path.join(ROOT, "llm_mux.py")).read().replace('__version__ = "%s"' % CURRENT,
                                                                  '__version__ = "9.9.9"')
    (src / "llm_mux.py").write_text(text)
    rel = tmp_path / "rel"
    release_tool.release(str(rel), private, str(src / "llm_mux.py"))
    install = tmp_path / "install"
    install.mkdir()
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import build_zipapp
    build_zipapp.build(str(install / "llm_mux.pyz"))
    server = ReleaseServer(rel)
    env = dict(os.environ, LLM_MUX_UPDATE_PUBLIC_KEY=public, XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    env.pop("LLM_MUX_CONFIG", None)
    yield {"dir": tmp_path, "rel": rel, "pyz": install / "llm_mux.pyz", "server": server, "env": env,
           "private": private, "public": public, "manifest": server.url + "/llm-mux-manifest.json"}
    server.stop()


def run(ch, *args, env=None, user=None):
    cmd = [sys.executable, str(ch["pyz"])] + list(args)
    if user:
        cmd = ["runuser", "-u", user, "--"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=env or ch["env"], timeout=120)


def version_of(ch):
    return run(ch, "version").stdout.split()[1]


def digest(path):
    return hashlib.sha256(open(str(path), "rb").read()).hexdigest()


def no_temp_files(ch):
    return not [n for n in os.listdir(str(ch["pyz"].parent)) if ".update-" in n]


def test_check_update_and_rollback(channel):
    ch = channel
    r = run(ch, "update", "--check", "--url", ch["manifest"])
    assert r.returncode == 0 and "Update available: %s -> 9.9.9" % CURRENT in r.stdout
    assert version_of(ch) == CURRENT
    before = digest(ch["pyz"])
    r = run(ch, "update", "--yes", "--url", ch["manifest"])
    assert r.returncode == 0, r.stderr
    assert "Updated %s -> 9.9.9" % CURRENT in r.stdout
    assert version_of(ch) == "9.9.9" and digest(ch["pyz"]) == digest(ch["rel"] / "llm_mux-9.9.9.pyz")
    assert digest(str(ch["pyz"]) + ".previous") == before and no_temp_files(ch)
    assert os.stat(str(ch["pyz"])).st_mode & 0o777 == 0o755
    r = run(ch, "update", "--yes", "--url", ch["manifest"])
    assert r.returncode == 0 and "Already up to date" in r.stdout
    r = run(ch, "update", "--rollback", "--yes")
    assert r.returncode == 0 and "Rolled back" in r.stdout and version_of(ch) == CURRENT
    assert digest(ch["pyz"]) == before


def tamper(ch, change):
    path = ch["rel"] / "llm-mux-manifest.json"
    envelope = json.loads(path.read_text())
    payload = json.loads(llm_mux.b64url_decode(envelope["payload"]))
    envelope = change(envelope, payload)
    path.write_text(json.dumps(envelope))


def resign(ch, key_pem=None):
    def change(envelope, payload):
        return json.loads(release_tool.sign_manifest(payload, key_pem or ch["private"]))
    return change


@pytest.mark.parametrize("case", ["checksum", "signature", "no-signature", "other-key", "truncated", "size",
                                  "not-a-zipapp"])
def test_a_bad_release_changes_nothing(channel, case):
    ch = channel
    if case == "checksum":
        def change(envelope, payload):
            payload["sha256"] = "0" * 64
            return json.loads(release_tool.sign_manifest(payload, ch["private"]))
        tamper(ch, change)
    elif case == "signature":
        def change(envelope, payload):  # the payload changed after signing
            payload["url"] = "elsewhere.pyz"
            envelope["payload"] = release_tool.b64url(json.dumps(payload).encode())
            return envelope
        tamper(ch, change)
    elif case == "no-signature":
        tamper(ch, lambda envelope, payload: {"payload": envelope["payload"], "alg": "RS256"})
    elif case == "other-key":
        _, other, _ = make_key(ch["dir"], "attacker")
        tamper(ch, resign(ch, other))
    elif case == "truncated":
        def change(envelope, payload):
            payload["url"] = "/short/llm_mux-9.9.9.pyz"
            return json.loads(release_tool.sign_manifest(payload, ch["private"]))
        tamper(ch, change)
    elif case == "size":
        def change(envelope, payload):
            payload["size"] -= 100
            return json.loads(release_tool.sign_manifest(payload, ch["private"]))
        tamper(ch, change)
    elif case == "not-a-zipapp":
        junk = b"#!/bin/sh\necho pwned\n"
        (ch["rel"] / "junk.pyz").write_bytes(junk)

        def change(envelope, payload):
            payload.update(url="junk.pyz", sha256=hashlib.sha256(junk).hexdigest(), size=len(junk))
            return json.loads(release_tool.sign_manifest(payload, ch["private"]))
        tamper(ch, change)
    before = digest(ch["pyz"])
    r = run(ch, "update", "--yes", "--url", ch["manifest"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("llm-mux: ") and "Traceback" not in r.stderr
    assert digest(ch["pyz"]) == before and version_of(ch) == CURRENT and no_temp_files(ch)
    assert not os.path.exists(str(ch["pyz"]) + ".previous")


def test_an_unwritable_target_and_a_downgrade(channel):
    ch = channel
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root to run the update as another user")
    system_python = "/usr/bin/python3"
    if not os.path.exists(system_python):
        pytest.skip("needs a system Python another user can run")
    import tempfile
    shared = tempfile.mkdtemp(prefix="llm-mux-update-")  # root's, 0755: another user can read, not write
    try:
        os.chmod(shared, 0o755)
        pyz = os.path.join(shared, "llm_mux.pyz")
        shutil.copy(str(ch["pyz"]), pyz)
        os.chmod(pyz, 0o755)
        public = os.path.join(shared, "release.pub.pem")
        shutil.copy(ch["public"], public)
        os.chmod(public, 0o644)
        env = dict(ch["env"], HOME="/tmp", XDG_CONFIG_HOME=shared, LLM_MUX_UPDATE_PUBLIC_KEY=public)
        before = digest(pyz)
        r = subprocess.run(["runuser", "-u", "nobody", "--", system_python, pyz, "update", "--yes", "--url",
                            ch["manifest"]], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 1 and "cannot write to" in r.stderr, r.stderr
        assert digest(pyz) == before and os.listdir(shared) == sorted(os.listdir(shared)) and \
            not [n for n in os.listdir(shared) if ".update-" in n or n.endswith(".previous")]
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    before = digest(ch["pyz"])
    # an older release is refused unless asked for
    src = ch["dir"] / "old"
    src.mkdir()
    (src / "llm_mux.py").write_text(open(os.path.join(ROOT, "llm_mux.py")).read().replace(
        '__version__ = "%s"' % CURRENT, '__version__ = "0.0.1"'))
    release_tool.release(str(ch["rel"]), ch["private"], str(src / "llm_mux.py"))
    r = run(ch, "update", "--yes", "--url", ch["manifest"])
    assert r.returncode == 1 and "not downgrading" in r.stderr and digest(ch["pyz"]) == before
    r = run(ch, "update", "--yes", "--allow-downgrade", "--url", ch["manifest"])
    assert r.returncode == 0 and version_of(ch) == "0.0.1"


def test_a_plain_llm_mux_py_is_updated_from_the_zipapp(channel):
    ch = channel
    target = ch["dir"] / "plain" / "llm_mux.py"
    target.parent.mkdir()
    shutil.copy(os.path.join(ROOT, "llm_mux.py"), str(target))
    r = subprocess.run([sys.executable, str(target), "update", "--yes", "--url", ch["manifest"]],
                       capture_output=True, text=True, env=ch["env"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert '__version__ = "9.9.9"' in target.read_text()
    r = subprocess.run([sys.executable, str(target), "version"], capture_output=True, text=True, env=ch["env"])
    assert r.stdout.startswith("llm-mux 9.9.9")


def test_management_latest_version_reads_the_signed_manifest(channel, gateway):
    ch = channel
    gw = gateway("remote-management: {secret-key: mk}\nupdate-url: %s\n" % ch["manifest"],
                 env={"LLM_MUX_UPDATE_PUBLIC_KEY": ch["public"]})
    got = gw.get_json("/v1/management/latest-version", headers={"Authorization": "Bearer mk"})["data"]
    assert got["latest-version"] == "9.9.9" and got["update-available"] is True
    again = gw.get_json("/v1/management/latest-version", headers={"Authorization": "Bearer mk"})["data"]
    assert again["cached"] is True and ch["server"].hits.count("/llm-mux-manifest.json") == 1
    _, other, _ = make_key(ch["dir"], "attacker")
    tamper(ch, resign(ch, other))
    gw2 = gateway("remote-management: {secret-key: mk}\nupdate-url: %s\n" % ch["manifest"],
                  env={"LLM_MUX_UPDATE_PUBLIC_KEY": ch["public"]})
    import urllib.error
    with pytest.raises(urllib.error.HTTPError) as e:
        gw2.get_json("/v1/management/latest-version", headers={"Authorization": "Bearer mk"})
    assert e.value.code == 502 and b"does not verify" in e.value.read()
