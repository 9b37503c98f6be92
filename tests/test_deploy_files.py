"""The Dockerfile and compose.yaml: the paths they copy exist, the environment variables they set are ones llm-mux
reads, and the image's command, run exactly as the Dockerfile says (python -I, an empty HOME, its ENV with the
volume paths moved to a temporary directory), builds nothing on the fly and answers /health and /ready."""
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import yaml

import llm_mux
from fakes import free_port
from harness import ROOT, wait_until


def dockerfile():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    return re.sub(r"\\\n\s*", " ", text)


def test_dockerfile_and_compose_reference_what_exists():
    text = dockerfile()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert os.path.exists(os.path.join(ROOT, src)), src
    assert re.search(r"^USER llmmux$", text, re.M) and "HEALTHCHECK" in text and "/health" in text
    env_names = {v for v, _, _ in llm_mux.ENV_OVERRIDES} | {"LLM_MUX_CONFIG", "HOME", "XDG_CONFIG_HOME",
                                                             "PYTHONDONTWRITEBYTECODE"}
    env_line = re.search(r"^ENV (.*)$", text, re.M).group(1)
    for name in re.findall(r"(\w+)=", env_line):
        assert name in env_names, name
    compose = yaml.safe_load(open(os.path.join(ROOT, "compose.yaml")))
    assert set(compose["services"]) == {"postgres", "llm-mux", "nginx"}
    assert compose["services"]["llm-mux"]["deploy"]["replicas"] == 3
    assert compose["services"]["llm-mux"]["build"] == "."
    for name in compose["services"]["llm-mux"]["environment"]:
        assert name in env_names, name
    assert "proxy_pass http://llm_mux" in compose["configs"]["nginx-conf"]["content"]


def test_the_image_command_serves_health_and_ready(tmp_path):
    text = dockerfile()
    pyz = tmp_path / "app" / "llm_mux.pyz"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_zipapp.py"), "--output", str(pyz)],
                   check=True, capture_output=True, timeout=120)
    env = {"PATH": os.environ["PATH"]}
    for name, value in re.findall(r'(\w+)=(\S+)', re.search(r"^ENV (.*)$", text, re.M).group(1)):
        env[name] = value.replace("/config", str(tmp_path / "config")).replace("/data", str(tmp_path / "data"))
    port = free_port()
    env["LLM_MUX_PORT"] = str(port)
    env["HOME"] = str(tmp_path / "data")  # empty, as in a fresh container
    env["LLM_MUX_API_KEYS"] = "sk-container"
    os.makedirs(env["HOME"])
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[:2] == ["python", "-I"]
    cmd = [sys.executable] + [str(pyz) if c == "/app/llm_mux.pyz" else c for c in cmd[1:]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def health():
            try:
                return json.loads(urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=2).read())
            except OSError:
                return None
        got = wait_until(health, timeout=30, what="/health")
        assert got["status"] == "ok"
        with urllib.request.urlopen("http://127.0.0.1:%d/ready" % port, timeout=5) as r:
            assert json.loads(r.read())["status"] == "ready"
        assert os.path.exists(os.path.join(env["XDG_CONFIG_HOME"], "llm-mux", "config.yaml"))
        assert not any(".pyc" in n for _, _, names in os.walk(str(tmp_path / "data")) for n in names)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    assert "management key" in out and "sk-container" not in out


def test_ready_says_why_not(gateway, upstream):
    up = upstream(lambda r: __import__("fakes").Reply(status=401, body={"error": {"message": "bad key"}}))
    from harness import openai_provider_config
    gw = gateway(openai_provider_config(up.url) + "request-retry: 0\n")
    assert gw.get_json("/ready")["status"] == "ready"
    import openai
    try:
        openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}])
    except openai.APIStatusError:
        pass
    try:
        urllib.request.urlopen(gw.url + "/ready", timeout=5)
        raise AssertionError("expected 503")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        assert e.code == 503 and body["status"] == "not ready" and "fake: no usable credential" in body["reasons"][0]
    assert "sk-up-1" not in json.dumps(body)
