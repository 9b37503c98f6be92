"""Real proxy servers from Debian's packages, started on 127.0.0.1 for a test: tinyproxy (HTTP, CONNECT),
dante (SOCKS5), microsocks (SOCKS5 with username/password) and stunnel (TLS in front of tinyproxy = an
https:// proxy). Plus a tiny recording SOCKS5 server to see what address type a client sends."""
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from fakes import free_port


def _wait_port(port, proc, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("proxy exited early with %s" % proc.returncode)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("proxy did not start on %d" % port)


def _need(binary, package):
    path = shutil.which(binary)
    if path is None:
        pytest.skip("%s is not installed (Debian package %s; tools/test.sh installs it as root)" % (binary, package))
    return path


class Proxy:
    def __init__(self, url, proc):
        self.url, self.proc = url, proc

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_tinyproxy(tmp, user=None, password=None):
    exe = _need("tinyproxy", "tinyproxy")
    port = free_port()
    conf = os.path.join(str(tmp), "tinyproxy-%d.conf" % port)
    lines = ["Port %d" % port, "Listen 127.0.0.1", "Timeout 60", "Allow 127.0.0.1", "MaxClients 100",
             "LogLevel Error", "DisableViaHeader Yes"]
    if user:
        lines.append("BasicAuth %s %s" % (user, password))
    open(conf, "w").write("\n".join(lines) + "\n")
    proc = subprocess.Popen([exe, "-d", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc)
    auth = "%s:%s@" % (user, password) if user else ""
    return Proxy("http://%s127.0.0.1:%d" % (auth, port), proc)


def start_dante(tmp):
    exe = _need("danted", "dante-server")
    port = free_port()
    conf = os.path.join(str(tmp), "danted-%d.conf" % port)
    open(conf, "w").write("""logoutput: stderr
internal: 127.0.0.1 port = %d
external: 127.0.0.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }
socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }
""" % port)
    proc = subprocess.Popen([exe, "-f", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc)
    return Proxy("socks5://127.0.0.1:%d" % port, proc)


def start_microsocks(user, password):
    exe = _need("microsocks", "microsocks")
    port = free_port()
    proc = subprocess.Popen([exe, "-i", "127.0.0.1", "-p", str(port), "-u", user, "-P", password],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc)
    return Proxy("socks5://%s:%s@127.0.0.1:%d" % (user, password, port), proc)


def start_stunnel(tmp, target_port, cert, key):
    exe = shutil.which("stunnel4") or _need("stunnel", "stunnel4")
    port = free_port()
    conf = os.path.join(str(tmp), "stunnel-%d.conf" % port)
    open(conf, "w").write("foreground = yes\npid =\n[proxy]\naccept = 127.0.0.1:%d\nconnect = 127.0.0.1:%d\n"
                          "cert = %s\nkey = %s\n" % (port, target_port, cert, key))
    proc = subprocess.Popen([exe, conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc)
    return port, proc


class RecordingSocks5:
    """A minimal SOCKS5 relay (no auth) that records the address type and host each CONNECT named."""

    def __init__(self):
        self.seen = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return "socks5://127.0.0.1:%d" % self.port

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            ver, n = c.recv(2)
            c.recv(n)
            c.sendall(b"\x05\x00")
            hdr = c.recv(4)
            atyp = hdr[3]
            if atyp == 1:
                host = socket.inet_ntoa(c.recv(4))
            elif atyp == 3:
                host = c.recv(c.recv(1)[0]).decode()
            else:
                host = socket.inet_ntop(socket.AF_INET6, c.recv(16))
            port = int.from_bytes(c.recv(2), "big")
            self.seen.append((atyp, host))
            up = socket.create_connection((host if host != "localhost" else "127.0.0.1", port))
            c.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + b"\x00\x00")
            for a, b in ((c, up), (up, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
        except Exception:
            c.close()

    @staticmethod
    def _pipe(a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def stop(self):
        self.sock.close()
