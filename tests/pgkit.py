"""PostgreSQL for the tests: the machine's server on 127.0.0.1:5432 (trust auth), and a private cluster made with
initdb in a temporary directory for what must not touch the shared one: password authentication (cleartext, md5,
SCRAM-SHA-256 roles the test creates), TLS with a test CA, and restarts under load."""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid

import pytest

from certs import make_certs
from fakes import free_port

SHARED_URL = os.environ.get("LLM_MUX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test?sslmode=disable")


def shared_available():
    try:
        socket.create_connection(("127.0.0.1", 5432), 2).close()
        return True
    except OSError:
        return False


def need_shared():
    if not shared_available():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")


def fresh_database(admin_url=SHARED_URL):
    """A new, empty database on the shared server for one test (so parallel tests never see each other's rows);
    returns its URL and a function that drops it."""
    import psycopg
    name = "llmmux_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin_url.replace("?sslmode=disable", ""), autocommit=True) as c:
        c.execute("CREATE DATABASE " + name)

    def drop():
        with psycopg.connect(admin_url.replace("?sslmode=disable", ""), autocommit=True) as c:
            c.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)
    return SHARED_URL.replace("/test?", "/%s?" % name), drop


def _bindir():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


class PrivateCluster:
    """initdb + pg_ctl as the postgres user, on a free port, with TLS and password roles."""

    PASSWORD = "s3cret pass"

    def __init__(self, directory):
        self.bindir = _bindir()
        if self.bindir is None or os.geteuid() != 0:
            pytest.skip("needs root and PostgreSQL's initdb to make a private cluster")
        # its own directory under /tmp: the postgres user cannot enter pytest's 0700 temporary directories
        self.dir = tempfile.mkdtemp(prefix="llm-mux-pg-")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        pw = pwd.getpwnam("postgres")
        ca, cert, key = make_certs(directory)
        self.ca = ca
        for path in (cert, key):
            shutil.copy(path, self.dir)
        self.data = os.path.join(self.dir, "data")
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        for name in ("server.pem", "server.key"):
            os.chown(os.path.join(self.dir, name), pw.pw_uid, pw.pw_gid)
            os.chmod(os.path.join(self.dir, name), 0o600)
        self.run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("port = %d\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\nssl = on\n"
                    "ssl_cert_file = '%s/server.pem'\nssl_key_file = '%s/server.key'\nfsync = off\n"
                    "max_connections = 60\n" % (self.port, self.dir, self.dir, self.dir))
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "hostnossl all tls_only 127.0.0.1/32 reject\n"
                    "host all scram_user 127.0.0.1/32 scram-sha-256\n"
                    "host all tls_only 127.0.0.1/32 scram-sha-256\n"
                    "host all md5_user 127.0.0.1/32 md5\n"
                    "host all plain_user 127.0.0.1/32 password\n"
                    "host all all 127.0.0.1/32 trust\n")
        self.start()
        self.psql("SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD '%s';" % self.PASSWORD)
        for role in ("scram_user", "plain_user", "tls_only"):
            self.psql("CREATE ROLE %s LOGIN PASSWORD '%s';" % (role, self.PASSWORD))
        self.psql("CREATE DATABASE test")
        self.psql("GRANT ALL ON DATABASE test TO PUBLIC")
        self.psql("GRANT ALL ON SCHEMA public TO PUBLIC;", db="test")

    def run(self, tool, *args):
        cmd = ["runuser", "-u", "postgres", "--", os.path.join(self.bindir, tool)] + list(args)
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        if done.returncode:
            raise RuntimeError("%s failed: %s" % (tool, done.stderr.decode(errors="replace")[-2000:]))

    def psql(self, sql, db="postgres"):
        subprocess.run(["runuser", "-u", "postgres", "--", os.path.join(self.bindir, "psql"), "-h", self.dir,
                        "-p", str(self.port), "-d", db, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], check=True,
                       stdout=subprocess.DEVNULL, timeout=60)

    def start(self):
        self.run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-t", "60", "start")

    def stop(self, mode="fast"):
        self.run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def url(self, user="postgres", password=None, **params):
        auth = user if password is None else "%s:%s" % (user, password.replace(" ", "%20"))
        query = "&".join("%s=%s" % kv for kv in params.items())
        return "postgresql://%s@127.0.0.1:%d/test%s" % (auth, self.port, "?" + query if query else "")

    def close(self):
        try:
            self.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
