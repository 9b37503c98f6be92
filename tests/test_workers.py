"""`serve --workers N`: N processes answer on one port, a worker that dies is replaced, and SIGTERM drains every
worker's requests before the parent exits."""
import json
import os
import signal
import threading
import time
import urllib.request

import openai

from fakes import Reply, openai_completion
from harness import Gateway, openai_provider_config, wait_until

MK = "workers-mgmt-key"


def overview(gw):
    """A fresh connection each time, so the kernel may hand it to any worker."""
    req = urllib.request.Request(gw.url + "/v1/management/overview", headers={"Authorization": "Bearer " + MK,
                                                                               "Connection": "close"})
    return json.loads(urllib.request.urlopen(req, timeout=10).read())["data"]


def test_workers_share_the_port_are_replaced_and_drain_on_sigterm(tmp_path, upstream):
    release = threading.Event()

    def handler(r):
        if r.json and r.json["messages"][0]["content"] == "slow":
            release.wait(30)
        return Reply(body=openai_completion())
    up = upstream(handler)
    gw = Gateway(tmp_path, openai_provider_config(up.url) + "remote-management: {secret-key: %s}\n" % MK,
                 args=("--workers", "2"))
    try:
        pids = set()
        wait_until(lambda: pids.add(overview(gw)["pid"]) or len(pids) == 2, timeout=30, what="both workers answering")
        assert gw.proc.pid not in pids
        workers = {overview(gw)["worker"] for _ in range(40)}
        assert workers == {1, 2}
        # a worker killed is started again
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: "worker" in gw.output() and "starting it again" in gw.output(), what="the restart")
        fresh = set()
        wait_until(lambda: fresh.add(overview(gw)["pid"]) or (len(fresh) == 2 and victim not in fresh), timeout=30,
                   what="two live workers again")
        # SIGTERM while a request is in flight: it completes, then every worker and the parent exit 0
        result = {}

        def slow():
            c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=30)
            result["answer"] = c.chat.completions.create(model="gpt-test",
                                                         messages=[{"role": "user", "content": "slow"}])
        t = threading.Thread(target=slow)
        t.start()
        wait_until(lambda: any(r.json and r.json["messages"][0]["content"] == "slow" for r in up.requests),
                   what="the slow request upstream")
        gw.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: gw.output().count("shutting down") >= 2, what="both workers draining")
        release.set()
        t.join(30)
        assert result["answer"].choices[0].message.content
        assert gw.proc.wait(30) == 0
        assert "all workers stopped" in gw.output()
        for pid in fresh:
            wait_until(lambda: not os.path.exists("/proc/%d" % pid) or
                       open("/proc/%d/stat" % pid).read().split()[2] == "Z", what="worker %d gone" % pid)
    finally:
        release.set()
        gw.stop()
