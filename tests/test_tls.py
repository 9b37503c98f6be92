"""HTTPS from tls.enable/cert/key: the OpenAI SDK and curl over it, a renewed certificate picked up without a
restart, and a certificate that does not load at start is one line naming the file."""
import os
import shutil
import ssl
import subprocess
import sys

import httpx
import openai
import pytest

from certs import make_certs
from harness import ROOT, openai_provider_config, wait_until


def models(gw, ca):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=10,
                      http_client=httpx.Client(verify=ssl.create_default_context(cafile=ca)))
    return [m.id for m in c.models.list()]


def test_https_with_the_sdk_and_curl_and_a_renewal_without_restart(gateway, upstream, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    ca1, cert1, key1 = make_certs(tmp_path / "one")
    ca2, cert2, key2 = make_certs(tmp_path / "two")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(cert1, str(live / "cert.pem"))
    shutil.copy(key1, str(live / "key.pem"))
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "tls: {enable: true, cert: %s, key: %s}\n"
                 % (live / "cert.pem", live / "key.pem"), scheme="https")
    assert models(gw, ca1) == ["gpt-test"]
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-sS", "--cacert", ca1, gw.url + "/v1/models"], capture_output=True, text=True,
                             timeout=30)
        assert '"gpt-test"' in out.stdout, out.stderr
    # a renewal: new files written in place (key first, as certbot's deploy hooks often do)
    shutil.copy(key2, str(live / "key.pem"))
    shutil.copy(cert2, str(live / "cert.pem"))
    wait_until(lambda: models(gw, ca2) == ["gpt-test"], timeout=40, what="the renewed certificate",
               ignore=(openai.APIConnectionError,))
    with pytest.raises(openai.APIConnectionError):
        models(gw, ca1)  # the old CA no longer vouches for what is served
    assert "TLS certificate %s reloaded" % (live / "cert.pem") in gw.output()


@pytest.mark.parametrize("case", ["missing", "not-pem", "mismatch"])
def test_a_bad_certificate_at_start_is_one_line_naming_the_file(tmp_path, case):
    ca, cert, key = make_certs(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, _, other_key = make_certs(other)
    if case == "missing":
        cert = str(tmp_path / "nope.pem")
    elif case == "not-pem":
        with open(cert, "w") as f:
            f.write("this is not a certificate\n")
    else:
        key = other_key
    config = tmp_path / "config.yaml"
    config.write_text("port: 0\nauth-dir: %s\ntls: {enable: true, cert: %s, key: %s}\n" % (tmp_path / "auth", cert,
                                                                                          key))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "llm_mux.py"), "serve", "--config", str(config)],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path)))
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.startswith("llm-mux: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    named = {"missing": cert, "not-pem": cert, "mismatch": key}[case]
    assert named in lines[0], lines[0]
