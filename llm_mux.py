#!/usr/bin/env python3
"""llm-mux: a self-hosted AI gateway in one standard-library file.

Turns subscription LLM accounts and API keys into the APIs existing tools already speak (OpenAI, Anthropic,
Gemini, Ollama). Every client format is decoded into one intermediate representation (IR); every upstream is a
provider class that encodes the IR for its wire format. Data flows top to bottom through this file.

Table of contents
   1. Header, version, table of contents
   2. Small helpers
   3. Configuration
   4. HTTP server
   5. HTTP client
   6. PostgreSQL client
   7. IR
   8. Codecs
   9. Credentials
  10. Providers
  11. Routing
  12. Usage and metrics
  13. Gateway
  14. Management API
  15. Client API
  16. Watcher
  17. CLI
  18. main
"""

# === 1. Header, version, table of contents ===
# Owns: the version and the imports. Everything the file uses comes from the standard library; the only optional
# import is uvloop, used when it happens to be installed.

import argparse
import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import errno
import fnmatch
import functools
import gc
import hashlib
import hmac
import io
from html import escape as html_escape
import ipaddress
import json
import logging
import math
import operator
import os
import random
import re
import signal
import socket
import ssl
import struct
import sys
import time
import urllib.parse
import zlib

__version__ = "0.1.0"
USER_AGENT = "llm-mux/" + __version__

try:  # optional speed-up, never required
    import uvloop  # type: ignore
except ImportError:  # pragma: no cover - depends on the host
    uvloop = None


# === 2. Small helpers ===
# Owns: time, ids, JSON, logging, secret redaction and RSA signatures. Nothing here knows about HTTP, providers or
# formats.

log = logging.getLogger("llm-mux")


def now_s():
    """Wall-clock seconds as an int, the unit every API's `created` field uses."""
    return int(time.time())


_ids = random.Random(os.urandom(32))
if hasattr(os, "register_at_fork"):  # each worker process draws its own ids
    os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def new_id(prefix, nbytes=12):
    """A random id such as `chatcmpl-3f9a...`; the prefix carries the API's own convention. Ids are unique, not
    secret (a generator seeded from the OS, no system call per id); secrets come from `secrets` / os.urandom."""
    return prefix + "%0*x" % (nbytes * 2, _ids.getrandbits(nbytes * 8))


# No circular-reference bookkeeping: what the gateway encodes is built from JSON it parsed or from the IR, never
# cyclic (a cycle would still end in an error, RecursionError instead of ValueError); a third off every encode.
_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)


def _built_json_encoder():
    """The json module's C encoder, built once with _json_encoder's settings: JSONEncoder.encode builds one per
    call and passes through two Python frames (half of a stream event's 1.7 µs encode). None where the C
    accelerator is missing or does not agree with the Python encoder on a sample."""
    make = getattr(json.encoder, "c_make_encoder", None)
    escape = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or escape is None:
        return None
    try:
        encode = make(None, _json_encoder.default, escape, None, ":", ",", False, False, True)
        sample = {"a": [1, 2.5, -0.0, 1e300, "é\n\u2028\"", None, True, {}], "b": {"c": []}}
        return encode if "".join(encode(sample, 0)) == _json_encoder.encode(sample) else None
    except Exception:  # another interpreter's signature: the module's own path then
        return None


_c_json_encode = _built_json_encoder()
if _c_json_encode is not None:
    def json_dumps(obj):
        """Compact JSON text (ensure_ascii off: UTF-8 on the wire)."""
        return "".join(_c_json_encode(obj, 0))
else:  # pragma: no cover - CPython always has the accelerator
    json_dumps = _json_encoder.encode


def json_bytes(obj):
    """Compact JSON as UTF-8 bytes: what goes on the wire."""
    return json_dumps(obj).encode("utf-8")


_json_scan = json.JSONDecoder().scan_once  # the C scanner: json.loads reaches it through three Python frames


def json_or_none(body):
    """Parsed JSON, or None for anything that is not JSON (upstream bodies and stream frames). What json.loads
    accepts, read by the scanner directly (a stream event is one of these)."""
    try:
        if body.__class__ is not str:
            body = body.decode(json.detect_encoding(body), "surrogatepass")
        value, end = _json_scan(body, _JSON_SPACE.match(body).end())
        if end != len(body) and _JSON_SPACE.match(body, end).end() != len(body):
            return None
        return value
    except (StopIteration, ValueError, UnicodeDecodeError, TypeError, AttributeError):
        return None


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_REUSE_CHECK = os.environ.get("LLM_MUX_CHECK_JSON_REUSE") == "1"


class JsonSource:
    """A JSON object as the client sent it: its parsed value and where each top-level member's value lies in the
    client's text. `encode` writes a large member that goes upstream equal to what was parsed with the client's
    own bytes instead of encoding it again: CPython's encoder escapes strings at ~1.5 ns a character (1.5 ms a
    megabyte of history), a splice is a copy. Codecs treat a parsed body as read-only, so "equal to what was
    parsed" means "as the client sent it". LLM_MUX_CHECK_JSON_REUSE=1 (the test suite sets it) splices members
    of any size and checks every spliced body up to a megabyte against a full encode, type for type."""

    REUSE_MIN = 1 if _JSON_REUSE_CHECK else 4096  # characters: below this, encoding beats comparing and splicing
    _MARK = "\x00llm-mux-reuse-%s-%%d" % os.urandom(8).hex()  # a stand-in no client text can spell
    __slots__ = ("text", "value", "spans")

    def __init__(self, text, value, spans):
        self.text, self.value, self.spans = text, value, spans

    @classmethod
    def parse(cls, raw, decoder=json.JSONDecoder()):
        """(value, source) of JSON bytes, parsed exactly as `json.loads` parses bytes with `decoder`'s settings
        (its errors, for bad input); source is None for a body too small to gain or not an object."""
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")  # what json.loads does with bytes
        if len(raw) < cls.REUSE_MIN:
            return decoder.decode(text), None
        try:
            value, spans = cls._members(text, decoder.scan_once)
        except (ValueError, StopIteration, IndexError):  # not an object, or malformed: the decoder says why
            return decoder.decode(text), None
        return value, cls(raw if raw.isascii() else text, value, spans)  # ASCII: byte offsets are str offsets

    @staticmethod
    def _members(text, scan):
        """The object's members and each value's (start, end) in `text`; the last of a repeated key wins, as in
        json.loads. Raises ValueError (or the scanner's StopIteration / IndexError) for anything else."""
        space = _JSON_SPACE.match
        i = space(text, 0).end()
        if text[i] != "{":
            raise ValueError("not an object")
        i = space(text, i + 1).end()
        value, spans = {}, {}
        if text[i] == "}":
            i += 1
        else:
            while True:
                if text[i] != '"':
                    raise ValueError("expected a key")
                key, i = json.decoder.scanstring(text, i + 1)
                i = space(text, i).end()
                if text[i] != ":":
                    raise ValueError("expected ':'")
                start = space(text, i + 1).end()
                value[key], i = scan(text, start)
                spans[key] = (start, i)
                i = space(text, i).end()
                if text[i] == "}":
                    i += 1
                    break
                if text[i] != ",":
                    raise ValueError("expected ','")
                i = space(text, i + 1).end()
        if space(text, i).end() != len(text):
            raise ValueError("extra data")
        return value, spans

    def encode(self, obj, body=None):
        """`obj` as wire JSON bytes; the members of `body` (the dict a codec built: `obj` itself, or inside an
        envelope) that equal what the client sent are written with the client's bytes. The value types must
        match too: `1 == True` in Python, not on the wire."""
        body = obj if body is None else body
        value, reuse = self.value, []
        for key, (start, end) in self.spans.items():
            if end - start >= self.REUSE_MIN and key in body:
                mine, theirs = body[key], value[key]
                if mine is theirs or (type(mine) is type(theirs) and mine == theirs):
                    reuse.append(key)
        if not reuse:
            return json_bytes(obj)
        kept = {key: body[key] for key in reuse}
        try:
            for n, key in enumerate(reuse):
                body[key] = self._MARK % n
            skeleton = json_bytes(obj)  # everything but the reused members: small
        finally:
            body.update(kept)
        stand_ins = [(json_bytes(self._MARK % n), key) for n, key in enumerate(reuse)]
        text = self.text
        view = memoryview(text) if not isinstance(text, str) else None  # slices of it are not copies
        pieces, at = [], 0
        for pos, mark, key in sorted((skeleton.find(mark), mark, key) for mark, key in stand_ins):
            start, end = self.spans[key]
            pieces += (skeleton[at:pos], view[start:end] if view is not None else text[start:end].encode("utf-8"))
            at = pos + len(mark)
        pieces.append(skeleton[at:])
        out = b"".join(pieces)  # the one copy of the client's bytes
        if _JSON_REUSE_CHECK and len(out) <= 1 << 20:  # (bigger test bodies measure memory: no extra copies)
            full = json.dumps(obj, sort_keys=True, ensure_ascii=False)
            if json.dumps(json.loads(out), sort_keys=True, ensure_ascii=False) != full:
                raise AssertionError("reusing the client's JSON changed the request: %s" % out[:500])
        return out


def mask_secret(value):
    """Keep only the ends of a secret so logs can tell keys apart without exposing them."""
    value = str(value)
    n = len(value)
    if n > 8:
        return value[:4] + "..." + value[-4:]
    if n >= 5:
        return value[:2] + "..." + value[-2:]
    if n >= 3:
        return value[:1] + "..." + value[-1:]
    return value


_SECRET_HEADER_HINTS = ("authorization", "api-key", "apikey", "token", "secret", "management-key", "cookie")


def redact_headers(headers):
    """Header pairs with secret values masked, for debug logs."""
    out = []
    for name, value in headers:
        low = name.lower()
        if any(h in low for h in _SECRET_HEADER_HINTS):
            if low == "authorization" and " " in value:
                scheme, _, rest = value.partition(" ")
                value = scheme + " " + mask_secret(rest)
            else:
                value = mask_secret(value)
        out.append((name, value))
    return out


def redact_url(url):
    """A URL with its userinfo password and secret-looking query parameters (key, token, ...) masked."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc and ":" in parts.netloc.rpartition("@")[0]:
        user, _, host = parts.netloc.rpartition("@")
        parts = parts._replace(netloc="%s:xxxxx@%s" % (user.partition(":")[0], host))
        url = urllib.parse.urlunsplit(parts)
    if not parts.query:
        return url
    pairs = []
    for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        low = k.lower()
        if low == "key" or any(h in low for h in ("api-key", "apikey", "api_key", "token", "secret")):
            v = mask_secret(v)
        pairs.append((k, v))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(pairs)))


class SecretMask:
    """Every secret the gateway holds — upstream keys, OAuth access, refresh and id tokens, client keys — masked
    wherever text leaves the gateway (client error bodies, stream error events, log lines), whichever credential
    an upstream's error text happens to echo. The Gateway keeps the set current."""

    def __init__(self):
        self.secrets = frozenset()
        self.pattern = None

    def update(self, secrets):
        found = frozenset(x for x in secrets if isinstance(x, str) and len(x) >= 8 and not x.startswith("sha256:"))
        if found != self.secrets:
            self.secrets = found
            self.pattern = re.compile("|".join(re.escape(x) for x in sorted(found, key=len, reverse=True))) \
                if found else None

    def add(self, *secrets):
        """Secrets learnt between rebuilds (a refreshed token)."""
        self.update(self.secrets | {x for x in secrets if isinstance(x, str)})

    def __call__(self, text):
        if self.pattern is None or not isinstance(text, str):
            return text
        return self.pattern.sub(lambda m: mask_secret(m.group()), text)


SECRET_MASK = SecretMask()


class OneLineFormatter(logging.Formatter):
    """`[time] [level] message`, one line per event whatever the message holds: control characters that came in
    with a request (a path with %0A, a model name with a newline) are escaped, so nobody can forge log lines. A
    traceback, which the gateway itself writes, keeps its lines."""

    CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")

    def __init__(self):
        logging.Formatter.__init__(self, "[%(asctime)s] [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record):
        # Every handler (stderr, the ring, a file) shares this formatter: a record is formatted once, not per
        # handler, and its line is put together here rather than by Formatter.format's general steps (style
        # lookups, a dict formatting): a busy gateway writes a line per request.
        line = record.__dict__.get("_llm_mux_line")
        if line is None:
            message = SECRET_MASK(record.getMessage())
            if self.CONTROL.search(message):
                message = self.CONTROL.sub(lambda m: repr(m.group())[1:-1] if m.group() != "\t" else " ", message)
            record.message = message
            line = "[%s] [%s] %s" % (self.formatTime(record), record.levelname, message)
            if record.exc_info and not record.exc_text:
                record.exc_text = SECRET_MASK(self.formatException(record.exc_info))
            if record.exc_text:
                line += "\n" + record.exc_text
            if record.stack_info:
                line += "\n" + self.formatStack(record.stack_info)
            record._llm_mux_line = line
        return line

    _second, _stamp = None, ""  # the second formatTime last formatted, and its text

    def formatTime(self, record, datefmt=None):
        # Once per second, not once per line: a busy gateway writes thousands of lines a second.
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(self.datefmt, time.localtime(second))
        return self._stamp

LOG_FORMAT = OneLineFormatter()


class LogRing(logging.Handler):
    """The newest log lines in memory (bounded), for the management API's `GET /logs` and the dashboard's live
    tail, whether or not the log also goes to a file. Each line keeps the epoch it was written at."""

    def __init__(self, size=2000):
        logging.Handler.__init__(self)
        import collections
        self.lines = collections.deque(maxlen=size)
        self.setFormatter(LOG_FORMAT)

    def emit(self, record):
        try:
            self.lines.append((record.created, self.format(record)))
        except Exception:  # a log line must never break the caller
            pass

    def since(self, after=0.0, limit=None):
        out = [(t, line) for t, line in list(self.lines) if t > after]
        return out[-limit:] if limit else out


LOG_RING = LogRing()


class LoopStreamHandler(logging.StreamHandler):
    """stderr, with the access lines written once per turn of the event loop: the access lines of one batch of
    ready sockets (one per request, under load dozens) leave in one write instead of a system call each. Only a
    line logged with `extra=AFTER_TURN` waits, and only on the loop's thread (at most 256 wait, never longer than
    the current loop iteration); any other line is written at once, after those waiting, so what a handler logs
    is on stderr before its response is sent. `logging.shutdown` (at exit) flushes the rest."""

    def __init__(self, stream):
        logging.StreamHandler.__init__(self, stream)
        self.pending = []

    def emit(self, record):
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.pending.append(line)
        loop = asyncio._get_running_loop()  # None off the loop's thread
        if loop is None or len(self.pending) >= 256 or not record.__dict__.get("after_turn"):
            self.flush()
        elif len(self.pending) == 1:
            loop.call_soon(self.flush)  # else a flush is already scheduled for this turn

    def flush(self):
        self.acquire()
        try:
            if self.pending:
                text, self.pending = "\n".join(self.pending) + "\n", []
                try:
                    self.stream.write(text)
                except Exception:  # a closed or full stderr must not break the caller (logging's own rule)
                    pass
            logging.StreamHandler.flush(self)
        finally:
            self.release()


AFTER_TURN = {"after_turn": True}  # log.info(..., extra=AFTER_TURN): a line that may wait for the loop turn's end


def setup_logging(debug=False, stream=None):
    """One line per event: `[YYYY-MM-DD HH:MM:SS] [level] message`, to stderr and the in-memory LOG_RING."""
    # What the records of a line-per-request log need not carry (the logging HOWTO's "Optimization"): no caller
    # lookup (a stack walk per line), no thread or process names.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LoopStreamHandler(stream or sys.stderr)
    handler.setFormatter(LOG_FORMAT)
    log.handlers[:] = [handler, LOG_RING]
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)


def log_to_file(path):
    """Also write the log to `path` (rotated at 10 MB, five kept; 0600), or stop doing so when `path` is None."""
    import logging.handlers
    for h in [h for h in log.handlers if isinstance(h, logging.handlers.RotatingFileHandler)]:
        if path is not None and h.baseFilename == os.path.abspath(path):
            return
        log.removeHandler(h)
        h.close()
    if path is None:
        return
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 << 20, backupCount=5, encoding="utf-8")
    os.chmod(path, 0o600)
    handler.setFormatter(LOG_FORMAT)
    log.addHandler(handler)


SECRET_HASH_PREFIXES = ("scrypt$", "pbkdf2-sha256$")


def hash_secret(secret):
    """A key as stored in a file: `scrypt$16384$8$1$<salt>$<hash>` (hashlib.scrypt), or
    `pbkdf2-sha256$600000$<salt>$<hash>` where the interpreter's OpenSSL has no scrypt. Salt and hash base64url."""
    salt = os.urandom(16)
    if hasattr(hashlib, "scrypt"):
        digest = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=16384, r=8, p=1, dklen=32)
        return "scrypt$16384$8$1$%s$%s" % (b64url(salt), b64url(digest))
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode("utf-8"), salt, 600000)
    return "pbkdf2-sha256$600000$%s$%s" % (b64url(salt), b64url(digest))


def is_hashed_secret(value):
    return isinstance(value, str) and value.startswith(SECRET_HASH_PREFIXES)


def verify_secret(stored, presented):
    """True when `presented` is the key `stored` (a hash_secret string, or a plain key), compared in constant
    time. A malformed stored hash matches nothing."""
    given = presented.encode("utf-8", "replace")
    if not is_hashed_secret(stored):
        return hmac.compare_digest(given, stored.encode("utf-8", "replace"))
    parts = stored.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, want = b64url_decode(parts[4]), b64url_decode(parts[5])
            if not (2 <= n <= 1 << 20 and 1 <= r <= 32 and 1 <= p <= 16) or not hasattr(hashlib, "scrypt"):
                return False
            got = hashlib.scrypt(given, salt=salt, n=n, r=r, p=p, dklen=len(want), maxmem=256 << 20)
        elif parts[0] == "pbkdf2-sha256" and len(parts) == 4:
            rounds = int(parts[1])
            salt, want = b64url_decode(parts[2]), b64url_decode(parts[3])
            if not 1000 <= rounds <= 10000000:
                return False
            got = hashlib.pbkdf2_hmac("sha256", given, salt, rounds, len(want))
        else:
            return False
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, want)


def is_loopback_host(host):
    """True for addresses only this machine can reach (127/8, ::1, localhost)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


def glob_match(pattern, name):
    """Case-insensitive match where `*` spans any run of characters (gateway.md §2.9)."""
    return fnmatch.fnmatchcase(name.lower(), pattern.lower().replace("[", "[[]").replace("?", "[?]"))


def rfc3339(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def rfc3339_now():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%06dZ" % int((t % 1) * 1e6)


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|\u00b5s|ns|m|s)")


_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "\u00b5s": 1e-6, "ns": 1e-9}


def format_seconds(seconds):
    """`90s`, `30m`, `4h`, `5d`: the largest unit that divides it."""
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def parse_duration(text):
    """Seconds from a Go/protobuf duration such as `12s`, `1.5s`, `3h2m1s`; None if it is not one."""
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.strip()
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_instant(value):
    """Epoch seconds from unix seconds/milliseconds, RFC 3339 or an HTTP date; None if unparsable."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) or (isinstance(value, str) and re.match(r"^\d+(\.\d+)?$", value.strip())):
        v = float(value)
        return v / 1000.0 if v > 1e12 else v
    text = str(value).strip()
    import datetime
    try:
        iso = text.replace("Z", "+00:00")
        m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", iso)
        if m and m.group(2):  # fromisoformat on 3.9/3.10 takes at most 6 fractional digits
            iso = m.group(1) + m.group(2)[:7] + m.group(3)
        dt = datetime.datetime.fromisoformat(iso)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.timezone.utc)
        return dt.timestamp()
    except ValueError:
        pass
    try:
        import email.utils
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sniff_image_mime(b64):
    """The image type from its first bytes (Ollama sends bare base64 with no type)."""
    try:
        head = base64.b64decode(b64[:24] + "=" * (-len(b64[:24]) % 4))
    except (binascii.Error, ValueError):
        return "image/png"
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def program_name():
    """How the user ran us, for hints they can paste: `python3 llm_mux.pyz`, `python3 llm_mux.py` or `llm-mux`."""
    prog = os.environ.get("LLM_MUX_PROG") or sys.argv[0]
    base = os.path.basename(prog)
    return "python3 " + base if base.endswith((".py", ".pyz")) else "llm-mux"


class Clock:
    """Monotonic time and sleeping, in one object so tests can drive cooldowns and backoff with a fake clock."""

    def now(self):
        return time.monotonic()

    def wall(self):
        """Epoch seconds, for deadlines that upstreams state as dates (token expiry)."""
        return time.time()

    async def sleep(self, seconds):
        await asyncio.sleep(max(0.0, seconds))


_malloc_trim = []  # glibc's malloc_trim once looked up, or None where there is none


def trim_heap():
    """Hand the heap's free pages back to the OS. glibc keeps freed memory for reuse, so without this a burst of
    large request bodies leaves the process hundreds of MB larger for good. A no-op where malloc is not glibc's."""
    if not _malloc_trim:
        try:
            import ctypes
            _malloc_trim.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (ImportError, OSError, AttributeError):
            _malloc_trim.append(None)  # not glibc: nothing to trim, nothing lost
    if _malloc_trim[0] is not None:
        _malloc_trim[0](0)


def release_startup_memory():
    """Give the heap that compiling this large file left behind back to the OS (about 15 MB). A script run as
    __main__ is always compiled from source, so this matters for `python llm_mux.py`."""
    gc.collect()
    trim_heap()


GC_THRESHOLDS = (50000, 20, 10)  # the collector's defaults are (700, 10, 10)


def tune_collector():
    """Once serving: what exists now lives as long as the process (gc.freeze: never scanned again), and the
    young generation is collected every 50,000 new objects instead of 700. A gateway holding thousands of streams
    keeps ~90 container objects alive per stream; with the defaults the collector made a full pass over all of
    them (~130 ms at 5,000 streams) about once a second, took ~15 % of the CPU, and every stream's next chunk
    waited for it (slow-stream delay p99 0.8-1.0 s -> 0.45-0.5 s, peak RSS lower). Reference cycles are still
    collected, less often."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def read_json_file(*parts):
    """(path, parsed JSON) of the file at os.path.join(*parts); OSError and ValueError pass through."""
    path = os.path.join(*parts)
    with open(path, "r", encoding="utf-8") as f:
        return path, json.load(f)


def write_file_atomic(path, data, mode=0o600):
    """Write, fsync, rename: a crash leaves either the old file or the new one, never half of either."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = "%s.tmp-%d-%s" % (path, os.getpid(), binascii.hexlify(os.urandom(4)).decode())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- RSA (standard library only): RS256 signing for Vertex service accounts, verification of release manifests --

# DigestInfo for SHA-256 (RFC 8017 §9.2 note 1)
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
RSA_ENCRYPTION_OID = b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01"  # 1.2.840.113549.1.1.1


def emsa_pkcs1_sha256(message, size):
    """EMSA-PKCS1-v1_5 encoding of SHA-256(message) for a `size`-byte modulus (RFC 8017 §9.2)."""
    t = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    if size < len(t) + 11:
        raise ValueError("RSA key too short")
    return b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t


def pem_block(text):
    """(label, DER bytes) of the first PEM block in `text`; ValueError when there is none or it is not base64."""
    m = re.search(r"-----BEGIN ([A-Z ]+)-----(.*?)-----END \1-----", text, re.S)
    if not m:
        raise ValueError("no PEM block found")
    try:
        return m.group(1), base64.b64decode("".join(m.group(2).split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("PEM body is not base64")


class RsaKey:
    """An RSA private key from PEM (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`), enough to sign."""

    __slots__ = ("n", "e", "d", "p", "q", "dp", "dq", "qinv", "size")

    def __init__(self, n, e, d, p, q, dp, dq, qinv):
        self.n, self.e, self.d, self.p, self.q, self.dp, self.dq, self.qinv = n, e, d, p, q, dp, dq, qinv
        self.size = (n.bit_length() + 7) // 8

    @staticmethod
    def _der(data, pos, expect=None):
        """(tag, value, next position) of the DER element at `pos`."""
        if pos + 2 > len(data):
            raise ValueError("truncated DER")
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4 or pos + count > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[pos:pos + count], "big")
            pos += count
        if pos + length > len(data):
            raise ValueError("truncated DER")
        if expect is not None and tag != expect:
            raise ValueError("unexpected DER tag 0x%02x (wanted 0x%02x)" % (tag, expect))
        return tag, data[pos:pos + length], pos + length

    @classmethod
    def _pkcs1(cls, der):
        _, seq, _ = cls._der(der, 0, 0x30)
        ints = []
        pos = 0
        while pos < len(seq) and len(ints) < 9:
            _, value, pos = cls._der(seq, pos, 0x02)
            ints.append(int.from_bytes(value, "big"))
        if len(ints) != 9 or ints[0] != 0:
            raise ValueError("not a two-prime RSA private key")
        return cls(*ints[1:])

    @classmethod
    def from_pem(cls, pem):
        kind, der = pem_block(pem.replace("\\n", "\n") if "\\n" in pem else pem)  # pasted with escaped newlines
        if kind == "RSA PRIVATE KEY":
            return cls._pkcs1(der)
        if kind == "PRIVATE KEY":  # PKCS#8: SEQUENCE { version, AlgorithmIdentifier, OCTET STRING { PKCS#1 } }
            _, seq, _ = cls._der(der, 0, 0x30)
            _, _, pos = cls._der(seq, 0, 0x02)
            _, alg, pos = cls._der(seq, pos, 0x30)
            if b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01" not in alg:  # OID 1.2.840.113549.1.1.1 rsaEncryption
                raise ValueError("not an RSA key")
            _, inner, _ = cls._der(seq, pos, 0x04)
            return cls._pkcs1(inner)
        raise ValueError("unsupported PEM block %r" % kind)

    def public(self):
        return RsaPublicKey(self.n, self.e)

    def sign_sha256(self, message):
        """RSASSA-PKCS1-v1_5 with SHA-256 (EMSA-PKCS1-v1_5 encoding, CRT exponentiation)."""
        m = int.from_bytes(emsa_pkcs1_sha256(message, self.size), "big")
        m1, m2 = pow(m, self.dp, self.p), pow(m, self.dq, self.q)
        h = (self.qinv * (m1 - m2)) % self.p
        sig = m2 + h * self.q
        if pow(sig, self.e, self.n) != m:  # guard against a faulty key or computation
            raise ValueError("RSA signature self-check failed")
        return sig.to_bytes(self.size, "big")


class RsaPublicKey:
    """An RSA public key (PEM `PUBLIC KEY` — SubjectPublicKeyInfo — or PKCS#1 `RSA PUBLIC KEY`), enough to verify
    RSASSA-PKCS1-v1_5 SHA-256 signatures."""

    __slots__ = ("n", "e", "size")

    def __init__(self, n, e):
        self.n, self.e = n, e
        self.size = (n.bit_length() + 7) // 8

    @classmethod
    def from_pem(cls, pem):
        kind, der = pem_block(pem)
        if kind == "PUBLIC KEY":  # SEQUENCE { AlgorithmIdentifier, BIT STRING { RSAPublicKey } }
            _, seq, _ = RsaKey._der(der, 0, 0x30)
            _, alg, pos = RsaKey._der(seq, 0, 0x30)
            if RSA_ENCRYPTION_OID not in alg:
                raise ValueError("not an RSA key")
            _, bits, _ = RsaKey._der(seq, pos, 0x03)
            der = bits[1:]  # the unused-bits byte
        elif kind != "RSA PUBLIC KEY":
            raise ValueError("unsupported PEM block %r" % kind)
        _, seq, _ = RsaKey._der(der, 0, 0x30)
        _, n, pos = RsaKey._der(seq, 0, 0x02)
        _, e, _ = RsaKey._der(seq, pos, 0x02)
        key = cls(int.from_bytes(n, "big"), int.from_bytes(e, "big"))
        if key.n.bit_length() < 2048 or key.e < 3 or key.e % 2 == 0:
            raise ValueError("RSA key too weak (need at least 2048 bits and an odd exponent)")
        return key

    def to_pem(self):
        def der(tag, body):
            n = len(body)
            length = bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
                (n.bit_length() + 7) // 8, "big")
            return bytes([tag]) + length + body

        def integer(v):
            raw = v.to_bytes(v.bit_length() // 8 + 1, "big")  # a leading zero keeps it positive
            return der(0x02, raw)
        rsa = der(0x30, integer(self.n) + integer(self.e))
        spki = der(0x30, der(0x30, RSA_ENCRYPTION_OID + b"\x05\x00") + der(0x03, b"\x00" + rsa))
        body = base64.b64encode(spki).decode()
        return "-----BEGIN PUBLIC KEY-----\n%s\n-----END PUBLIC KEY-----\n" % "\n".join(
            body[i:i + 64] for i in range(0, len(body), 64))

    def verify_sha256(self, message, signature):
        """True when `signature` is this key's RSASSA-PKCS1-v1_5 SHA-256 signature of `message`."""
        if len(signature) != self.size:
            return False
        s = int.from_bytes(signature, "big")
        if s >= self.n:
            return False
        em = pow(s, self.e, self.n).to_bytes(self.size, "big")
        return hmac.compare_digest(em, emsa_pkcs1_sha256(message, self.size))


# === 3. Configuration ===
# Owns: the YAML-subset reader, the key schema with defaults, LLM_MUX_* overrides and the immutable Config
# snapshot. It reads files and the environment; it never opens sockets. Reload builds a new snapshot.

class ConfigError(Exception):
    """A configuration problem, already worded for the user (with file:line:column where known)."""


YAML_MAX_DEPTH = 100  # no config is this deep; deeper would only exhaust the parser's recursion


class YamlError(ConfigError):
    def __init__(self, message, line, col, filename="<string>"):
        self.line, self.col, self.filename = line, col, filename
        super().__init__("%s:%d:%d: %s" % (filename, line, col, message))


_YAML_INT = re.compile(r"[-+]?[0-9]+\Z")
_YAML_OCT = re.compile(r"0o[0-7]+\Z")
_YAML_HEX = re.compile(r"0x[0-9a-fA-F]+\Z")
_YAML_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?\Z")
_YAML_INF = re.compile(r"[-+]?\.(inf|Inf|INF)\Z")
_YAML_NAN = re.compile(r"\.(nan|NaN|NAN)\Z")
_YAML_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v", "f": "\f",
                 "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0",
                 "L": "\u2028", "P": "\u2029"}
_YAML_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def yaml_resolve_plain(text):
    """YAML 1.2 core schema for an unquoted scalar: null, bool, int, float, else the string itself."""
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if _YAML_INT.match(text):
        return int(text, 10)
    if _YAML_OCT.match(text):
        return int(text[2:], 8)
    if _YAML_HEX.match(text):
        return int(text[2:], 16)
    if _YAML_FLOAT.match(text):
        return float(text)
    if _YAML_INF.match(text):
        return -math.inf if text.startswith("-") else math.inf
    if _YAML_NAN.match(text):
        return math.nan
    return text


class YamlReader:
    """A reader for the YAML subset config files use: block and flow mappings and sequences, plain, single- and
    double-quoted scalars (YAML 1.2 core types), comments, and `|`/`>` block scalars. Anything else (anchors,
    aliases, tags, complex keys, several documents, tabs in indentation) is an error with line and column, so a
    config is never half-understood. `positions` maps each key path to its (line, column)."""

    def __init__(self, text, filename="<string>"):
        self.filename = filename
        if text.startswith("\ufeff"):
            text = text[1:]
        self.lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.i = 0
        self.positions = {}

    # -- entry point ------------------------------------------------------------------------------------------
    def read(self):
        self._skip_blank()
        if self.i < len(self.lines) and self.lines[self.i].rstrip() == "---":
            self.i += 1
            self._skip_blank()
        if self.i >= len(self.lines):
            return None
        value = self._block_node(-1, ())
        self._skip_blank()
        if self.i < len(self.lines):
            line = self.lines[self.i]
            if line.rstrip() in ("---", "..."):
                self._fail("several documents in one file are not supported", self.i, 0)
            self._fail("unexpected content (check the indentation)", self.i, self._indent(line))
        return value

    # -- low-level helpers --------------------------------------------------------------------------------------
    def _fail(self, message, index, col):
        raise YamlError(message, index + 1, col + 1, self.filename)

    @staticmethod
    def _indent(line):
        return len(line) - len(line.lstrip(" "))

    def _is_blank(self, line):
        s = line.strip(" \t")
        return not s or s.startswith("#")

    def _skip_blank(self):
        while self.i < len(self.lines) and self._is_blank(self.lines[self.i]):
            self.i += 1

    def _check_tabs(self, index):
        line = self.lines[index]
        stripped = line.lstrip(" ")
        if stripped.startswith("\t") and stripped.strip():
            self._fail("tabs are not allowed in indentation", index, len(line) - len(stripped))

    @staticmethod
    def _strip_comment(s):
        """Drop a trailing ` # comment` that is outside quotes."""
        k = 0
        while k < len(s):
            c = s[k]
            if c in "'\"" and (k == 0 or s[k - 1] in " \t[{,:"):
                k = YamlReader._quoted_end(s, k)
                if k < 0:  # an unterminated quote runs to the end of the line
                    break
                continue
            if c == "#" and (k == 0 or s[k - 1] in " \t"):
                return s[:k].rstrip(" \t")
            k += 1
        return s.rstrip(" \t")

    def _find_mapping_colon(self, s):
        """Index of the `: ` (or final `:`) that makes `s` a mapping entry, or -1."""
        if not s or s[0] in "[{":
            return -1
        if s[0] in "'\"":
            end = self._quoted_end(s, 0)
            if end < 0:
                return -1
            rest = s[end:]
            stripped = rest.lstrip(" ")
            if stripped.startswith(":") and (len(stripped) == 1 or stripped[1] in " \t"):
                return end + (len(rest) - len(stripped))
            return -1
        k = 0
        while True:
            k = s.find(":", k)
            if k < 0:
                return -1
            if k + 1 == len(s) or s[k + 1] in " \t":
                return k
            k += 1

    @staticmethod
    def _quoted_end(s, start):
        """Index just past the closing quote of the scalar starting at s[start], or -1."""
        q = s[start]
        k = start + 1
        while k < len(s):
            c = s[k]
            if q == '"' and c == "\\":
                k += 2
                continue
            if c == q:
                if q == "'" and k + 1 < len(s) and s[k + 1] == "'":
                    k += 2
                    continue
                return k + 1
            k += 1
        return -1

    # -- block structure ----------------------------------------------------------------------------------------
    def _block_node(self, parent_indent, path):
        """The node that starts on the next non-blank line and is indented deeper than parent_indent."""
        found = self._next_line(parent_indent + 1)
        if found is None:
            return None
        _, ind, content = found
        if len(path) > YAML_MAX_DEPTH:
            self._fail("nested more than %d levels deep" % YAML_MAX_DEPTH, self.i, ind)
        if content.startswith("? ") or content == "?":
            self._fail("complex mapping keys ('? ') are not supported", self.i, ind)
        if content == "-" or content.startswith("- "):
            return self._block_sequence(ind, path)
        if self._find_mapping_colon(content) >= 0:
            return self._block_mapping(ind, path)
        return self._scalar_lines(ind, parent_indent, path, self.i, ind)

    def _next_line(self, ind):
        """(line, indentation, content) of the next non-blank line when it is indented at least `ind`."""
        self._skip_blank()
        if self.i >= len(self.lines):
            return None
        self._check_tabs(self.i)
        line = self.lines[self.i]
        cur = self._indent(line)
        if cur < ind:
            return None
        return line, cur, self._strip_comment(line[cur:])

    def _block_sequence(self, ind, path):
        items = []
        while True:
            nxt = self._next_line(ind)
            if nxt is None:
                break
            line, cur, content = nxt
            if cur > ind or not (content == "-" or content.startswith("- ")):
                if cur == ind:
                    break
                self._fail("unexpected indentation in a sequence", self.i, cur)
            item_path = path + (len(items),)
            self.positions[item_path] = (self.i + 1, cur + 1)
            rest = line[cur + 1:]
            if not self._strip_comment(rest).strip():
                self.i += 1
                items.append(self._block_node(ind, item_path))
            else:
                # Re-read the rest of the line as if it were indented where its content starts: this is how
                # `- name: x` opens a mapping whose later keys align under `name`.
                offset = cur + 1 + (len(rest) - len(rest.lstrip(" ")))
                self.lines[self.i] = " " * offset + rest.lstrip(" ")
                items.append(self._block_node(ind, item_path))
        return items

    def _block_mapping(self, ind, path):
        result = {}
        while True:
            nxt = self._next_line(ind)
            if nxt is None:
                break
            line, cur, content = nxt
            if cur > ind:
                self._fail("unexpected indentation in a mapping", self.i, cur)
            if content.startswith("- ") or content == "-":
                break
            if cur == 0 and content in ("---", "..."):
                self._fail("several documents in one file are not supported", self.i, cur)
            if content.startswith("? "):
                self._fail("complex mapping keys ('? ') are not supported", self.i, cur)
            colon = self._find_mapping_colon(content)
            if colon < 0:
                self._fail("expected 'key: value'", self.i, cur)
            key_text = content[:colon].rstrip(" ")
            key = self._key_scalar(key_text, self.i, cur)
            if key in result:
                self._fail("duplicate key %r" % (key,), self.i, cur)
            key_path = path + (key,)
            self.positions[key_path] = (self.i + 1, cur + 1)
            value_text = content[colon + 1:].lstrip(" \t")
            value_col = cur + len(content) - len(value_text)
            if not value_text:
                self.i += 1
                value = self._block_node(ind, key_path)
                if value is None:
                    # YAML allows a sequence at the same indentation as its key.
                    self._skip_blank()
                    if self.i < len(self.lines):
                        nxt = self.lines[self.i]
                        c = self._strip_comment(nxt[self._indent(nxt):])
                        if self._indent(nxt) == ind and (c == "-" or c.startswith("- ")):
                            value = self._block_sequence(ind, key_path)
                result[key] = value
            else:
                result[key] = self._inline_value(value_text, ind, key_path, self.i, value_col)
        return result

    def _key_scalar(self, text, index, col):
        if not text:
            self._fail("empty mapping key", index, col)
        if text[0] in "'\"":
            value, end = self._quoted(text, 0, index, col)
            if text[end:].strip():
                self._fail("unexpected text after quoted key", index, col + end)
            return value
        self._check_plain_start(text, index, col)
        value = yaml_resolve_plain(text)
        if isinstance(value, (dict, list)):
            self._fail("unsupported key", index, col)
        return value

    def _check_plain_start(self, text, index, col):
        c = text[0]
        if c == "&":
            self._fail("anchors ('&') are not supported", index, col)
        if c == "*":
            self._fail("aliases ('*') are not supported", index, col)
        if c == "!":
            self._fail("tags ('!') are not supported", index, col)
        if c in "@`%":
            self._fail("a plain scalar cannot start with %r" % c, index, col)
        if c in "]},":
            self._fail("unexpected %r" % c, index, col)
        if c in "-?:" and (len(text) == 1 or text[1] in " \t"):
            self._fail("%r must be followed by a value here (quote it if it is the value)" % c, index, col)

    def _inline_value(self, text, ind, path, index, col):
        """A value written after `key: ` (or `- `)."""
        c = text[0]
        if c in "|>":
            return self._block_scalar(text, ind, index, col)
        if c in "[{":
            return self._flow_from(ind, path, index, col)
        if c in "'\"":
            value, end = self._quoted(text, 0, index, col)
            if text[end:].strip():
                self._fail("unexpected text after quoted scalar", index, col + end)
            self.i = index + 1
            return value
        return self._scalar_lines(ind, ind, path, index, col)

    def _scalar_lines(self, ind, parent_indent, path, index, col):
        """A plain scalar, possibly continued on more-indented lines (folded with spaces)."""
        line = self.lines[index]
        text = self._strip_comment(line[col:])
        if text[:1] in "[{":
            return self._flow_from(parent_indent, path, index, col)
        if text[:1] in "'\"":
            value, end = self._quoted(text, 0, index, col)
            if text[end:].strip():
                self._fail("unexpected text after quoted scalar", index, col + end)
            self.i = index + 1
            return value
        self._check_plain_start(text, index, col)
        if ": " in text or text.endswith(":"):
            self._fail("a mapping value is not allowed here (quote the value if it contains ': ')", index,
                       col + text.find(":"))
        parts = [text]
        self.i = index + 1
        while self.i < len(self.lines):
            nxt = self.lines[self.i]
            if self._is_blank(nxt):
                if nxt.strip().startswith("#"):
                    break
                # A blank line inside a multi-line plain scalar is a line break.
                j = self.i
                while j < len(self.lines) and not self.lines[j].strip():
                    j += 1
                if j < len(self.lines) and self._indent(self.lines[j]) > max(ind, parent_indent) \
                        and not self._is_blank(self.lines[j]):
                    parts.append("\n" * (j - self.i))
                    self.i = j
                    continue
                break
            if self._indent(nxt) <= max(ind, parent_indent):
                break
            cont = self._strip_comment(nxt.strip(" "))
            if self._find_mapping_colon(cont) >= 0 or cont.startswith("- "):
                self._fail("unexpected mapping or sequence inside a plain scalar", self.i, self._indent(nxt))
            parts.append(cont)
            self.i += 1
        out = parts[0]
        for p in parts[1:]:
            if p.startswith("\n"):
                out += p
            elif out.endswith("\n"):
                out += p
            else:
                out += " " + p
        if len(parts) > 1:
            return out
        return yaml_resolve_plain(text)

    def _block_scalar(self, header, ind, index, col):
        """`|` (literal) and `>` (folded) with optional chomping (`-`, `+`) and indentation digit."""
        style = header[0]
        chomp = None
        explicit = None
        k = 1
        while k < len(header) and header[k] not in " \t#":
            ch = header[k]
            if ch in "+-" and chomp is None:
                chomp = ch
            elif ch in "123456789" and explicit is None:
                explicit = int(ch)
            else:
                self._fail("bad block scalar header", index, col + k)
            k += 1
        if self._strip_comment(header[k:]).strip():
            self._fail("unexpected text after block scalar header", index, col + k)
        self.i = index + 1
        # Content indentation: explicit, else the first non-empty line's.
        block_indent = None
        if explicit is not None:
            block_indent = max(ind, 0) + explicit if ind >= 0 else explicit
        else:
            j = self.i
            while j < len(self.lines) and not self.lines[j].strip(" "):
                j += 1
            if j < len(self.lines):
                cand = self._indent(self.lines[j])
                if cand > ind:
                    block_indent = cand
        lines = []
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            if not raw.strip(" ") and (block_indent is None or len(raw) <= block_indent):
                lines.append(None)
                self.i += 1
                continue
            if block_indent is None or self._indent(raw) < block_indent:
                break
            lines.append(raw[block_indent:])
            self.i += 1
        # Trailing empty lines belong to the scalar only for chomping; give back lines after the last content.
        while lines and lines[-1] is None:
            lines.pop()
            self.i -= 1
        # the last content line is the text's very last one and no line break follows it
        final_break = not (self.i == len(self.lines) and self.lines and self.lines[-1] != "")
        trailing = 0
        j = self.i
        # the "" after the text's final newline is not a line: it must not count as a kept empty line
        real_end = len(self.lines) - (1 if self.lines and self.lines[-1] == "" else 0)
        while j < real_end and not self.lines[j].strip(" "):
            trailing += 1
            j += 1
        self.i = max(j, self.i)
        if not lines:
            return "\n" * trailing if chomp == "+" else ""
        return self._fold_block(lines, style, chomp, trailing, final_break)

    @staticmethod
    def _fold_block(lines, style, chomp, trailing, final_break=True):
        """A block scalar's text from its content lines (None for an empty line): literal keeps the breaks,
        folded joins adjacent non-indented lines with a space; then chomping."""
        chunks = []
        breaks = []
        line_break = ""
        first = True
        leading_non_space = True
        idx = 0
        while idx < len(lines) and lines[idx] is None:  # empty lines before the first content are kept as breaks
            breaks.append("\n")
            idx += 1
        while idx < len(lines):
            text = lines[idx]
            if not first:
                if style == ">" and line_break == "\n" and leading_non_space and not text.startswith((" ", "\t")):
                    if not breaks:
                        chunks.append(" ")
                else:
                    chunks.append(line_break)
            chunks.extend(breaks)
            first = False
            leading_non_space = not text.startswith((" ", "\t"))
            chunks.append(text)
            line_break = "\n"
            breaks = []
            idx += 1
            while idx < len(lines) and lines[idx] is None:
                breaks.append("\n")
                idx += 1
        if chomp != "-" and final_break:
            chunks.append(line_break)
        if chomp == "+":
            chunks.extend(breaks)
            chunks.append("\n" * trailing)
        return "".join(chunks)

    def _quoted(self, s, start, index, col):
        """Decode the quoted scalar at s[start]; returns (value, index after it). Single line only."""
        q = s[start]
        end = self._quoted_end(s, start)
        if end < 0:
            self._fail("unterminated quoted scalar (multi-line quoted scalars are not supported)", index,
                       col + start)
        body = s[start + 1:end - 1]
        if q == "'":
            return body.replace("''", "'"), end
        out = []
        k = 0
        while k < len(body):
            c = body[k]
            if c != "\\":
                out.append(c)
                k += 1
                continue
            k += 1
            e = body[k] if k < len(body) else ""
            if e in _YAML_ESCAPES:
                out.append(_YAML_ESCAPES[e])
                k += 1
            elif e in _YAML_HEX_ESCAPES:
                n = _YAML_HEX_ESCAPES[e]
                digits = body[k + 1:k + 1 + n]
                if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    self._fail("bad \\%s escape" % e, index, col + start + k)
                out.append(chr(int(digits, 16)))
                k += 1 + n
            else:
                self._fail("unknown escape \\%s" % e, index, col + start + k)
        return "".join(out), end

    # -- flow collections ---------------------------------------------------------------------------------------
    def _flow_from(self, ind, path, index, col):
        """Read a flow collection starting at (index, col), which may span lines until brackets balance."""
        text_parts = []
        depth = 0
        quote = None
        j = index
        c0 = col
        positions = []  # (offset in joined text, line index, col) for error reporting
        offset = 0
        done = False
        while j < len(self.lines) and not done:
            raw = self.lines[j][c0:] if j == index else self.lines[j]
            base_col = c0 if j == index else 0
            segment = []
            k = 0
            while k < len(raw):
                ch = raw[k]
                if quote:
                    if quote == '"' and ch == "\\":
                        segment.append(raw[k:k + 2])
                        k += 2
                        continue
                    if ch == quote:
                        if quote == "'" and raw[k + 1:k + 2] == "'":
                            segment.append("''")
                            k += 2
                            continue
                        quote = None
                elif ch in "'\"":
                    quote = ch
                elif ch == "#" and (k == 0 or raw[k - 1] in " \t"):
                    break
                elif ch in "[{":
                    depth += 1
                elif ch in "]}":
                    depth -= 1
                    if depth == 0:
                        segment.append(ch)
                        k += 1
                        rest = self._strip_comment(raw[k:])
                        if rest.strip():
                            self._fail("unexpected text after a flow collection", j, base_col + k)
                        done = True
                        break
                segment.append(ch)
                k += 1
            if quote and not done:
                self._fail("multi-line quoted scalars are not supported", j, base_col + k)
            seg = "".join(segment)
            positions.append((offset, j, base_col))
            text_parts.append(seg)
            offset += len(seg) + 1
            j += 1
        if not done:
            self._fail("unterminated flow collection", index, col)
        self.i = j
        text = " ".join(text_parts)
        parser = _FlowParser(self, text, positions, path)
        value = parser.parse()
        return value


class _FlowParser:
    """Recursive descent over `[...]` / `{...}` text joined from one or more lines."""

    def __init__(self, reader, text, positions, path):
        self.r, self.s, self.k, self.positions, self.path = reader, text, 0, positions, path

    def _where(self, k):
        line, col = self.positions[0][1], self.positions[0][2]
        for off, li, base in self.positions:
            if off <= k:
                line, col = li, base + (k - off)
        return line, col

    def _fail(self, message, k=None):
        line, col = self._where(self.k if k is None else k)
        self.r._fail(message, line, col)

    def _ws(self):
        while self.k < len(self.s) and self.s[self.k] in " \t\n":
            self.k += 1

    def parse(self):
        self._ws()
        return self._node(self.path)

    def _node(self, path):
        self._ws()
        if self.k >= len(self.s):
            self._fail("unexpected end of flow collection")
        if len(path) > YAML_MAX_DEPTH:
            self._fail("nested more than %d levels deep" % YAML_MAX_DEPTH)
        c = self.s[self.k]
        if c == "[":
            return self._seq(path)
        if c == "{":
            return self._map(path)
        return self._scalar()

    def _closed(self, opener, closer):
        """Skip white space; at `closer`, consume it and say so; at the end of the text, fail."""
        self._ws()
        if self.k >= len(self.s):
            self._fail("unterminated '%s'" % opener)
        if self.s[self.k] == closer:
            self.k += 1
            return True
        return False

    def _seq(self, path):
        self.k += 1
        items = []
        while True:
            if self._closed("[", "]"):
                return items
            line, col = self._where(self.k)
            self.r.positions[path + (len(items),)] = (line + 1, col + 1)
            items.append(self._node(path + (len(items),)))
            self._ws()
            if self.k < len(self.s) and self.s[self.k] == ":":
                self._fail("single-pair mappings inside flow sequences are not supported")
            if self.k < len(self.s) and self.s[self.k] == ",":
                self.k += 1
            elif self.k < len(self.s) and self.s[self.k] != "]":
                self._fail("expected ',' or ']'")

    def _map(self, path):
        self.k += 1
        result = {}
        while True:
            if self._closed("{", "}"):
                return result
            if self.s[self.k] in "[{":
                self._fail("complex mapping keys are not supported")
            key_at = self.k
            key = self._scalar(key=True)
            if isinstance(key, float) and key != key:
                self._fail("unsupported key", key_at)
            if key in result:
                self._fail("duplicate key %r" % (key,), key_at)
            line, col = self._where(key_at)
            self.r.positions[path + (key,)] = (line + 1, col + 1)
            self._ws()
            if self.k < len(self.s) and self.s[self.k] == ":":
                self.k += 1
                self._ws()
                if self.k < len(self.s) and self.s[self.k] in ",}":
                    result[key] = None
                else:
                    result[key] = self._node(path + (key,))
            else:
                result[key] = None
            self._ws()
            if self.k < len(self.s) and self.s[self.k] == ",":
                self.k += 1
            elif self.k < len(self.s) and self.s[self.k] != "}":
                self._fail("expected ',' or '}'")

    def _scalar(self, key=False):
        s = self.s
        c = s[self.k]
        if c in "'\"":
            line, col = self._where(self.k)
            value, end = self.r._quoted(s, self.k, line, col - self.k)
            self.k = end
            return value
        if c in "&*!":
            self.r._check_plain_start(c, *self._where(self.k))
        if c in "@`%|>":
            self._fail("a plain scalar cannot start with %r" % c)
        start = self.k
        while self.k < len(s):
            ch = s[self.k]
            if ch in ",[]{}":
                break
            if ch == ":" and (self.k + 1 >= len(s) or s[self.k + 1] in " \t\n,[]{}"):
                break
            if ch == "#" and s[self.k - 1] in " \t":
                break
            self.k += 1
        text = " ".join(s[start:self.k].split())
        if not text and not key:
            self._fail("empty value in flow collection")
        return yaml_resolve_plain(text)


def yaml_load(text, filename="<string>"):
    """Parse YAML-subset text; returns (data, positions)."""
    reader = YamlReader(text, filename)
    return reader.read(), reader.positions


# -- write-back ---------------------------------------------------------------------------------------------------
# The management API changes config.yaml the way a careful person would: only the lines whose values change are
# rewritten; comments, key order, quoting and blank lines of everything else stay byte for byte.

_YAML_PLAIN_SAFE = re.compile(r"[A-Za-z0-9_./$~(][A-Za-z0-9_./:@$~+=,()*-]*\Z")


def yaml_scalar(value, style=""):
    """`value` as a YAML scalar that the reader above reads back as the same value; `style` (' or ") keeps the
    quoting a line already used."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    value = str(value)
    if style == "'" and "\n" not in value:
        return "'%s'" % value.replace("'", "''")
    if style != '"' and _YAML_PLAIN_SAFE.match(value) and ": " not in value and " #" not in value and \
            yaml_resolve_plain(value) == value:
        return value
    return json.dumps(value, ensure_ascii=False)


def yaml_flow(value):
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s: %s" % (yaml_scalar(str(k)), yaml_flow(v)) for k, v in value.items())
    if isinstance(value, list):
        return "[%s]" % ", ".join(yaml_flow(v) for v in value)
    return yaml_scalar(value)


def yaml_block(key, value, indent):
    """The lines of `key: value` at `indent`, block style for non-empty collections, `[]` / `{}` for empty ones."""
    head = " " * indent + yaml_scalar(str(key)) + ":"
    if isinstance(value, dict) and value:
        lines = [head]
        for k, v in value.items():
            lines += yaml_block(k, v, indent + 2)
        return lines
    if isinstance(value, list) and value:
        return [head] + yaml_items(value, indent + 2)
    return [head + " " + yaml_flow(value)]


def yaml_items(items, indent):
    lines = []
    for item in items:
        if isinstance(item, dict) and item:
            sub = []
            for k, v in item.items():
                sub += yaml_block(k, v, indent + 2)
            sub[0] = " " * indent + "- " + sub[0][indent + 2:]
            lines += sub
        else:
            lines.append(" " * indent + "- " + yaml_flow(item))
    return lines


def _same(a, b):
    """Equal values of the same YAML type (1 and true, 1 and 1.0 differ on disk)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


class YamlEditor:
    """Turns config text into text whose data is `want`, one small edit at a time: set a scalar in place (keeping
    its quoting and trailing comment), replace one value's lines, delete a key or list item, insert a key after its
    siblings, append a list item. After each edit the text is read again, so positions are never stale."""

    MAX_EDITS = 2000

    def __init__(self, text):
        self.crlf = "\r\n" in text
        self.lines = text.replace("\r\n", "\n").split("\n")

    @property
    def text(self):
        return ("\r\n" if self.crlf else "\n").join(self.lines)

    def edit(self, want):
        for _ in range(self.MAX_EDITS):
            data, self.positions = yaml_load("\n".join(self.lines))
            if data is None:
                data = {}
            if not isinstance(data, dict) or not isinstance(want, dict):
                raise ConfigError("the top level of the config must be a mapping of keys")
            op = self._first_difference(data, want, ())
            if op is None:
                return self.text
            getattr(self, "_" + op[0])(*op[1:])
        raise ConfigError("config write-back did not converge")  # a bug: every edit removes one difference

    def _first_difference(self, cur, want, path):
        if isinstance(cur, dict) and isinstance(want, dict) and (cur or path == ()) and not self._flow(path):
            if not want and path:
                return ("set", path, want)
            for k in cur:
                if k not in want:
                    return ("delete", path + (k,)) if len(cur) > 1 or path == () else ("set", path, want)
            for k, v in want.items():
                if k not in cur:
                    return ("insert", path, k, v)
                op = self._first_difference(cur[k], v, path + (k,))
                if op is not None:
                    return op
            return None
        if isinstance(cur, list) and isinstance(want, list) and cur and want and not self._flow(path):
            for i, (a, b) in enumerate(zip(cur, want)):
                if not _same(a, b):
                    if len(cur) > len(want) and _same(cur[i + 1:i + 1 + len(want) - i], want[i:]):
                        return ("delete", path + (i,))
                    return self._first_difference(a, b, path + (i,))
            if len(cur) > len(want):
                return ("delete", path + (len(want),))
            if len(cur) < len(want):
                return ("append", path, want[len(cur)])
            return None
        return None if _same(cur, want) else ("set", path, want)

    # -- where things are ---------------------------------------------------------------------------------------
    def _where(self, path):
        line, col = self.positions[path]
        return line - 1, col - 1

    def _value_text(self, path):
        """What follows `key:` or `- ` on the line of `path` (comment stripped), and the comment."""
        i, col = self._where(path)
        line = self.lines[i]
        if isinstance(path[-1], int):
            start = col + 1
        else:
            start = col + YamlReader("")._find_mapping_colon(line[col:]) + 1
        rest = line[start:]
        value = YamlReader._strip_comment(rest)
        return i, start, rest, value

    def _flow(self, path):
        """True when the collection at `path` is written in flow style (`[a, b]`, `{k: v}`) on its key's line."""
        if path == () or path not in self.positions:
            return False
        _, _, _, value = self._value_text(path)
        return value.strip().startswith(("[", "{"))

    def _extent(self, path):
        """(first, end) line indexes of the entry at `path`: its line and every following line indented deeper
        (or, for a key whose value is a block sequence at the key's own indentation, its `- ` lines), with
        trailing comment and blank lines left to what follows."""
        i, col = self._where(path)
        end = i + 1
        j = i + 1
        same_indent_items = not isinstance(path[-1], int) and not self._value_text(path)[3].strip()
        while j < len(self.lines):
            line = self.lines[j]
            s = line.strip()
            if not s or s.startswith("#"):
                j += 1
                continue
            ind = len(line) - len(line.lstrip(" "))
            if ind > col or (same_indent_items and ind == col and (s == "-" or s.startswith("- "))):
                end = j + 1
                j += 1
                continue
            break
        return i, end

    def _child_indent(self, path, example):
        return self._where(path + (example,))[1]

    # -- edits --------------------------------------------------------------------------------------------------
    def _set(self, path, want):
        if path == ():
            self.lines = [ln for k, v in want.items() for ln in yaml_block(k, v, 0)] + [""]
            return
        i, start, rest, value = self._value_text(path)
        cur = value.strip()
        end = self._extent(path)[1]
        scalar = not isinstance(want, (dict, list))
        flow = cur[:1] in ("[", "{") and (isinstance(want, (dict, list)) or not want)
        if end == i + 1 and cur and ((scalar and cur[0] not in "[{|>") or flow):
            style = cur[0] if cur[0] in "'\"" else ""
            lead = rest[:len(rest) - len(rest.lstrip(" "))] or " "
            text = yaml_flow(want) if flow else yaml_scalar(want, style)
            self.lines[i] = self.lines[i][:start] + lead + text + rest[len(value):]
            return
        col = self._where(path)[1]
        if isinstance(path[-1], int):
            new = yaml_items([want], col)
        else:
            new = yaml_block(path[-1], want, col)
            comment = rest[len(value):]
            if comment.strip() and len(new) > 1:
                new[0] += comment
        self.lines[i:end] = new

    def _delete(self, path):
        i, end = self._extent(path)
        del self.lines[i:end]

    def _insert(self, path, key, value):
        if path == ():
            while self.lines and not self.lines[-1].strip():
                self.lines.pop()
            self.lines += yaml_block(key, value, 0) + [""]
            return
        siblings = list(k for k in self._siblings(path))
        indent = self._child_indent(path, siblings[-1])
        end = self._extent(path + (siblings[-1],))[1]
        self.lines[end:end] = yaml_block(key, value, indent)

    def _append(self, path, value):
        n = len(self._siblings(path))
        indent = self._child_indent(path, n - 1)
        end = self._extent(path + (n - 1,))[1]
        self.lines[end:end] = yaml_items([value], indent)

    def _siblings(self, path):
        out = [p[-1] for p in self.positions if len(p) == len(path) + 1 and p[:-1] == path]
        out.sort(key=lambda k: self.positions[path + (k,)])
        return out


def yaml_edit(text, want):
    """`text` changed so that it reads as `want`, every untouched line kept byte for byte (see YamlEditor)."""
    return YamlEditor(text).edit(want)


# -- schema -------------------------------------------------------------------------------------------------------
# A type spec is one of: "str", "int", "bool", "num", "any", ("list", spec), ("map", spec), or a dict of
# key -> (spec, default) for a mapping with known keys. Unknown keys warn; wrong types are start-up errors.

PROVIDER_SCHEMA = {
    "type": ("str", ""),
    "name": ("str", ""),
    "enabled": ("bool", True),
    "api-key": ("str", ""),
    "api-keys": (("list", "any"), []),
    "base-url": ("str", ""),
    "proxy-url": ("str", ""),
    "headers": (("map", "str"), {}),
    "models": (("list", "any"), []),
    "excluded-models": (("list", "str"), []),
}

CONFIG_SCHEMA = {
    "host": ("str", "127.0.0.1"),
    "port": ("int", 8317),
    "tls": ({"enable": ("bool", False), "cert": ("str", ""), "key": ("str", "")}, None),
    "auth-dir": ("str", "$XDG_CONFIG_HOME/llm-mux/auth"),
    "disable-auth": ("bool", False),
    "api-keys": (("list", "any"), []),
    "ws-auth": ("bool", False),
    "debug": ("bool", False),
    "logging-to-file": ("bool", False),
    "request-log": ("bool", False),
    "proxy-url": ("str", ""),
    "request-retry": ("int", 3),
    "max-retry-interval": ("int", 30),
    "stream-timeout": ("int", 600),
    "response-header-timeout": ("int", 45),
    "request-timeout": ("int", 0),
    "connect-timeout": ("int", 15),
    "disable-cooling": ("bool", False),
    "quota-window": ("int", 300),
    "quota-exceeded": ({"switch-project": ("bool", True), "switch-preview-model": ("bool", True)}, None),
    "max-request-size": ("int", 52428800),
    "max-response-size": ("int", 104857600),
    "usage": ({"enabled": ("bool", True), "database-path": ("str", ""), "dsn": ("str", ""),
               "postgres-url": ("str", ""), "spool-path": ("str", ""), "spool-max-records": ("int", 200000),
               "batch-size": ("int", 500), "flush-interval": ("str", "1s"), "retention-days": ("int", 30)}, None),
    "store": ({"postgres-url": ("str", ""), "encryption-key": ("str", ""), "poll-interval": ("str", "5s"),
               "lock-timeout": ("str", "30s")}, None),
    "show-provider-prefixes": ("bool", False),
    "use-canonical-translator": ("bool", True),
    "remote-management": ({"allow-remote": ("bool", False), "secret-key": ("str", "")}, None),
    "providers": (("list", PROVIDER_SCHEMA), []),
    "vertex-api-key": (("list", "any"), []),
    "oauth-excluded-models": (("map", ("list", "str")), {}),
    "routing": ({"provider-priority": (("map", "int"), {}), "aliases": (("map", "str"), {}),
                 "fallbacks": (("map", ("list", "str")), {}), "family-fallback": ("bool", True)}, None),
    "refresh-lead": (("map", "any"), {}),
    "pricing": (("map", "any"), {}),
    "metrics-auth": ("str", "loopback"),
    "update-url": ("str", ""),
    "payload": ({"default": (("list", "any"), []), "override": (("list", "any"), [])}, None),
    "ampcode": ({"upstream-url": ("str", ""), "upstream-api-key": ("str", ""),
                 "restrict-management-to-localhost": ("bool", True), "model-mappings": (("list", "any"), [])},
                None),
    "auth": ("any", None),
    # llm-mux (Python) additions
    "upstream-overrides": (("map", "str"), {}),
    "ca-file": ("str", ""),
    "cors": ({"enable": ("bool", False), "allow-origins": (("list", "str"), ["*"])}, None),
    "server": ({"header-timeout": ("num", 10), "keepalive-timeout": ("num", 75),
                "shutdown-timeout": ("num", 30), "max-connections": ("int", 4096),
                "max-buffered-body": ("int", 268435456)}, None),
}

_TYPE_NAMES = {"str": "a string", "int": "an integer", "bool": "true or false", "num": "a number"}


def _defaults(schema):
    out = {}
    for key, (spec, default) in schema.items():
        if isinstance(spec, dict):
            out[key] = _defaults(spec)
        elif isinstance(default, (list, dict)):
            out[key] = type(default)(default)
        else:
            out[key] = default
    return out


class _Validator:
    """Checks parsed YAML against the schema, filling defaults; collects warnings, raises on type errors."""

    def __init__(self, positions, filename):
        self.positions, self.filename, self.warnings = positions, filename, []

    def where(self, path):
        pos = self.positions.get(tuple(path))
        if pos:
            return "%s:%d:%d" % (self.filename, pos[0], pos[1])
        return self.filename

    @staticmethod
    def dotted(path):
        out = ""
        for p in path:
            out += "[%d]" % p if isinstance(p, int) else ("." if out else "") + str(p)
        return out

    def error(self, path, message):
        raise ConfigError("%s: '%s' %s" % (self.where(path), self.dotted(path), message))

    def lead(self, path, value):
        """A refresh lead for one provider type: seconds, or a duration such as `90s`, `30m`, `4h`, `5d`."""
        kind = PROVIDERS.files.get(path[-1])
        if kind is None or not kind.refresh_lead:
            self.error(path, "names no provider whose tokens are refreshed (one of %s)"
                       % ", ".join(sorted(t for t, c in PROVIDERS.files.items() if c.refresh_lead)))
        seconds = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str):
            text = value.strip()
            days = re.match(r"(\d+)d\Z", text)
            seconds = int(days.group(1)) * 86400 if days else parse_duration(text)
        if seconds is None or seconds <= 0:
            self.error(path, "must be a positive number of seconds or a duration such as 30m, 4h or 5d")
        return float(seconds)

    def value(self, spec, value, path, default=None):
        if value is None:
            return _defaults(spec) if isinstance(spec, dict) else (
                type(default)(default) if isinstance(default, (list, dict)) else default)
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                self.error(path, "must be a mapping, got %s" % type(value).__name__)
            out = {}
            for key, item in value.items():
                if key not in spec:
                    self.warnings.append("%s: unknown key '%s' (ignored)" % (self.where(path + (key,)),
                                                                            self.dotted(path + (key,))))
                    continue
            for key, (sub, dflt) in spec.items():
                out[key] = self.value(sub, value.get(key), path + (key,), dflt)
            return out
        if isinstance(spec, tuple):
            kind, sub = spec
            if kind == "list":
                if not isinstance(value, list):
                    self.error(path, "must be a list, got %s" % _kind(value))
                return [self.value(sub, v, path + (i,)) for i, v in enumerate(value)]
            if not isinstance(value, dict):
                self.error(path, "must be a mapping, got %s" % _kind(value))
            return {str(k): self.value(sub, v, path + (k,)) for k, v in value.items()}
        if spec == "any":
            return value
        if spec == "str":
            if isinstance(value, bool) or isinstance(value, (dict, list)):
                self.error(path, "must be a string, got %s" % _kind(value))
            return value if isinstance(value, str) else _scalar_text(value)
        if spec == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                self.error(path, "must be an integer, got %s" % _kind(value))
            return value
        if spec == "num":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.error(path, "must be a number, got %s" % _kind(value))
            return value
        if spec == "bool":
            if not isinstance(value, bool):
                self.error(path, "must be true or false, got %s" % _kind(value))
            return value
        raise AssertionError(spec)


def _kind(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer (%d)" % value
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string (%r)" % value[:40]
    if isinstance(value, list):
        return "a list"
    return "a mapping"


def _scalar_text(value):
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return str(value)


ENV_OVERRIDES = [
    ("LLM_MUX_HOST", "host", "str"),
    ("LLM_MUX_PORT", "port", "int"),
    ("LLM_MUX_DEBUG", "debug", "bool"),
    ("LLM_MUX_DISABLE_AUTH", "disable-auth", "bool"),
    ("LLM_MUX_API_KEYS", "api-keys", "list"),
    ("LLM_MUX_USAGE_DSN", "usage.dsn", "str"),
    ("LLM_MUX_USAGE_RETENTION_DAYS", "usage.retention-days", "int"),
    ("LLM_MUX_USAGE_POSTGRES_URL", "usage.postgres-url", "str"),
    ("LLM_MUX_STORE_POSTGRES_URL", "store.postgres-url", "str"),
    ("LLM_MUX_STORE_KEY", "store.encryption-key", "str"),
    ("LLM_MUX_PROXY_URL", "proxy-url", "str"),
    ("LLM_MUX_AUTH_DIR", "auth-dir", "str"),
    ("LLM_MUX_LOGGING_TO_FILE", "logging-to-file", "bool"),
    ("LLM_MUX_REQUEST_RETRY", "request-retry", "int"),
    ("LLM_MUX_MAX_RETRY_INTERVAL", "max-retry-interval", "int"),
    ("LLM_MUX_STREAM_TIMEOUT", "stream-timeout", "int"),
    ("LLM_MUX_MAX_REQUEST_SIZE", "max-request-size", "int"),
    ("LLM_MUX_MAX_RESPONSE_SIZE", "max-response-size", "int"),
]


def apply_env_overrides(data, environ):
    """LLM_MUX_* variables win over the file (gateway.md §2.2); re-applied on every reload."""
    applied = []
    for var, dotted, kind in ENV_OVERRIDES:
        raw = (environ.get(var) or "").strip()
        if not raw:
            continue
        if kind == "bool":
            value = raw.lower() in ("true", "1", "yes")
        elif kind == "int":
            try:
                value = int(raw)
            except ValueError:
                log.warning("ignoring %s=%r: not an integer", var, raw)
                continue
        elif kind == "list":
            value = [p.strip() for p in raw.split(",") if p.strip()]
        else:
            value = raw
        target = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        applied.append(var)
    return applied


def default_config_dir(environ=None):
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "llm-mux")


def expand_path(path, environ=None):
    """Expand `~` and a leading `$XDG_CONFIG_HOME` the way llm-mux does."""
    environ = os.environ if environ is None else environ
    if path.startswith("$XDG_CONFIG_HOME"):
        base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        path = base + path[len("$XDG_CONFIG_HOME"):]
    return os.path.abspath(os.path.expanduser(path))


def find_config_path(cli_path=None, environ=None):
    """--config, then LLM_MUX_CONFIG, then $XDG_CONFIG_HOME/llm-mux/config.yaml. Returns (path, is_default)."""
    environ = os.environ if environ is None else environ
    if cli_path:
        return os.path.abspath(os.path.expanduser(cli_path)), False
    if (environ.get("LLM_MUX_CONFIG") or "").strip():
        return os.path.abspath(os.path.expanduser(environ["LLM_MUX_CONFIG"].strip())), False
    return os.path.join(default_config_dir(environ), "config.yaml"), True


DEFAULT_CONFIG_TEXT = """\
# llm-mux configuration. Every key is optional; the values below are the defaults.
# Environment variables LLM_MUX_* override these values; edits apply without a restart.
#
# Two ways to get models:
#   - a subscription account: run `python3 llm_mux.pyz login <provider>` (claude, codex, gemini, antigravity,
#     copilot, qwen, iflow, kiro, cline); the credential file lands in auth-dir below;
#   - an API key: an entry under `providers:` (one commented example per type at the end of this file).

# Where to listen. Without api-keys the gateway only serves on a loopback address.
host: 127.0.0.1
port: 8317

# Client API keys. Clients send one as `Authorization: Bearer`, `x-api-key`, `x-goog-api-key` or `?key=`.
api-keys: []
# disable-auth: true   # serve without keys on any address (only if something else guards the port)

# Credential files written by `llm-mux login` live here.
auth-dir: $XDG_CONFIG_HOME/llm-mux/auth

# Outbound proxy for every upstream call: http://, https://, socks5://, socks5h:// (user:pass@ allowed).
proxy-url: ""

# Retries and timeouts (seconds).
request-retry: 3
max-retry-interval: 30
stream-timeout: 600

# Largest request body accepted (bytes).
max-request-size: 52428800

tls:
  enable: false
  cert: ""
  key: ""

# The management API (/v1/management) and the dashboard (/dashboard). The key is stored hashed (scrypt): a plain
# key typed here is hashed on the next start. `llm-mux init --force` makes a new one.
remote-management:
  allow-remote: false   # true: other machines may call it too (with the key)
  secret-key: ""

# API-key upstreams: uncomment and edit one entry per endpoint. `type` is one of openai, anthropic, gemini,
# vertex-compat, codex. base-url may be left out for the official endpoints.
# providers:
#   - type: anthropic                    # the Anthropic Messages API; base-url with or without /v1
#     api-key: sk-ant-...
#   - type: gemini                       # Google AI Studio keys (generativelanguage.googleapis.com)
#     api-keys: [AIza-one, AIza-two]     # several keys share the load
#   - type: vertex-compat                # Vertex AI's Gemini models with an API key
#     api-key: ...
#   - type: codex                        # the OpenAI Responses API (GPT-5 / Codex models)
#     api-key: sk-proj-...
#   - type: openai                       # any OpenAI-compatible endpoint: base-url and models are required
#     name: my-endpoint
#     base-url: https://api.example.com/v1
#     api-keys:
#       - key: sk-one
#       - key: sk-two
#         proxy-url: socks5://127.0.0.1:1080
#     headers: {X-Team: research}
#     models:
#       - name: gpt-4o
#         alias: fast
#     excluded-models: ["*-preview"]
providers: []
"""


# Built-in list prices, USD per million tokens: (input, output, cache read, cache write), first matching pattern
# wins. An approximation of the providers' published prices (late 2025) for the API-equivalent cost of a request;
# `pricing:` in the config overrides or extends it (README: Usage records).
PRICES = (
    ("claude-*opus-4-5*", (5, 25, 0.5, 6.25)), ("claude-opus-4.5", (5, 25, 0.5, 6.25)),
    ("claude-opus-4-6*", (5, 25, 0.5, 6.25)), ("*claude*opus*", (15, 75, 1.5, 18.75)),
    ("*claude*haiku-4*", (1, 5, 0.1, 1.25)), ("*claude*haiku*", (0.8, 4, 0.08, 1)),
    ("*claude*", (3, 15, 0.3, 3.75)),
    ("gemini-*flash-lite*", (0.1, 0.4, 0.025, 0)), ("gemini-2*flash*", (0.3, 2.5, 0.075, 0)),
    ("gemini-*flash*", (0.5, 3, 0.125, 0)), ("gemini-2*pro*", (1.25, 10, 0.3125, 0)),
    ("gemini-*pro*", (2, 12, 0.5, 0)), ("gemini-embedding*", (0.15, 0, 0, 0)), ("text-embedding-00*", (0.025, 0, 0, 0)),
    ("text-embedding-3-small", (0.02, 0, 0, 0)), ("text-embedding-3-large", (0.13, 0, 0, 0)),
    ("gpt-5*mini*", (0.25, 2, 0.025, 0)), ("gpt-5*", (1.25, 10, 0.125, 0)), ("gpt-4.1*", (2, 8, 0.5, 0)),
    ("gpt-4o*", (2.5, 10, 1.25, 0)), ("gpt-oss*", (0.15, 0.6, 0, 0)), ("*grok-code-fast*", (0.2, 1.5, 0.02, 0)),
    ("deepseek-r1*", (0.55, 2.19, 0.14, 0)), ("deepseek*", (0.28, 0.42, 0.028, 0)),
    ("qwen3-coder*", (1, 5, 0.1, 0)), ("coder-model", (1, 5, 0.1, 0)), ("qwen3-max*", (1.2, 6, 0.24, 0)),
    ("qwen*", (0.4, 1.2, 0, 0)), ("vision-model", (0.4, 1.2, 0, 0)), ("glm-4*", (0.6, 2.2, 0.11, 0)),
    ("kimi*", (0.6, 2.5, 0.15, 0)), ("*minimax*", (0.3, 1.2, 0, 0)),
)
PRICE_FIELDS = ("input", "output", "cache-read", "cache-write")


@functools.lru_cache(maxsize=4096)
def price_of(model, overrides=()):
    """(input, output, cache read, cache write) in USD per million tokens for `model`: the config's `pricing:`
    first, then the built-in table; None when neither knows it. Cached: it runs for every upstream call."""
    for pattern, price in tuple(overrides) + PRICES:
        if glob_match(pattern, model):
            return price
    return None


class ClientKey:
    """One client API key: the secret (or only its SHA-256, `sha256:<hex>`), a name for usage and metrics, and its
    limits: `models` (globs it may use), `rpm`, `tpm`, `max_budget` USD per `budget_seconds`, `expires` (epoch),
    `disabled`. A plain string in `api-keys` is a key without limits."""

    __slots__ = ("secret", "digest", "name", "models", "rpm", "tpm", "max_budget", "budget_seconds", "expires",
                 "disabled")
    LIMIT_FIELDS = ("key", "name", "models", "rpm", "tpm", "max-budget", "budget-duration", "expires", "disabled")

    def __init__(self, secret, name):
        self.secret, self.name = secret, name
        self.digest = bytes.fromhex(secret[7:]) if secret.startswith("sha256:") else None
        self.models, self.rpm, self.tpm, self.max_budget, self.budget_seconds = (), None, None, None, 30 * 86400.0
        self.expires, self.disabled = None, False

    def matches(self, presented):
        """Constant-time comparison of a presented key (bytes) with this one."""
        if self.digest is not None:
            return hmac.compare_digest(hashlib.sha256(presented).digest(), self.digest)
        return hmac.compare_digest(presented, self.secret.encode("utf-8", "replace"))

    def allows(self, model):
        return not self.models or any(glob_match(p, model) for p in self.models)

    @classmethod
    def from_config(cls, item, index, where):
        """A ClientKey from one `api-keys` entry; a ConfigError (with `where`) for anything wrong in it."""
        def fail(message):
            raise ConfigError("%s: api-keys[%d]: %s" % (where, index, message))
        if isinstance(item, str) or item is None:
            if not (item or "").strip():
                fail("an empty key would let anyone in; remove it or give it a value")
            return cls(item.strip(), "key-%d" % (index + 1))
        if not isinstance(item, dict):
            fail("expected a key string or a mapping with key, name, models, rpm, tpm, max-budget, ...")
        unknown = set(item) - set(cls.LIMIT_FIELDS)
        if unknown:
            fail("unknown field(s) %s" % ", ".join(sorted(unknown)))
        secret = str(item.get("key") or "").strip()
        if not secret or (secret.startswith("sha256:") and not re.match(r"sha256:[0-9a-fA-F]{64}\Z", secret)):
            fail("key is required (the key itself, or sha256:<64 hex digits> of it)")
        key = cls(secret, str(item.get("name") or "key-%d" % (index + 1)))
        models = item.get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            fail("models must be a list of model names or globs")
        key.models = tuple(models)
        for field, attr in (("rpm", "rpm"), ("tpm", "tpm"), ("max-budget", "max_budget")):
            value = item.get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                fail("%s must be a non-negative number" % field)
            setattr(key, attr, value)
        if item.get("budget-duration") is not None:
            text = str(item["budget-duration"]).strip()
            days = re.match(r"(\d+)d\Z", text)
            seconds = int(days.group(1)) * 86400 if days else parse_duration(text)
            if not seconds or seconds <= 0:
                fail("budget-duration must be a duration such as 24h, 7d or 30d")
            key.budget_seconds = float(seconds)
        if item.get("expires") not in (None, ""):
            key.expires = parse_instant(item["expires"])
            if key.expires is None:
                fail("expires must be a date or RFC 3339 time")
        key.disabled = bool(item.get("disabled"))
        return key


class ProviderRegistry:
    """The one catalogue of provider classes, filled as each Provider subclass is defined (Providers section):
    by the `type` of a `providers:` entry (`config_type`) and by the `type` of a credential file (`file_type`).
    Config reads it to validate entries, routing to build providers, the CLI to list logins and importers."""

    def __init__(self):
        self.entries = {}  # providers: entry type -> class
        self.files = {}  # credential-file type -> class

    def add(self, cls):
        own = cls.__dict__
        if own.get("config_type"):
            self.entries[cls.config_type] = cls
        if own.get("file_type"):
            for name in (cls.file_type,) + tuple(own.get("file_aliases") or ()):
                self.files[name] = cls

    def file_class(self, meta):
        """The class serving a credential file's JSON, or None."""
        return self.files.get(str(meta.get("type") or "").strip().lower())

    def logins(self):
        """{login name: provider class} for `llm-mux login` and the management API."""
        return {c.login_name: c for c in self.files.values() if c.login_name}

    def importers(self):
        """Provider classes that can import their official tool's stored credentials (their own, not inherited)."""
        return [c for c in dict.fromkeys(self.files.values()) if c.__dict__.get("official_tool")]


PROVIDERS = ProviderRegistry()


class ProviderEntry:
    """One validated `providers:` entry (gateway.md §2.4)."""

    __slots__ = ("type", "name", "provider_id", "base_url", "keys", "proxy_url", "headers", "models", "excluded",
                 "index")

    @staticmethod
    def _pairs(items, where, first, second, warnings):
        """[(a, b)] from a list of strings or {first: a, second: b} mappings (`first` lists the spellings of the
        first field); other items are warned about and skipped."""
        out = []
        for j, item in enumerate(items or []):
            if isinstance(item, str):
                a, b = item, ""
            elif isinstance(item, dict):
                a, b = next((item[k] for k in first if item.get(k)), ""), item.get(second) or ""
            else:
                warnings.append("%s[%d]: expected {%s, %s}; skipped" % (where, j, first[0], second))
                continue
            if str(a).strip():
                out.append((str(a).strip(), str(b).strip()))
        return out

    @classmethod
    def from_config(cls, raw, index, warnings, locate=None):
        """The entry, or None when it is switched off. Without what its type requires, a ConfigError saying where
        and how to fix it: an entry that would silently serve nothing is worse than a start that fails."""
        where = "providers[%d]" % index
        here = "%s: %s" % (locate(("providers", index)), where) if locate else where
        ptype = (raw.get("type") or "").strip().lower()
        if not raw.get("enabled", True):
            return None
        kind = PROVIDERS.entries.get(ptype)
        if kind is None:
            raise ConfigError("%s: type %r is not one of %s (see the provider types in the README or the generated "
                              "config)" % (here, ptype, ", ".join(PROVIDERS.entries)))
        e = cls()
        e.index = index
        e.type = ptype
        e.name = (raw.get("name") or "").strip() or ptype
        e.provider_id = kind.provider_id or e.name.lower()
        e.base_url = (raw.get("base-url") or "").strip().rstrip("/")
        for suffix in kind.version_suffixes:  # written with or without the version the provider adds itself
            if e.base_url.endswith(suffix):
                e.base_url = e.base_url[:-len(suffix)]
                break
        e.proxy_url = (raw.get("proxy-url") or "").strip()
        e.headers = [(str(k).strip(), str(v).strip()) for k, v in raw.get("headers", {}).items()
                     if str(k).strip() and str(v).strip()]
        e.keys = cls._pairs(raw.get("api-keys"), where + ".api-keys", ("key", "api-key"), "proxy-url", warnings)
        if not e.keys and (raw.get("api-key") or "").strip():
            e.keys.append((raw["api-key"].strip(), ""))
        e.models = cls._pairs(raw.get("models"), where + ".models", ("name",), "alias", warnings)
        e.excluded = [p.strip().lower() for p in raw.get("excluded-models") or [] if p.strip()]
        if kind.needs_base_url and not e.base_url:
            raise ConfigError("%s (%s): base-url is required for type %s: the endpoint up to its version, e.g. "
                              "base-url: https://openrouter.ai/api/v1" % (here, e.name, ptype))
        if kind.needs_models and not e.models:
            raise ConfigError("%s (%s): models is required for type %s: list what the endpoint serves, e.g. "
                              "models: [gpt-4o] or models: [{name: org/model, alias: short}]" % (here, e.name, ptype))
        if not e.keys and kind.needs_key:
            raise ConfigError("%s (%s): no api-key: add api-key: <key> (or api-keys: [...]) for type %s"
                              % (here, e.name, ptype))
        if not e.keys:
            e.keys.append(("", ""))  # an OpenAI-compatible endpoint that needs no key (local servers)
        return e


def synthetic_entry(ptype, excluded=()):
    """The provider entry of file-based (OAuth) credentials: no config block, default models."""
    e = ProviderEntry()
    e.index, e.type, e.name, e.provider_id = -1, ptype, ptype, ptype
    e.base_url, e.proxy_url, e.headers, e.keys, e.models = "", "", [], [], []
    e.excluded = [p.lower() for p in excluded]
    return e


class Config:
    """An immutable snapshot of the configuration. Readers hold it for one request at most; reload swaps it."""

    def __init__(self, data, path=None, warnings=(), env_applied=(), locate=None):
        self.data = data
        self.path = path
        self.warnings = list(warnings)
        self.env_applied = list(env_applied)
        for key, value in data.items():
            setattr(self, key.replace("-", "_"), value)
        self.auth_dir = expand_path(data["auth-dir"])
        self.providers = [ProviderEntry.from_config(p, i, self.warnings, locate)
                          for i, p in enumerate(data["providers"])]
        self.providers = [p for p in self.providers if p is not None]
        self._dedupe_providers()
        self.pricing = self._prices(data["pricing"], locate)
        if data["metrics-auth"] not in ("loopback", "always", "none"):
            raise ConfigError("%s: metrics-auth must be loopback (free from this machine, the management key from "
                              "elsewhere), always or none" % (locate(("metrics-auth",)) if locate else path))
        self.client_keys = [ClientKey.from_config(k, i, locate(("api-keys", i)) if locate else path or "config")
                            for i, k in enumerate(data["api-keys"])]
        self.amp_mappings = self._amp_mappings(data["ampcode"]["model-mappings"], locate, path)
        self.api_keys = [k.secret for k in self.client_keys]
        if not 0 <= data["port"] <= 65535:
            raise ConfigError("%s: port must be between 0 and 65535" % (locate(("port",)) if locate else path))
        for src, dst in data["upstream-overrides"].items():
            for url in (src, dst):
                try:
                    parts = urllib.parse.urlsplit(url)
                    parts.port  # raises ValueError for a port out of range or not a number
                except ValueError as e:
                    parts = None
                    reason = str(e)
                if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ConfigError("%s: upstream-overrides: %r is not an http(s) URL%s" % (
                        locate(("upstream-overrides", src)) if locate else path, url,
                        " (%s)" % reason if parts is None else ""))
        self.overrides = {}
        for src, dst in data["upstream-overrides"].items():
            self.overrides[normalize_origin(src)] = dst.rstrip("/")

    def _prices(self, pricing, locate):
        """`pricing:` as ((pattern, (input, output, cache read, cache write)), ...), each checked: four
        non-negative numbers (USD per million tokens), for a model some provider serves or lists."""
        known = {m for c in set(PROVIDERS.entries.values()) | set(PROVIDERS.files.values()) for m in c.default_models}
        known.update(n for p in self.providers for pair in p.models for n in pair if n)
        known.update(pattern for pattern, _ in PRICES)
        out = []
        for name, spec in pricing.items():
            where = "%s: pricing.%s" % (locate(("pricing", name)), name) if locate else "pricing.%s" % name
            if not isinstance(spec, dict) or set(spec) - set(PRICE_FIELDS) or not all(
                    isinstance(spec.get(f, 0), (int, float)) and not isinstance(spec.get(f, 0), bool) and
                    spec.get(f, 0) >= 0 for f in PRICE_FIELDS):
                raise ConfigError("%s: expected {input, output, cache-read, cache-write}: non-negative USD per "
                                  "million tokens" % where)
            if not any(glob_match(name, m) or m == name for m in known):
                raise ConfigError("%s: no provider serves or lists a model %r (check the name, or list the model "
                                  "under a provider first)" % (where, name))
            out.append((name, tuple(float(spec.get(f, 0)) for f in PRICE_FIELDS)))
        return tuple(out)

    @staticmethod
    def _amp_mappings(entries, locate, path):
        """ampcode.model-mappings as [(matcher, to, source)]: `from` matched case-insensitively, or as a regular
        expression (the whole name) with `regex: true`."""
        out = []
        for i, entry in enumerate(entries):
            where = locate(("ampcode", "model-mappings", i)) if locate else path or "config"
            if not isinstance(entry, dict) or not isinstance(entry.get("from"), str) or \
                    not isinstance(entry.get("to"), str) or not entry["from"].strip() or not entry["to"].strip():
                raise ConfigError("%s: a model mapping is {from: model, to: model[, regex: true]}" % where)
            unknown = set(entry) - {"from", "to", "regex"}
            if unknown:
                raise ConfigError("%s: unknown field(s) in a model mapping: %s" % (where, ", ".join(sorted(unknown))))
            if entry.get("regex"):
                try:
                    pattern = re.compile(entry["from"].strip(), re.I)
                except re.error as e:
                    raise ConfigError("%s: 'from' is not a valid regular expression: %s" % (where, e))
                matcher = pattern.fullmatch
            else:
                wanted = entry["from"].strip().lower()
                matcher = (lambda w: lambda model: model.strip().lower() == w)(wanted)
            out.append((matcher, entry["to"].strip(), entry["from"].strip()))
        return out

    def _dedupe_providers(self):
        seen = set()
        kept = []
        for p in self.providers:
            key = (p.type, p.name, p.base_url)
            if key in seen:
                self.warnings.append("provider %r (%s) is listed twice; the first entry wins" % (p.name, p.type))
                continue
            seen.add(key)
            kept.append(p)
        self.providers = kept

    @classmethod
    def from_text(cls, text, filename="<string>", environ=None):
        environ = os.environ if environ is None else environ
        raw, positions = yaml_load(text, filename)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError("%s: the top level must be a mapping of keys" % filename)
        validator = _Validator(positions, filename)
        data = validator.value(CONFIG_SCHEMA, raw, ())
        data["refresh-lead"] = {name: validator.lead(("refresh-lead", name), value)
                                for name, value in data["refresh-lead"].items()}
        _fold_legacy_auth(data)
        applied = apply_env_overrides(data, environ)
        return cls(data, filename, validator.warnings, applied, validator.where)

    @classmethod
    def load(cls, path, environ=None):
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError("cannot read config %s: %s" % (path, e.strerror or e))
        except UnicodeDecodeError:
            raise ConfigError("config %s is not UTF-8 text" % path)
        return cls.from_text(text, path, environ)

    @classmethod
    def defaults(cls, environ=None):
        return cls.from_text("", "<defaults>", environ)


def _fold_legacy_auth(data):
    """`auth.providers[type=config-api-key].api-keys` used to hold the client keys."""
    legacy = data.get("auth")
    if isinstance(legacy, dict) and not data["api-keys"]:
        for entry in legacy.get("providers") or []:
            if isinstance(entry, dict) and entry.get("type") == "config-api-key":
                data["api-keys"] = [str(k) for k in entry.get("api-keys") or [] if k]
                break


def normalize_origin(url):
    """`scheme://host:port` with the default port made explicit, for matching upstream-overrides."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme = (parts.scheme or "https").lower()
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if scheme in ("https", "wss") else 80)
    if ":" in host:
        host = "[%s]" % host
    return "%s://%s:%d" % (scheme, host, port)


def logs_dir(cfg):
    """Where log files go: `logs/` beside the auth dir."""
    return os.path.join(os.path.dirname(cfg.auth_dir.rstrip("/")) or ".", "logs")


def load_config_for_cli(cli_path=None, environ=None, create=True):
    """Find, create on first run, and load the config. Returns (Config, path, created)."""
    environ = os.environ if environ is None else environ
    path, is_default = find_config_path(cli_path, environ)
    created = False
    if not os.path.exists(path):
        if not is_default:
            raise ConfigError("config file not found: %s" % path)
        if create:
            write_file_atomic(path, DEFAULT_CONFIG_TEXT, 0o600)
            created = True
        else:
            cfg = Config.defaults(environ)
            return cfg, path, False
    cfg = Config.load(path, environ)
    return cfg, path, created


class ConfigFile:
    """config.yaml as the management API changes it. One writer at a time (a lock here, an flock on
    `<config>.lock` for other processes); the change is validated as a whole Config before a byte is written;
    the file is written atomically in its own mode with every untouched line kept (yaml_edit); and the digest of
    the gateway's own last write is remembered so the watcher does not reload what the gateway itself applied."""

    def __init__(self, path, environ=None):
        import threading
        self.path = path
        self.environ = environ
        self.lock = threading.Lock()
        self.own_digest = None

    def read(self):
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""
        except UnicodeDecodeError:
            raise ConfigError("config %s is not UTF-8 text" % self.path)

    def update(self, change):
        """Apply `change(data)` (it edits the file's data in place; may raise) and write the result. Returns the
        new Config; on any error nothing is written."""
        with self._locked():
            text = self.read()
            data = yaml_load(text, self.path)[0] or {}
            if not isinstance(data, dict):
                raise ConfigError("%s: the top level must be a mapping of keys" % self.path)
            want = json.loads(json.dumps(data))
            change(want)
            new_text = yaml_edit(text, want) if want != data else text
            cfg = Config.from_text(new_text, self.path, self.environ)
            if new_text != text:
                self._write(new_text)
            return cfg

    def replace(self, text):
        """Replace the whole file with `text` after validating it (PUT /config.yaml)."""
        cfg = Config.from_text(text, self.path, self.environ)
        with self._locked():
            self._write(text)
        return cfg

    def _write(self, text):
        try:
            mode = os.stat(self.path).st_mode & 0o777
        except OSError:
            mode = 0o600
        write_file_atomic(self.path, text, mode)
        self.own_digest = hashlib.sha256(text.encode("utf-8")).hexdigest()

    @contextlib.contextmanager
    def _locked(self):
        with self.lock:
            fd = None
            try:
                import fcntl
                fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except (ImportError, OSError):
                pass  # no flock here: the in-process lock still serialises this gateway's writers
            try:
                yield
            finally:
                if fd is not None:
                    os.close(fd)  # closing releases the flock


# === 4. HTTP server ===
# Owns: the byte channel shared with the HTTP client, HTTP/1.1 request parsing with its limits and smuggling
# defences, response writing (JSON, SSE, NDJSON, chunked), keep-alive, pipelining, TLS and graceful shutdown.
# It knows nothing about LLMs: it hands a Request to an app callable and writes what comes back.

class ChannelClosed(ConnectionError):
    """The peer closed the connection (or it broke) before the bytes we waited for arrived."""


class LimitExceeded(Exception):
    """More bytes than allowed arrived before the separator."""


class BadFraming(Exception):
    """Bytes that may not appear before the separator arrived (a bare LF in an HTTP head)."""


class Channel(asyncio.Protocol):
    """One TCP or TLS connection as a byte buffer with awaitable reads and flow-controlled writes.

    Both the server and the upstream client use it: owning the buffer lets a read carry its own deadline (one
    timer, no extra task) and lets the server tell an idle keep-alive connection from a slow, half-sent request.
    """

    HIGH_WATER = 1 << 20

    def __init__(self):
        self.buf = bytearray()
        self.transport = None
        self.eof = False
        self.error = None
        self._waiter = None
        self._read_paused = False
        self.write_paused = False
        self._drain_waiter = None
        self.on_lost = None
        self.on_made = None  # called once with the channel when the connection is made (the server starts it)
        self.on_data = None  # called as bytes arrive; unless it returns True, a waiting read is not woken
        self.lost = False
        self._corked = None  # writes waiting for the end of this loop iteration (write_soon)
        self._deadline = None  # the deadline of the read under way
        self._alarm = None  # the timer that enforces it (see _ring)

    # -- protocol callbacks ---------------------------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        made, self.on_made = self.on_made, None  # not kept: a channel holding a closure over itself is a cycle
        if made is not None:
            made(self)

    def data_received(self, data):
        self.buf += data
        push = self.on_data
        if push is not None and not push():  # the listener took what came: the reader need not wake
            return
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)
        elif len(self.buf) > self.HIGH_WATER and not self._read_paused:
            try:
                self.transport.pause_reading()
                self._read_paused = True
            except (AttributeError, RuntimeError):
                pass

    def eof_received(self):
        self.eof = True
        self._wake()
        # A client that closes its side while its request is being served has gone away (as nginx also
        # assumes): cancel the work now rather than at the next write, which may be far off in a quiet stream.
        cb = self.on_lost
        if cb is not None:
            self.on_lost = None
            cb()
        return True  # keep the write side open (an upstream may still be sending)

    def connection_lost(self, exc):
        self.eof = True
        self.lost = True
        self.error = exc
        self._wake()
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        d = self._drain_waiter
        if d is not None and not d.done():
            d.set_result(None)
        cb = self.on_lost
        if cb is not None:
            self.on_lost = None
            cb()

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        d = self._drain_waiter
        if d is not None and not d.done():
            d.set_result(None)

    def _wake(self):
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # -- reads --------------------------------------------------------------------------------------------------
    async def _wait(self, deadline):
        if self.eof:
            raise ChannelClosed("connection closed")
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        if deadline is not None:
            if deadline <= loop.time():
                raise asyncio.TimeoutError()
            alarm = self._alarm
            if alarm is None or alarm.when() > deadline:
                if alarm is not None:
                    alarm.cancel()
                self._alarm = loop.call_at(deadline, self._ring)
        self._deadline = deadline
        fut = self._waiter = loop.create_future()
        try:
            await fut
        finally:
            # Ours only: a stream that ended in the read callback has handed the connection to the pool, and its
            # next user may be waiting on it by the time this wait's task runs.
            if self._waiter is fut:
                self._waiter = None

    def _ring(self):
        """The read alarm: times out the read under way once its deadline has come, else is set again for it. A
        stream's reads each move the deadline on, and one timer serves them all (it is set again only when it
        rings) instead of a timer made and cancelled per read: 5,000 streams read 50,000 times a second."""
        self._alarm = None
        fut, deadline = self._waiter, self._deadline
        if fut is None or deadline is None or fut.done():
            return
        loop = fut.get_loop()
        if loop.time() >= deadline:
            self._waiter = None
            fut.set_exception(asyncio.TimeoutError())
        else:
            self._alarm = loop.call_at(deadline, self._ring)

    def extend(self, deadline):
        """Bytes taken while a read waits (by an `on_data` listener) move that read's deadline to `deadline()`."""
        if self._waiter is not None:
            self._deadline = deadline()

    def _consumed(self):
        if self._read_paused and len(self.buf) < self.HIGH_WATER // 2:
            self._read_paused = False
            self.transport.resume_reading()

    async def read_until(self, sep, limit, deadline=None, forbid=None):
        """Bytes up to and including `sep`; LimitExceeded if `limit` bytes arrive without it, BadFraming as soon as
        `forbid(buf, end)` finds fault with the bytes before it."""
        start = 0
        while True:
            k = self.buf.find(sep, start)
            if forbid is not None and forbid(self.buf, k if k >= 0 else len(self.buf)):
                raise BadFraming()
            if k >= 0:
                end = k + len(sep)
                if end > limit:
                    raise LimitExceeded()
                data = bytes(self.buf[:end])
                del self.buf[:end]
                self._consumed()
                return data
            if len(self.buf) > limit:
                raise LimitExceeded()
            start = max(0, len(self.buf) - len(sep) + 1)
            await self._wait(deadline)

    async def read_exactly(self, n, deadline=None):
        while len(self.buf) < n:
            await self._wait(deadline)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self._consumed()
        return data

    async def read_into(self, out, n, deadline=None):
        """Append exactly `n` bytes to the bytearray `out`, moving them out of this buffer as they arrive: a large
        body is copied once, straight to where it stays, and never piles up here whole."""
        while n:
            if not self.buf:
                await self._wait(deadline)
                continue
            if n >= len(self.buf):
                n -= len(self.buf)
                out += self.buf
                self.buf = bytearray()
            else:
                with memoryview(self.buf) as view:
                    out += view[:n]
                del self.buf[:n]
                n = 0
            self._consumed()

    async def read_some(self, max_bytes=1 << 16, deadline=None):
        """Whatever is buffered (up to max_bytes), waiting for at least one byte; b"" at end of stream."""
        if not self.buf:
            if self.eof:
                return b""
            try:
                await self._wait(deadline)
            except ChannelClosed:
                return b""
            if not self.buf:
                return b""
        return self.take(max_bytes)

    def take(self, max_bytes=None):
        """Up to `max_bytes` of what is buffered (all of it with None), without waiting."""
        buf = self.buf
        if not buf:
            return b""
        if max_bytes is None or max_bytes >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:max_bytes])
            del buf[:max_bytes]
        self._consumed()
        return data

    fill = _wait  # wait for more bytes to be buffered (TimeoutError past `deadline`, ChannelClosed at the end)

    async def wait_readable(self, deadline=None):
        """Wait until at least one byte is buffered. False on timeout or close."""
        while not self.buf:
            try:
                await self._wait(deadline)
            except (asyncio.TimeoutError, ChannelClosed):
                return False
        return True

    # -- writes -------------------------------------------------------------------------------------------------
    def write(self, data):
        if self._corked is not None:
            self._uncork()
        if not self.lost:
            self.transport.write(data)

    def write_soon(self, data):
        """Write `data` together with whatever else is written in this turn of the event loop: a stream's events
        decoded from one upstream read leave in one send instead of one each (a system call per event was most of
        a stream's cost). Nothing waits longer than the current loop iteration."""
        if self.lost:
            return
        if self._corked is None:
            self._corked = [data]
            asyncio.get_running_loop().call_soon(self._uncork)
        else:
            self._corked.append(data)

    def _uncork(self):
        corked, self._corked = self._corked, None
        if corked and not self.lost:
            self.transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    async def drain(self, deadline=None):
        if self.lost:
            raise ChannelClosed("connection lost")
        if self.write_paused:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._drain_waiter = fut
            timer = loop.call_at(deadline, _expire_future, fut) if deadline is not None else None
            try:
                await fut
            finally:
                self._drain_waiter = None
                if timer is not None:
                    timer.cancel()
            if self.lost:
                raise ChannelClosed("connection lost")

    async def write_all(self, data, deadline=None):
        """Write `data` in slices as the peer takes them (TimeoutError past `deadline`): the transport's buffer
        copies at most one slice of a large body, never the whole of it."""
        if len(data) <= self.HIGH_WATER:
            self.write(data)
            return
        view = memoryview(data)
        for i in range(0, len(view), self.HIGH_WATER):
            self.write(view[i:i + self.HIGH_WATER])
            await self.drain(deadline)

    def close(self):
        if self._corked is not None:
            self._uncork()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self):
        if self.transport is not None:
            self.transport.abort()


def _expire_future(fut):
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


class HttpError(Exception):
    """An HTTP-level failure the server answers itself (bad framing, limits). `close` ends the connection."""

    def __init__(self, status, message, close=True):
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


HTTP_REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently", 304: "Not Modified",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type", 422: "Unprocessable Content",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 499: "Client Closed Request",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 417: "Expectation Failed", 505: "HTTP Version Not Supported", 529: "Overloaded",
}

_TOKEN_CHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # a method or header field name (RFC 9110 §5.6.2)
_TOKEN = re.compile(_TOKEN_CHARS + rb"\Z")
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]*\Z")
_BAD_VALUE_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REQUEST_LINE = re.compile(rb"(%s) (\S+) HTTP/(\d)\.(\d)\Z" % _TOKEN_CHARS)
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_FIELDS = 100


class Headers:
    """Ordered header pairs with case-insensitive lookup. Names are kept lower-case."""

    __slots__ = ("items", "_map")

    def __init__(self, items=()):
        self.items = list(items)
        self._map = None

    def _index(self):
        m = {}
        for k, v in self.items:
            if k in m:
                m[k] = m[k] + ", " + v
            else:
                m[k] = v
        self._map = m
        return m

    def get(self, name, default=None):
        m = self._map if self._map is not None else self._index()
        return m.get(name.lower(), default)

    def get_all(self, name):
        name = name.lower()
        return [v for k, v in self.items if k == name]

    def __contains__(self, name):
        m = self._map if self._map is not None else self._index()
        return name.lower() in m

    def __iter__(self):
        return iter(self.items)


EMPTY_HEADERS = Headers()


class Request:
    """One parsed client request. The body is fully read (bounded by max-request-size) before the app runs."""

    __slots__ = ("method", "target", "path", "query_string", "version", "headers", "body", "peer", "keep_alive",
                 "_query", "json_source", "received_at", "secure", "principal", "authenticated")

    def __init__(self, method, target, version, headers, peer):
        self.method = method
        self.target = target
        self.principal = ""  # who the app authenticated the request as (a client key's name)
        self.authenticated = None  # the configuration the app authenticated it against (its keys), once it has
        path, _, qs = target.partition("?")
        self.path = urllib.parse.unquote(path) if "%" in path else path
        self.query_string = qs
        self.version = version
        self.headers = headers
        self.body = b""
        self.peer = peer
        self.keep_alive = True
        self._query = None
        self.json_source = None  # the body's JsonSource once the app read it as JSON
        self.received_at = time.monotonic()
        self.secure = False

    @property
    def query(self):
        if self._query is None:
            self._query = dict(urllib.parse.parse_qsl(self.query_string, keep_blank_values=True))
        return self._query


class Response:
    """A complete response body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status=200, body=b"", headers=None, content_type="application/json"):
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []
        if content_type and body is not None:
            self.headers.append(("Content-Type", content_type))


class StreamResponse:
    """A response whose body is written (and flushed) piece by piece as its `source` has them. A source has
    `take()` (the bytes ready now, b"" when none; it never waits), `ended` (nothing more will come), `async wait()`
    (until more may be ready) and `async close()` (the rest is not wanted; called once, however the body ends), and
    may have `listen(callback)`: the callback is then called from the event loop as the source's input arrives, so
    what is ready is written without waking the response's task (thousands of streams each deliver a chunk ten
    times a second), and its True return wakes the task's `wait`. An async iterable of pieces is taken as a source
    too (IterSource). `filters` are applied to each piece in turn (Amp's model names, the request log's copy);
    `after` hooks run once the body is over."""

    __slots__ = ("status", "headers", "source", "filters", "after")

    def __init__(self, body, status=200, headers=None, content_type="text/event-stream"):
        self.status = status
        self.source = body if hasattr(body, "take") else IterSource(body)
        self.headers = headers if headers is not None else []
        self.filters, self.after = [], []
        if content_type:
            self.headers.append(("Content-Type", content_type))
            if content_type == "text/event-stream":
                self.headers.append(("Cache-Control", "no-cache"))

    async def pieces(self):
        """The body's pieces, filtered, for a reader other than the HTTP server (a WebSocket relays them)."""
        src = self.source
        try:
            while True:
                piece = src.take()
                if piece:
                    for f in self.filters:
                        piece = f(piece)
                    yield piece
                if src.ended:
                    return
                await src.wait()
        finally:
            await self.close()

    async def close(self):
        """Close the source and run the `after` hooks, once."""
        after, self.after = self.after, []
        try:
            await self.source.close()
        finally:
            for hook in after:
                try:
                    hook()
                except Exception:
                    log.exception("a stream's after hook failed")


class IterSource:
    """An async iterable of pieces as a StreamResponse source: `wait` runs it to its next piece."""

    __slots__ = ("pieces", "ready", "ended")

    def __init__(self, pieces):
        self.pieces, self.ready, self.ended = pieces.__aiter__(), None, False

    def take(self):
        piece, self.ready = self.ready, None
        return piece or b""

    async def wait(self):
        try:
            self.ready = await self.pieces.__anext__()
        except StopAsyncIteration:
            self.ended = True

    async def close(self):
        aclose = getattr(self.pieces, "aclose", None)
        if aclose is not None:
            await aclose()


WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
WS_CLOSE_CODES_OK = set(range(1000, 1004)) | set(range(1007, 1012)) | set(range(3000, 5000))


class WebSocketClosed(Exception):
    """The WebSocket is closed: by the peer (its code and reason), by us, or because the connection broke (1006)."""

    def __init__(self, code=1006, reason=""):
        super().__init__("websocket closed (%d%s)" % (code, ": " + reason if reason else ""))
        self.code, self.reason = code, reason


class WebSocketResponse:
    """What an app returns to accept a WebSocket upgrade: the server answers 101 and then runs `handler(ws)` on
    the connection; when the handler returns, the socket is closed (1000) if it is not already."""

    __slots__ = ("status", "headers", "handler")

    def __init__(self, req, handler, protocol=None):
        key = websocket_key(req)
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest()).decode("ascii")
        self.status = 101
        self.headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)]
        if protocol:
            self.headers.append(("Sec-WebSocket-Protocol", protocol))
        self.handler = handler


def is_websocket_request(req):
    return "websocket" in req.headers.get("upgrade", "").lower()


def websocket_key(req):
    """The client's Sec-WebSocket-Key after checking the upgrade request (RFC 6455 §4.2.1); HttpError otherwise."""
    h = req.headers
    if req.method != "GET" or req.version < (1, 1):
        raise HttpError(400, "a WebSocket upgrade is a GET over HTTP/1.1", close=False)
    if "upgrade" not in [t.strip().lower() for t in h.get("connection", "").split(",")]:
        raise HttpError(400, "a WebSocket upgrade needs 'Connection: Upgrade'", close=False)
    if h.get("sec-websocket-version", "").strip() != "13":
        raise HttpError(426, "WebSocket version 13 required", close=False)
    key = h.get("sec-websocket-key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HttpError(400, "bad Sec-WebSocket-Key", close=False)
    return key


class WebSocket:
    """The server side of one WebSocket connection (RFC 6455) on a Channel: frames read and checked (client
    masking, reserved bits, opcodes, control-frame rules, fragmentation, UTF-8 of text, close codes), messages
    bounded by `max_message` (1009 past it), pings answered, a ping sent every `ping_interval` and the
    connection closed when nothing has arrived for `idle_timeout`. Every send waits for the transport to drain,
    so a slow reader slows the sender instead of growing a buffer."""

    def __init__(self, ch, max_message=16 << 20, ping_interval=30.0, idle_timeout=60.0):
        self.ch = ch
        self.max_message = max_message
        self.ping_interval, self.idle_timeout = ping_interval, idle_timeout
        self.closed = None  # WebSocketClosed once closed
        self.close_sent = False
        self.send_lock = asyncio.Lock()
        self.last_seen = time.monotonic()
        self.pinger = None

    def start_pings(self):
        if self.ping_interval and self.pinger is None:
            self.pinger = asyncio.ensure_future(self._ping_loop())

    async def _ping_loop(self):
        try:
            while self.closed is None:
                await asyncio.sleep(self.ping_interval)
                if time.monotonic() - self.last_seen > self.idle_timeout:
                    await self.close(1001, "no answer to pings")
                    self.ch.abort()
                    return
                await self._send_frame(0x9, b"ping")
        except (WebSocketClosed, ChannelClosed, ConnectionError):
            pass

    # -- reading ------------------------------------------------------------------------------------------------
    async def _frame(self, used=0):
        """One frame: (fin, opcode, unmasked payload). `used` bytes of the message are already in: a data frame
        that would take it past max_message is refused from its header, before its payload is read."""
        ch = self.ch
        b0, b1 = await ch.read_exactly(2)
        fin, opcode, masked, length = b0 & 0x80, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
        if b0 & 0x70:
            raise WebSocketClosed(1002, "reserved bits set without an extension")
        if not masked:
            raise WebSocketClosed(1002, "client frames must be masked")
        if opcode >= 0x8 and (not fin or length > 125):
            raise WebSocketClosed(1002, "control frames must be whole and at most 125 bytes")
        if opcode not in (0x0, 0x1, 0x2, 0x8, 0x9, 0xA):
            raise WebSocketClosed(1002, "unknown opcode %d" % opcode)
        if length == 126:
            length = struct.unpack("!H", await ch.read_exactly(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await ch.read_exactly(8))[0]
            if length >> 63:
                raise WebSocketClosed(1002, "bad frame length")
        if length > self.max_message - (used if opcode < 0x8 else 0):
            raise WebSocketClosed(1009, "message larger than %d bytes" % self.max_message)
        mask = await ch.read_exactly(4)
        data = await ch.read_exactly(length) if length else b""
        if length:
            rep = (mask * (length // 4 + 1))[:length]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(rep, "big")).to_bytes(length, "big")
        self.last_seen = time.monotonic()
        return bool(fin), opcode, data

    async def receive(self):
        """The next message: str for text, bytes for binary. WebSocketClosed when the socket closes (a protocol
        error by the peer is answered with the right close code first)."""
        if self.closed is not None:
            raise self.closed
        parts, size, kind, decoder = [], 0, None, None
        try:
            while True:
                fin, opcode, data = await self._frame(size)
                if opcode == 0x8:
                    await self._peer_closed(data)
                elif opcode == 0x9:
                    await self._send_frame(0xA, data)
                    continue
                elif opcode == 0xA:
                    continue
                if opcode == 0x0:
                    if kind is None:
                        raise WebSocketClosed(1002, "continuation frame without a message")
                elif kind is not None:
                    raise WebSocketClosed(1002, "a new message began inside a fragmented one")
                else:
                    kind = opcode
                    if kind == 0x1:
                        import codecs
                        decoder = codecs.getincrementaldecoder("utf-8")()
                size += len(data)
                if size > self.max_message:
                    raise WebSocketClosed(1009, "message larger than %d bytes" % self.max_message)
                if decoder is not None:
                    try:
                        parts.append(decoder.decode(data, final=bool(fin)))
                    except UnicodeDecodeError:
                        raise WebSocketClosed(1007, "text message is not valid UTF-8")
                else:
                    parts.append(data)
                if fin:
                    return "".join(parts) if kind == 0x1 else b"".join(parts)
        except WebSocketClosed as e:
            if e.code != 1006 and not self.close_sent:
                with contextlib.suppress(Exception):
                    await self._send_close(e.code, e.reason)
            self._finish(e)
            raise
        except (ChannelClosed, ConnectionError):
            self._finish(WebSocketClosed(1006, "connection lost"))
            raise self.closed

    async def _peer_closed(self, data):
        if len(data) == 1:
            raise WebSocketClosed(1002, "close frame with a one-byte body")
        code, reason = 1005, ""
        if data:
            code = struct.unpack("!H", data[:2])[0]
            if code not in WS_CLOSE_CODES_OK:
                raise WebSocketClosed(1002, "invalid close code %d" % code)
            try:
                reason = data[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise WebSocketClosed(1007, "close reason is not valid UTF-8")
        if not self.close_sent:
            with contextlib.suppress(Exception):
                await self._send_close(code if code != 1005 else 1000, "")
        closed = WebSocketClosed(code, reason)
        self._finish(closed)
        raise closed

    def _finish(self, closed):
        if self.closed is None:
            self.closed = closed
        if self.pinger is not None:
            self.pinger.cancel()
        self.ch.close()

    # -- writing ------------------------------------------------------------------------------------------------
    async def _send_frame(self, opcode, data):
        n = len(data)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        async with self.send_lock:
            if self.ch.lost:
                raise WebSocketClosed(1006, "connection lost")
            self.ch.write(head + data)
            await self.ch.drain()

    async def send(self, message):
        """Send a text (str) or binary (bytes) message."""
        if self.closed is not None or self.close_sent:
            raise self.closed or WebSocketClosed(1000, "closing")
        if isinstance(message, str):
            await self._send_frame(0x1, message.encode("utf-8"))
        else:
            await self._send_frame(0x2, bytes(message))

    async def send_json(self, obj):
        await self.send(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))

    async def _send_close(self, code, reason):
        self.close_sent = True
        await self._send_frame(0x8, struct.pack("!H", code) + reason.encode("utf-8")[:123])

    async def close(self, code=1000, reason=""):
        """Send a close frame (once) and wait briefly for the peer's, then end the connection."""
        if self.closed is not None:
            return
        try:
            if not self.close_sent:
                await self._send_close(code, reason)
            deadline = asyncio.get_running_loop().time() + 2.0
            while True:  # the peer's close frame, skipping what it sent before it
                b0_b1 = await self.ch.read_exactly(2, deadline)
                length = b0_b1[1] & 0x7F
                if length == 126:
                    length = struct.unpack("!H", await self.ch.read_exactly(2, deadline))[0]
                elif length == 127:
                    length = struct.unpack("!Q", await self.ch.read_exactly(8, deadline))[0]
                await self.ch.read_exactly(4 + length if b0_b1[1] & 0x80 else length, deadline)
                if b0_b1[0] & 0x0F == 0x8:
                    break
        except (asyncio.TimeoutError, ChannelClosed, ConnectionError, WebSocketClosed, struct.error):
            pass
        self._finish(WebSocketClosed(code, reason))


def plain_error(status, message, path=None):
    """The HTTP server's own error page; an app passes its API-shaped one instead."""
    return Response(status, (message + "\n").encode("utf-8"), None, "text/plain; charset=utf-8")


def json_response(obj, status=200, headers=None):
    return Response(status, json_bytes(obj), headers)


def parse_request_head(head, peer):
    """Parse the request line and header block (without the final blank line) into a Request.
    Raises HttpError for anything a strict HTTP/1.1 server must refuse."""
    line_end = head.find(b"\r\n")
    request_line = head if line_end < 0 else head[:line_end]
    if len(request_line) > MAX_REQUEST_LINE:
        raise HttpError(414, "request line too long")
    m = _REQUEST_LINE.match(request_line)
    if m is None:
        raise HttpError(400, "malformed request line")
    method = m.group(1).decode("ascii")
    target = m.group(2)
    major, minor = int(m.group(3)), int(m.group(4))
    if major != 1:
        raise HttpError(505, "only HTTP/1.x is supported")
    if not _VISIBLE_ASCII.match(target):  # visible ASCII only (RFC 3986; others are percent-encoded)
        raise HttpError(400, "invalid request target")
    target = target.decode("latin-1")
    if not (target.startswith("/") or target == "*" or target.startswith(("http://", "https://"))):
        raise HttpError(400, "invalid request target")
    if target.startswith(("http://", "https://")):
        try:
            parts = urllib.parse.urlsplit(target)
        except ValueError:  # "Invalid IPv6 URL" and the like
            raise HttpError(400, "invalid request target")
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    items = []
    if line_end >= 0:
        block = head[line_end + 2:]
        if len(block) > MAX_HEADER_BYTES:
            raise HttpError(431, "request headers too large")
        if block.count(b"\r\n") >= MAX_HEADER_FIELDS:
            raise HttpError(431, "too many header fields")
        if block:
            if not _HEADER_SECTION.match(block):
                raise header_section_fault(block)
            lines = block.decode("latin-1").split("\r\n")
            items = [(name.lower(), value.strip(" \t")) for name, _, value in [line.partition(":") for line in lines]]
    req = Request(method, target, (major, minor), Headers(items), peer)
    conn = (req.headers.get("connection") or "").lower()
    if (major, minor) >= (1, 1):
        req.keep_alive = "close" not in conn
        hosts = req.headers.get_all("host")
        if len(hosts) != 1:
            raise HttpError(400, "HTTP/1.1 requests need exactly one Host header")
    else:
        req.keep_alive = "keep-alive" in conn
    return req


# A request's header section is checked in one pass (each line a field name, a colon and a value of visible
# characters, spaces and tabs: RFC 9110 §5.1, §5.5), then split into fields: checking each line with its own
# patterns cost an SDK's sixteen-field head 12 µs. Only a section that fails is looked at line by line, to say why.
_FIELD_LINE = _TOKEN_CHARS + rb":[\t\x20-\x7e\x80-\xff]*"  # the bytes _BAD_VALUE_BYTES does not name
_HEADER_SECTION = re.compile(rb"%s(?:\r\n%s)*\Z" % (_FIELD_LINE, _FIELD_LINE))


def header_section_fault(block):
    """The HttpError for a header section that _HEADER_SECTION refused: its first faulty line's fault."""
    for raw in block.split(b"\r\n"):
        if not raw:
            return HttpError(400, "empty header line")
        if raw[0] in (0x20, 0x09):
            return HttpError(400, "obsolete line folding is not allowed")
        colon = raw.find(b":")
        if colon <= 0:
            return HttpError(400, "malformed header line")
        if not _TOKEN.match(raw[:colon]):
            return HttpError(400, "invalid header name")
        if _BAD_VALUE_BYTES.search(raw[colon + 1:]):
            return HttpError(400, "invalid character in header value")
    return HttpError(400, "malformed header section")


def body_framing(req):
    """('length', n) | ('chunked', None) for the request body, refusing ambiguous framing (smuggling)."""
    te = req.headers.get_all("transfer-encoding")
    cl = req.headers.get_all("content-length")
    if te:
        if cl:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        # Only SP and HTAB are optional whitespace (RFC 9110 §5.6.3): str.strip() would also remove \xa0 and \x85
        # and turn "\xa0chunked" into "chunked" where other servers see something else (request smuggling).
        codings = [c.strip(" \t").lower() for v in te for c in v.split(",")]
        if req.version < (1, 1):
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if codings != ["chunked"]:
            raise HttpError(400, "unsupported transfer coding")
        return "chunked", None
    if cl:
        values = set(v.strip(" \t") for item in cl for v in item.split(","))
        if len(values) != 1:
            raise HttpError(400, "conflicting Content-Length values")
        value = values.pop()
        if not _DIGITS.match(value) or len(value) > 18:  # ASCII digits only: "²".isdigit() is True
            raise HttpError(400, "invalid Content-Length")
        return "length", int(value)
    return "length", 0


# Leading zeros are fine (RFC 9112 §7.1: 1*HEXDIG); whitespace before an extension is not (h11 and others refuse
# it, and a parser pair that disagrees on where a chunk starts is how requests are smuggled).
_CHUNK_SIZE = re.compile(rb"0*([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?\Z")
_HEX_DIGITS = b"0123456789ABCDEFabcdef"
_DIGITS = re.compile(r"[0-9]+\Z")
# Framing refused as soon as it is seen, not after a timeout: Channel.read_until's `forbid(buf, end)` checks.


def not_http(buf, end):
    """An answer whose first five bytes are not "HTTP/"."""
    return end >= 5 and not buf.startswith(b"HTTP/")


def bare_lf(buf, end):
    """HTTP/1.1 lines end in CRLF: a lone LF in buf[:end] (counted: a regular expression with a look-behind costs a
    request ten times as much)."""
    return buf.count(b"\n", 0, end) != buf.count(b"\r\n", 0, end)


_METHOD_START = re.compile(rb"(?:\r\n)*[^\r\n!#$%&'*+\-.^_`|~0-9A-Za-z]")


def bad_request_head(buf, end):
    """A request head with a bare LF, or whose first byte (after the empty lines a server ignores) cannot begin a
    method."""
    return bare_lf(buf, end) or _METHOD_START.match(buf, 0, end) is not None


async def read_chunked(ch, limit, deadline_fn, header_limit=MAX_HEADER_BYTES):
    """Decode a chunked body into one bytearray. Refuses malformed sizes (400) and bodies over `limit` (413)."""
    body = bytearray()
    total = 0
    while True:
        try:
            line = await ch.read_until(b"\r\n", 4096, deadline_fn(), bare_lf)
        except LimitExceeded:
            raise HttpError(400, "chunk size line too long")
        except BadFraming:
            raise HttpError(400, "chunk lines must end in CRLF")
        m = _CHUNK_SIZE.match(line[:-2])
        if m is None:
            raise HttpError(400, "malformed chunk size")
        size = int(m.group(1), 16)
        if size == 0:
            # Trailer section: read and discard fields up to the blank line.
            seen = 0
            while True:
                try:
                    t = await ch.read_until(b"\r\n", header_limit, deadline_fn())
                except LimitExceeded:
                    raise HttpError(431, "trailer section too large")
                seen += len(t)
                if seen > header_limit:
                    raise HttpError(431, "trailer section too large")
                if t == b"\r\n":
                    return body
                if t[:1] in (b" ", b"\t") or b":" not in t or _BAD_VALUE_BYTES.search(t[:-2]):
                    raise HttpError(400, "malformed trailer")
        total += size
        if total > limit:
            raise HttpError(413, "request body too large")
        await ch.read_into(body, size, deadline_fn())
        if await ch.read_exactly(2, deadline_fn()) != b"\r\n":
            raise HttpError(400, "chunk data not followed by CRLF")


def parse_multipart(body, content_type):
    """A multipart/form-data body as [(field name, file name or None, content type, bytes)]; ValueError when it is
    not one (no boundary, no closing delimiter, a part without Content-Disposition)."""
    m = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type or "", re.I)
    if not m:
        raise ValueError("no boundary in Content-Type")
    delimiter = b"--" + (m.group(1) or m.group(2)).encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise ValueError("no closing boundary")
    parts = []
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise ValueError("a part is not framed by CRLF")
        head, sep, data = chunk[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part has no header block")
        headers = {}
        for line in head.split(b"\r\n"):
            name, _, value = line.decode("utf-8", "replace").partition(":")
            headers[name.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        field = re.search(r'(?:^|;)\s*name="([^"]*)"', disposition)
        if not disposition.lower().startswith("form-data") or not field:
            raise ValueError("a part has no Content-Disposition: form-data; name=...")
        filename = re.search(r'(?:^|;)\s*filename="([^"]*)"', disposition)
        parts.append((field.group(1), filename.group(1) if filename else None,
                      headers.get("content-type", "application/octet-stream"), data))
    return parts


class ServerLimits:
    """The knobs the HTTP server reads per connection, taken from the config snapshot of the moment."""

    __slots__ = ("max_body", "header_timeout", "keepalive_timeout", "body_timeout", "cors", "cors_origins",
                 "max_connections", "max_buffered")

    def __init__(self, cfg):
        self.max_body = cfg.max_request_size if cfg.max_request_size > 0 else 52428800
        self.max_connections = max(1, cfg.server["max-connections"])
        self.max_buffered = max(self.max_body, cfg.server["max-buffered-body"])
        self.header_timeout = float(cfg.server["header-timeout"])
        self.keepalive_timeout = float(cfg.server["keepalive-timeout"])
        self.body_timeout = max(60.0, self.header_timeout)
        self.cors = cfg.cors["enable"]
        self.cors_origins = cfg.cors["allow-origins"]


class HttpServer:
    """Serves an `app(request) -> Response | StreamResponse` coroutine over HTTP/1.1 (optionally TLS)."""

    TRIM_AFTER = 4 << 20  # request bodies at least this large give their memory back to the OS when done

    def __init__(self, app, limits_fn, access_log=True, error_page=None):
        self.app = app
        self.limits_fn = limits_fn
        self.error_page = error_page or plain_error  # (status, message, path or None) -> Response
        self.access_log = access_log
        self.servers = []
        self.connections = set()
        self.busy = set()
        self.idle = set()
        self.websockets = set()
        self.websocket_options = {}  # WebSocket(max_message=, ping_interval=, idle_timeout=)
        self.draining = False
        # async (request) -> Response or None, run on the head before any body byte is read: the app refuses an
        # unauthenticated request there, so a stranger cannot make the server hold a large body
        self.head_check = None
        self.buffered = 0  # body bytes being held by requests in flight (bounded by max-buffered-body)
        self.refused_at = 0.0

    async def listen(self, host, port, ssl_context=None, sock=None, reuse_port=False):
        """Listen on host:port, or on an already bound socket `sock` (a worker inherits its parent's)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(self._make_channel, sock=sock, ssl=ssl_context, backlog=1024)
        else:
            server = await loop.create_server(self._make_channel, host, port, ssl=ssl_context, reuse_address=True,
                                              reuse_port=reuse_port or None, backlog=1024)
        self.servers.append(server)
        return server

    def _make_channel(self):
        ch = Channel()
        ch.on_made = self._start
        return ch

    def _start(self, ch):
        limits = self.limits_fn()
        if len(self.connections) >= limits.max_connections:
            now = time.monotonic()
            if now - self.refused_at > 10:  # once per burst, not once per connection
                log.warning("%d connections open (server.max-connections): refusing new ones with 503",
                            len(self.connections))
            self.refused_at = now
            resp = self.error_page(503, "too many connections; retry shortly", None)
            ch.write(self._head(503, resp.headers + [("Retry-After", "1")], False,
                                "Content-Length: %d\r\n" % len(resp.body or b"")) + (resp.body or b""))
            ch.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(ch))
        self.connections.add(task)
        task.add_done_callback(self.connections.discard)

    async def _serve(self, ch):
        loop = asyncio.get_running_loop()
        transport = ch.transport
        peername = transport.get_extra_info("peername")
        peer = peername[0] if isinstance(peername, tuple) else "unix"
        secure = transport.get_extra_info("sslcontext") is not None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        try:
            while not self.draining:
                limits = self.limits_fn()
                head = await self._next_head(ch, limits, loop)
                if head is None:
                    break
                req, reserved = await self._read_request(ch, head, peer, secure, limits, loop)
                if req is None:
                    break
                try:
                    keep = await self._dispatch(ch, req, limits)
                finally:
                    req = None  # the request goes (with the body it keeps: see App.read_json) before any trim
                    self.buffered -= reserved
                    if reserved >= self.TRIM_AFTER and not self.buffered:
                        # The last large body in flight is done: give its memory back. Garbage goes first: with
                        # tune_collector's thresholds it can wait long, pinning the freed pages below it (a full
                        # pass: ~1 ms on a quiet gateway, ~100 ms beside 5,000 streams; bodies of 4 MB are rare).
                        gc.collect()
                        trim_heap()
                if not keep:
                    break
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug must cost one connection, never the server
            log.exception("connection handler failed")
        finally:
            ch.close()

    async def _next_head(self, ch, limits, loop):
        """The next request's head, or None when the connection is to end: an idle keep-alive connection timed
        out or closed, or a malformed, oversize or late head (already answered)."""
        if not ch.buf:  # idle keep-alive: wait for the first byte quietly; then the whole head must arrive in time
            me = asyncio.current_task()
            self.idle.add(me)
            try:
                readable = await ch.wait_readable(loop.time() + limits.keepalive_timeout)
            finally:
                self.idle.discard(me)
            if not readable:
                return None
        if self.draining:
            return None
        try:
            return await ch.read_until(b"\r\n\r\n", MAX_REQUEST_LINE + MAX_HEADER_BYTES + 4,
                                       loop.time() + limits.header_timeout, bad_request_head)
        except BadFraming:
            self._write_error(ch, HttpError(400, "malformed request: lines must end in CRLF, not a bare LF, and a "
                                                 "request begins with its method"))
        except LimitExceeded:
            status = 414 if b"\r\n" not in bytes(ch.buf[:MAX_REQUEST_LINE + 2]) else 431
            self._write_error(ch, HttpError(status, HTTP_REASONS[status].lower()))
        except asyncio.TimeoutError:
            self._write_error(ch, HttpError(408, "request headers not received in time"))
        except ChannelClosed:
            pass
        return None

    async def _read_request(self, ch, head, peer, secure, limits, loop):
        """(request with its body read, body bytes counted against max-buffered-body), or (None, 0) when the
        connection is to end: refused on its head, a framing or size error, a late body (each already answered)."""
        req = None
        reserved = 0
        try:
            req = parse_request_head(head[:-4], peer)
            req.secure = secure
            body_deadline = loop.time() + limits.body_timeout
            kind, length = body_framing(req)
            if kind == "length" and length > limits.max_body:
                raise HttpError(413, "request body too large (limit %d bytes)" % limits.max_body)
            if self.head_check is not None and (kind == "chunked" or length):
                early = await self.head_check(req)
                if early is not None:  # refused on its head: the body is never read
                    self._write_refusal(ch, req, early)
                    await self._linger(ch)
                    return None, 0
            if kind == "length" and length:
                if self.buffered + length > limits.max_buffered:
                    raise HttpError(503, "too many request bodies in flight (server.max-buffered-body); retry "
                                         "shortly")
                reserved = length
                self.buffered += length
            expect = req.headers.get("expect")
            if expect is not None:
                if expect.lower() != "100-continue":
                    raise HttpError(417, "unsupported Expect header")
                if req.version >= (1, 1) and (kind == "chunked" or length > 0) and not ch.buf:
                    ch.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if kind == "chunked":
                # its size is known only once read: bounded by max-request-size while it arrives, then
                # counted against max-buffered-body like any other body while the request runs
                req.body = await read_chunked(ch, limits.max_body, lambda: body_deadline)
                if self.buffered + len(req.body) > limits.max_buffered:
                    raise HttpError(503, "too many request bodies in flight (server.max-buffered-body); retry "
                                         "shortly")
                reserved = len(req.body)
                self.buffered += reserved
            elif length:
                req.body = bytearray()
                await ch.read_into(req.body, length, body_deadline)
            return req, reserved
        except HttpError as e:
            self.buffered -= reserved
            self._write_error(ch, e, req and req.path)
            await self._linger(ch)
        except asyncio.TimeoutError:
            self.buffered -= reserved
            self._write_error(ch, HttpError(408, "request body not received in time"), req.path)
        except ChannelClosed:
            self.buffered -= reserved
        except BaseException:
            self.buffered -= reserved
            raise
        return None, 0

    async def _dispatch(self, ch, req, limits):
        """Run the app for one request and write its response. Returns whether to keep the connection."""
        task = asyncio.current_task()
        self.busy.add(task)
        # A client that disconnects mid-response cancels the work (and with it any upstream request).
        ch.on_lost = task.cancel
        status = 500
        sent = 0
        try:
            if req.method == "OPTIONS":
                resp = self._options(req, limits)
            else:
                try:
                    resp = await self.app(req)
                except asyncio.CancelledError:
                    raise
                except HttpError as e:
                    resp = self.error_page(e.status, e.message, req.path)
                except Exception:
                    log.exception("unhandled error serving %s %s", req.method, req.path)
                    resp = self.error_page(500, "internal server error", req.path)
            status = resp.status
            keep = req.keep_alive and not self.draining
            if isinstance(resp, WebSocketResponse):
                await self._run_websocket(ch, req, resp)
                return False
            if limits.cors:
                self._cors_headers(req, limits, resp.headers)
            if isinstance(resp, StreamResponse):
                sent = await self._write_stream(ch, req, resp, keep)
                keep = keep and req.version >= (1, 1)
            else:
                sent = self._write_full(ch, req, resp, keep)
                await ch.drain()
            return keep
        except (asyncio.CancelledError, ChannelClosed):
            status = 499
            return False
        finally:
            ch.on_lost = None
            self.busy.discard(task)
            if self.access_log:
                log.info('%s %s %d %dB %.1fms %s', req.method, redact_url(req.target), status, sent,
                         (time.monotonic() - req.received_at) * 1000, req.peer, extra=AFTER_TURN)

    async def _run_websocket(self, ch, req, resp):
        # The socket notices a lost connection itself (a read ends with 1006) and ends its turn in order, so the
        # handler is not cancelled from under a relayed stream.
        ch.on_lost = None
        ch.write(self._head(101, resp.headers, True, ""))
        ws = WebSocket(ch, **self.websocket_options)
        self.websockets.add(ws)
        try:
            ws.start_pings()
            await resp.handler(ws)
            await ws.close(1000)
        except WebSocketClosed:
            pass
        except Exception:
            log.exception("websocket handler for %s failed", req.path)
            with contextlib.suppress(Exception):
                await ws.close(1011, "internal error")
        finally:
            self.websockets.discard(ws)
            if ws.pinger is not None:
                ws.pinger.cancel()

    def _head(self, status, headers, keep, extra):
        lines = ["HTTP/1.1 %d %s\r\n" % (status, HTTP_REASONS.get(status, "Status"))]
        for k, v in headers:
            lines.append("%s: %s\r\n" % (k, v))
        lines.append(extra)
        if not keep:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _write_full(self, ch, req, resp, keep):
        body = resp.body or b""
        no_body = req.method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        extra = "" if resp.status in (204, 304) else "Content-Length: %d\r\n" % len(body)
        head = self._head(resp.status, resp.headers, keep, extra)
        if no_body or len(body) > 65536:  # a large body is written after its head, not copied onto it
            ch.write(head)
            if not no_body:
                ch.write(body)
        else:
            ch.write(head + body)
        return 0 if no_body else len(body)

    async def _write_stream(self, ch, req, resp, keep):
        chunked = req.version >= (1, 1)
        extra = "Transfer-Encoding: chunked\r\n" if chunked else ""
        ch.write_soon(self._head(resp.status, resp.headers, keep and chunked, extra))
        src, filters = resp.source, resp.filters
        listen = getattr(src, "listen", None)
        sent = 0
        broken = []  # what the pump raised when the event loop called it, for the task to raise

        def pump(write):
            """Write what the source has ready; True when the task must act (the end, a paused or lost client)."""
            nonlocal sent
            piece = src.take()
            if piece:
                for f in filters:
                    piece = f(piece)
                write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            return src.ended or ch.write_paused or ch.lost

        def pushed():
            """The pump, called by the source as its input arrives: that input is written without a task wake, at
            once (the read callback is the piece's only writer in this loop turn; corking it would cost a callback)."""
            if broken or ch.write_paused or ch.lost:
                return True
            try:
                return pump(ch.write)
            except BaseException as e:
                broken.append(e)
                return True

        try:
            if req.method == "HEAD":
                ch.write(b"0\r\n\r\n" if chunked else b"")
                return 0
            if listen is not None:
                listen(pushed)
            while True:
                if broken:
                    raise broken[0]
                if pump(ch.write_soon):  # with the head, or with what else this loop turn writes
                    if src.ended:
                        break
                    await ch.drain()  # the client is paused (or gone: ChannelClosed)
                else:
                    await src.wait()
            if chunked:
                ch.write_soon(b"0\r\n\r\n")
            await ch.drain()
        finally:
            if listen is not None:
                listen(None)
            try:
                await resp.close()
            except Exception:
                log.exception("closing a stream failed")
        return sent

    def _write_refusal(self, ch, req, resp):
        body = resp.body or b""
        ch.write(self._head(resp.status, resp.headers, False, "Content-Length: %d\r\n" % len(body)) + body)
        if self.access_log:
            log.info("%s %s %d (refused before its body) %s", req.method, redact_url(req.target), resp.status,
                     req.peer, extra=AFTER_TURN)

    LINGER_SECONDS = 5.0  # after refusing a request whose body is still arriving
    LINGER_BYTES = 64 << 20

    async def _linger(self, ch):
        """A lingering close, as nginx does: the error is sent and our side shut for writing, then what the client
        is still sending is read and discarded for a bounded time and size, so a client that writes its whole
        body before reading (urllib, curl without Expect) sees the 413 instead of a reset."""
        try:
            await ch.drain()
            if ch.transport.can_write_eof():
                ch.transport.write_eof()
            loop = asyncio.get_running_loop()
            deadline, discarded = loop.time() + self.LINGER_SECONDS, 0
            ch.buf.clear()
            while discarded < self.LINGER_BYTES and not self.draining:
                data = await ch.read_some(1 << 20, deadline)
                if not data:
                    return
                discarded += len(data)
        except (asyncio.TimeoutError, ChannelClosed, ConnectionError, OSError, RuntimeError):
            pass

    def _write_error(self, ch, err, path=None):
        resp = self.error_page(err.status, err.message, path)
        body = resp.body or b""
        ch.write(self._head(err.status, resp.headers, False, "Content-Length: %d\r\n" % len(body)) + body)
        log.warning("HTTP %d: %s", err.status, err.message)

    def _cors_headers(self, req, limits, headers):
        origin = req.headers.get("origin")
        if origin is None:
            return
        allowed = limits.cors_origins
        if "*" in allowed:
            headers.append(("Access-Control-Allow-Origin", "*"))
        elif origin in allowed:
            headers.append(("Access-Control-Allow-Origin", origin))
            headers.append(("Vary", "Origin"))

    def _options(self, req, limits):
        resp = Response(204, b"", [("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")], None)
        if limits.cors and req.headers.get("access-control-request-method"):
            resp.headers.append(("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"))
            resp.headers.append(("Access-Control-Allow-Headers",
                                 req.headers.get("access-control-request-headers") or "*"))
            resp.headers.append(("Access-Control-Max-Age", "86400"))
        return resp

    async def shutdown(self, grace):
        """Stop accepting, let in-flight responses finish for up to `grace` seconds, then cut the rest."""
        self.draining = True
        for s in self.servers:
            s.close()
        for ws in list(self.websockets):  # a WebSocket has no natural end: tell its client we are going away
            asyncio.ensure_future(ws.close(1001, "server shutting down"))
        # Idle keep-alive connections have nothing to finish.
        for task in list(self.idle):
            task.cancel()
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=2)
        for s in self.servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 1)
            except (asyncio.TimeoutError, Exception):
                pass


# === 5. HTTP client ===
# Owns: every outbound request the gateway makes: pooled keep-alive connections per origin and proxy, TLS with
# SNI and the system CA store, http/https/socks5/socks5h proxies, gzip/deflate and chunked decoding, streaming
# reads with timeouts, and `upstream-overrides` applied to every URL. It knows nothing about providers.

class UpstreamError(Exception):
    """A network-level failure talking upstream (connect, TLS, proxy, timeout, broken framing)."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind, self.message = kind, message


class ProxySpec:
    """A parsed proxy URL. `direct`/`none` mean no proxy at all."""

    __slots__ = ("scheme", "host", "port", "username", "password", "url")

    def __init__(self, url):
        parts = urllib.parse.urlsplit(url)
        self.scheme = parts.scheme.lower()
        if self.scheme not in ("http", "https", "socks5", "socks5h"):
            raise UpstreamError("proxy", "unsupported proxy scheme %r (use http, https, socks5 or socks5h)"
                                % parts.scheme)
        if not parts.hostname:
            raise UpstreamError("proxy", "proxy URL has no host")
        self.host = parts.hostname
        self.port = parts.port or {"http": 80, "https": 443}.get(self.scheme, 1080)
        self.username = urllib.parse.unquote(parts.username) if parts.username else None
        self.password = urllib.parse.unquote(parts.password) if parts.password else ""
        self.url = url

    def basic_auth(self):
        if self.username is None:
            return None
        raw = ("%s:%s" % (self.username, self.password)).encode("utf-8")
        return "Basic " + base64.b64encode(raw).decode("ascii")


class _PooledConn:
    __slots__ = ("ch", "key", "idle_since", "reused")

    def __init__(self, ch, key):
        self.ch, self.key, self.idle_since, self.reused = ch, key, 0.0, False


_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) (\d{3})(?: ([^\r\n]*))?\Z")


class ChunkedDecoder:
    """The chunked transfer coding (RFC 9112 §7.1) undone incrementally: `take(buf)` consumes from the bytearray
    `buf` every complete part it holds (size lines, data, CRLFs, the trailer section) and returns the data bytes
    found, in one piece; `done` once the last chunk and its trailer section are in. Malformed framing is an
    UpstreamError; a size line or trailer section larger than the limits is refused, not buffered."""

    __slots__ = ("left", "trailer", "done")

    def __init__(self):
        self.left = 0  # > 0: data bytes of the current chunk still to come; -1: its CRLF is next; 0: a size line
        self.trailer = -1  # bytes of the trailer section seen once the last chunk came (-1 before it)
        self.done = False

    def take(self, buf):
        left, trailer = self.left, self.trailer
        n, pos, out = len(buf), 0, []
        try:
            while pos < n:
                if left > 0:
                    take = min(left, n - pos)
                    out.append(buf[pos:pos + take])
                    pos += take
                    left -= take
                    if not left:
                        left = -1
                elif left < 0:
                    if n - pos < 2:
                        break
                    if buf[pos:pos + 2] != b"\r\n":
                        raise UpstreamError("protocol", "upstream chunk not followed by CRLF")
                    pos += 2
                    left = 0
                else:
                    k = buf.find(b"\r\n", pos, pos + 4096)
                    if k < 0:
                        if n - pos >= 4096:
                            raise UpstreamError("protocol", "upstream sent a malformed chunk")
                        break
                    if trailer >= 0:  # the trailer section after the last chunk, up to its blank line
                        trailer += k + 2 - pos
                        if trailer > MAX_HEADER_BYTES:
                            raise UpstreamError("protocol", "upstream trailer section too large")
                        blank = k == pos
                        pos = k + 2
                        if blank:
                            self.done = True
                            break
                        continue
                    size = buf[pos:k]
                    if size and not size.translate(None, _HEX_DIGITS) and len(size.lstrip(b"0")) <= 16:
                        left = int(size, 16)  # hex digits alone, as most servers write it: no pattern needed
                    else:
                        m = _CHUNK_SIZE.match(size)
                        if m is None:
                            raise UpstreamError("protocol", "upstream sent a malformed chunk size")
                        left = int(m.group(1), 16)
                    pos = k + 2
                    if not left:
                        trailer = 0
                    elif pos + left + 2 <= n:  # the whole chunk and its CRLF are here: take them in one step
                        end = pos + left
                        if not buf.startswith(b"\r\n", end):
                            raise UpstreamError("protocol", "upstream chunk not followed by CRLF")
                        out.append(buf[pos:end])
                        pos, left = end + 2, 0
        finally:
            self.left, self.trailer = left, trailer
            if pos:
                del buf[:pos]
        if not out:
            return b""
        return bytes(out[0]) if len(out) == 1 else b"".join(out)


class ResponseBody:
    """An upstream answer's body, as UpstreamResponse and RelayResponse give it: `take()` returns what has arrived
    and not been taken (b"" when nothing has) and never waits, `ended` tells that the whole body is in, `await
    wait()` waits for more (UpstreamError on timeout or a broken connection), `close()` drops what is left, and
    `listen(callback)` has the callback called as bytes arrive, so that a stream is relayed from the event loop's
    read callback (StreamResponse). A stream is driven by those steps directly (Call.pull); `iter_bytes`, `read`
    and `json` are drivers of them."""

    ended = False
    _max_size = 0

    def take(self):
        raise NotImplementedError

    async def wait(self):
        raise NotImplementedError

    def close(self):
        pass

    def listen(self, callback):
        """Have `callback` called as body bytes arrive, where the transport allows it (here it does not: `wait`
        serves alone)."""

    async def iter_bytes(self):
        """The body's pieces as they arrive."""
        try:
            while True:
                data = self.take()
                if data:
                    yield data
                if self.ended:
                    return
                await self.wait()
        finally:
            if not self.ended:
                self.close()

    async def read(self, limit=None):
        """The whole body; UpstreamError past `limit` bytes (default max-response-size)."""
        limit = limit or self._max_size
        parts, size = [], 0
        try:
            while True:
                data = self.take()
                if data:
                    size += len(data)
                    if limit and size > limit:
                        raise UpstreamError("too-large", "upstream response exceeds max-response-size (%d bytes)"
                                            % limit)
                    parts.append(data)
                if self.ended:
                    return b"".join(parts)
                await self.wait()
        except BaseException:
            self.close()
            raise

    async def json(self):
        body = await self.read()
        try:
            return json.loads(body)
        except ValueError as e:
            raise UpstreamError("protocol", "upstream returned invalid JSON (%s)" % str(e)[:120])


class UpstreamResponse(ResponseBody):
    """An upstream HTTP response whose headers are read and whose body is read on demand (ResponseBody). The
    connection goes back to the pool only after the body was read to its end."""

    def __init__(self, client, conn, method, url, status, reason, headers, keep_alive, stream_timeout, max_size):
        self._client, self._conn = client, conn
        self.method, self.url, self.status, self.reason, self.headers = method, url, status, reason, headers
        self._keep = keep_alive
        self._stream_timeout = stream_timeout
        self._max_size = max_size
        self._done = self.ended = False
        self._total = 0  # decoded body bytes so far
        self.ends_at = self.total_timeout = None  # the whole request's end (request-timeout), in loop time
        te = (headers.get("transfer-encoding") or "").lower()
        cl = headers.get("content-length")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            self._mode, self._remaining = "none", 0
        elif "chunked" in te:
            self._mode, self._remaining = "chunked", 0
            self._chunks = ChunkedDecoder()
        elif cl is not None and re.match(r"[0-9]{1,18}\Z", cl.strip(" \t")):  # ASCII digits ("²".isdigit())
            self._mode, self._remaining = "length", int(cl.strip(" \t"))
        else:
            self._mode, self._remaining = "close", 0
            self._keep = False
        enc = (headers.get("content-encoding") or "").strip().lower()
        self._decoder = None
        if enc in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._decoder = "deflate?"  # zlib-wrapped or raw: decided by the first bytes
        elif enc not in ("", "identity"):
            self._keep = False
            self._decoder = "unsupported:" + enc

    def _deadline(self):
        """The next wait's deadline: stream-timeout of silence, and never past the whole request's end."""
        idle = asyncio.get_running_loop().time() + self._stream_timeout if self._stream_timeout else None
        if self.ends_at is None:
            return idle
        return self.ends_at if idle is None else min(idle, self.ends_at)

    def _decode(self, data, final=False):
        d = self._decoder
        if d is None:
            return data
        if isinstance(d, str):
            if d.startswith("unsupported:"):
                return data
            # RFC 9110 deflate is zlib-wrapped; some servers send raw deflate.
            wrapped = len(data) >= 2 and (data[0] & 0x0F) == 8 and ((data[0] << 8) | data[1]) % 31 == 0
            d = self._decoder = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        try:
            out = d.decompress(data)
            if final:
                out += d.flush()
        except zlib.error as e:
            raise UpstreamError("protocol", "cannot decode upstream body: %s" % e)
        return out

    def take(self):
        """The body bytes that have arrived and not been taken, decoded (b"" when none); `ended` once the whole body
        is in (the connection then goes back to the pool). Never waits: `wait` does. UpstreamError on broken framing,
        an undecodable body or one over max-response-size."""
        ch = self._conn.ch
        mode, buf = self._mode, ch.buf
        if mode == "chunked":
            data = self._chunks.take(buf) if buf else b""
            if data and ch._read_paused:
                ch._consumed()
            ended = self._chunks.done
        elif mode == "length":
            data = ch.take(self._remaining)
            self._remaining -= len(data)
            ended = not self._remaining
        elif mode == "close":
            data = ch.take()
            ended = ch.eof
        else:
            data, ended = b"", True
        out = self._deliver(data) if data else b""
        if data:  # taken by a listener while `wait` waits: the silence began now
            ch.extend(self._deadline)
        if ended:
            self.ended = True
            tail = self._decode(b"", final=True)
            if tail:
                out += tail
            self._finish(True)
        return out

    async def wait(self):
        """Wait until more body bytes arrive; each wait is bounded by stream-timeout (and request-timeout)."""
        try:
            await self._conn.ch.fill(self._deadline())
        except asyncio.TimeoutError:
            if self.ends_at is not None and asyncio.get_running_loop().time() >= self.ends_at:
                raise UpstreamError("timeout", "the upstream answer took longer than request-timeout (%ss)"
                                    % self.total_timeout)
            raise UpstreamError("timeout", "upstream sent nothing for %ss" % self._stream_timeout)
        except ChannelClosed:
            if self._mode != "close":  # else the close is the body's end, which `take` sees
                raise UpstreamError("protocol", "upstream closed the connection mid-body")

    def _deliver(self, raw):
        """`raw` body bytes decoded (Content-Encoding) and counted against max-response-size: streams too, so an
        endless one is cut."""
        out = raw if self._decoder is None else self._decode(raw)
        if out:
            self._total += len(out)
            if self._max_size and self._total > self._max_size:
                raise UpstreamError("too-large", "upstream response exceeds max-response-size (%d bytes)"
                                    % self._max_size)
        return out

    def listen(self, callback):
        """Have `callback` called as body bytes arrive (Channel.on_data); None stops it."""
        if not self._done:
            self._conn.ch.on_data = callback

    def _finish(self, completed):
        if self._done:
            return
        self._done = True
        self._conn.ch.on_data = None
        if completed and self._keep and not self._conn.ch.buf:
            self._client._release(self._conn)
        else:
            self._conn.ch.close()

    def close(self):
        """Drop the connection unless the body was fully consumed."""
        self._finish(False)


class HttpClient:
    """Outbound HTTP/1.1 with per-(origin, proxy) connection pools."""

    IDLE_SECONDS = 60.0
    MAX_IDLE_PER_KEY = 64

    def __init__(self, config_fn):
        self.config_fn = config_fn
        self.pools = {}
        self._ssl_contexts = {}

    # -- URL and TLS plumbing ---------------------------------------------------------------------------------
    def apply_overrides(self, url):
        """Rewrite the origin of `url` per `upstream-overrides` (tests and corporate mirrors rely on this)."""
        overrides = self.config_fn().overrides
        if not overrides:
            return url
        parts = urllib.parse.urlsplit(url)
        dst = overrides.get(normalize_origin("%s://%s" % (parts.scheme, parts.netloc.rpartition("@")[2])))
        if dst is None:
            return url
        d = urllib.parse.urlsplit(dst)
        path = (d.path.rstrip("/") + parts.path) if d.path else parts.path
        return urllib.parse.urlunsplit((d.scheme, d.netloc, path, parts.query, parts.fragment))

    def ssl_context(self, ca_file=""):
        ctx = self._ssl_contexts.get(ca_file)
        if ctx is None:
            ctx = ssl.create_default_context()
            if ca_file:
                ctx.load_verify_locations(cafile=ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl_contexts[ca_file] = ctx
        return ctx

    # -- connections --------------------------------------------------------------------------------------------
    def _release(self, conn):
        if conn.ch.lost or conn.ch.eof:
            conn.ch.close()
            return
        conn.idle_since = time.monotonic()
        conn.reused = True
        pool = self.pools.setdefault(conn.key, [])
        if len(pool) >= self.MAX_IDLE_PER_KEY:
            conn.ch.close()
            return
        pool.append(conn)

    def _acquire_idle(self, key):
        pool = self.pools.get(key)
        now = time.monotonic()
        while pool:
            conn = pool.pop()
            if conn.ch.lost or conn.ch.eof or conn.ch.buf or now - conn.idle_since > self.IDLE_SECONDS:
                conn.ch.close()
                continue
            return conn
        return None

    def close_idle(self):
        for pool in self.pools.values():
            for conn in pool:
                conn.ch.close()
        self.pools.clear()

    async def _open_tcp(self, host, port, timeout, ssl_ctx=None, server_hostname=None):
        loop = asyncio.get_running_loop()
        try:
            _, ch = await asyncio.wait_for(
                loop.create_connection(Channel, host, port, ssl=ssl_ctx,
                                       server_hostname=server_hostname if ssl_ctx else None), timeout)
        except asyncio.TimeoutError:
            raise UpstreamError("connect", "connecting to %s:%d timed out after %ss" % (host, port, timeout))
        except ssl.SSLError as e:
            raise UpstreamError("tls", "TLS handshake with %s:%d failed: %s" % (host, port, e))
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):  # our shortage, not the upstream's fault
                raise UpstreamError("local", "the gateway is out of file descriptors (%s)" % (e.strerror or e))
            raise UpstreamError("connect", "cannot connect to %s:%d: %s" % (host, port, e.strerror or e))
        sock = ch.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        return ch

    async def _start_tls(self, ch, ctx, host, timeout):
        loop = asyncio.get_running_loop()
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(ch.transport, ch, ctx, server_hostname=host), timeout)
        except asyncio.TimeoutError:
            ch.abort()
            raise UpstreamError("tls", "TLS handshake with %s timed out" % host)
        except (ssl.SSLError, OSError, RuntimeError) as e:
            ch.abort()
            raise UpstreamError("tls", "TLS handshake with %s failed: %s" % (host, e))
        ch.transport = transport
        return ch

    async def _connect(self, scheme, host, port, proxy, timeout, ca_file):
        tls = scheme == "https"
        ctx = self.ssl_context(ca_file) if tls else None
        if proxy is None:
            return await self._open_tcp(host, port, timeout, ctx, host)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if proxy.scheme in ("socks5", "socks5h"):
            ch = await self._open_tcp(proxy.host, proxy.port, timeout)
            try:
                await self._socks5_handshake(ch, proxy, host, port, deadline)
            except BaseException:
                ch.abort()
                raise
        else:
            proxy_ctx = self.ssl_context(ca_file) if proxy.scheme == "https" else None
            ch = await self._open_tcp(proxy.host, proxy.port, timeout, proxy_ctx, proxy.host)
            if not tls:
                return ch  # plain-http targets go through an HTTP proxy in absolute form, no tunnel
            try:
                await self._http_connect(ch, proxy, host, port, deadline)
            except BaseException:
                ch.abort()
                raise
        if tls:
            if proxy.scheme == "https" and sys.version_info < (3, 11):
                ch.abort()
                raise UpstreamError("proxy", "TLS inside a TLS proxy tunnel needs Python 3.11 or newer")
            await self._start_tls(ch, ctx, host, max(0.1, deadline - loop.time()))
        return ch

    async def _http_connect(self, ch, proxy, host, port, deadline):
        hostport = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
        lines = ["CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (hostport, hostport)]
        auth = proxy.basic_auth()
        if auth:
            lines.append("Proxy-Authorization: %s\r\n" % auth)
        lines.append("\r\n")
        ch.write("".join(lines).encode("latin-1"))
        try:
            head = await ch.read_until(b"\r\n\r\n", MAX_HEADER_BYTES, deadline)
        except asyncio.TimeoutError:
            raise UpstreamError("proxy", "proxy %s:%d did not answer CONNECT in time" % (proxy.host, proxy.port))
        except (ChannelClosed, LimitExceeded):
            raise UpstreamError("proxy", "proxy %s:%d closed the CONNECT tunnel" % (proxy.host, proxy.port))
        m = _STATUS_LINE.match(head.split(b"\r\n", 1)[0])
        if m is None:
            raise UpstreamError("proxy", "proxy sent a malformed CONNECT answer")
        status = int(m.group(2))
        if status != 200:
            raise UpstreamError("proxy", "proxy refused CONNECT to %s: HTTP %d" % (hostport, status))

    async def _socks5_handshake(self, ch, proxy, host, port, deadline):
        methods = b"\x00\x02" if proxy.username is not None else b"\x00"
        ch.write(b"\x05" + bytes([len(methods)]) + methods)
        try:
            ver, method = await ch.read_exactly(2, deadline)
            if ver != 5:
                raise UpstreamError("proxy", "not a SOCKS5 proxy")
            if method == 0x02:
                user = (proxy.username or "").encode("utf-8")
                pw = (proxy.password or "").encode("utf-8")
                if len(user) > 255 or len(pw) > 255:
                    raise UpstreamError("proxy", "SOCKS5 username or password too long")
                ch.write(b"\x01" + bytes([len(user)]) + user + bytes([len(pw)]) + pw)
                _, status = await ch.read_exactly(2, deadline)
                if status != 0:
                    raise UpstreamError("proxy", "SOCKS5 proxy rejected the username/password")
            elif method != 0x00:
                raise UpstreamError("proxy", "SOCKS5 proxy accepts none of our auth methods")
            addr = self._socks_address(host, proxy.scheme == "socks5h")
            if addr is None:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
                addr = self._socks_address(infos[0][4][0], False)
            ch.write(b"\x05\x01\x00" + addr + port.to_bytes(2, "big"))
            ver, rep, _, atyp = await ch.read_exactly(4, deadline)
            if rep != 0:
                reasons = {1: "general failure", 2: "not allowed by ruleset", 3: "network unreachable",
                           4: "host unreachable", 5: "connection refused", 6: "TTL expired",
                           7: "command not supported", 8: "address type not supported"}
                raise UpstreamError("proxy", "SOCKS5 proxy could not connect to %s:%d: %s"
                                    % (host, port, reasons.get(rep, "error %d" % rep)))
            if atyp == 1:
                await ch.read_exactly(4 + 2, deadline)
            elif atyp == 4:
                await ch.read_exactly(16 + 2, deadline)
            elif atyp == 3:
                n = (await ch.read_exactly(1, deadline))[0]
                await ch.read_exactly(n + 2, deadline)
            else:
                raise UpstreamError("proxy", "SOCKS5 proxy sent a bad address type")
        except asyncio.TimeoutError:
            raise UpstreamError("proxy", "SOCKS5 proxy %s:%d timed out" % (proxy.host, proxy.port))
        except ChannelClosed:
            raise UpstreamError("proxy", "SOCKS5 proxy %s:%d closed the connection" % (proxy.host, proxy.port))

    @staticmethod
    def _socks_address(host, remote_dns):
        """ATYP + address. socks5h sends names to the proxy; socks5 resolves locally (None = resolve first)."""
        try:
            ip = ipaddress.ip_address(host)
            return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        except ValueError:
            pass
        if not remote_dns:
            return None
        name = host.encode("idna")
        if len(name) > 255:
            raise UpstreamError("proxy", "host name too long for SOCKS5")
        return b"\x03" + bytes([len(name)]) + name

    # -- requests -----------------------------------------------------------------------------------------------
    async def request(self, method, url, headers=(), body=None, proxy_url="", timeout=None, stream_timeout=None,
                      max_size=None, head_timeout=None, total_timeout=None):
        """Send one request; returns an UpstreamResponse once the status and headers are in.

        `headers` are name/value pairs sent as given (Host, Content-Length, Accept-Encoding and User-Agent are
        added when absent). `proxy_url` may be '', 'direct' or a proxy URL; '' falls back to the global one.
        """
        cfg = self.config_fn()
        url = self.apply_overrides(url)
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise UpstreamError("protocol", "unsupported URL scheme in %s" % url)
        host = parts.hostname
        if not host:
            raise UpstreamError("protocol", "URL has no host: %s" % url)
        port = parts.port or (443 if scheme == "https" else 80)
        proxy_url = (proxy_url or cfg.proxy_url or "").strip()
        proxy = None if proxy_url.lower() in ("", "direct", "none") else ProxySpec(proxy_url)
        connect_timeout = timeout or cfg.connect_timeout
        stream_timeout = stream_timeout if stream_timeout is not None else cfg.stream_timeout
        max_size = max_size or cfg.max_response_size
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        absolute_form = proxy is not None and proxy.scheme in ("http", "https") and scheme == "http"
        target = "%s://%s%s" % (scheme, parts.netloc.rpartition("@")[2], path) if absolute_form else path
        hostport = parts.netloc.rpartition("@")[2]
        if body is None:
            body = b""
        elif isinstance(body, str):
            body = body.encode("utf-8")
        payload = self._request_head(method, target, hostport, headers, body,
                                     proxy.basic_auth() if absolute_form else None)
        if len(body) <= 65536:  # one write; a larger body follows the head in slices (write_all), never copied
            payload, body = payload + body, b""
        key = (scheme, host, port, proxy.url if proxy else "")
        started = asyncio.get_running_loop().time()
        for attempt in (0, 1):
            conn = self._acquire_idle(key) if attempt == 0 else None
            if conn is None:
                ch = await self._connect(scheme, host, port, proxy, connect_timeout, cfg.ca_file)
                conn = _PooledConn(ch, key)
            ch = conn.ch
            try:
                ch.write(payload)
                if body:
                    wait = head_timeout or stream_timeout or total_timeout
                    await ch.write_all(body, started + wait if wait else None)
                if total_timeout:
                    head_timeout = min(head_timeout or stream_timeout or total_timeout, total_timeout)
                resp = await self._read_head(conn, method, url, stream_timeout, max_size, head_timeout)
                if total_timeout:
                    resp.ends_at, resp.total_timeout = started + total_timeout, total_timeout
                return resp
            except ChannelClosed:
                ch.close()
                # A pooled connection the server closed while idle: resend once on a fresh one.
                if conn.reused and attempt == 0 and not ch.buf:
                    continue
                raise UpstreamError("protocol", "upstream closed the connection before answering")
            except asyncio.TimeoutError:
                ch.close()
                raise UpstreamError("timeout", "upstream sent no response headers within %ss"
                                    % (head_timeout or stream_timeout))
            except BadFraming:
                ch.close()
                raise UpstreamError("protocol", "upstream answered with something that is not HTTP")
            except BaseException:
                ch.close()
                raise
        raise UpstreamError("protocol", "upstream closed the connection before answering")

    @staticmethod
    def _request_head(method, target, hostport, headers, body, proxy_auth=None):
        """The request line and header block: `headers` as given, plus Host, User-Agent, Accept-Encoding and
        Content-Length where the caller did not set them (and Proxy-Authorization for an HTTP proxy)."""
        lines = ["%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, hostport)]
        present = set()
        for k, v in headers:
            present.add(k.lower())
            lines.append("%s: %s\r\n" % (k, v))
        if "user-agent" not in present:
            lines.append("User-Agent: %s\r\n" % USER_AGENT)
        if "accept-encoding" not in present:
            lines.append("Accept-Encoding: gzip, deflate\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: %d\r\n" % len(body))
        if proxy_auth:
            lines.append("Proxy-Authorization: %s\r\n" % proxy_auth)
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def _read_head(self, conn, method, url, stream_timeout, max_size, head_timeout=None):
        ch = conn.ch
        loop = asyncio.get_running_loop()
        wait = head_timeout or stream_timeout
        deadline = loop.time() + wait if wait else None
        while True:
            try:  # garbage fails at once (not_http), not after a timeout
                head = await ch.read_until(b"\r\n\r\n", MAX_REQUEST_LINE + MAX_HEADER_BYTES, deadline, not_http)
            except LimitExceeded:
                raise UpstreamError("protocol", "upstream response headers too large")
            lines = head[:-4].split(b"\r\n")
            m = _STATUS_LINE.match(lines[0])
            if m is None:
                raise UpstreamError("protocol", "upstream sent a malformed status line: %r" % lines[0][:80])
            status = int(m.group(2))
            items = []
            for raw in lines[1:]:
                name, sep, value = raw.partition(b":")
                if not sep:
                    raise UpstreamError("protocol", "upstream sent a malformed header line")
                items.append((name.strip().decode("latin-1").lower(), value.strip().decode("latin-1")))
            if 100 <= status < 200 and status != 101:
                continue
            headers = Headers(items)
            conn_hdr = (headers.get("connection") or "").lower()
            keep = m.group(1) == b"1" and "close" not in conn_hdr
            return UpstreamResponse(self, conn, method, url, status, (m.group(3) or b"").decode("latin-1"),
                                    headers, keep, stream_timeout, max_size)


class SSEParser:
    """Incremental `text/event-stream` parser (WHATWG rules): feed bytes, get (event, data) pairs. Linear in the
    input however it is split (a line is searched once, never re-scanned), and bounded: a line or an event larger
    than MAX_EVENT is an UpstreamError, not a buffer that grows until memory runs out."""

    __slots__ = ("_buf", "_scan", "_event", "_data", "_size")
    MAX_EVENT = 16 << 20

    def __init__(self):
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already known to hold no newline
        self._event = None
        self._data = []
        self._size = 0

    def feed(self, chunk):
        buf = self._buf
        buf += chunk
        out = []
        end = buf.rfind(b"\n", self._scan)  # the last complete line's end: its lines are split in one pass
        if end >= 0:
            lines = bytes(buf[:end]).split(b"\n")
            del buf[:end + 1]
            event, data, size = self._event, self._data, self._size
            for line in lines:
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line:
                    if data:
                        out.append((event, "\n".join(data)))
                    event, data, size = None, [], 0
                    continue
                if line[0] == 0x3A:  # ':' comment
                    continue
                name, sep, value = line.partition(b":")
                if sep and value.startswith(b" "):
                    value = value[1:]
                if name == b"data":
                    size += len(value)
                    if size > self.MAX_EVENT:
                        raise UpstreamError("too-large", "an upstream event is larger than %d bytes" % self.MAX_EVENT)
                    data.append(value.decode("utf-8", "replace"))
                elif name == b"event":
                    event = value.decode("utf-8", "replace")
            self._event, self._data, self._size = event, data, size
        self._scan = len(buf)
        if self._scan > self.MAX_EVENT:
            raise UpstreamError("too-large", "an upstream line is longer than %d bytes" % self.MAX_EVENT)
        return out

    def finish(self):
        """Flush an event that was not followed by a blank line (some upstreams end that way)."""
        out = []
        if bytes(self._buf).strip():
            out = self.feed(b"\n\n")
        elif self._data:
            out = [(self._event, "\n".join(self._data))]
        self._buf, self._scan, self._event, self._data, self._size = bytearray(), 0, None, [], 0
        return out


# === 6. PostgreSQL client ===
# Owns: the PostgreSQL frontend/backend protocol 3.0 over the byte Channel: URLs and PG* defaults, TLS (sslmode),
# trust / cleartext / md5 / SCRAM-SHA-256 authentication, the extended query protocol with bound parameters only,
# text-format values, transactions, LISTEN/NOTIFY and a small pool. It knows nothing of what the gateway stores.

class PgError(Exception):
    """An error the server reported, with its SQLSTATE (`fields` holds the rest: detail, hint, ...)."""

    def __init__(self, message, sqlstate="", fields=None):
        super().__init__("%s (SQLSTATE %s)" % (message, sqlstate) if sqlstate else message)
        self.message, self.sqlstate, self.fields = message, sqlstate, fields or {}


class PgConnectionError(PgError):
    """The connection could not be made or broke (SQLSTATE class 08); the pool opens a new one next time."""

    def __init__(self, message, sqlstate="08006"):
        super().__init__(message, sqlstate)


PG_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def pg_settings(url="", env=None):
    """Connection settings from a `postgres://` / `postgresql://` URL (user, password, host, port, database and
    the query parameters sslmode, sslrootcert, connect_timeout, application_name, options, statement_timeout,
    host, hostaddr, port, user, password, dbname), completed from the PG* environment variables as libpq does."""
    env = os.environ if env is None else env
    parts = urllib.parse.urlsplit(url or "postgresql://")
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("a PostgreSQL URL starts with postgres:// or postgresql://")
    q = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    unquote = urllib.parse.unquote
    netloc = parts.netloc.rpartition("@")[2]
    host, _, port = netloc.rpartition(":") if not netloc.endswith("]") and ":" in netloc else (netloc, "", "")
    host = unquote(host.strip("[]"))

    def pick(name, url_value, env_name, default=""):
        value = q.get(name) or url_value or env.get(env_name) or default
        return value

    s = {
        "user": pick("user", unquote(parts.username or ""), "PGUSER", env.get("USER") or "postgres"),
        "password": pick("password", unquote(parts.password or ""), "PGPASSWORD"),
        "host": pick("host", host, "PGHOST", "localhost"),
        "hostaddr": pick("hostaddr", "", "PGHOSTADDR"),
        "port": pick("port", port, "PGPORT", "5432"),
        "sslmode": pick("sslmode", "", "PGSSLMODE", "prefer"),
        "sslrootcert": pick("sslrootcert", "", "PGSSLROOTCERT"),
        "connect_timeout": pick("connect_timeout", "", "PGCONNECT_TIMEOUT", "10"),
        "application_name": pick("application_name", "", "PGAPPNAME", "llm-mux"),
        "options": pick("options", "", "PGOPTIONS"),
        "statement_timeout": pick("statement_timeout", "", "PGSTATEMENTTIMEOUT", "30000"),
    }
    s["database"] = pick("dbname", unquote(parts.path.lstrip("/")), "PGDATABASE", s["user"])
    if s["sslmode"] not in PG_SSLMODES:
        raise ValueError("sslmode must be one of %s" % ", ".join(PG_SSLMODES))
    for name in ("port", "connect_timeout", "statement_timeout"):
        if not s[name].isdigit():
            raise ValueError("%s must be a whole number, not %r" % (name, s[name]))
    s["port"], s["connect_timeout"] = int(s["port"]), int(s["connect_timeout"]) or 10
    s["statement_timeout"] = int(s["statement_timeout"])
    return s


def pg_quote_ident(name):
    """A channel or identifier name as a quoted SQL identifier (LISTEN takes no parameters)."""
    if not re.match(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z", name or ""):
        raise ValueError("not a safe identifier: %r" % (name,))
    return '"%s"' % name


def _pg_timestamp(text):
    """A timestamp in PostgreSQL's ISO output (`2026-12-04 13:39:30.12+00`) as a datetime (aware when it has an
    offset); infinity and BC dates stay text."""
    import datetime
    m = re.match(r"(\d{4,}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)(?:\.(\d{1,6}))?([+-]\d\d(?::?\d\d){0,2})?\Z", text)
    if m is None:
        return text
    frac = (m.group(3) or "").ljust(6, "0")
    value = datetime.datetime.strptime("%s %s %s" % (m.group(1), m.group(2), frac), "%Y-%m-%d %H:%M:%S %f")
    offset = m.group(4)
    if offset:
        sign = -1 if offset[0] == "-" else 1
        fields = [int(x) for x in re.findall(r"\d\d", offset)] + [0, 0]
        value = value.replace(tzinfo=datetime.timezone(
            sign * datetime.timedelta(hours=fields[0], minutes=fields[1], seconds=fields[2])))
    return value


def _pg_date(text):
    import datetime
    try:
        return datetime.date(*[int(x) for x in text.split("-")])
    except ValueError:
        return text


def _pg_array(text, element):
    """A one-dimensional array literal (`{1,2,NULL}`, `{"a b","c\\"d"}`) decoded element by element."""
    if not (text.startswith("{") and text.endswith("}")):
        return text
    items, i, body = [], 0, text[1:-1]
    while i < len(body):
        if body[i] == '"':
            j, chars = i + 1, []
            while body[j] != '"':
                if body[j] == "\\":
                    j += 1
                chars.append(body[j])
                j += 1
            items.append(element("".join(chars)))
            i = j + 2
        else:
            j = body.find(",", i)
            j = len(body) if j < 0 else j
            raw = body[i:j]
            items.append(None if raw == "NULL" else element(raw))
            i = j + 1
    return items


def _pg_float(text):
    return float({"Infinity": "inf", "-Infinity": "-inf"}.get(text, text))


def _pg_numeric(text):
    import decimal
    try:
        return decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise ValueError("not a numeric: %r" % text[:40])


PG_DECODERS = {  # type OID -> text-format decoder; anything else is returned as str
    16: lambda t: t == "t", 20: int, 21: int, 23: int, 26: int, 700: _pg_float, 701: _pg_float, 1700: _pg_numeric,
    114: json.loads, 3802: json.loads, 17: lambda t: bytes.fromhex(t[2:]) if t.startswith("\\x") else t.encode(),
    1114: _pg_timestamp, 1184: _pg_timestamp, 1082: _pg_date,
}
for _array_oid, _element_oid in ((1000, 16), (1005, 21), (1007, 23), (1016, 20), (1021, 700), (1022, 701),
                                 (1231, 1700), (1009, 25), (1015, 1043), (1014, 1042), (199, 114), (3807, 3802)):
    PG_DECODERS[_array_oid] = functools.partial(_pg_array, element=PG_DECODERS.get(_element_oid, str))


def pg_encode(value):
    """A Python value as a text-format parameter (bytes), or None for SQL NULL."""
    import datetime
    import decimal
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, (int, decimal.Decimal)):
        return str(value).encode()
    if isinstance(value, float):
        if value != value:
            return b"NaN"
        return {math.inf: b"Infinity", -math.inf: b"-Infinity"}.get(value) or repr(value).encode()
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("PostgreSQL text cannot hold NUL characters")
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b"\\x" + bytes(value).hex().encode()
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat().encode()
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":")).encode()
    if isinstance(value, (list, tuple)):  # a one-dimensional array
        def element(v):
            raw = pg_encode(v)
            if raw is None:
                return "NULL"
            return '"%s"' % raw.decode("utf-8").replace("\\", "\\\\").replace('"', '\\"')
        return ("{%s}" % ",".join(element(v) for v in value)).encode("utf-8")
    raise TypeError("cannot send %s to PostgreSQL" % type(value).__name__)


class PgResult:
    """The rows of one statement (tuples, in column order), the column names and the command tag."""

    __slots__ = ("rows", "columns", "tag")

    def __init__(self, rows, columns, tag):
        self.rows, self.columns, self.tag = rows, columns, tag

    @property
    def rowcount(self):
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else -1


class PgQueries:
    """The result shapes callers want, over `execute(sql, *args, timeout=)` (a connection's or a pool's)."""

    async def fetch(self, sql, *args, timeout=None):
        return (await self.execute(sql, *args, timeout=timeout)).rows

    async def fetchrow(self, sql, *args, timeout=None):
        rows = (await self.execute(sql, *args, timeout=timeout)).rows
        return rows[0] if rows else None

    async def fetchval(self, sql, *args, timeout=None):
        row = await self.fetchrow(sql, *args, timeout=timeout)
        return row[0] if row else None


class PgConnection(PgQueries):
    """One server connection. Statements run one at a time (a lock serialises callers); asynchronous
    notifications that arrive on it are handed to `on_notify(channel, payload, pid)`."""

    def __init__(self, settings):
        self.settings = settings
        self.ch = None
        self.params = {}
        self.backend = (0, 0)  # (process id, secret key) for CancelRequest
        self.status = "I"  # I idle, T in a transaction, E in a failed transaction
        self.lock = asyncio.Lock()
        self.on_notify = None
        self.closed = False
        self.tls = False

    # -- framing ------------------------------------------------------------------------------------------------
    @staticmethod
    def _message(kind, payload=b""):
        return kind + struct.pack("!I", len(payload) + 4) + payload

    async def _read(self, deadline=None):
        try:
            head = await self.ch.read_exactly(5, deadline)
            kind, size = head[:1], struct.unpack("!I", head[1:])[0]
            if size < 4 or size > (1 << 30):
                raise PgConnectionError("bad message length %d from the server" % size)
            return kind, await self.ch.read_exactly(size - 4, deadline)
        except ChannelClosed:
            self.closed = True
            raise PgConnectionError("the server closed the connection")

    @staticmethod
    def _error(payload):
        fields = {}
        for part in payload.split(b"\x00"):
            if part:
                fields[part[:1].decode()] = part[1:].decode("utf-8", "replace")
        cls = PgConnectionError if fields.get("C", "").startswith(("08", "57P")) else PgError
        err = cls(fields.get("M", "unknown error"), fields.get("C", ""))
        err.fields = {"severity": fields.get("S", ""), "detail": fields.get("D", ""), "hint": fields.get("H", "")}
        return err

    # -- connect ------------------------------------------------------------------------------------------------
    async def connect(self):
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s["connect_timeout"]
        host = s["host"]
        try:
            if host.startswith("/"):
                path = os.path.join(host, ".s.PGSQL.%d" % s["port"])
                _, self.ch = await asyncio.wait_for(loop.create_unix_connection(Channel, path), s["connect_timeout"])
            else:
                _, self.ch = await asyncio.wait_for(
                    loop.create_connection(Channel, s["hostaddr"] or host, s["port"]), s["connect_timeout"])
                if s["sslmode"] not in ("disable", "allow"):
                    await self._start_tls(deadline)
            await self._guarded(self._startup(deadline))
        except asyncio.TimeoutError:
            self.close()
            raise PgConnectionError("connecting to PostgreSQL at %s:%s timed out" % (host, s["port"]))
        except OSError as e:
            self.close()
            raise PgConnectionError("cannot connect to PostgreSQL at %s:%s: %s" % (host, s["port"], e.strerror or e))
        except BaseException:
            self.close()
            raise
        return self

    def _ssl_context(self):
        mode = self.settings["sslmode"]
        ctx = ssl.create_default_context(cafile=self.settings["sslrootcert"] or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if mode in ("prefer", "require"):
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif mode == "verify-ca":
            ctx.check_hostname = False
        return ctx

    async def _start_tls(self, deadline):
        self.ch.write(struct.pack("!II", 8, 80877103))  # SSLRequest
        answer = await self.ch.read_exactly(1, deadline)
        if answer != b"S":
            if self.settings["sslmode"] != "prefer":
                raise PgConnectionError("the server does not accept TLS (sslmode=%s)" % self.settings["sslmode"])
            return
        loop = asyncio.get_running_loop()
        try:
            self.ch.transport = await asyncio.wait_for(
                loop.start_tls(self.ch.transport, self.ch, self._ssl_context(), server_hostname=self.settings["host"]),
                max(0.1, deadline - loop.time()))
        except (ssl.SSLError, ssl.CertificateError) as e:
            raise PgConnectionError("TLS with PostgreSQL failed: %s" % e)
        self.tls = True

    async def _guarded(self, coro):
        """Bytes from the server that break the protocol (a bad length, a truncated field, a value that does not
        parse as its type) end this connection with a PgConnectionError, never another exception."""
        try:
            return await coro
        except (struct.error, ValueError, IndexError, KeyError, TypeError, OverflowError, RecursionError) as e:
            self.closed = True
            if self.ch is not None:
                self.ch.close()
            raise PgConnectionError("malformed message from the server (%s: %s)" % (type(e).__name__, e), "08P01")

    async def _startup(self, deadline):
        s = self.settings
        params = [("user", s["user"]), ("database", s["database"]), ("application_name", s["application_name"]),
                  ("client_encoding", "UTF8"), ("DateStyle", "ISO"), ("TimeZone", "UTC"),
                  ("statement_timeout", str(s["statement_timeout"]))]
        if s["options"]:
            params.append(("options", s["options"]))
        body = struct.pack("!I", 196608) + b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params)
        self.ch.write(struct.pack("!I", len(body) + 5) + body + b"\x00")
        scram = None
        while True:
            kind, payload = await self._read(deadline)
            if kind == b"R":
                code = struct.unpack("!I", payload[:4])[0]
                if code == 0:
                    if scram is not None and not scram.verified:  # a server that skips proving itself
                        raise PgConnectionError("the server ended SCRAM without proving it knows the password",
                                                "28000")
                    continue
                if code == 3:
                    self._password(s["password"].encode())
                elif code == 5:
                    inner = hashlib.md5((s["password"] + s["user"]).encode()).hexdigest().encode()
                    self._password(b"md5" + hashlib.md5(inner + payload[4:8]).hexdigest().encode())
                elif code == 10:
                    mechanisms = payload[4:].split(b"\x00")
                    if b"SCRAM-SHA-256" not in mechanisms:
                        raise PgConnectionError("the server offers no SASL mechanism llm-mux knows: %s" % mechanisms)
                    scram = PgScram(s["password"])
                    first = scram.first()
                    self.ch.write(self._message(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!I", len(first)) + first))
                elif code in (11, 12) and scram is None:
                    raise PgConnectionError("the server continued a SASL exchange that was never started", "08P01")
                elif code == 11:
                    self.ch.write(self._message(b"p", scram.final(payload[4:])))
                elif code == 12:
                    scram.verify(payload[4:])
                else:
                    raise PgConnectionError("unsupported authentication request %d" % code)
            elif kind == b"S":
                name, value = payload.rstrip(b"\x00").split(b"\x00", 1)
                self.params[name.decode()] = value.decode()
            elif kind == b"K":
                self.backend = struct.unpack("!II", payload[:8])
            elif kind == b"Z":
                self.status = payload[:1].decode()
                return
            elif kind == b"E":
                err = self._error(payload)
                raise PgConnectionError(err.message, err.sqlstate or "08004")
            # N (notice), v (protocol negotiation): nothing to do

    def _password(self, secret):
        if not self.settings["password"]:
            raise PgConnectionError("the server asks for a password and none is configured", "28P01")
        self.ch.write(self._message(b"p", secret + b"\x00"))

    # -- statements ---------------------------------------------------------------------------------------------
    async def execute(self, sql, *args, timeout=None):
        """Run one statement with bound parameters ($1, $2, ...); a PgResult. `timeout` (seconds) is a client-side
        backstop to the server's statement_timeout: past it the query is cancelled and the connection closed."""
        values = self._encode(args)
        async with self.lock:
            if self.closed:
                raise PgConnectionError("connection closed")
            try:
                if timeout is None:
                    return await self._guarded(self._run(sql, args, values))
                return await asyncio.wait_for(self._guarded(self._run(sql, args, values)), timeout)
            except asyncio.TimeoutError:
                await self.cancel()
                self.close()
                raise PgError("statement timed out after %ss" % timeout, "57014")
            except PgConnectionError:
                self.close()
                raise
            except asyncio.CancelledError:
                self.close()  # the reply is half read: this connection cannot be reused
                raise

    @staticmethod
    def _encode(args):
        """The Bind message's parameter values (a ValueError or TypeError here is the caller's, not the server's)."""
        values = []
        for v in args:
            raw = pg_encode(v)
            values.append(struct.pack("!i", -1) if raw is None else struct.pack("!I", len(raw)) + raw)
        return values

    async def _run(self, sql, args, values):
        m = self._message
        self.ch.write(
            m(b"P", b"\x00" + sql.encode("utf-8") + b"\x00" + struct.pack("!H", 0)) +
            m(b"B", b"\x00\x00" + struct.pack("!HH", 0, len(args)) + b"".join(values) + struct.pack("!H", 0)) +
            m(b"D", b"P\x00") + m(b"E", b"\x00" + struct.pack("!I", 0)) + m(b"S"))
        columns, decoders, rows, tag, error = [], [], [], "", None
        while True:
            kind, payload = await self._read()
            if kind == b"D":
                n = struct.unpack("!H", payload[:2])[0]
                row, at = [], 2
                for i in range(n):
                    size = struct.unpack("!i", payload[at:at + 4])[0]
                    at += 4
                    if size < 0:
                        row.append(None)
                        continue
                    text = payload[at:at + size].decode("utf-8")
                    at += size
                    row.append(decoders[i](text))
                rows.append(tuple(row))
            elif kind == b"T":
                columns, decoders = self._columns(payload)
            elif kind == b"C":
                tag = payload.rstrip(b"\x00").decode()
            elif kind == b"E":
                error = self._error(payload)
            elif kind == b"Z":
                self.status = payload[:1].decode()
                if error is not None:
                    raise error
                return PgResult(rows, columns, tag)
            elif kind == b"A":
                self._notification(payload)
            # 1 ParseComplete, 2 BindComplete, n NoData, I EmptyQuery, N notice, S parameter status: nothing to do

    @staticmethod
    def _columns(payload):
        n = struct.unpack("!H", payload[:2])[0]
        names, decoders, at = [], [], 2
        for _ in range(n):
            end = payload.index(b"\x00", at)
            names.append(payload[at:end].decode())
            oid = struct.unpack("!I", payload[end + 7:end + 11])[0]
            decoders.append(PG_DECODERS.get(oid, str))
            at = end + 19
        return names, decoders

    def _notification(self, payload):
        pid = struct.unpack("!I", payload[:4])[0]
        channel, text = payload[4:].rstrip(b"\x00").split(b"\x00", 1)
        if self.on_notify is not None:
            try:
                self.on_notify(channel.decode(), text.decode("utf-8", "replace"), pid)
            except Exception:
                log.exception("PostgreSQL notification handler failed")

    @contextlib.asynccontextmanager
    async def transaction(self):
        """BEGIN ... COMMIT, or ROLLBACK when the block raises."""
        await self.execute("BEGIN")
        try:
            yield self
        except BaseException:
            if not self.closed:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.execute("ROLLBACK"))
            raise
        await self.execute("COMMIT")

    async def listen(self, channel):
        await self.execute("LISTEN " + pg_quote_ident(channel))

    async def wait_notifications(self, deadline=None):
        """While idle, read what the server sends (notifications) until `deadline`; PgConnectionError when the
        connection breaks. Returns on timeout."""
        async with self.lock:
            while True:
                try:
                    kind, payload = await self._read(deadline)
                except asyncio.TimeoutError:
                    return
                if kind == b"A":
                    self._notification(payload)
                elif kind == b"E":
                    raise self._error(payload)

    async def cancel(self):
        """Ask the server, on a separate connection, to cancel what this connection is running."""
        pid, secret = self.backend
        if not pid or self.settings["host"].startswith("/"):
            return
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(
                self.settings["hostaddr"] or self.settings["host"], self.settings["port"]), 5)
            w.write(struct.pack("!IIII", 16, 80877102, pid, secret))
            await w.drain()
            w.close()
        except (OSError, asyncio.TimeoutError):
            pass

    def close(self):
        if self.ch is not None and not self.closed:
            with contextlib.suppress(Exception):
                self.ch.write(self._message(b"X"))
            self.ch.close()
        self.closed = True


class PgScram:
    """SCRAM-SHA-256 (RFC 5802 / 7677) without channel binding, as PostgreSQL speaks it."""

    def __init__(self, password):
        self.password = password.encode("utf-8")
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.first_bare = "n=,r=" + self.nonce
        self.server_key = None
        self.verified = False

    def first(self):
        return ("n,," + self.first_bare).encode()

    def final(self, server_first):
        text = server_first.decode()
        fields = dict(part.split("=", 1) for part in text.split(","))
        if not fields.get("r", "").startswith(self.nonce):
            raise PgConnectionError("SCRAM: the server's nonce does not extend ours", "28000")
        salted = hashlib.pbkdf2_hmac("sha256", self.password, base64.b64decode(fields["s"]), int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        without_proof = "c=biws,r=" + fields["r"]
        self.auth_message = ",".join((self.first_bare, text, without_proof)).encode()
        signature = hmac.new(hashlib.sha256(client_key).digest(), self.auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self.server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        return (without_proof + ",p=" + base64.b64encode(proof).decode()).encode()

    def verify(self, server_final):
        if self.server_key is None:
            raise PgConnectionError("SCRAM: the server's final message came before its first", "08P01")
        fields = dict(part.split("=", 1) for part in server_final.decode().split(","))
        expected = hmac.new(self.server_key, self.auth_message, hashlib.sha256).digest()
        if not hmac.compare_digest(base64.b64decode(fields.get("v", "")), expected):
            raise PgConnectionError("SCRAM: the server's signature is wrong (not the server we asked for?)", "28000")
        self.verified = True


class PgPool(PgQueries):
    """A few connections shared by callers on one event loop. Connections are opened on demand up to `size`;
    a broken one is dropped and replaced next time; after a failed connect, new attempts wait an exponential
    back-off (0.2 s doubling to 10 s) and fail fast meanwhile, so a dead database costs callers no waiting."""

    def __init__(self, settings, size=4, clock=None):
        self.settings = settings if isinstance(settings, dict) else pg_settings(settings)
        self.size = size
        self.clock = clock or Clock()
        self.idle = []
        self.opened = 0
        self.waiters = collections.deque()
        self.backoff = 0.0
        self.retry_at = 0.0
        self.last_error = None
        self.closed = False

    async def _open(self):
        now = self.clock.now()
        if now < self.retry_at:
            raise PgConnectionError("PostgreSQL unreachable (%s); next try in %.1fs"
                                    % (self.last_error, self.retry_at - now))
        try:
            conn = await PgConnection(self.settings).connect()
        except PgConnectionError as e:
            self.backoff = min(10.0, max(0.2, self.backoff * 2))
            self.retry_at = self.clock.now() + self.backoff
            self.last_error = e.message
            raise
        self.backoff, self.retry_at, self.last_error = 0.0, 0.0, None
        return conn

    async def acquire(self, timeout=10.0):
        if self.closed:
            raise PgConnectionError("pool closed")
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and not conn.ch.eof:
                return conn
            self.opened -= 1
        if self.opened < self.size:
            self.opened += 1
            try:
                return await self._open()
            except BaseException:
                self.opened -= 1
                raise
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise PgConnectionError("no PostgreSQL connection free within %ss" % timeout, "08001")
        finally:
            with contextlib.suppress(ValueError):
                self.waiters.remove(fut)

    def release(self, conn):
        broken = conn.closed or conn.ch.eof or conn.status != "I" or self.closed
        if broken:
            conn.close()
        while self.waiters:
            fut = self.waiters.popleft()
            if fut.done():
                continue
            if broken:  # hand the waiter a fresh slot: it opens its own connection
                asyncio.ensure_future(self._hand_new(fut))
            else:
                fut.set_result(conn)
            return
        if broken:
            self.opened -= 1
        else:
            self.idle.append(conn)

    async def _hand_new(self, fut):
        try:
            conn = await self._open()
        except BaseException as e:
            self.opened -= 1
            if not fut.done():
                fut.set_exception(e)
            return
        if fut.done():
            self.release(conn)
        else:
            fut.set_result(conn)

    @contextlib.asynccontextmanager
    async def connection(self, timeout=10.0):
        conn = await self.acquire(timeout)
        try:
            yield conn
        finally:
            self.release(conn)

    @contextlib.asynccontextmanager
    async def transaction(self, timeout=10.0):
        async with self.connection(timeout) as conn:
            async with conn.transaction():
                yield conn

    async def execute(self, sql, *args, timeout=None):
        async with self.connection() as conn:
            return await conn.execute(sql, *args, timeout=timeout)

    def close(self):
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        self.opened = 0


class PgListener:
    """A dedicated connection that LISTENs on channels and calls `handler(channel, payload, pid)` for each
    notification. Each time it is listening (at first, and after a broken connection is made again with back-off)
    it calls `on_connect()`: notifications sent while it was not listening are lost, so the caller re-reads."""

    def __init__(self, settings, channels, handler, on_connect=None, clock=None):
        self.settings, self.channels, self.handler = settings, list(channels), handler
        self.on_connect = on_connect
        self.clock = clock or Clock()
        self.task = None
        self.connected = asyncio.Event()
        self.conn = None

    def start(self):
        self.task = asyncio.ensure_future(self._run())
        return self

    async def _run(self):
        delay = 0.2
        while True:
            try:
                conn = await PgConnection(self.settings).connect()
                conn.on_notify = self.handler
                for channel in self.channels:
                    await conn.listen(channel)
                self.conn = conn
                self.connected.set()
                delay = 0.2
                if self.on_connect is not None:  # what was sent before we listened is not delivered: re-read
                    await self.on_connect()
                await conn.wait_notifications()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # PgError, OSError: try again after a pause
                log.warning("PostgreSQL listener: %s; reconnecting in %.1fs", e, delay)
            self.connected.clear()
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            await self.clock.sleep(delay)
            delay = min(10.0, delay * 2)

    async def close(self):
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if self.conn is not None:
            self.conn.close()


# === 7. IR ===
# Owns: the one intermediate representation every format and provider meets in: the request (messages made of
# parts, tools, sampling, thinking), the non-streamed response, the stream events, usage and errors. Plain classes
# with __slots__: they sit on the hot path. No wire format appears here.

class Text:
    __slots__ = ("text", "cache_control")
    kind = "text"

    def __init__(self, text, cache_control=None):
        self.text, self.cache_control = text, cache_control


class Image:
    """An image as base64 `data` with its `mime`, or as a `url`."""
    __slots__ = ("mime", "data", "url", "detail")
    kind = "image"

    def __init__(self, mime=None, data=None, url=None, detail=None):
        self.mime, self.data, self.url, self.detail = mime, data, url, detail


class File:
    """A document, audio or video attachment: base64 `data`, a `url`, or a `file_id` uploaded to the file store of
    the family `store` names (openai, anthropic, gemini), which only that family's upstreams can read."""
    __slots__ = ("mime", "data", "url", "filename", "file_id", "store")
    kind = "file"

    def __init__(self, mime=None, data=None, url=None, filename=None, file_id=None, store=None):
        self.mime, self.data, self.url, self.filename, self.file_id = mime, data, url, filename, file_id
        self.store = store


class ToolCall:
    """A model's call of a tool. `arguments` is the JSON text (what OpenAI sends); `signature` carries an opaque
    per-call token (Gemini thoughtSignature) back to the family (`source`) that issued it."""
    __slots__ = ("id", "name", "arguments", "tool_kind", "signature", "source", "parsed")
    kind = "tool_call"

    def __init__(self, id, name, arguments="{}", tool_kind="function", signature=None, source=None):
        self.id, self.name, self.arguments = id, name, arguments
        self.tool_kind, self.signature, self.source = tool_kind, signature, source
        self.parsed = None  # (arguments text, the object it was written from), while the text is unchanged

    @classmethod
    def of_object(cls, id, name, obj):
        """A call whose arguments came as a JSON object (Anthropic's `input`, Gemini's `args`): the object is
        kept beside its text, so a format that writes an object gets it back without parsing the text again (a
        Claude Code history holds hundreds of calls)."""
        obj = obj if isinstance(obj, dict) else {}
        call = cls(id, name, json_dumps(obj))
        call.parsed = (call.arguments, obj)
        return call

    def args_object(self):
        """Arguments as a JSON object; invalid or non-object JSON becomes {} (formats.md §6.2)."""
        parsed = self.parsed
        if parsed is not None and parsed[0] is self.arguments:
            return parsed[1]
        try:
            value = json.loads(self.arguments) if self.arguments else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class ToolResult:
    """The result of one tool call. `content` is a list of Text/Image/File parts; `plain`: the client wrote it as
    a bare string, which a format that has both spellings writes back as one (a same-format request then goes
    upstream as the client wrote it)."""
    __slots__ = ("id", "name", "content", "is_error", "plain")
    kind = "tool_result"

    def __init__(self, id, name=None, content=None, is_error=False, plain=False):
        self.id, self.name, self.content, self.is_error, self.plain = id, name, content or [], is_error, plain

    def text(self):
        return "".join(p.text for p in self.content if p.kind == "text")


class Thinking:
    """Reasoning output. `signature` (Anthropic, Gemini), `redacted` (Anthropic redacted_thinking data) and
    `encrypted` (Responses encrypted_content) are opaque and go back byte-exact only to `source`."""
    __slots__ = ("text", "signature", "redacted", "encrypted", "source", "item_id")
    kind = "thinking"

    def __init__(self, text="", signature=None, redacted=None, encrypted=None, source=None, item_id=None):
        self.text, self.signature, self.redacted = text, signature, redacted
        self.encrypted, self.source, self.item_id = encrypted, source, item_id


class Message:
    """One turn. Roles: user, assistant, tool (ToolResult parts), system (a system turn after the start).
    `plain`: the client wrote the content as a bare string (see ToolResult)."""
    __slots__ = ("role", "parts", "name", "plain")

    def __init__(self, role, parts=None, name=None, plain=False):
        self.role, self.parts, self.name, self.plain = role, parts if parts is not None else [], name, plain

    def text(self):
        return "".join(p.text for p in self.parts if p.kind == "text")


class Tool:
    """A tool definition. `parameters` is the raw JSON Schema; `tool_kind` is function or custom; `format` is a
    custom tool's input grammar; `cache_control` an Anthropic cache breakpoint."""
    __slots__ = ("name", "description", "parameters", "tool_kind", "strict", "format", "cache_control")

    def __init__(self, name, description=None, parameters=None, tool_kind="function", strict=None, format=None,
                 cache_control=None):
        self.name, self.description, self.parameters = name, description, parameters
        self.tool_kind, self.strict, self.format, self.cache_control = tool_kind, strict, format, cache_control


class ThinkingConfig:
    """What the client asked for: an effort level (none/minimal/low/medium/high/xhigh/max/auto) and/or a token
    budget (-1 = dynamic, 0 = off), whether to return thought text, and a Responses summary mode."""
    __slots__ = ("effort", "budget", "include_thoughts", "summary")

    def __init__(self, effort=None, budget=None, include_thoughts=None, summary=None):
        self.effort, self.budget, self.include_thoughts, self.summary = effort, budget, include_thoughts, summary


# Effort <-> budget tables (formats.md §6.3).
EFFORT_BUDGETS = {"none": 0, "auto": -1, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576,
                  "xhigh": 32768, "max": 128000}


def budget_to_effort(budget):
    if budget is None:
        return None
    if budget < 0:
        return "auto"
    if budget == 0:
        return "none"
    for level, limit in (("minimal", 512), ("low", 1024), ("medium", 8192), ("high", 24576)):
        if budget <= limit:
            return level
    return "xhigh"


def thinking_effort(cfg):
    """The effort level a ThinkingConfig amounts to (None when nothing was asked)."""
    if cfg is None:
        return None
    return cfg.effort or budget_to_effort(cfg.budget)


def fit_thinking_budget(req, default):
    """The thinking budget to send for `req`: what was asked (`default` when dynamic or unspecified), kept under
    the client's own output limit, which counts reasoning too: the budget never enlarges the answer the client
    allowed. None when thinking is off."""
    budget = thinking_budget(req.thinking)
    if budget == 0 or thinking_effort(req.thinking) in (None, "none"):
        return None
    if budget is None or budget < 0:
        budget = default
    if req.max_tokens is not None and budget >= req.max_tokens * 3 // 4:
        budget = req.max_tokens * 3 // 4  # a quarter of the client's limit stays for the answer
    return budget


def thinking_budget(cfg):
    if cfg is None:
        return None
    if cfg.budget is not None:
        return cfg.budget
    return EFFORT_BUDGETS.get(cfg.effort) if cfg.effort else None


class ChatRequest:
    """A chat request in the IR. What only an upstream of the client's own format can use is kept in fields read
    only when `client_format` matches: `passthrough` (the client's wire fields by their wire names),
    `native_tools` (tool definitions the IR cannot express: server, hosted and built-in tools), `safety_settings`
    (Gemini) and `betas` (the anthropic-beta header). `cache_key` is the client's prompt-cache / session key.
    `source` is the client's body as sent (a JsonSource), so providers can write unchanged members with its
    bytes."""
    __slots__ = ("model", "system", "messages", "tools", "tool_choice", "parallel_tool_calls", "max_tokens",
                 "temperature", "top_p", "top_k", "stop", "n", "presence_penalty", "frequency_penalty", "seed",
                 "response_format", "thinking", "stream", "include_usage", "user", "metadata", "passthrough",
                 "native_tools", "safety_settings", "betas", "cache_key", "client_key", "request_id",
                 "client_format", "source")

    kind = "chat"

    def __init__(self, model, messages=None, system=None, stream=False, client_format=None):
        self.model = model
        self.system = system if system is not None else []
        self.messages = messages if messages is not None else []
        self.tools = []
        self.tool_choice = None  # None | "auto" | "none" | "required" | {"name": ...}
        self.parallel_tool_calls = None
        self.max_tokens = None
        self.temperature = None
        self.top_p = None
        self.top_k = None
        self.stop = None
        self.n = None
        self.presence_penalty = None
        self.frequency_penalty = None
        self.seed = None
        self.response_format = None  # None | {"type": "json_object"} | {"type": "json_schema", "name", "schema"...}
        self.thinking = None
        self.stream = stream
        self.include_usage = False
        self.user = None
        self.metadata = None
        self.passthrough = {}
        self.native_tools = []
        self.safety_settings = None
        self.betas = None
        self.cache_key = None
        self.client_key = ""  # the name of the client key the request came with
        self.request_id = ""  # one id per client request, on every usage record of its attempts
        self.client_format = client_format
        self.source = None

    def encode(self, obj, body=None):
        """The upstream body `obj` (holding the codec-built `body`, default `obj`) as wire JSON bytes, reusing the
        client's own bytes for members passed on unchanged. The first upstream body written lets the client's
        bytes go: a large request is not held twice while its call runs (a retry elsewhere encodes in full)."""
        source, self.source = self.source, None
        return source.encode(obj, body) if source is not None else json_bytes(obj)

    def system_text(self):
        return "\n\n".join(p.text for p in self.system if p.kind == "text")

    def turn(self, role):
        """The last message when it has `role`, else a new empty one appended: consecutive parts of one role make
        one turn (tool results answering one assistant turn, an assistant's text and calls)."""
        last = self.messages[-1] if self.messages else None
        if last is None or last.role != role:
            last = Message(role, [])
            self.messages.append(last)
        return last

    def conversation_key(self):
        """A stable id for the conversation: the client's cache key, else a hash of its first turns (which do not
        change as the conversation grows), so one conversation keeps one credential and its prompt cache."""
        if self.cache_key:
            return "k:" + str(self.cache_key)
        h = hashlib.sha256()
        _digest_text(h, self.system_text())
        for m in self.messages[:2]:
            h.update(b"\x00" + m.role.encode() + b"\x00")
            for p in m.parts:
                if p.kind == "text":
                    _digest_text(h, p.text)
                elif p.kind == "tool_call":
                    h.update(p.name.encode())
                    _digest_text(h, p.arguments)
        return "h:" + h.hexdigest()[:32]


def _digest_text(h, text, edge=4096):
    """Feed a text to a conversation hash by its length and its first and last `edge` characters: a 1 MB prompt is
    not hashed whole on every request, and two conversations that differ only in their middle are rare enough
    (and would merely share a credential)."""
    if len(text) > 2 * edge:
        text = "%d\x00%s\x00%s" % (len(text), text[:edge], text[-edge:])
    h.update(text.encode("utf-8", "replace"))


class Usage:
    """Token counts. input includes cache reads and writes; output includes reasoning (formats.md §6.9)."""
    __slots__ = ("input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens")

    def __init__(self, input_tokens=0, output_tokens=0, cached_tokens=0, cache_write_tokens=0, reasoning_tokens=0):
        self.input_tokens, self.output_tokens = input_tokens, output_tokens
        self.cached_tokens, self.cache_write_tokens = cached_tokens, cache_write_tokens
        self.reasoning_tokens = reasoning_tokens

    @property
    def total_tokens(self):
        return self.input_tokens + self.output_tokens


class EmbeddingRequest:
    """Texts to embed, in order. `dimensions` asks for shorter vectors where the model allows; `task` is a
    Gemini taskType. Routed like a chat request (same models, credentials and failover)."""
    __slots__ = ("model", "inputs", "dimensions", "task", "client_format", "thinking", "encoding", "client_key",
                 "request_id")
    kind = "embed"
    stream = False

    def __init__(self, model, inputs, dimensions=None, task=None, client_format=None):
        self.model, self.inputs, self.dimensions, self.task = model, inputs, dimensions, task
        self.client_format, self.thinking = client_format, None
        self.encoding = "float"  # how an OpenAI client wants the vectors back (float, or base64 of float32)
        self.client_key = self.request_id = ""

    def conversation_key(self):
        return None  # no conversation: any credential will do


class Embeddings:
    """One vector per input, in input order, and the tokens the upstream counted."""
    __slots__ = ("vectors", "usage")

    def __init__(self, vectors, usage=None):
        self.vectors, self.usage = vectors, usage or Usage()


class ChatResponse:
    """A complete assistant answer. finish: stop | stop_sequence | length | tool_calls | content_filter | pause."""
    __slots__ = ("id", "model", "created", "parts", "finish", "stop_sequence", "usage")

    def __init__(self, id=None, model=None, created=None, parts=None, finish="stop", stop_sequence=None, usage=None):
        self.id, self.model, self.created = id, model, created or now_s()
        self.parts = parts if parts is not None else []
        self.finish, self.stop_sequence, self.usage = finish, stop_sequence, usage

    def settle_finish(self, usage=None):
        """The answer once parsed: `usage` set when given; a `tool_calls` finish without a tool call is a plain
        stop (some upstreams say it anyway)."""
        if usage is not None:
            self.usage = usage
        if self.finish == "tool_calls" and not any(p.kind == "tool_call" for p in self.parts):
            self.finish = "stop"
        return self


# -- stream events ------------------------------------------------------------------------------------------------

class Start:
    __slots__ = ("id", "model", "created")
    kind = "start"

    def __init__(self, id=None, model=None, created=None):
        self.id, self.model, self.created = id, model, created


class TextDelta:
    __slots__ = ("text",)
    kind = "text"

    def __init__(self, text):
        self.text = text


class ThinkingDelta(Thinking):
    """A stream event: reasoning text, and/or the opaque state that closes a thinking block (Thinking's fields)."""
    __slots__ = ()


class ToolCallStart:
    __slots__ = ("index", "id", "name", "tool_kind", "signature", "source")
    kind = "tool_start"

    def __init__(self, index, id, name, tool_kind="function", signature=None, source=None):
        self.index, self.id, self.name = index, id, name
        self.tool_kind, self.signature, self.source = tool_kind, signature, source


class ToolCallDelta:
    __slots__ = ("index", "arguments")
    kind = "tool_delta"

    def __init__(self, index, arguments):
        self.index, self.arguments = index, arguments


class ToolCallEnd:
    __slots__ = ("index",)
    kind = "tool_end"

    def __init__(self, index):
        self.index = index


class UsageEvent:
    __slots__ = ("usage",)
    kind = "usage"

    def __init__(self, usage):
        self.usage = usage


class Finish:
    __slots__ = ("reason", "stop_sequence")
    kind = "finish"

    def __init__(self, reason="stop", stop_sequence=None):
        self.reason, self.stop_sequence = reason, stop_sequence


class ErrorEvent:
    """A failure inside a stream (or before it started): HTTP-like status, message, IR error type and code."""
    __slots__ = ("status", "message", "type", "code")
    kind = "error"

    def __init__(self, status, message, type="server_error", code=None):
        message = SECRET_MASK(message)
        self.status, self.message, self.type, self.code = status, message, type, error_code(status, message, code)

    def error(self):
        return GatewayError(self.status, self.message, self.type, code=self.code)


class RawFrame:
    """A frame of the client's own format, relayed as the upstream sent it (FrameRelay): `data` is the bytes the
    client receives; `lead` marks a frame that carried nothing but the stream's start."""
    __slots__ = ("data", "lead")
    kind = "raw"

    def __init__(self, data, lead=False):
        self.data, self.lead = data, lead


_OPT_STR = (str, type(None))
# The types each field of IR built from upstream bytes may hold (what every encoder assumes), by class.
IR_FIELD_TYPES = {
    Text: {"text": str}, TextDelta: {"text": str},
    ToolCall: {"id": str, "name": str, "arguments": str, "signature": _OPT_STR, "source": _OPT_STR},
    Thinking: dict.fromkeys(("text", "signature", "redacted", "encrypted", "item_id"), _OPT_STR),
    Usage: dict.fromkeys(Usage.__slots__, (int, float)), Start: {"id": _OPT_STR, "model": _OPT_STR},
    ToolCallStart: {"index": int, "id": str, "name": str, "signature": _OPT_STR},
    ToolCallDelta: {"index": int, "arguments": str}, ToolCallEnd: {"index": int}, UsageEvent: {"usage": Usage},
    Finish: {"reason": str, "stop_sequence": _OPT_STR}, ErrorEvent: {"status": int, "message": str},
    ToolResult: {"id": str, "name": _OPT_STR}, Tool: {"name": str, "description": _OPT_STR},
    Image: dict.fromkeys(Image.__slots__, _OPT_STR), File: dict.fromkeys(File.__slots__, _OPT_STR),
    ThinkingConfig: {"effort": _OPT_STR, "budget": (int, float, type(None)), "summary": _OPT_STR}}
IR_FIELD_TYPES[ThinkingDelta] = IR_FIELD_TYPES[Thinking]


def ir_problem(value):
    """What is wrong with IR built from upstream bytes (stream events, or a ChatResponse and its parts): the first
    field whose type is not the IR's (a name that is an object, a usage count that is a string), or None. A decoder
    copies values through; this is the one check that they are what every encoder may assume."""
    if value.__class__ is list:
        for item in value:
            if item.__class__ is not RawFrame:  # relayed bytes (most of a relayed stream's events) hold no fields
                problem = ir_problem(item)
                if problem:
                    return problem
        return None
    if value.__class__ is ChatResponse:
        return ir_problem(value.parts) or (ir_problem(value.usage) if value.usage is not None else None)
    for field, types in IR_FIELD_TYPES.get(value.__class__, _NO_FIELDS).items():
        v = getattr(value, field)
        if v.__class__ is bool or not isinstance(v, types):  # no IR field is a boolean
            return "%s.%s is %s" % (type(value).__name__, field, type(v).__name__)
        if v.__class__ is Usage:
            return ir_problem(v)
    return None


_NO_FIELDS = {}


def request_problem(req):
    """ir_problem for a client's parsed request: what a parser let through with the wrong type (a number where a
    text or an id belongs), which every encoder would trip over. None when the request is sound."""
    for m in req.messages:
        problem = ir_problem(m.parts)
        if problem:
            return problem
        for p in m.parts:
            if p.__class__ is ToolResult:
                problem = ir_problem(p.content)
                if problem:
                    return problem
    return ir_problem(req.system) or ir_problem(req.tools) or (
        ir_problem(req.thinking) if req.thinking is not None else None)


CONTEXT_OVERFLOW = "context_length_exceeded"
_OVERFLOW_WORDING = ("context_length_exceeded", "prompt is too long", "maximum context length", "context window",
                     "exceeds the maximum number of tokens", "input token count", "context length")


def error_code(status, message, code=None):
    """The IR error code: `context_length_exceeded` when a 400 says the prompt does not fit the model's context,
    in any family's wording (OpenAI's code, Anthropic's "prompt is too long", Gemini's token-count message);
    else the upstream's own code. The one place overflow is recognised; codecs render it as their clients expect."""
    if code == CONTEXT_OVERFLOW or (status in (400, 413, 422) and isinstance(message, str) and
                                    any(w in message.lower() for w in _OVERFLOW_WORDING)):
        return CONTEXT_OVERFLOW
    return code if isinstance(code, str) else None


class GatewayError(Exception):
    """A request that fails with an HTTP status, rendered in the client's own error format.
    IR error types: invalid_request, authentication, permission, not_found, rate_limit, overloaded,
    server_error, timeout, upstream. `code` is the IR error code (see error_code)."""

    def __init__(self, status, message, type="invalid_request", param=None, headers=None, code=None):
        message = SECRET_MASK(message)
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.headers = headers or []
        self.code = error_code(status, message, code)


def error_type_for_status(status):
    if status == 400 or status == 422:
        return "invalid_request"
    if status == 401:
        return "authentication"
    if status in (402, 403):
        return "permission"
    if status == 404:
        return "not_found"
    if status == 408 or status == 504:
        return "timeout"
    if status == 429:
        return "rate_limit"
    if status == 529 or status == 503:
        return "overloaded"
    return "server_error"


class ResponseCollector:
    """Folds stream events into a ChatResponse, so a streaming-only upstream can serve non-stream clients."""

    def __init__(self):
        self.resp = ChatResponse()
        self._text = None
        self._thinking = None
        self._calls = {}
        self.error = None

    def add(self, ev):
        k = ev.kind
        r = self.resp
        if k == "text":
            if self._text is None:
                self._text = Text("")
                r.parts.append(self._text)
                self._thinking = None
            self._text.text += ev.text
        elif k == "thinking":
            if ev.redacted:
                r.parts.append(Thinking("", redacted=ev.redacted, source=ev.source))
                self._thinking = self._text = None
                return
            positional = not ev.text and ev.signature and ev.source == "gemini"  # belongs to the next part
            if self._thinking is None or positional or \
                    (ev.text and (self._thinking.signature or self._thinking.encrypted)):
                self._thinking = Thinking("", source=ev.source, item_id=ev.item_id)
                r.parts.append(self._thinking)
                self._text = None
            t = self._thinking
            if ev.item_id and not t.item_id:
                t.item_id = ev.item_id
            t.text += ev.text or ""
            if ev.signature:
                t.signature = ev.signature
            if ev.redacted:
                t.redacted = ev.redacted
            if ev.encrypted:
                t.encrypted = ev.encrypted
            if ev.source:
                t.source = ev.source
        elif k == "tool_start":
            call = ToolCall(ev.id, ev.name, "", ev.tool_kind, ev.signature, ev.source)
            self._calls[ev.index] = call
            r.parts.append(call)
            self._text = self._thinking = None
        elif k == "tool_delta":
            call = self._calls.get(ev.index)
            if call is not None:
                call.arguments += ev.arguments
        elif k == "usage":
            r.usage = ev.usage
        elif k == "finish":
            r.finish, r.stop_sequence = ev.reason, ev.stop_sequence
        elif k == "start":
            r.id = ev.id or r.id
            r.model = ev.model or r.model
            r.created = ev.created or r.created
        elif k == "error":
            self.error = ev

    def result(self):
        for call in self._calls.values():
            if not call.arguments:
                call.arguments = "{}"
        if any(p.kind == "tool_call" for p in self.resp.parts) and self.resp.finish == "stop":
            self.resp.finish = "tool_calls"
        self.resp.settle_finish()
        return self.resp


# -- reasoning state carried through clients ---------------------------------------------------------------------
# An upstream's reasoning state (Anthropic signatures and redacted thinking, Gemini thoughtSignatures, Responses
# encrypted_content and item ids) must come back on the next turn, byte-exact and only to the family that made
# it (formats.md §6.3). A client of another family carries it as one opaque token that only these two helpers
# make and read; codecs never parse each other's tokens.

REASONING_TOKEN = "llmmux:v1:"
_REASONING_FIELDS = (("s", "signature"), ("r", "redacted"), ("e", "encrypted"), ("i", "item_id"))


def pack_reasoning(part):
    """The opaque token for a Thinking part or ThinkingDelta: `llmmux:v1:` + base64url of its family (`f`) and
    state. A part without state (OpenAI chat `reasoning_content`) still gets one, so every client that requires
    a signature has one; it is recognised on replay and never forwarded."""
    state = {"f": part.source or "anthropic"}
    for short, name in _REASONING_FIELDS:
        value = getattr(part, name, None)
        if value:
            state[short] = value
    return REASONING_TOKEN + base64.urlsafe_b64encode(json_bytes(state)).decode("ascii").rstrip("=")


def unpack_reasoning(token):
    """Thinking fields (source, signature, redacted, encrypted, item_id) from a token pack_reasoning made, or from
    the unversioned `llmmux:<family>:<value>` tokens of earlier releases; None for anything else (a family's own
    native token)."""
    if not isinstance(token, str) or not token.startswith("llmmux:"):
        return None
    fields = {"source": None, "signature": None, "redacted": None, "encrypted": None, "item_id": None}
    if token.startswith(REASONING_TOKEN):
        body = token[len(REASONING_TOKEN):]
        try:
            state = json.loads(b64url_decode(body))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        if not isinstance(state, dict) or not isinstance(state.get("f"), str):
            return None
        fields["source"] = state["f"]
        for short, name in _REASONING_FIELDS:
            if isinstance(state.get(short), str):
                fields[name] = state[short]
        return fields
    family, _, value = token[len("llmmux:"):].partition(":")
    if family == "responses":
        item_id, _, encrypted = value.partition("|")
        fields.update(source=family, item_id=item_id or None, encrypted=encrypted or None)
    elif family == "anthropic-redacted":
        fields.update(source="anthropic", redacted=value)
    else:
        fields.update(source=family, signature=value or None)
    return fields


def thinking_from_token(text, token, family):
    """A Thinking part from a client's reasoning token: carried state restored where the gateway made the token,
    else the token is the client family's own signature."""
    fields = unpack_reasoning(token)
    if fields is None:
        return Thinking(text, token or None, source=family)
    return Thinking(text, **fields)


_THINKING_SUFFIX = re.compile(r"^(.+)\(([A-Za-z]+|-?\d+)\)$")


def split_thinking_suffix(model):
    """`model(high)` / `model(16384)` -> ("model", ThinkingConfig) (providers.md §1.4); else (model, None)."""
    m = _THINKING_SUFFIX.match(model)
    if not m:
        return model, None
    base, value = m.group(1), m.group(2).lower()
    if value.lstrip("-").isdigit():
        return base, ThinkingConfig(budget=int(value))
    if value in EFFORT_BUDGETS:
        return base, ThinkingConfig(effort=value)
    return model, None


def estimate_tokens(req):
    """A documented heuristic for count_tokens when the upstream has no counter: about 4 characters per token
    over every text, tool definition and argument, plus a few tokens per message and per image."""
    chars = sum(len(p.text) for p in req.system if p.kind == "text")
    extra = 0
    for m in req.messages:
        extra += 4
        for p in m.parts:
            k = p.kind
            if k == "text":
                chars += len(p.text)
            elif k == "thinking":
                chars += len(p.text or "")
            elif k == "tool_call":
                chars += len(p.name) + len(p.arguments or "")
            elif k == "tool_result":
                chars += len(p.text())
            elif k in ("image", "file"):
                extra += 258
    for t in req.tools:
        chars += len(t.name) + len(t.description or "") + len(json_dumps(t.parameters or {}))
    return max(1, chars // 4 + extra)


def repair_tool_turns(messages):
    """Make tool calls and results pair up the way Anthropic and Gemini demand (formats.md §6.1): results go
    right after the assistant turn that made the calls, duplicates are dropped, calls left unanswered (a user
    who interrupted a tool run) get a synthetic 'cancelled' result, and results with no call become text."""
    out = []
    i = 0
    n = len(messages)
    while i < n:
        m = messages[i]
        if m.role == "assistant":
            out.append(m)
            calls = [p for p in m.parts if p.kind == "tool_call"]
            i += 1
            if not calls:
                continue
            results = {}
            extra_user = []
            while i < n and messages[i].role in ("tool",):
                for r in messages[i].parts:
                    if r.kind == "tool_result":
                        results[r.id] = r
                i += 1
            parts = []
            for c in calls:
                r = results.pop(c.id, None)
                if r is None:
                    r = ToolResult(c.id, c.name, [Text("cancelled: no result was returned for this call")], True)
                elif not r.name:
                    r.name = c.name
                parts.append(r)
            for r in results.values():
                extra_user.append(Text("[result of tool call %s]: %s" % (r.id, r.text())))
            out.append(Message("tool", parts))
            if extra_user:
                out.append(Message("user", extra_user))
            continue
        if m.role == "tool":
            # Results with no preceding call: keep the information as user text.
            texts = [Text("[result of tool call %s]: %s" % (r.id, r.text())) for r in m.parts if r.kind == "tool_result"]
            if texts:
                out.append(Message("user", texts))
            i += 1
            continue
        out.append(m)
        i += 1
    return out


# === 8. Codecs ===
# Owns: one codec per API format, each translating between its wire JSON and the IR in both directions
# (request, response, stream). Codecs never talk to the network and never know which provider is upstream.

class BadRequest(GatewayError):
    """The client's request is malformed; names the field at fault."""

    def __init__(self, message, param=None):
        super().__init__(400, message, "invalid_request", param)


# -- wire helpers shared by the codecs ------------------------------------------------------------------------

def data_url_split(url):
    """('image/png', '<base64>') for a data: URL, else None."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep:
        return None
    mime = head.split(";")[0] or "application/octet-stream"
    if ";base64" not in head:
        data = base64.b64encode(urllib.parse.unquote_to_bytes(data)).decode("ascii")
    return mime, data


def b64_normalize(value):
    """Standard-alphabet padded base64 (python-genai sends URL-safe; Gemini accepts both)."""
    if not isinstance(value, str):
        return value
    v = value.replace("-", "+").replace("_", "/").strip()
    return v + "=" * (-len(v) % 4)


def custom_tool_schema():
    """How a freeform (custom) tool is offered to upstreams that only know function tools."""
    return {"type": "object", "properties": {"input": {"type": "string", "description": "The raw input."}},
            "required": ["input"]}


def _expect(value, types, field, what):
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRequest("'%s' must be %s" % (field, what), field)
    if not isinstance(value, types):
        raise BadRequest("'%s' must be %s" % (field, what), field)
    return value


def request_model(body, message="'model' is required and must be a non-empty string"):
    """The `model` of a client request body, validated (every format needs one)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest(message, "model")
    return model.strip()


def openai_family_usage(u, inp, out):
    """Usage from the usage object of OpenAI's formats: `<inp>_tokens` (cache reads included), `<out>_tokens`
    (reasoning included) and their `_details` (chat says prompt/completion, Responses input/output)."""
    if not isinstance(u, dict):
        return None
    ind = u.get(inp + "_tokens_details") or {}
    outd = u.get(out + "_tokens_details") or {}
    return Usage(u.get(inp + "_tokens") or 0, u.get(out + "_tokens") or 0, ind.get("cached_tokens") or 0,
                 ind.get("cache_write_tokens") or 0, outd.get("reasoning_tokens") or 0)


def _array(body, field):
    """body[field] as a list ([] when absent); anything else is a 400 naming the field."""
    value = body.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("%s must be an array" % field, field)
    return value


def _objects(items, field):
    """(index, where, item) for each element of a list that must hold JSON objects; a 400 names any other."""
    for i, item in enumerate(items):
        where = "%s[%d]" % (field, i)
        if not isinstance(item, dict):
            raise BadRequest("%s must be an object" % where, field)
        yield i, where, item


def _number(body, field):
    return _expect(body.get(field), (int, float), field, "a number")


def _integer(body, field):
    return _expect(body.get(field), int, field, "an integer")


_INTEGER_SETTINGS = frozenset(("top_k", "n", "seed", "max_tokens"))


def _read_settings(req, body, spec, where=""):
    """Generation settings from `body` into the IR. `spec` lists IR names, each optionally `=wire_name`; integers
    where the IR keeps integers, numbers elsewhere; a wrong type is a 400 naming the field."""
    for name, wire, types, what in _settings_spec(spec):
        setattr(req, name, _expect(body.get(wire), types, where + wire, what))


@functools.lru_cache(maxsize=None)
def _settings_spec(spec):
    """_read_settings's `spec` read once: (IR name, wire name, types, what they are) per setting."""
    out = []
    for item in spec.split():
        name, _, wire = item.partition("=")
        out.append((name, wire or name) + ((int, "an integer") if name in _INTEGER_SETTINGS else
                                           ((int, float), "a number")))
    return tuple(out)


def _stop_list(value, field="stop"):
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise BadRequest("'%s' must be a string or a list of strings" % field, field)


OPENAI_FINISH_OUT = {"stop": "stop", "stop_sequence": "stop", "length": "length", "tool_calls": "tool_calls",
                     "content_filter": "content_filter", "refusal": "content_filter", "pause": "stop"}
OPENAI_FINISH_IN = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls",
                    "content_filter": "content_filter"}
OPENAI_ERROR_TYPES = {"invalid_request": "invalid_request_error", "authentication": "authentication_error",
                      "permission": "permission_error", "not_found": "not_found_error",
                      "rate_limit": "rate_limit_error", "overloaded": "server_error", "server_error": "server_error",
                      "timeout": "timeout_error", "upstream": "upstream_error"}


# The shapes of client request bodies, for errors that name the field a parser tripped over. A shape is a type
# ("str", "int", "num", "bool", "object", "array", "any"), an object's fields as a dict (fields it does not name
# are not looked at; null counts as absent; a camelCase name also matches its snake_case spelling, as Gemini's
# protobuf JSON allows), [item shape] for an array, or a tuple of alternatives. They are consulted only after a
# parser failed on something its own checks missed, so they cost nothing on the way in and can refuse nothing.
_SHAPE_TYPES = {"str": (str, "a string"), "int": (int, "an integer"), "num": ((int, float), "a number"),
                "bool": (bool, "a boolean"), "object": (dict, "an object"), "array": (list, "an array")}


def _json_kind(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _shape_name(shape):
    if isinstance(shape, tuple):
        return " or ".join(_shape_name(s) for s in shape)
    if isinstance(shape, dict):
        return "an object"
    if isinstance(shape, list):
        return "an array"
    return _SHAPE_TYPES[shape][1]


def _fits_kind(value, shape):
    """Whether `value` is the kind of thing `shape` describes, before looking inside it."""
    if isinstance(shape, dict):
        return isinstance(value, dict)
    if isinstance(shape, list):
        return isinstance(value, list)
    if shape == "any":
        return True
    types = _SHAPE_TYPES[shape][0]
    return isinstance(value, types) and (shape == "bool" or not isinstance(value, bool))


_SNAKE = {}


def snake_case(camel):
    """`inlineData` -> `inline_data` (cached): protobuf JSON accepts both spellings of a field."""
    snake = _SNAKE.get(camel)
    if snake is None:
        snake = _SNAKE[camel] = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)
    return snake


def shape_problem(value, shape, path=()):
    """(path, expected, found) for the first place `value` departs from `shape`, or None where it fits."""
    if isinstance(shape, tuple):
        fitting = [s for s in shape if _fits_kind(value, s)]
        if not fitting:
            return path, _shape_name(shape), _json_kind(value)
        problems = [shape_problem(value, s, path) for s in fitting]
        return None if None in problems else max(problems, key=lambda p: len(p[0]))
    if not _fits_kind(value, shape):
        return path, _shape_name(shape), _json_kind(value)
    if isinstance(shape, dict):
        for key, sub in shape.items():
            v = value.get(key)
            if v is None and key not in value:
                key = snake_case(key)  # as the client spelt it
                v = value.get(key)
            if v is not None:
                problem = shape_problem(v, sub, path + (key,))
                if problem is not None:
                    return problem
    elif isinstance(shape, list):
        for i, item in enumerate(value):
            problem = shape_problem(item, shape[0], path + (i,))
            if problem is not None:
                return problem
    return None


def _guard_client_parser(fn):
    """A client parser that fails on a body of the wrong shape, or lets a value of the wrong type into the IR,
    answers 400 naming the field (from the codec's REQUEST_SHAPES), never 500 here or in an encoder later."""
    @functools.wraps(fn)
    def guarded(cls, *args, **kw):
        try:
            req = fn(cls, *args, **kw)
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError) as e:
            log.info("%s request rejected: %s: %s", cls.__name__, type(e).__name__, e)
            detail = str(e)[:200] if not isinstance(e, KeyError) else "missing %s" % e
        else:
            detail = request_problem(req) if req.__class__ is ChatRequest else None
            if detail is None:
                return req
            log.info("%s request rejected: %s", cls.__name__, detail)
        shape = cls.REQUEST_SHAPES.get(fn.__name__)
        problem = shape_problem(args[0], shape) if shape is not None and args else None
        if problem is None:
            raise BadRequest("invalid request body: a field has the wrong type or shape (%s)" % detail)
        path, expected, found = problem
        field = cls.field_path(path)
        raise BadRequest("%s: expected %s, got %s" % (field, expected, found), field)
    return guarded


class Codec:
    """One API format, translated to and from the IR in both directions. A codec reads and writes only its own
    format's fields and tokens (reasoning state of other families goes through pack_reasoning). Each implements:
      parse_request(body) -> ChatRequest      a client's request body (Gemini also takes the model from the path)
      build_request(req, model) -> dict       the body for an upstream that speaks this format
      parse_response(data) -> ChatResponse    an upstream's whole answer
      build_response(resp, req) -> dict       the whole answer for a client
      error_body(err) -> dict                 a GatewayError in the format's error shape (default: OpenAI's)
      StreamDecoder(req)                      upstream frames -> IR events, an EventDecoder
      StreamEncoder(req)                      IR events -> client bytes, an EventEncoder
    `name` is the format's id (ChatRequest.client_format). Completions is a client format only."""

    name = "?"
    file_store = None  # the family whose uploaded files this format's upstreams can read by id
    CLIENT_PARSERS = ("parse_request", "parse_embeddings")
    REQUEST_SHAPES = {}  # parser name -> the shape of its body (see shape_problem), to name a field at fault

    @staticmethod
    def field_path(path):
        """A field's place in a request body as this format's errors write it: messages[2].content[0].text."""
        return "".join("[%d]" % k if isinstance(k, int) else ("." if i else "") + k for i, k in enumerate(path))

    def __init_subclass__(cls, **kw):
        """The contract for client input: a codec's parsers raise BadRequest (400) and nothing else. A body of
        the wrong shape that slips past a parser's own checks (a list where an object belongs, a null in a list)
        is turned into a 400 naming what was wrong, never a 500."""
        super().__init_subclass__(**kw)
        for name in cls.CLIENT_PARSERS:
            fn = cls.__dict__.get(name)
            if isinstance(fn, classmethod):
                setattr(cls, name, classmethod(_guard_client_parser(fn.__func__)))

    @classmethod
    def file_ref(cls, part):
        """The id of an uploaded file for this format's upstream; a 400 when it lives in another family's store
        (never dropped silently)."""
        if part.store != cls.file_store:
            raise BadRequest("%s is a file uploaded to %s's file store, which this model's upstream cannot read; "
                             "send the file's content inline (base64) instead" % (part.file_id, part.store),
                             "messages")
        return part.file_id

    @staticmethod
    def error_body(err):
        return {"error": {"message": err.message, "type": OPENAI_ERROR_TYPES.get(err.type, err.type),
                          "param": err.param, "code": err.code}}

    # -- same-format pass-through (FrameRelay): a codec that declares RELAY_MARKS has its streams relayed ------------
    RELAY_MODEL_KEY = "model"  # the frame field naming the model: the relay writes the asked model there
    RELAY_TALLY = None  # a field whose last value counts (usage repeated in every frame): its last frame is decoded

    # Bytes in every frame that may carry what the gateway must observe (usage, the finish, an error): such frames
    # are decoded, frames without any are relayed undecoded. A false alarm (the bytes in content) costs a decode.
    RELAY_MARKS = ()

    @staticmethod
    def relay_edit(req, event, data):
        """The frame's data as the client should get it (None: drop the frame)."""
        return data

    @classmethod
    def relay(cls, req, provider):
        """A FrameRelay when `provider` streams this very format, else None."""
        if cls.RELAY_MARKS and provider.codec is cls and provider.relays_frames:
            return FrameRelay(cls, req, provider.stream_decoder(req))
        return None


class EventDecoder:
    """Base of every codec's StreamDecoder: upstream frames in, IR events out.
      feed(event, data) -> [events]   one frame (SSE event name and data); formats whose frames are JSON objects
                                      implement on_object(obj, type) instead and get malformed frames skipped
      close() -> [events]             the end of the body: what a cut-off stream still owes (Finish, Error)"""

    def __init__(self, req=None):
        self.req = req
        self.started = self.done = False  # Start sent; the upstream said it was finished
        self.finish = self.usage = None

    def feed(self, event, data):
        obj = json_or_none(data)
        return self.on_object(obj, obj.get("type") or event) if isinstance(obj, dict) else []

    def close(self):
        return []


class EventEncoder:
    """Base of every codec's StreamEncoder: IR stream events in, the client format's bytes out. The skeleton all
    formats share is here: usage is kept for the closing frames, the finish is written once, an error event
    becomes the format's in-band error and ends the stream. A subclass implements on_<kind>(ev) for the events
    its format shows (start, text, thinking, tool_start, tool_delta, tool_end), finish(ev) (the closing frames)
    and error_frame(err); close() gives what follows the last frame (b"" unless the format needs a tail)."""

    HANDLERS = {"start": "on_start", "text": "on_text", "thinking": "on_thinking", "tool_start": "on_tool_start",
                "tool_delta": "on_tool_delta", "tool_end": "on_tool_end"}

    def __init__(self, req):
        self.req = req
        self.usage = None
        self.finished = False

    def encode(self, ev):
        """The bytes for one IR event (b"" when it only changes the encoder's state)."""
        k = ev.kind
        if k == "usage":
            self.usage = ev.usage
            return b""
        if k == "finish":
            if self.finished:
                return b""
            self.finished = True
            return self.finish(ev)
        if k == "error":
            return self.error(ev.error())
        handler = getattr(self, self.HANDLERS.get(k, "on_other"), None)
        return handler(ev) if handler is not None else b""

    def error(self, err):
        self.finished = True
        return self.error_frame(err)

    def close(self):
        return b""


_SSE_FRAME_END = re.compile(rb"\r?\n\r?\n")


def sse_frame_ends(buf):
    """The offsets just past each complete SSE frame (a blank line) in buf. Without a CR in buf (most upstreams)
    the ends are found by find(), far faster than the regular expression that also knows CRLF."""
    if buf.find(b"\r") < 0:
        ends = []
        k = buf.find(b"\n\n")
        while k >= 0:
            ends.append(k + 2)
            k = buf.find(b"\n\n", k + 2)
        return ends
    return [m.end() for m in _SSE_FRAME_END.finditer(buf)]


RELAYED = "relayed"  # the event name FrameRelay.split gives a run of frames relayed without decoding


class FrameRelay(EventDecoder):
    """Same-format pass-through: when the client and the upstream speak one format, the upstream's frames reach
    the client as they came instead of being decoded into the IR and encoded again. The relay is the Call's frame
    parser (`split`, `split_end`) and its decoder (`feed`, `close`); its `encoder` (a RelayEncoder) writes the
    response. Frames are cut from the upstream bytes and looked at as bytes: a frame holding none of the codec's
    RELAY_MARKS (no usage, finish or error can be in it) joins a run that goes out in one piece; any other
    frame, and every frame before the first content (so a failure before any content is still an HTTP error
    status, as on the general path), is decoded by the format's own StreamDecoder, which tells the Call what it
    must know. An upstream error frame is not relayed: the format's encoder renders it, masked, as it renders every
    error. The model field names the model the client asked for, as the encoders write it; the codec may edit a
    decoded frame (`relay_edit`)."""

    _model_fields = {}  # codec -> its model field and that field's JSON string value, as a pattern

    def __init__(self, codec, req, decoder):
        EventDecoder.__init__(self, req)
        self.codec, self.decoder = codec, decoder
        self.encoder = RelayEncoder(codec, req)
        self.sse = SSEParser()  # for the frames that are decoded
        self.pending = bytearray()  # bytes after the last complete frame
        self.lead = True  # no content relayed yet: every frame is decoded
        self.tally = None  # the last relayed frame carrying codec.RELAY_TALLY (its last value counts)
        self.model_key = '"%s"' % codec.RELAY_MODEL_KEY
        self.model_key_bytes = self.model_key.encode()
        self.model_json = json_dumps(req.model)
        self.model_field = self._model_fields.get(codec)
        if self.model_field is None:  # the first `"model": "..."` of a frame is the frame's own (values are escaped)
            self.model_field = self._model_fields[codec] = re.compile(
                r'(%s\s*:\s*)"(?:[^"\\]|\\.)*"' % re.escape(self.model_key))
        self.seen_bytes = self.out_bytes = None  # the model field as the upstream writes it, as the client gets it

    # -- the parser's side: upstream bytes -> runs of relayed frames and frames to decode -------------------------
    def split(self, chunk):
        """The SSE frames to decode as (event, data) and each run of plain frames as (RELAYED, bytes), in order.
        Where a frame is to be decoded, a generator: a frame is judged after the frames before it were decoded (the
        first content ends the lead). The buffer is searched, not each frame: its frame ends and the places of the
        codec's marks are found by a few scans of the whole read (a stream's read holds dozens of frames), then
        each frame is judged by where its bounds fall."""
        buf = self.pending
        buf += chunk
        ends = sse_frame_ends(buf)
        if not ends:
            if len(buf) > SSEParser.MAX_EVENT:
                raise UpstreamError("too-large", "an upstream event is larger than %d bytes" % SSEParser.MAX_EVENT)
            return ()
        marks = [] if self.lead and len(ends) == 1 else self._marks_in(buf, ends[-1])
        if not marks and not self.lead:  # most reads: no frame to decode, so every frame joins one run
            run = self._relay_run(buf, 0, ends[-1])
            del buf[:ends[-1]]
            return run
        return self._judge(buf, ends, marks)

    def _judge(self, buf, ends, marks):
        """split's frames one by one, for a read where some are decoded."""
        start = 0  # where the next frame begins
        run = -1  # where the run of plain frames under way began
        m = 0  # the first mark not before `start`
        try:
            for end in ends:
                while m < len(marks) and marks[m] < start:
                    m += 1
                if not self.lead and (m == len(marks) or marks[m] >= end):
                    run = start if run < 0 else run
                    start = end
                    continue
                if run >= 0:
                    yield from self._relay_run(buf, run, start)
                    run = -1
                frame, start = bytes(buf[start:end]), end
                yield from self.sse.feed(frame)
            if run >= 0:
                yield from self._relay_run(buf, run, start)
        finally:
            del buf[:start]

    def _marks_in(self, buf, stop):
        """The sorted offsets in buf[:stop] where one of the codec's marks begins."""
        found = []
        for mark in self.codec.RELAY_MARKS:
            k = buf.find(mark, 0, stop)
            while k >= 0:
                found.append(k)
                k = buf.find(mark, k + 1, stop)
        found.sort()
        return found

    def _relay_run(self, buf, begin, end):
        """A run of plain frames, buf[begin:end], as one relayed piece with the model field renamed, in a tuple.
        Where a frame writes the field otherwise than the upstream's first frame did, the run is taken frame by
        frame (a generator: such a frame is decoded and framed again, which learns the new way)."""
        run = bytes(buf[begin:end])
        tally = self.codec.RELAY_TALLY
        keys = run.count(self.model_key_bytes)
        if keys and (self.seen_bytes is None or run.count(self.seen_bytes) != keys):
            return self._relay_frames(run)
        if keys and self.seen_bytes != self.out_bytes:
            run = run.replace(self.seen_bytes, self.out_bytes)
        if tally is not None:
            k = run.rfind(tally)
            if k >= 0:  # the frame that holds the run's last tally
                ends = sse_frame_ends(run)
                last = bisect.bisect_right(ends, k)
                self.tally = run[ends[last - 1] if last else 0:ends[last]]
        return ((RELAYED, run),)

    def _relay_frames(self, run):
        plain = []
        start = 0
        for end in sse_frame_ends(run):
            frame, start = run[start:end], end
            renamed = self._rename(frame)
            if renamed is not None:
                plain.append(renamed)
                continue
            if plain:
                yield RELAYED, b"".join(plain)
                plain = []
            yield from self.sse.feed(frame)
        if plain:
            yield RELAYED, b"".join(plain)

    def split_end(self):
        """The end of the upstream body: a last frame not followed by a blank line is decoded."""
        rest, self.pending = bytes(self.pending), bytearray()
        return self.sse.feed(rest) + self.sse.finish()

    def _rename(self, frame):
        """The frame with the asked model in its model field; None when it writes the field another way (then it
        is decoded and framed again, which learns the new way)."""
        if self.model_key_bytes in frame:
            if self.seen_bytes is None or self.seen_bytes not in frame:
                return None
            frame = frame.replace(self.seen_bytes, self.out_bytes, 1)
        if self.codec.RELAY_TALLY is not None and self.codec.RELAY_TALLY in frame:
            self.tally = frame
        return frame

    # -- the decoder's side: frames -> events for the Call and the response ---------------------------------------
    def feed(self, event, data):
        if event is RELAYED:
            return [RawFrame(data)]
        self.tally = None  # the decoder now holds the newest tally
        events = self.decoder.feed(event, data)
        lead = self.lead = self.lead and all(ev.kind == "start" for ev in events)
        if any(ev.kind == "error" for ev in events):
            return events  # rendered by the encoder, like every error
        data = self.codec.relay_edit(self.req, event, data)
        if data is not None:
            events.append(RawFrame(self.frame(event, data), lead))
        return events

    def close(self):
        """What the decoder still owes, after the last relayed tally frame (decoded now, for its value)."""
        events = []
        if self.tally is not None:
            for event, data in SSEParser().feed(self.tally + b"\n\n"):
                events += [ev for ev in self.decoder.feed(event, data) if ev.kind in ("usage", "error")]
        return events + self.decoder.close()

    def frame(self, event, data):
        """A decoded frame written again for the client, its model field renamed."""
        if self.model_key in data:
            m = self.model_field.search(data)
            if m is not None:
                renamed = m.group(1) + self.model_json
                self.seen_bytes, self.out_bytes = m.group(0).encode(), renamed.encode()
                data = data[:m.start()] + renamed + data[m.end():]
        if "\n" in data:
            data = data.replace("\n", "\ndata: ")
        if event:
            return ("event: %s\ndata: %s\n\n" % (event, data)).encode()
        return ("data: %s\n\n" % data).encode()


class RelayEncoder(EventEncoder):
    """The response side of a FrameRelay: relayed frames as they are, errors in the format's own error frame;
    decoded events only inform the Call."""

    def __init__(self, codec, req):
        EventEncoder.__init__(self, req)
        self.codec = codec

    def encode(self, ev):
        if ev.kind == "raw":
            return ev.data
        if ev.kind == "error":
            return self.error(ev.error())
        return b""

    def error_frame(self, err):
        encoder = self.codec.StreamEncoder(self.req)
        encoder.started = True  # the upstream's own start frames were relayed
        return encoder.error_frame(err)


class OpenAIChat(Codec):
    """OpenAI Chat Completions (`/v1/chat/completions`), formats.md §2.2–2.4."""
    name = "openai"
    file_store = "openai"
    PART_SHAPE = {"type": "str", "text": "str", "refusal": "str", "image_url": ("str", {"url": "str", "detail": "str"}),
                  "input_audio": {"data": "str", "format": "str"},
                  "file": {"file_id": "str", "file_data": "str", "filename": "str"}}
    FUNCTION_SHAPE = {"name": "str", "description": "str", "parameters": "object", "strict": "bool"}
    TOOL_SHAPE = {"type": "str", "function": FUNCTION_SHAPE, "custom": {"name": "str", "description": "str"}}
    REQUEST_SHAPES = {
        "parse_request": {
            "model": "str", "messages": [{
                "role": "str", "content": ("str", [("str", PART_SHAPE)]), "name": "str", "tool_call_id": "str",
                "tool_calls": [{"id": "str", "type": "str", "custom": {"name": "str"},
                                "function": {"name": "str", "arguments": ("str", "object", "array")},
                                "extra_content": {"google": {"thought_signature": "str"}}}],
                "function_call": {"name": "str", "arguments": "str"}}],
            "tools": [TOOL_SHAPE], "functions": [FUNCTION_SHAPE],
            "tool_choice": ("str", {"type": "str", "name": "str", "function": {"name": "str"},
                                    "custom": {"name": "str"}, "allowed_tools": {"mode": "str"}}),
            "function_call": ("str", {"name": "str"}), "stream": "bool", "stream_options": "object",
            "max_tokens": "int", "max_completion_tokens": "int", "temperature": "num", "top_p": "num", "n": "int",
            "presence_penalty": "num", "frequency_penalty": "num", "seed": "int", "stop": ("str", ["str"]),
            "user": "str", "metadata": "object", "parallel_tool_calls": "bool", "reasoning_effort": "str",
            "response_format": {"type": "str", "json_schema": {"name": "str", "schema": "object"}}},
        "parse_embeddings": {"model": "str", "input": ("str", ["str"]), "encoding_format": "str",
                             "dimensions": "int"}}

    # -- embeddings -----------------------------------------------------------------------------------------------
    @classmethod
    def parse_embeddings(cls, body):
        model = request_model(body)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            raise BadRequest("'input' must be a string or a non-empty array of strings (token arrays are not "
                             "supported)", "input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be float or base64", "encoding_format")
        req = EmbeddingRequest(model, inputs, _expect(body.get("dimensions"), int, "dimensions", "an integer"),
                               client_format=cls.name)
        req.encoding = fmt  # OpenAI's SDK asks for base64
        return req

    @staticmethod
    def build_embeddings(emb, req):
        def encode(vec):
            if req.encoding != "base64":
                return vec
            return base64.b64encode(struct.pack("<%df" % len(vec), *vec)).decode("ascii")
        n = emb.usage.input_tokens
        return {"object": "list", "model": req.model, "usage": {"prompt_tokens": n, "total_tokens": n},
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(emb.vectors)]}

    # -- request: wire -> IR --------------------------------------------------------------------------------------
    @classmethod
    def parse_request(cls, body):
        model = request_model(body)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty array", "messages")
        req = ChatRequest(model, client_format=cls.name)
        cls._parse_messages(req, msgs)
        stream = _expect(body.get("stream"), bool, "stream", "a boolean")
        req.stream = bool(stream)
        so = body.get("stream_options")
        if so is not None:
            _expect(so, dict, "stream_options", "an object")
            req.include_usage = bool(so.get("include_usage"))
        mt = body.get("max_completion_tokens")
        req.max_tokens = _expect(mt, int, "max_completion_tokens", "an integer") if mt is not None else \
            _integer(body, "max_tokens")
        _read_settings(req, body, "temperature top_p top_k n presence_penalty frequency_penalty seed")
        req.stop = _stop_list(body.get("stop"))
        req.user = _expect(body.get("user"), str, "user", "a string")
        req.metadata = _expect(body.get("metadata"), dict, "metadata", "an object")
        req.parallel_tool_calls = _expect(body.get("parallel_tool_calls"), bool, "parallel_tool_calls", "a boolean")
        effort = _expect(body.get("reasoning_effort"), str, "reasoning_effort", "a string")
        if effort:
            req.thinking = ThinkingConfig(effort=effort.lower())
        rf = body.get("response_format")
        if rf is not None:
            _expect(rf, dict, "response_format", "an object")
            t = rf.get("type")
            if t == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict):
                    raise BadRequest("'response_format.json_schema' must be an object", "response_format")
                req.response_format = {"type": "json_schema", "name": js.get("name") or "response",
                                       "schema": js.get("schema") or {}, "strict": js.get("strict"),
                                       "description": js.get("description")}
            elif t == "json_object":
                req.response_format = {"type": "json_object"}
            elif t not in (None, "text"):
                raise BadRequest("unsupported response_format type %r" % t, "response_format")
        tools = body.get("tools")
        if tools is not None:
            _expect(tools, list, "tools", "an array")
            for i, t in enumerate(tools):
                req.tools.append(cls._parse_tool(t, i))
        elif isinstance(body.get("functions"), list):
            for i, f in enumerate(body["functions"]):
                req.tools.append(cls._parse_tool({"type": "function", "function": f}, i))
        req.tool_choice = cls._parse_tool_choice(body.get("tool_choice", body.get("function_call")))
        for key in ("logprobs", "top_logprobs", "logit_bias", "service_tier", "store", "prediction", "modalities",
                    "audio", "verbosity", "web_search_options", "prompt_cache_key", "safety_identifier"):
            if key in body:
                req.passthrough[key] = body[key]
        req.cache_key = body.get("prompt_cache_key") if isinstance(body.get("prompt_cache_key"), str) else None
        return req

    @staticmethod
    def _parse_tool(t, i):
        if not isinstance(t, dict):
            raise BadRequest("'tools[%d]' must be an object" % i, "tools")
        if t.get("type") == "custom":
            c = t.get("custom") or {}
            if not isinstance(c.get("name"), str):
                raise BadRequest("'tools[%d].custom.name' is required" % i, "tools")
            return Tool(c["name"], c.get("description"), None, "custom", format=c.get("format"))
        f = t.get("function")
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise BadRequest("'tools[%d].function.name' is required" % i, "tools")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRequest("'tools[%d].function.parameters' must be an object" % i, "tools")
        return Tool(f["name"], f.get("description"), params, "function", f.get("strict"))

    @staticmethod
    def _parse_tool_choice(tc):
        if tc is None:
            return None
        if isinstance(tc, str):
            if tc not in ("auto", "none", "required"):
                raise BadRequest("'tool_choice' must be auto, none, required or an object", "tool_choice")
            return tc
        if isinstance(tc, dict):
            if tc.get("type") == "function" and isinstance(tc.get("function"), dict):
                return {"name": tc["function"].get("name")}
            if tc.get("type") == "custom" and isinstance(tc.get("custom"), dict):
                return {"name": tc["custom"].get("name")}
            if tc.get("type") == "allowed_tools":
                mode = (tc.get("allowed_tools") or {}).get("mode")
                return "required" if mode == "required" else "auto"
            if isinstance(tc.get("name"), str):  # legacy function_call: {"name": ...}
                return {"name": tc["name"]}
        raise BadRequest("'tool_choice' is malformed", "tool_choice")

    @classmethod
    def _content_parts(cls, content, where):
        if content is None:
            return []
        if isinstance(content, str):
            return [Text(content)] if content else []
        if not isinstance(content, list):
            raise BadRequest("'%s.content' must be a string or an array of parts" % where, "messages")
        parts = []
        for j, p in enumerate(content):
            if isinstance(p, str):
                parts.append(Text(p))
                continue
            if not isinstance(p, dict):
                raise BadRequest("'%s.content[%d]' must be an object" % (where, j), "messages")
            t = p.get("type")
            if t in ("text", "input_text", "output_text"):
                text = p.get("text")
                if not isinstance(text, str):
                    raise BadRequest("'%s.content[%d].text' must be a string" % (where, j), "messages")
                parts.append(Text(text, p.get("cache_control")))
            elif t == "refusal":
                parts.append(Text(p.get("refusal") or ""))
            elif t == "image_url":
                iu = p.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                if not isinstance(url, str):
                    raise BadRequest("'%s.content[%d].image_url.url' must be a string" % (where, j), "messages")
                detail = iu.get("detail") if isinstance(iu, dict) else None
                split = data_url_split(url)
                parts.append(Image(split[0], split[1], detail=detail) if split else Image(url=url, detail=detail))
            elif t == "input_audio":
                a = p.get("input_audio") or {}
                fmt = a.get("format") or "wav"
                parts.append(File("audio/" + ("mpeg" if fmt == "mp3" else fmt), a.get("data")))
            elif t == "file":
                f = p.get("file") or {}
                fd = f.get("file_data")
                split = data_url_split(fd) if isinstance(fd, str) else None
                if split:
                    parts.append(File(split[0], split[1], filename=f.get("filename")))
                else:
                    fid = f.get("file_id") if isinstance(f.get("file_id"), str) else None
                    parts.append(File("application/pdf", fd, filename=f.get("filename"), file_id=fid,
                                      store="openai" if fid else None))
            else:
                raise BadRequest("unsupported content part type %r in %s" % (t, where), "messages")
        return parts

    @classmethod
    def _parse_messages(cls, req, msgs):
        call_names = {}
        seen_turn = False
        for i, where, m in _objects(msgs, "messages"):
            role = m.get("role")
            if role in ("system", "developer"):
                parts = cls._content_parts(m.get("content"), where)
                if seen_turn:
                    req.messages.append(Message("system", parts))
                else:
                    req.system.extend(parts)
            elif role == "user":
                seen_turn = True
                req.messages.append(Message("user", cls._content_parts(m.get("content"), where), m.get("name")))
            elif role == "assistant":
                seen_turn = True
                parts = []
                rc = m.get("reasoning_content")
                if isinstance(rc, str) and rc:
                    parts.append(Thinking(rc, source="openai"))
                parts.extend(cls._content_parts(m.get("content"), where))
                if isinstance(m.get("refusal"), str) and m["refusal"] and not parts:
                    parts.append(Text(m["refusal"]))
                calls = m.get("tool_calls")
                if calls is not None:
                    if not isinstance(calls, list):
                        raise BadRequest("'%s.tool_calls' must be an array" % where, "messages")
                    for j, c in enumerate(calls):
                        if not isinstance(c, dict):
                            raise BadRequest("'%s.tool_calls[%d]' must be an object" % (where, j), "messages")
                        if c.get("type") == "custom":
                            cu = c.get("custom") or {}
                            call = ToolCall(c.get("id") or new_id("call_"), cu.get("name") or "",
                                            json_dumps({"input": cu.get("input", "")}), "custom")
                        else:
                            f = c.get("function") or {}
                            args = f.get("arguments")
                            if isinstance(args, (dict, list)):
                                args = json_dumps(args)
                            call = ToolCall(c.get("id") or new_id("call_"), f.get("name") or "",
                                            args if isinstance(args, str) and args else "{}")
                        gsig = ((c.get("extra_content") or {}).get("google") or {}).get("thought_signature")
                        if gsig:
                            call.signature, call.source = gsig, "gemini"
                        call_names[call.id] = call.name
                        parts.append(call)
                fc = m.get("function_call")
                if isinstance(fc, dict) and fc.get("name"):
                    call = ToolCall(new_id("call_"), fc["name"], fc.get("arguments") or "{}")
                    call_names[fc["name"]] = fc["name"]
                    parts.append(call)
                req.messages.append(Message("assistant", parts))
            elif role in ("tool", "function"):
                seen_turn = True
                if role == "tool":
                    tid = m.get("tool_call_id")
                    if not isinstance(tid, str) or not tid:
                        raise BadRequest("'%s.tool_call_id' is required for tool messages" % where, "messages")
                    name = call_names.get(tid)
                else:
                    tid = name = m.get("name") or ""
                result = ToolResult(tid, name, cls._content_parts(m.get("content"), where))
                req.turn("tool").parts.append(result)
            else:
                raise BadRequest("'%s.role' must be system, developer, user, assistant or tool" % where,
                                 "messages")

    # -- request: IR -> wire (for OpenAI-compatible upstreams) ----------------------------------------------------
    @classmethod
    def build_request(cls, req, model):
        msgs = []
        if req.system:
            msgs.append({"role": "system", "content": req.system_text()})
        for m in req.messages:
            if m.role == "tool":
                for r in m.parts:
                    if r.kind == "tool_result":
                        content = r.text()
                        if r.is_error and not content.lower().startswith("error"):
                            content = "Error: " + content
                        msgs.append({"role": "tool", "tool_call_id": r.id, "content": content})
                continue
            if m.role == "system":
                msgs.append({"role": "system", "content": m.text()})
                continue
            if m.role == "assistant":
                out = {"role": "assistant"}
                text = "".join(p.text for p in m.parts if p.kind == "text")
                calls = [p for p in m.parts if p.kind == "tool_call"]
                out["content"] = text if text or not calls else None
                if calls:
                    out["tool_calls"] = [cls._wire_call(c) for c in calls]
                msgs.append(out)
                continue
            msgs.append({"role": "user", "content": cls._wire_content(m.parts)})
        body = {"model": model, "messages": msgs}
        if req.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if req.max_tokens is not None:
            body["max_tokens"] = req.max_tokens
        for field in ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "seed", "user"):
            v = getattr(req, field)
            if v is not None:
                body[field] = v
        if req.stop:
            body["stop"] = req.stop
        effort = thinking_effort(req.thinking)
        if effort and effort != "auto":
            body["reasoning_effort"] = effort
        if req.response_format:
            rf = req.response_format
            if rf["type"] == "json_schema":
                js = {"name": rf.get("name") or "response", "schema": rf.get("schema") or {}}
                if rf.get("strict") is not None:
                    js["strict"] = rf["strict"]
                if rf.get("description"):
                    js["description"] = rf["description"]
                body["response_format"] = {"type": "json_schema", "json_schema": js}
            else:
                body["response_format"] = {"type": "json_object"}
        if req.tools:
            body["tools"] = [cls._wire_tool(t) for t in req.tools]
            tc = req.tool_choice
            if tc is not None:
                body["tool_choice"] = {"type": "function", "function": {"name": tc["name"]}} \
                    if isinstance(tc, dict) else tc
            if req.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = req.parallel_tool_calls
        if req.metadata and req.client_format == cls.name:
            body["metadata"] = req.metadata
        if req.client_format == cls.name:
            for k, v in req.passthrough.items():
                body.setdefault(k, v)
        return body

    @staticmethod
    def _wire_tool(t):
        if t.tool_kind == "custom":
            # Many OpenAI-compatible servers know only function tools: a freeform tool takes one string.
            f = {"name": t.name, "parameters": custom_tool_schema()}
            if t.description:
                f["description"] = t.description
            return {"type": "function", "function": f}
        f = {"name": t.name}
        if t.description:
            f["description"] = t.description
        f["parameters"] = t.parameters if t.parameters is not None else {"type": "object", "properties": {}}
        if t.strict is not None:
            f["strict"] = t.strict
        return {"type": "function", "function": f}

    @staticmethod
    def _wire_call(c):
        return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}}

    @classmethod
    def _wire_content(cls, parts):
        if all(p.kind == "text" for p in parts):
            return "".join(p.text for p in parts)
        out = []
        for p in parts:
            if p.kind == "text":
                out.append({"type": "text", "text": p.text})
            elif p.kind == "image":
                url = p.url or "data:%s;base64,%s" % (p.mime or "image/png", p.data)
                iu = {"url": url}
                if p.detail:
                    iu["detail"] = p.detail
                out.append({"type": "image_url", "image_url": iu})
            elif p.kind == "file":
                if (p.mime or "").startswith("audio/"):
                    fmt = "mp3" if p.mime in ("audio/mpeg", "audio/mp3") else p.mime.split("/", 1)[1]
                    out.append({"type": "input_audio", "input_audio": {"data": p.data, "format": fmt}})
                else:
                    f = {"filename": p.filename or "file"}
                    if p.data:
                        f["file_data"] = "data:%s;base64,%s" % (p.mime or "application/pdf", p.data)
                    if p.file_id:
                        f["file_id"] = cls.file_ref(p)
                    out.append({"type": "file", "file": f})
        return out

    # -- response: wire -> IR -------------------------------------------------------------------------------------
    @staticmethod
    def parse_usage(u):
        return openai_family_usage(u, "prompt", "completion")

    @classmethod
    def parse_response(cls, data):
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamError("protocol", "upstream answer has no choices")
        resp = ChatResponse(data.get("id"), data.get("model"), data.get("created"))
        choice = data["choices"][0] if data["choices"] else {}
        msg = choice.get("message") or {}
        rc = msg.get("reasoning_content") or msg.get("reasoning")
        if isinstance(rc, str) and rc:
            resp.parts.append(Thinking(rc, source="openai"))
        content = msg.get("content")
        if isinstance(content, str) and content:
            resp.parts.append(Text(content))
        elif isinstance(content, list):
            resp.parts.extend(Text(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("text"))
        if msg.get("refusal") and not content:
            resp.parts.append(Text(msg["refusal"]))
        for c in msg.get("tool_calls") or []:
            f = c.get("function") or {}
            args = f.get("arguments")
            if isinstance(args, (dict, list)):
                args = json_dumps(args)
            resp.parts.append(ToolCall(c.get("id") or new_id("call_"), f.get("name") or "", args or "{}"))
        resp.finish = OPENAI_FINISH_IN.get(choice.get("finish_reason") or "stop", "stop")
        return resp.settle_finish(cls.parse_usage(data.get("usage")))

    # -- response: IR -> wire -------------------------------------------------------------------------------------
    @staticmethod
    def wire_usage(u):
        if u is None:
            return None
        out = {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
               "total_tokens": u.input_tokens + u.output_tokens,
               "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
               "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}
        if u.cache_write_tokens:
            out["prompt_tokens_details"]["cache_write_tokens"] = u.cache_write_tokens
        return out

    @classmethod
    def build_response(cls, resp, req):
        text = "".join(p.text for p in resp.parts if p.kind == "text")
        calls = [p for p in resp.parts if p.kind == "tool_call"]
        thinking = "".join(p.text for p in resp.parts if p.kind == "thinking" and p.text)
        msg = {"role": "assistant", "content": text if (text or not calls) else None, "refusal": None,
               "annotations": []}
        if thinking:
            msg["reasoning_content"] = thinking
        if calls:
            msg["tool_calls"] = [cls._wire_call(c) for c in calls]
        finish = "tool_calls" if calls else OPENAI_FINISH_OUT.get(resp.finish, "stop")
        out = {"id": resp.id if resp.id and str(resp.id).startswith("chatcmpl") else new_id("chatcmpl-"),
               "object": "chat.completion", "created": resp.created or now_s(), "model": req.model,
               "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}]}
        usage = cls.wire_usage(resp.usage)
        if usage is not None:
            out["usage"] = usage
        return out

    # -- streams --------------------------------------------------------------------------------------------------
    RELAY_MARKS = (b'"finish_reason":"', b'"finish_reason": "', b'"usage":{', b'"usage": {', b'"error"', b"[DONE]")

    @staticmethod
    def relay_edit(req, event, data):
        """The gateway always asks the upstream for usage; a client that did not ask does not get the usage chunk."""
        if req.include_usage or ('"usage":{' not in data and '"usage": {' not in data):
            return data
        obj = json_or_none(data)
        if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
            return data
        del obj["usage"]
        return json_dumps(obj) if obj.get("choices") else None

    class StreamDecoder(EventDecoder):
        """OpenAI chat SSE payloads -> IR events. Feed each `data:` payload (already split by SSEParser)."""

        def __init__(self, req=None):
            EventDecoder.__init__(self, req)
            self.calls = {}  # upstream index -> [id, name, buffered args, started, our index]
            self.next_index = 0
            self.emitted_tool = False

        def feed(self, event, data):
            if data == "[DONE]":
                return self._end()
            obj = json_or_none(data)
            if not isinstance(obj, dict):
                return []
            out = []
            err = obj.get("error")
            if err:
                msg = err.get("message") if isinstance(err, dict) else str(err)
                code = err.get("code") if isinstance(err, dict) else None
                status = 400 if error_code(400, msg, code) == CONTEXT_OVERFLOW else 502
                out.append(ErrorEvent(status, msg or "upstream error", "upstream", code))
                return out
            if not self.started:
                self.started = True
                out.append(Start(obj.get("id"), obj.get("model"), obj.get("created")))
            for choice in obj.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                rc = delta.get("reasoning_content") or delta.get("reasoning")
                if isinstance(rc, str) and rc:
                    out.append(ThinkingDelta(rc, source="openai"))
                content = delta.get("content")
                if isinstance(content, str) and content:
                    out.append(TextDelta(content))
                for tc in delta.get("tool_calls") or ():
                    self._tool_delta(tc, out)
                fr = choice.get("finish_reason")
                if fr:
                    self.finish = OPENAI_FINISH_IN.get(fr, "stop")
            if obj.get("usage"):
                self.usage = OpenAIChat.parse_usage(obj["usage"])
            return out

        def _tool_delta(self, tc, out):
            idx = tc.get("index", len(self.calls))
            f = tc.get("function") or {}
            slot = self.calls.get(idx)
            if slot is None:
                slot = self.calls[idx] = [None, None, "", False, None]
            if tc.get("id") and not slot[0]:
                slot[0] = tc["id"]
            if f.get("name") and not slot[1]:
                slot[1] = f["name"]
            args = f.get("arguments")
            if isinstance(args, (dict, list)):
                args = json_dumps(args)
            # Wait for the name before announcing the call: some upstreams send id and name in separate chunks.
            if not slot[3]:
                if args:
                    slot[2] += args
                if slot[1]:
                    slot[3] = True
                    slot[4] = self.next_index
                    self.next_index += 1
                    self.emitted_tool = True
                    out.append(ToolCallStart(slot[4], slot[0] or new_id("call_"), slot[1]))
                    if slot[2]:
                        out.append(ToolCallDelta(slot[4], slot[2]))
                        slot[2] = ""
            elif args:
                out.append(ToolCallDelta(slot[4], args))

        def _end(self):
            if self.done:
                return []
            self.done = True
            out = []
            if not self.started:
                out.append(Start())
                self.started = True
            for slot in self.calls.values():
                if slot[3]:
                    out.append(ToolCallEnd(slot[4]))
            if self.usage is not None:
                out.append(UsageEvent(self.usage))
            reason = self.finish or "stop"
            if self.emitted_tool:
                reason = "tool_calls"
            elif reason == "tool_calls":
                reason = "stop"
            out.append(Finish(reason))
            return out

        def close(self):
            """The upstream stream ended. Without [DONE] or a finish reason it was cut short."""
            if self.done:
                return []
            if self.finish is None:
                return [ErrorEvent(502, "upstream stream ended before completion", "upstream")]
            return self._end()

    class StreamEncoder(EventEncoder):
        """IR events -> OpenAI chat SSE bytes, following formats.md §2.4 (what OPY's accumulator needs)."""

        def __init__(self, req):
            EventEncoder.__init__(self, req)
            self.id = new_id("chatcmpl-")
            self.created = now_s()
            self.prefix = ('data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
                           '"choices":[{"index":0,"delta":' % (self.id, self.created, json_dumps(req.model)))
            self.role_sent = False
            self.tool_seen = False

        def _chunk(self, delta_json, finish="null"):
            return (self.prefix + delta_json + ',"logprobs":null,"finish_reason":' + finish + '}]}\n\n').encode()

        def _role(self):
            if self.role_sent:
                return b""
            self.role_sent = True
            return self._chunk('{"role":"assistant","content":""}')

        def on_start(self, ev):
            return self._role()

        def on_text(self, ev):
            return self._role() + self._chunk('{"content":' + json_dumps(ev.text) + "}")

        def on_thinking(self, ev):
            if not ev.text:
                return b""
            return self._role() + self._chunk('{"reasoning_content":' + json_dumps(ev.text) + "}")

        def on_tool_start(self, ev):
            self.tool_seen = True
            call = {"index": ev.index, "id": ev.id, "type": "function",
                    "function": {"name": ev.name, "arguments": ""}}
            return self._role() + self._chunk(json_dumps({"tool_calls": [call]}))

        def on_tool_delta(self, ev):
            if not ev.arguments:
                return b""
            return self._chunk(json_dumps({"tool_calls": [{"index": ev.index,
                                                           "function": {"arguments": ev.arguments}}]}))

        def finish(self, ev):
            reason = "tool_calls" if self.tool_seen else OPENAI_FINISH_OUT.get(ev.reason, "stop")
            out = self._role() + self._chunk("{}", '"%s"' % reason)
            if self.req.include_usage and self.usage is not None:
                out += ('data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
                        '"choices":[],"usage":%s}\n\n' % (self.id, self.created, json_dumps(self.req.model),
                                                         json_dumps(OpenAIChat.wire_usage(self.usage)))).encode()
            return out + b"data: [DONE]\n\n"

        def error_frame(self, err):
            return b"data: " + json_bytes(OpenAIChat.error_body(err)) + b"\n\n"


_TOOL_ID_BAD = re.compile(r"[^a-zA-Z0-9_-]")


def sanitize_tool_id(tool_id):
    """Anthropic ids must match ^[a-zA-Z0-9_-]+$; the same function is applied to calls and results."""
    return _TOOL_ID_BAD.sub("_", tool_id) if tool_id else new_id("toolu_")


ANTHROPIC_STOP_IN = {"end_turn": "stop", "stop_sequence": "stop_sequence", "max_tokens": "length",
                     "tool_use": "tool_calls", "pause_turn": "pause", "refusal": "content_filter",
                     "model_context_window_exceeded": "length"}
ANTHROPIC_STOP_OUT = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens",
                      "tool_calls": "tool_use", "pause": "pause_turn", "content_filter": "refusal"}
ANTHROPIC_ERROR_TYPES = {"invalid_request": "invalid_request_error", "authentication": "authentication_error",
                         "permission": "permission_error", "not_found": "not_found_error",
                         "rate_limit": "rate_limit_error", "overloaded": "overloaded_error",
                         "timeout": "timeout_error", "server_error": "api_error", "upstream": "api_error"}
ANTHROPIC_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                          403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                          429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error"}


class Anthropic(Codec):
    """Anthropic Messages (`/v1/messages`), formats.md §3."""
    name = "anthropic"
    file_store = "anthropic"
    SOURCE_SHAPE = {"type": "str", "media_type": "str", "data": "str", "url": "str", "file_id": "str"}
    MEDIA_SHAPE = {"type": "str", "text": "str", "source": SOURCE_SHAPE, "title": "str"}
    BLOCK_SHAPE = dict(MEDIA_SHAPE, id="str", name="str", tool_use_id="str", content=("str", [MEDIA_SHAPE]),
                       thinking="str", signature="str", data="str", cache_control="object")
    REQUEST_SHAPES = {"parse_request": {
        "model": "str", "max_tokens": "int", "messages": [{"role": "str", "content": ("str", [BLOCK_SHAPE])}],
        "system": ("str", [{"type": "str", "text": "str", "cache_control": "object"}]), "stream": "bool",
        "temperature": "num", "top_p": "num", "top_k": "num", "stop_sequences": ["str"], "metadata": "object",
        "tools": [{"name": "str", "type": "str", "description": "str", "input_schema": "object"}],
        "tool_choice": {"type": "str", "name": "str"},
        "thinking": {"type": "str", "display": "str", "budget_tokens": "int"},
        "output_config": {"effort": "str", "format": {"type": "str", "schema": "object"}}}}

    @staticmethod
    def field_path(path):
        """Anthropic writes a field's place with dots throughout: messages.2.content.0.text."""
        return ".".join(str(k) for k in path)

    @staticmethod
    def error_body(err):
        t = ANTHROPIC_STATUS_TYPES.get(err.status) or ANTHROPIC_ERROR_TYPES.get(err.type, "api_error")
        message = err.message
        if err.code == CONTEXT_OVERFLOW and not message.lower().startswith("prompt is too long"):
            message = "prompt is too long: " + message  # what Claude Code looks for before compacting
        return {"type": "error", "error": {"type": t, "message": message}}

    # -- request: wire -> IR --------------------------------------------------------------------------------------
    @classmethod
    def parse_request(cls, body, count_only=False):
        model = request_model(body, "model: Field required (a non-empty string)")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("messages: must be a non-empty array", "messages")
        req = ChatRequest(model, client_format=cls.name)
        if not count_only:
            if "max_tokens" not in body:
                raise BadRequest("max_tokens: Field required", "max_tokens")
            req.max_tokens = _integer(body, "max_tokens")
        system = body.get("system")
        if isinstance(system, str):
            if system:
                req.system.append(Text(system))
        elif isinstance(system, list):
            for i, b in enumerate(system):
                if not isinstance(b, dict) or not isinstance(b.get("text"), str):
                    raise BadRequest("system.%d: expected a text block" % i, "system")
                req.system.append(Text(b["text"], b.get("cache_control")))
        elif system is not None:
            raise BadRequest("system: must be a string or an array of text blocks", "system")
        names = {}
        for i, m in enumerate(msgs):
            cls._parse_message(req, m, i, names)
        req.stream = bool(_expect(body.get("stream"), bool, "stream", "a boolean"))
        _read_settings(req, body, "temperature top_p top_k")
        ss = body.get("stop_sequences")
        if ss is not None:
            req.stop = _stop_list(ss, "stop_sequences")
        md = body.get("metadata")
        if isinstance(md, dict) and isinstance(md.get("user_id"), str):
            req.user = md["user_id"]
        tools = body.get("tools")
        if tools is not None:
            _expect(tools, list, "tools", "an array")
            for i, t in enumerate(tools):
                if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                    raise BadRequest("tools.%d.name: Field required" % i, "tools")
                if t.get("type") not in (None, "custom"):
                    req.native_tools.append(t)  # server tools (web search, ...): Anthropic upstreams only
                    continue
                schema = t.get("input_schema")
                if schema is not None and not isinstance(schema, dict):
                    raise BadRequest("tools.%d.input_schema: must be an object" % i, "tools")
                req.tools.append(Tool(t["name"], t.get("description"), schema, "function", t.get("strict"),
                                      cache_control=t.get("cache_control")))
        tc = body.get("tool_choice")
        if tc is not None:
            if not isinstance(tc, dict):
                raise BadRequest("tool_choice: must be an object", "tool_choice")
            kind = tc.get("type")
            req.tool_choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
            if kind == "tool":
                req.tool_choice = {"name": tc.get("name")}
            if tc.get("disable_parallel_tool_use"):
                req.parallel_tool_calls = False
        th = body.get("thinking")
        oc = body.get("output_config") if isinstance(body.get("output_config"), dict) else {}
        if isinstance(th, dict):
            kind = th.get("type")
            if kind == "enabled":
                req.thinking = ThinkingConfig(budget=th.get("budget_tokens") if isinstance(
                    th.get("budget_tokens"), int) else 8192, include_thoughts=th.get("display") != "omitted")
            elif kind == "adaptive":
                req.thinking = ThinkingConfig(effort=oc.get("effort") or "auto", include_thoughts=True)
            elif kind == "disabled":
                req.thinking = ThinkingConfig(effort="none")
        elif oc.get("effort"):
            req.thinking = ThinkingConfig(effort=oc["effort"])
        fmt = oc.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            req.response_format = {"type": "json_schema", "name": "response", "schema": fmt.get("schema") or {}}
        return req

    @classmethod
    def _blocks(cls, content, where):
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise BadRequest("%s.content: must be a string or an array of blocks" % where, "messages")
        return content

    @classmethod
    def _media_part(cls, b):
        src = b.get("source") or {}
        st = src.get("type")
        if st == "file" and isinstance(src.get("file_id"), str):  # the Files API (beta): a reference, kept
            return File("image/*" if b.get("type") == "image" else "application/pdf", file_id=src["file_id"],
                        store="anthropic", filename=b.get("title"))
        if b.get("type") == "image":
            if st == "base64":
                return Image(src.get("media_type"), src.get("data"))
            if st == "url":
                return Image(url=src.get("url"))
            return None
        if st == "base64":
            return File(src.get("media_type") or "application/pdf", src.get("data"), filename=b.get("title"))
        if st == "url":
            return File("application/pdf", url=src.get("url"), filename=b.get("title"))
        if st == "text":
            return Text(src.get("data") or "")
        return None

    @classmethod
    def _parse_message(cls, req, m, i, names):
        where = "messages.%d" % i
        if not isinstance(m, dict):
            raise BadRequest("%s: must be an object" % where, "messages")
        role = m.get("role")
        if role not in ("user", "assistant", "system"):
            raise BadRequest("%s.role: must be user or assistant" % where, "messages")
        blocks = cls._blocks(m.get("content"), where)
        if role == "system":
            req.messages.append(Message("system", [Text(b.get("text", "")) for b in blocks
                                                   if isinstance(b, dict) and b.get("type") == "text"]))
            return
        parts = []
        results = []
        for j, b in enumerate(blocks):
            if not isinstance(b, dict):
                raise BadRequest("%s.content.%d: must be an object" % (where, j), "messages")
            t = b.get("type")
            if t == "text":
                if not isinstance(b.get("text"), str):
                    raise BadRequest("%s.content.%d.text: must be a string" % (where, j), "messages")
                parts.append(Text(b["text"], b.get("cache_control")))
            elif t in ("image", "document"):
                part = cls._media_part(b)
                if part is not None:
                    parts.append(part)
            elif t == "tool_use":
                call = ToolCall.of_object(b.get("id") or new_id("toolu_"), b.get("name") or "", b.get("input"))
                names[call.id] = call.name
                parts.append(call)
            elif t == "tool_result":
                content = b.get("content")
                plain = isinstance(content, str)
                if plain:
                    rparts = [Text(content)] if content else []
                elif isinstance(content, list):
                    rparts = []
                    for c in content:
                        if isinstance(c, dict) and c.get("type") == "text":
                            rparts.append(Text(c.get("text") or ""))
                        elif isinstance(c, dict) and c.get("type") in ("image", "document"):
                            mp = cls._media_part(c)
                            if mp is not None:
                                rparts.append(mp)
                else:
                    rparts = []
                tid = b.get("tool_use_id") or ""
                results.append(ToolResult(tid, names.get(tid), rparts, bool(b.get("is_error")), plain))
            elif t == "thinking":
                parts.append(thinking_from_token(b.get("thinking") or "", b.get("signature") or "", "anthropic"))
            elif t == "redacted_thinking":
                parts.append(Thinking("", redacted=b.get("data"), source="anthropic"))
            # server-tool blocks (web search results, ...) only make sense to Anthropic itself: skipped
        if results:
            req.messages.append(Message("tool", results))
        if parts or not results:
            req.messages.append(Message(role, parts, plain=isinstance(m.get("content"), str)))

    # -- request: IR -> wire --------------------------------------------------------------------------------------
    @staticmethod
    def default_max_tokens(model):
        return 8192 if "claude-3-" in model or "claude-3.5" in model else 32000

    @classmethod
    def _wire_parts(cls, parts, upstream=True):
        out = []
        for p in parts:
            k = p.kind
            if k == "text":
                if not p.text.strip():
                    continue  # Anthropic rejects empty and whitespace-only text blocks
                b = {"type": "text", "text": p.text}
                if p.cache_control:
                    b["cache_control"] = p.cache_control
                out.append(b)
            elif k == "image":
                if p.data:
                    out.append({"type": "image", "source": {"type": "base64", "media_type": p.mime or "image/png",
                                                            "data": p.data}})
                elif p.url:
                    split = data_url_split(p.url)
                    src = {"type": "base64", "media_type": split[0], "data": split[1]} if split else \
                        {"type": "url", "url": p.url}
                    out.append({"type": "image", "source": src})
            elif k == "file" and p.file_id:
                out.append({"type": "image" if (p.mime or "").startswith("image/") else "document",
                            "source": {"type": "file", "file_id": cls.file_ref(p)}})
            elif k == "file":
                if p.data and (p.mime or "").startswith("text/"):
                    try:
                        text = base64.b64decode(p.data).decode("utf-8")
                    except (binascii.Error, ValueError, UnicodeDecodeError):
                        continue
                    out.append({"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                               "data": text}})
                elif p.data and p.mime == "application/pdf":
                    out.append({"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                               "data": p.data}})
                elif p.url:
                    out.append({"type": "document", "source": {"type": "url", "url": p.url}})
            elif k == "tool_call":
                out.append({"type": "tool_use", "id": sanitize_tool_id(p.id), "name": p.name,
                            "input": p.args_object()})
            elif k == "thinking":
                if upstream:
                    if p.source != "anthropic":
                        continue  # another family's reasoning cannot be replayed to Anthropic
                    if p.redacted:
                        out.append({"type": "redacted_thinking", "data": p.redacted})
                    elif p.signature:
                        out.append({"type": "thinking", "thinking": p.text, "signature": p.signature})
                else:
                    out.extend(cls._client_thinking_blocks(p))
        return out

    @staticmethod
    def _client_thinking_blocks(p):
        """Thinking for an Anthropic client: Anthropic's own tokens as they are, others carried."""
        if (p.source == "anthropic" or p.source is None) and (p.redacted or p.signature):
            if p.redacted:
                return [{"type": "redacted_thinking", "data": p.redacted}]
            return [{"type": "thinking", "thinking": p.text or "", "signature": p.signature}]
        return [{"type": "thinking", "thinking": p.text or "", "signature": pack_reasoning(p)}]

    @classmethod
    def build_request(cls, req, model):
        system = [{"type": "text", "text": p.text, **({"cache_control": p.cache_control} if p.cache_control else {})}
                  for p in req.system if p.kind == "text" and p.text.strip()]
        msgs = cls._wire_messages(req)
        body = {"model": model, "messages": msgs,
                "max_tokens": req.max_tokens or cls.default_max_tokens(model)}
        if system:
            body["system"] = system
        if req.stream:
            body["stream"] = True
        thinking_on = cls._wire_thinking(req, body)
        if req.stop:
            body["stop_sequences"] = req.stop
        if req.user:
            body["metadata"] = {"user_id": req.user}
        cls._wire_tools(req, body, thinking_on)
        rf = req.response_format
        if rf and rf["type"] == "json_schema":
            body["output_config"] = {"format": {"type": "json_schema",
                                                "schema": cls.wire_schema(rf.get("schema") or {}, strict=True)}}
        elif rf:  # JSON mode has no Messages API field: ask for it in the system prompt
            body.setdefault("system", []).append({"type": "text",
                                                  "text": "Respond with a single JSON object and nothing else."})
        return body

    @classmethod
    def _wire_messages(cls, req):
        """Strictly alternating turns: tool results first in a user turn, tool uses last in an assistant turn. A
        turn or tool result the client wrote as a bare string is written as one when it still is one text."""
        msgs, plain = [], []
        for m in repair_tool_turns(req.messages):
            if m.role == "tool":
                blocks = []
                for r in m.parts:
                    content = cls._wire_parts(r.content)
                    b = {"type": "tool_result", "tool_use_id": sanitize_tool_id(r.id)}
                    if content:
                        b["content"] = cls._plain_text(content) if r.plain else content
                    if r.is_error:
                        b["is_error"] = True
                    blocks.append(b)
                role = "user"
            elif m.role == "system":
                blocks = [{"type": "text", "text": "<system-reminder>\n%s\n</system-reminder>" % m.text()}] \
                    if m.text().strip() else []
                role = "user"
            else:
                blocks = cls._wire_parts(m.parts)
                role = m.role
                if role == "assistant":
                    # tool_use blocks close an assistant turn; a final thinking block is not allowed
                    calls = [b for b in blocks if b["type"] == "tool_use"]
                    rest = [b for b in blocks if b["type"] != "tool_use"]
                    blocks = rest + calls
                    while blocks and blocks[-1]["type"] in ("thinking", "redacted_thinking"):
                        blocks.pop()
            if not blocks:
                continue
            if msgs and msgs[-1]["role"] == role:
                prev = msgs[-1]["content"]
                if role == "user":
                    # tool_result blocks stay first in a user turn
                    merged = [b for b in prev + blocks if b["type"] == "tool_result"] + \
                             [b for b in prev + blocks if b["type"] != "tool_result"]
                    msgs[-1]["content"] = merged
                else:
                    calls = [b for b in prev if b["type"] == "tool_use"]
                    msgs[-1]["content"] = [b for b in prev if b["type"] != "tool_use"] + blocks + calls
                plain[-1] = False
                continue
            msgs.append({"role": role, "content": blocks})
            plain.append(m.plain)
        for msg, was_plain in zip(msgs, plain):
            if was_plain:
                msg["content"] = cls._plain_text(msg["content"])
        if msgs and msgs[0]["role"] == "assistant":
            msgs.insert(0, {"role": "user", "content": [{"type": "text", "text": "(continue)"}]})
        return msgs or [{"role": "user", "content": [{"type": "text", "text": "(empty)"}]}]

    @staticmethod
    def _plain_text(blocks):
        """One plain text block as a bare string; anything else as it is."""
        if len(blocks) == 1 and len(blocks[0]) == 2 and blocks[0]["type"] == "text":
            return blocks[0]["text"]
        return blocks

    @staticmethod
    def _wire_thinking(req, body):
        """Extended thinking and the sampling it allows; whether thinking is on."""
        msgs = body["messages"]
        effort = thinking_effort(req.thinking)
        thinking_on = effort not in (None, "none")
        if thinking_on:
            last_assistant = next((m for m in reversed(msgs) if m["role"] == "assistant"), None)
            content = last_assistant["content"] if last_assistant is not None else ""
            if not isinstance(content, str) and any(b["type"] == "tool_use" for b in content) and \
                    content[0]["type"] not in ("thinking", "redacted_thinking"):
                # Anthropic demands a signed thinking block before the last tool use; without one, no thinking.
                thinking_on = False
        if thinking_on:
            budget = fit_thinking_budget(req, 8192)
            if budget is not None and budget < 1024 and (req.max_tokens is None or req.max_tokens * 3 // 4 >= 1024):
                budget = 1024  # Anthropic's minimum
            if budget is None or budget < 1024:  # the client's output limit leaves no room to think
                thinking_on = False
            else:
                if body["max_tokens"] <= budget:  # only our own default limit: the client set none
                    body["max_tokens"] = budget + 4096
                body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        if not thinking_on:
            if req.temperature is not None:
                body["temperature"] = min(1.0, req.temperature)
            if req.top_k is not None:
                body["top_k"] = req.top_k
        if req.top_p is not None and not thinking_on:
            body["top_p"] = req.top_p
        return thinking_on

    _SCHEMA_CHILDREN = ("items", "anyOf", "oneOf", "allOf", "not", "additionalProperties", "prefixItems")

    @classmethod
    def wire_schema(cls, schema, strict=False):
        """A JSON Schema as Anthropic takes it, for tools and structured output alike: keys of Gemini's schema
        dialect dropped (propertyOrdering; `nullable` becomes a null type); with `strict` (structured output)
        every object closed with additionalProperties: false and titles dropped, as Anthropic requires."""
        if isinstance(schema, list):
            return [cls.wire_schema(x, strict) for x in schema]
        if not isinstance(schema, dict):
            return schema
        out = {}
        for k, v in schema.items():
            if k in ("propertyOrdering", "property_ordering", "nullable") or (strict and k == "title"):
                continue
            if k in ("properties", "$defs", "definitions") and isinstance(v, dict):
                out[k] = {name: cls.wire_schema(sub, strict) for name, sub in v.items()}
            elif k in cls._SCHEMA_CHILDREN:
                out[k] = cls.wire_schema(v, strict)
            else:
                out[k] = v
        if schema.get("nullable") is True and isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if strict and out.get("type") == "object":
            out.setdefault("additionalProperties", False)
        return out

    @classmethod
    def _wire_tools(cls, req, body, thinking_on):
        tools = []
        for t in req.tools:
            schema = custom_tool_schema() if t.tool_kind == "custom" else (t.parameters or {})
            schema = dict(schema) if isinstance(schema, dict) else {}
            if schema.get("type") != "object":
                schema = {"type": "object", "properties": schema.get("properties") or {}}
            schema.pop("$schema", None)
            tool = {"name": t.name, "input_schema": cls.wire_schema(schema)}
            if t.description:
                tool["description"] = t.description
            if t.cache_control:
                tool["cache_control"] = t.cache_control
            tools.append(tool)
        if req.client_format == cls.name:
            tools.extend(req.native_tools)
        if tools and req.tool_choice != "none":
            body["tools"] = tools
            tc = req.tool_choice
            choice = None
            if tc == "required":
                choice = {"type": "any"}
            elif isinstance(tc, dict):
                choice = {"type": "tool", "name": tc.get("name")}
            elif req.parallel_tool_calls is False:
                choice = {"type": "auto"}
            if choice is not None:
                if req.parallel_tool_calls is False:
                    choice["disable_parallel_tool_use"] = True
                if thinking_on and choice["type"] in ("any", "tool"):
                    choice = {"type": "auto"}  # forced tool use is not allowed with thinking
                body["tool_choice"] = choice

    # -- response: wire -> IR -------------------------------------------------------------------------------------
    @staticmethod
    def parse_usage(u, into=None):
        if not isinstance(u, dict):
            return into
        usage = into or Usage()
        base = u.get("input_tokens")
        cr = u.get("cache_read_input_tokens")
        cw = u.get("cache_creation_input_tokens")
        if base is not None or cr is not None or cw is not None:
            usage.cached_tokens = cr if cr is not None else usage.cached_tokens
            usage.cache_write_tokens = cw if cw is not None else usage.cache_write_tokens
            if base is not None:
                usage.input_tokens = (base or 0) + (usage.cached_tokens or 0) + (usage.cache_write_tokens or 0)
        if u.get("output_tokens") is not None:
            usage.output_tokens = u["output_tokens"]
        otd = u.get("output_tokens_details") or {}
        if otd.get("thinking_tokens") is not None:
            usage.reasoning_tokens = otd["thinking_tokens"]
        return usage

    @classmethod
    def parse_response(cls, data):
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            raise UpstreamError("protocol", "upstream answer has no content")
        resp = ChatResponse(data.get("id"), data.get("model"))
        for b in data["content"]:
            t = b.get("type")
            if t == "text":
                resp.parts.append(Text(b.get("text") or ""))
            elif t == "thinking":
                resp.parts.append(Thinking(b.get("thinking") or "", b.get("signature"), source="anthropic"))
            elif t == "redacted_thinking":
                resp.parts.append(Thinking("", redacted=b.get("data"), source="anthropic"))
            elif t == "tool_use":
                resp.parts.append(ToolCall(b.get("id") or new_id("toolu_"), b.get("name") or "",
                                           json_dumps(b.get("input") if isinstance(b.get("input"), dict) else {})))
        resp.finish = ANTHROPIC_STOP_IN.get(data.get("stop_reason") or "end_turn", "stop")
        resp.stop_sequence = data.get("stop_sequence")
        return resp.settle_finish(cls.parse_usage(data.get("usage")))

    # -- response: IR -> wire -------------------------------------------------------------------------------------
    @staticmethod
    def wire_usage(u):
        if u is None:
            return {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0}
        return {"input_tokens": max(0, u.input_tokens - u.cached_tokens - u.cache_write_tokens),
                "output_tokens": u.output_tokens, "cache_creation_input_tokens": u.cache_write_tokens,
                "cache_read_input_tokens": u.cached_tokens}

    @classmethod
    def build_response(cls, resp, req):
        content = []
        for p in resp.parts:
            if p.kind == "tool_call" and p.signature and p.source and p.source != "anthropic":
                content.extend(cls._client_thinking_blocks(Thinking("", p.signature, source=p.source)))  # Gemini
            content.extend(cls._wire_parts([p], upstream=False))
        calls = any(b["type"] == "tool_use" for b in content)
        stop = "tool_use" if calls else ANTHROPIC_STOP_OUT.get(resp.finish, "end_turn")
        if stop == "tool_use" and not calls:
            stop = "end_turn"
        return {"id": resp.id if resp.id and str(resp.id).startswith("msg_") else new_id("msg_"), "type": "message",
                "role": "assistant", "model": req.model, "content": content, "stop_reason": stop,
                "stop_sequence": resp.stop_sequence if stop == "stop_sequence" else None,
                "usage": cls.wire_usage(resp.usage)}

    # -- streams --------------------------------------------------------------------------------------------------
    RELAY_MARKS = (b"message_start", b"message_delta", b"message_stop", b'"error"')

    class StreamDecoder(EventDecoder):
        """Anthropic SSE -> IR events."""

        def __init__(self, req=None):
            EventDecoder.__init__(self, req)
            self.blocks = {}  # upstream index -> ("text"|"thinking"|"tool", our tool index)
            self.tools = 0
            self.usage = Usage()
            self.stop_sequence = None

        def on_object(self, obj, t):
            if t == "content_block_delta":
                d = obj.get("delta") or {}
                dt = d.get("type")
                if dt == "text_delta":
                    return [TextDelta(d.get("text") or "")] if d.get("text") else []
                if dt == "thinking_delta":
                    return [ThinkingDelta(d.get("thinking") or "", source="anthropic")]
                if dt == "signature_delta":
                    return [ThinkingDelta("", signature=d.get("signature"), source="anthropic")]
                if dt == "input_json_delta":
                    kind = self.blocks.get(obj.get("index"))
                    if kind and kind[0] == "tool" and d.get("partial_json"):
                        return [ToolCallDelta(kind[1], d["partial_json"])]
                return []
            if t == "content_block_start":
                cb = obj.get("content_block") or {}
                ct = cb.get("type")
                idx = obj.get("index")
                if ct == "tool_use":
                    n = self.tools
                    self.tools += 1
                    self.blocks[idx] = ("tool", n)
                    out = [ToolCallStart(n, cb.get("id") or new_id("toolu_"), cb.get("name") or "")]
                    if isinstance(cb.get("input"), dict) and cb["input"]:
                        out.append(ToolCallDelta(n, json_dumps(cb["input"])))
                    return out
                if ct == "thinking":
                    self.blocks[idx] = ("thinking", None)
                    return [ThinkingDelta(cb.get("thinking") or "", source="anthropic")] if cb.get("thinking") else []
                if ct == "redacted_thinking":
                    self.blocks[idx] = ("thinking", None)
                    return [ThinkingDelta("", redacted=cb.get("data"), source="anthropic")]
                if ct == "text":
                    self.blocks[idx] = ("text", None)
                    return [TextDelta(cb["text"])] if cb.get("text") else []
                return []
            if t == "content_block_stop":
                kind = self.blocks.get(obj.get("index"))
                if kind and kind[0] == "tool":
                    return [ToolCallEnd(kind[1])]
                return []
            if t == "message_start":
                self.started = True
                msg = obj.get("message") or {}
                Anthropic.parse_usage(msg.get("usage"), self.usage)
                return [Start(msg.get("id"), msg.get("model"))]
            if t == "message_delta":
                d = obj.get("delta") or {}
                if d.get("stop_reason"):
                    self.finish = ANTHROPIC_STOP_IN.get(d["stop_reason"], "stop")
                    self.stop_sequence = d.get("stop_sequence")
                Anthropic.parse_usage(obj.get("usage"), self.usage)
                return []
            if t == "message_stop":
                return self._end()
            if t == "error":
                err = obj.get("error") or {}
                etype = err.get("type") or "api_error"
                status = {"overloaded_error": 529, "rate_limit_error": 429, "invalid_request_error": 400,
                          "authentication_error": 401, "permission_error": 403, "not_found_error": 404,
                          "timeout_error": 504}.get(etype, 502)
                self.done = True
                return [ErrorEvent(status, err.get("message") or "upstream error", error_type_for_status(status))]
            return []

        def _end(self):
            if self.done:
                return []
            self.done = True
            reason = self.finish or "stop"
            if self.tools and reason == "stop":
                reason = "tool_calls"
            return [UsageEvent(self.usage), Finish(reason, self.stop_sequence)]

        def close(self):
            if self.done:
                return []
            if self.finish is not None:
                return self._end()
            return [ErrorEvent(502, "upstream stream ended before message_stop", "upstream")]

    class StreamEncoder(EventEncoder):
        """IR events -> Anthropic SSE with `event:` lines, one block open at a time (formats.md §3.4, §6.10)."""

        def __init__(self, req):
            EventEncoder.__init__(self, req)
            self.index = -1
            self.open = None  # "text" | "thinking" | ("tool", ir index)
            self.started = False
            self.tools_seen = False
            self.pending = {}
            self.thinking = None  # the open thinking block's family, until its signature is sent
            self.thinking_item = None  # the upstream item id of the open thinking block (Responses)
            self.deferred = []  # signature-only reasoning state met inside a text block: sent after that block

        @staticmethod
        def _event(name, obj):
            return ("event: %s\ndata: %s\n\n" % (name, json_dumps(obj))).encode()

        def _start(self, ev=None):
            if self.started:
                return b""
            self.started = True
            msg = {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": self.req.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 0}}
            return self._event("message_start", {"type": "message_start", "message": msg})

        def _close(self):
            if self.open is None:
                return b""
            out = b""
            if self.thinking is not None:  # every thinking block a client sees carries a signature
                out = self._signature(ThinkingDelta("", source=self.thinking))
            closed, self.open = self.open, None
            out += self._event("content_block_stop", {"type": "content_block_stop", "index": self.index})
            if closed == "text" and self.deferred:
                deferred, self.deferred = self.deferred, []
                for ev in deferred:
                    out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                    out += self._signature(ev) + self._close()
            return out

        def _signature(self, ev):
            self.thinking = None
            native = ev.source in (None, "anthropic") and ev.signature
            return self._delta({"type": "signature_delta", "signature": ev.signature if native else
                                pack_reasoning(ev)})

        def _open(self, kind, block):
            out = self._close()
            self.index += 1
            self.open = kind
            return out + self._event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                              "content_block": block})

        def _delta(self, delta):
            return self._event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                        "delta": delta})

        def on_start(self, ev):
            return self._start()

        def on_text(self, ev):
            out = self._start()
            if self.open != "text":
                out += self._open("text", {"type": "text", "text": ""})
            return out + self._delta({"type": "text_delta", "text": ev.text})

        def on_thinking(self, ev):
            out = self._start()
            native = ev.source in (None, "anthropic")
            if ev.redacted and native:
                out += self._open("redacted", {"type": "redacted_thinking", "data": ev.redacted})
                return out + self._close()
            sealed = bool(ev.signature or ev.redacted or ev.encrypted)  # state that closes a block
            if sealed and not ev.text and not native and self.open == "text":
                self.deferred.append(ev)  # a signature for this text: never split the answer around it
                return out
            same_item = ev.item_id is not None and ev.item_id == self.thinking_item
            if self.open != "thinking" or (sealed and not ev.text and not native and not same_item):
                out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                self.thinking, self.thinking_item = ev.source or "anthropic", ev.item_id
            if ev.text:
                out += self._delta({"type": "thinking_delta", "thinking": ev.text})
            if sealed:
                out += self._signature(ev) + self._close()
            return out

        def on_tool_start(self, ev):
            out = self._start()
            self.tools_seen = True
            if ev.signature and ev.source and ev.source != "anthropic":
                out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out += self._signature(ev) + self._close()
            out += self._open(("tool", ev.index), {"type": "tool_use", "id": sanitize_tool_id(ev.id),
                                                   "name": ev.name, "input": {}})
            pending = self.pending.pop(ev.index, "")
            if pending:
                out += self._delta({"type": "input_json_delta", "partial_json": pending})
            return out

        def on_tool_delta(self, ev):
            out = self._start()
            if self.open == ("tool", ev.index):
                return out + self._delta({"type": "input_json_delta", "partial_json": ev.arguments})
            self.pending[ev.index] = self.pending.get(ev.index, "") + ev.arguments
            return out

        def on_tool_end(self, ev):
            out = self._start()
            if self.open == ("tool", ev.index):
                out += self._close()
            return out

        def finish(self, ev):
            out = self._start()
            out += self._close()
            stop = "tool_use" if self.tools_seen else ANTHROPIC_STOP_OUT.get(ev.reason, "end_turn")
            if stop == "tool_use" and not self.tools_seen:
                stop = "end_turn"
            usage = Anthropic.wire_usage(self.usage)
            out += self._event("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": stop, "stop_sequence": ev.stop_sequence if stop == "stop_sequence" else None},
                "usage": usage})
            return out + self._event("message_stop", {"type": "message_stop"})

        def error_frame(self, err):
            return self._start() + self._event("error", Anthropic.error_body(err))


_GEMINI_DROP_KEYS = frozenset((
    "$schema", "$id", "$comment", "$defs", "definitions", "$ref", "additionalProperties", "propertyNames",
    "patternProperties", "enumDescriptions", "enumTitles", "prefill", "deprecated", "encrypted",
    "title", "unevaluatedProperties", "unevaluatedItems", "dependentSchemas", "dependentRequired",
    "dependencies", "contentEncoding", "contentMediaType", "if", "then", "else", "not", "strict",
    "input_examples", "readOnly", "writeOnly", "examples", "default", "minContains", "maxContains", "contains",
    "const"))


_GEMINI_HINT_KEYS = ("minLength", "maxLength", "exclusiveMinimum", "exclusiveMaximum", "pattern", "minItems",
                     "maxItems", "uniqueItems", "format", "default", "examples")


def _merge_all_of(s, branches):
    """Fold allOf branches into schema `s` (a copy): properties and required lists united, other keys kept where
    unset. The client's own dicts inside `s` are replaced, never written into (codecs treat a body as read-only)."""
    merged = {}
    for sub in branches:
        if isinstance(sub, dict):
            for k, v in sub.items():
                if k == "properties":  # (of the wrong type: dropped, like the rest of a broken schema)
                    if isinstance(v, dict):
                        merged["properties"] = dict(merged.get("properties") or {}, **v)
                elif k == "required":
                    if isinstance(v, list):
                        merged["required"] = (merged.get("required") or []) + v
                else:
                    merged.setdefault(k, v)
    for k, v in merged.items():
        if k == "properties":
            own = s.get("properties")
            s["properties"] = dict(own, **v) if isinstance(own, dict) else v
        elif k == "required":
            own = s.get("required")
            s["required"] = (own if isinstance(own, list) else []) + v
        else:
            s.setdefault(k, v)


def clean_schema_for_gemini(schema, _defs=None, _depth=0):
    """JSON Schema -> the OpenAPI subset Gemini's `parameters` accepts (formats.md §6.5): local $refs inlined,
    const -> enum, enums as strings, allOf merged, anyOf/oneOf flattened (a null branch = optional),
    `type: [T, "null"]` -> T, unsupported constraints moved into the description. Applied to schemas only."""
    if not isinstance(schema, dict) or _depth > 40:
        return {"type": "object", "properties": {}} if _depth == 0 else {}
    defs = _defs
    if defs is None:
        defs = {}
        for key in ("$defs", "definitions"):
            if isinstance(schema.get(key), dict):
                defs.update(schema[key])
    s = dict(schema)
    ref = s.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and _depth < 20:
        name = ref.rsplit("/", 1)[-1]
        if isinstance(defs.get(name), dict):
            merged = dict(defs[name])
            merged.update({k: v for k, v in s.items() if k != "$ref"})
            s = merged
        else:
            s = {"type": "object", "description": "(reference %s)" % ref}
    if "allOf" in s and isinstance(s["allOf"], list):
        _merge_all_of(s, s.pop("allOf"))
    for key in ("anyOf", "oneOf"):
        branches = s.pop(key, None)
        if isinstance(branches, list):
            real = [b for b in branches if isinstance(b, dict) and b.get("type") != "null"]
            if len(real) < len(branches):
                s["nullable"] = True  # a union with null: the value may be absent
            best = max(real, key=lambda b: (b.get("type") == "object", len(b)), default=None)
            if best is not None:
                for k, v in best.items():
                    s.setdefault(k, v)
    t = s.get("type")
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        s["type"] = non_null[0] if non_null else "string"
        if "null" in t and non_null:
            s["nullable"] = True
    if "const" in s:
        s["enum"] = [s["const"]]
    if "enum" in s and isinstance(s["enum"], list):
        s["enum"] = [v if isinstance(v, str) else json_dumps(v) for v in s["enum"] if v is not None]
        s["type"] = "string"
    hints = []
    for k in _GEMINI_HINT_KEYS:
        if k in s and not (k == "format" and s[k] in ("enum", "date-time")):
            hints.append("%s: %s" % (k, s[k] if isinstance(s[k], str) else json_dumps(s[k])))
    out = {}
    for k, v in s.items():
        if k in _GEMINI_DROP_KEYS or k in _GEMINI_HINT_KEYS or k.startswith("x-"):
            continue
        if k == "properties" and isinstance(v, dict):
            out[k] = {pk: clean_schema_for_gemini(pv, defs, _depth + 1) for pk, pv in v.items()
                      if isinstance(pv, dict)}
        elif k == "items":
            out[k] = clean_schema_for_gemini(v if isinstance(v, dict) else {}, defs, _depth + 1)
        else:
            out[k] = v
    if hints:
        out["description"] = ((out.get("description") or "") + " (" + "; ".join(hints) + ")").strip()
    if "properties" in out and "type" not in out:
        out["type"] = "object"
    if isinstance(out.get("required"), list):
        props = out.get("properties") if isinstance(out.get("properties"), dict) else {}
        out["required"] = [r for r in dict.fromkeys(r for r in out["required"] if isinstance(r, str)) if r in props]
        if not out["required"]:
            del out["required"]
    if out.get("type") == "array" and "items" not in out:
        out["items"] = {"type": "string"}
    if _depth == 0 and out.get("type") != "object":
        out = {"type": "object", "properties": out.get("properties") or {}}
    return out


def json_object_or_wrap(text):
    """A tool result for Gemini's functionResponse.response: JSON objects stay, anything else is wrapped."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return {"output": text}
    return value if isinstance(value, dict) else {"output": value}


GEMINI_FINISH_IN = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
                    "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
                    "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter", "IMAGE_SAFETY": "content_filter",
                    "IMAGE_PROHIBITED_CONTENT": "content_filter", "IMAGE_RECITATION": "content_filter"}
GEMINI_FINISH_OUT = {"stop": "STOP", "stop_sequence": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP",
                     "content_filter": "SAFETY", "refusal": "SAFETY", "pause": "STOP"}
GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
GEMINI_SKIP_SIGNATURE = "skip_thought_signature_validator"
GEMINI_STORES = ("generativelanguage.googleapis.com", "www.youtube.com", "youtube.com", "youtu.be")
GEMINI_DEFAULT_SAFETY = [{"category": c, "threshold": "OFF"} for c in (
    "HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_SEXUALLY_EXPLICIT",
    "HARM_CATEGORY_DANGEROUS_CONTENT")] + [{"category": "HARM_CATEGORY_CIVIC_INTEGRITY", "threshold": "BLOCK_NONE"}]


def gget(obj, camel, default=None):
    """A Gemini field in either spelling (requests are protobuf JSON: `inlineData` or `inline_data`)."""
    if camel in obj:
        return obj[camel]
    return obj.get(snake_case(camel), default)


class Gemini(Codec):
    """Gemini Generative Language API (`/v1beta/models/{m}:generateContent` ...), formats.md §4."""
    name = "gemini"
    file_store = "gemini"
    PART_SHAPE = {"text": "str", "thoughtSignature": "str", "inlineData": {"mimeType": "str", "data": "str"},
                  "fileData": {"mimeType": "str", "fileUri": "str"}, "functionCall": {"name": "str", "id": "str"},
                  "functionResponse": {"name": "str", "id": "str"}}
    CONTENT_SHAPE = {"role": "str", "parts": [PART_SHAPE]}
    GENERATE_SHAPE = {
        "contents": [CONTENT_SHAPE], "systemInstruction": ("str", {"parts": [PART_SHAPE]}),
        "tools": [{"functionDeclarations": [{"name": "str", "description": "str", "parameters": "object",
                                             "parametersJsonSchema": "object"}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "str", "allowedFunctionNames": ["str"]}},
        "generationConfig": {"temperature": "num", "topP": "num", "topK": "num", "maxOutputTokens": "int",
                             "stopSequences": ["str"], "candidateCount": "int", "presencePenalty": "num",
                             "frequencyPenalty": "num", "seed": "int", "responseMimeType": "str",
                             "thinkingConfig": {"thinkingLevel": "str", "thinkingBudget": "int"}},
        "safetySettings": ["object"]}
    EMBED_SHAPE = {"content": {"parts": [PART_SHAPE]}, "outputDimensionality": "int", "taskType": "str"}
    REQUEST_SHAPES = {"parse_request": dict(GENERATE_SHAPE, generateContentRequest=GENERATE_SHAPE),
                      "parse_embeddings": dict(EMBED_SHAPE, requests=[EMBED_SHAPE])}

    @staticmethod
    def error_body(err):
        message = err.message
        if err.code == CONTEXT_OVERFLOW and "exceeds the maximum number of tokens" not in message:
            message = "The input token count exceeds the maximum number of tokens allowed: " + message
        return {"error": {"code": err.status, "message": message, "status": GEMINI_STATUS.get(err.status, "UNKNOWN")}}

    # -- signatures -----------------------------------------------------------------------------------------------
    @staticmethod
    def client_signature(part):
        """A thoughtSignature for a Gemini client: Gemini's own as is; other families' reasoning state carried in
        the IR token, base64-encoded because the SDKs decode thoughtSignature as bytes."""
        if part.source == "gemini" and part.signature:
            return part.signature
        return base64.b64encode(pack_reasoning(part).encode("ascii")).decode("ascii")

    @staticmethod
    def read_signature(value):
        """The reasoning state in a client's thoughtSignature, as a Thinking part with no text."""
        value = b64_normalize(value)
        try:
            raw = base64.b64decode(value).decode("ascii")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raw = None
        fields = unpack_reasoning(raw)
        return Thinking("", **fields) if fields else Thinking("", value, source="gemini")

    # -- request: wire -> IR --------------------------------------------------------------------------------------
    @classmethod
    def parse_request(cls, body, model, count_only=False):
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        inner = gget(body, "generateContentRequest")
        if isinstance(inner, dict):  # countTokens may wrap a whole request
            body = inner
        contents = _array(body, "contents")
        req = ChatRequest(model, client_format=cls.name)
        si = gget(body, "systemInstruction")
        if isinstance(si, str):
            req.system.append(Text(si))
        elif isinstance(si, dict):
            for p in si.get("parts") or []:
                if isinstance(p, dict) and isinstance(p.get("text"), str):
                    req.system.append(Text(p["text"]))
        pending = {}  # function name -> [call ids] awaiting responses (FIFO when ids are absent)
        for i, _, c in _objects(contents, "contents"):
            cls._parse_content(req, c, i, pending)
        if not req.messages and not count_only:
            raise BadRequest("contents must not be empty", "contents")
        for t in body.get("tools") or []:
            if not isinstance(t, dict):
                continue
            for f in gget(t, "functionDeclarations") or []:
                if not isinstance(f, dict) or not f.get("name"):
                    raise BadRequest("tools[].functionDeclarations[].name is required", "tools")
                params = f.get("parameters") or gget(f, "parametersJsonSchema")
                req.tools.append(Tool(f["name"], f.get("description"), cls._lower_types(params)))
            others = {k: v for k, v in t.items() if k not in ("functionDeclarations", "function_declarations")}
            if others:
                req.native_tools.append(others)  # googleSearch, codeExecution, ...: Gemini upstreams only
        tc = gget(body, "toolConfig")
        if isinstance(tc, dict):
            fcc = gget(tc, "functionCallingConfig") or {}
            mode = (fcc.get("mode") or "").upper()
            allowed = gget(fcc, "allowedFunctionNames") or []
            if mode == "NONE":
                req.tool_choice = "none"
            elif mode in ("ANY", "VALIDATED"):
                req.tool_choice = {"name": allowed[0]} if len(allowed) == 1 else "required"
            elif mode == "AUTO":
                req.tool_choice = "auto"
        gc = gget(body, "generationConfig") or {}
        if not isinstance(gc, dict):
            raise BadRequest("generationConfig must be an object", "generationConfig")
        req.temperature = _expect(gc.get("temperature"), (int, float), "generationConfig.temperature", "a number")
        req.top_p = _expect(gget(gc, "topP"), (int, float), "generationConfig.topP", "a number")
        req.top_k = _expect(gget(gc, "topK"), (int, float), "generationConfig.topK", "a number")
        if req.top_k is not None:
            req.top_k = int(req.top_k)
        req.max_tokens = _expect(gget(gc, "maxOutputTokens"), int, "generationConfig.maxOutputTokens", "an integer")
        req.stop = _stop_list(gget(gc, "stopSequences"), "generationConfig.stopSequences")
        req.n = gget(gc, "candidateCount")
        req.presence_penalty = gget(gc, "presencePenalty")
        req.frequency_penalty = gget(gc, "frequencyPenalty")
        req.seed = gc.get("seed")
        mime = gget(gc, "responseMimeType")
        schema = gget(gc, "responseJsonSchema") or gget(gc, "responseSchema")
        if mime == "application/json":
            req.response_format = {"type": "json_schema", "name": "response", "schema": cls._lower_types(schema)} \
                if isinstance(schema, dict) else {"type": "json_object"}
        tcfg = gget(gc, "thinkingConfig")
        if isinstance(tcfg, dict):
            level = gget(tcfg, "thinkingLevel")
            budget = gget(tcfg, "thinkingBudget")
            req.thinking = ThinkingConfig(effort=level.lower() if isinstance(level, str) else None,
                                          budget=budget if isinstance(budget, int) else None,
                                          include_thoughts=gget(tcfg, "includeThoughts"))
            req.passthrough["thinkingConfig"] = tcfg
        ss = gget(body, "safetySettings")
        if ss is not None:
            req.safety_settings = ss
        return req

    @classmethod
    def _lower_types(cls, schema):
        """Gemini schemas spell types in capitals (STRING); other formats expect JSON Schema's lower case."""
        if isinstance(schema, dict):
            out = {}
            for k, v in schema.items():
                if k == "type" and isinstance(v, str):
                    out[k] = v.lower()
                elif k == "properties" and isinstance(v, dict):
                    out[k] = {pk: cls._lower_types(pv) for pk, pv in v.items()}
                elif k in ("items", "anyOf") or isinstance(v, (dict, list)) and k not in ("enum", "required"):
                    out[k] = cls._lower_types(v)
                else:
                    out[k] = v
            return out
        if isinstance(schema, list):
            return [cls._lower_types(x) for x in schema]
        return schema

    @classmethod
    def _media(cls, data, url=False):
        mime = gget(data, "mimeType") or ("application/octet-stream" if url else "image/png")
        if url:
            uri = gget(data, "fileUri") or ""
            if not uri.startswith(("http://", "https://")) or urllib.parse.urlsplit(uri).hostname in GEMINI_STORES:
                return File(mime, file_id=uri, store="gemini")  # Files API, gs://, a video: only Gemini reads it
            return Image(mime, url=uri) if mime.startswith("image/") else File(mime, url=uri)
        b64 = b64_normalize(data.get("data") or "")
        return Image(mime, b64) if mime.startswith("image/") else File(mime, b64)

    @classmethod
    def _parse_content(cls, req, c, i, pending):
        role = c.get("role") or ("user" if i % 2 == 0 else "model")
        parts_in = c.get("parts") or []
        if not isinstance(parts_in, list):
            raise BadRequest("contents[%d].parts must be an array" % i, "contents")
        parts, results = [], []
        for j, p in enumerate(parts_in):
            if not isinstance(p, dict):
                raise BadRequest("contents[%d].parts[%d] must be an object" % (i, j), "contents")
            sig = gget(p, "thoughtSignature")
            state = cls.read_signature(sig) if sig else None
            if "text" in p:
                if p.get("thought"):
                    th = state or Thinking("", source="gemini")
                    th.text = p.get("text") or ""
                    parts.append(th)
                else:
                    if state is not None:
                        parts.append(state)
                    if p.get("text"):
                        parts.append(Text(p["text"]))
            elif gget(p, "inlineData") is not None:
                parts.append(cls._media(gget(p, "inlineData")))
            elif gget(p, "fileData") is not None:
                parts.append(cls._media(gget(p, "fileData"), url=True))
            elif gget(p, "functionCall") is not None:
                fc = gget(p, "functionCall")
                name = fc.get("name") or ""
                cid = fc.get("id") or new_id("call_")
                pending.setdefault(name, []).append(cid)
                call = ToolCall.of_object(cid, name, fc.get("args"))
                if state is not None and state.signature:
                    call.signature, call.source = state.signature, state.source
                elif state is not None:
                    parts.append(state)
                parts.append(call)
            elif gget(p, "functionResponse") is not None:
                fr = gget(p, "functionResponse")
                name = fr.get("name") or ""
                rid = fr.get("id")
                queue = pending.get(name) or []
                if rid and rid in queue:
                    queue.remove(rid)
                elif queue:
                    rid = queue.pop(0)
                rid = rid or new_id("call_")
                resp = fr.get("response")
                is_error = isinstance(resp, dict) and "error" in resp and "output" not in resp
                if isinstance(resp, dict) and set(resp) <= {"output", "error", "result"} and resp:
                    value = resp.get("output", resp.get("result", resp.get("error")))
                    text = value if isinstance(value, str) else json_dumps(value)
                else:
                    text = json_dumps(resp if resp is not None else {})
                results.append(ToolResult(rid, name, [Text(text)], is_error))
            elif state is not None:
                prev = parts[-1] if parts else None
                if state.source != "gemini" and prev is not None and prev.kind == "thinking" and not prev.signature \
                        and not prev.encrypted and not prev.redacted:
                    # A carried token streamed after its thought text closes that thought (Anthropic semantics).
                    prev.source, prev.signature, prev.redacted = state.source, state.signature, state.redacted
                    prev.encrypted, prev.item_id = state.encrypted, state.item_id or prev.item_id
                else:
                    parts.append(state)
        if results:
            req.messages.append(Message("tool", results))
        if parts or not results:
            req.messages.append(Message("assistant" if role == "model" else "user", parts))

    # -- request: IR -> wire --------------------------------------------------------------------------------------
    @staticmethod
    def is_gemini3(model):
        return bool(re.search(r"gemini-3", model))

    @classmethod
    def _wire_media(cls, p):
        if getattr(p, "file_id", None):
            return {"fileData": {"mimeType": p.mime or "application/octet-stream", "fileUri": cls.file_ref(p)}}
        if p.data:
            return {"inlineData": {"mimeType": p.mime or "application/octet-stream", "data": p.data}}
        if p.url:
            split = data_url_split(p.url)
            if split:
                return {"inlineData": {"mimeType": split[0], "data": split[1]}}
            return {"fileData": {"mimeType": p.mime or "application/octet-stream", "fileUri": p.url}}
        return None

    @classmethod
    def build_contents(cls, req, client=False):
        """IR messages -> Gemini contents with the turn grammar repaired (formats.md §6.1, §4.9)."""
        contents = []
        for m in repair_tool_turns(req.messages):
            parts = []
            role = "model" if m.role == "assistant" else "user"
            if m.role == "tool":
                extra = []
                for r in m.parts:
                    text = r.text()
                    resp = {"error": json_object_or_wrap(text).get("output", text)} if r.is_error else \
                        json_object_or_wrap(text)
                    fr = {"name": r.name or "unknown", "response": resp}
                    if r.id and not r.id.startswith("call_") or client:
                        fr["id"] = r.id
                    parts.append({"functionResponse": fr})
                    extra.extend(x for x in (cls._wire_media(c) for c in r.content if c.kind in ("image", "file"))
                                 if x)
                parts.extend(extra)
            elif m.role == "system":
                if m.text().strip():
                    parts.append({"text": m.text()})
            else:
                parts = cls._wire_turn(m, role, client)
            if not parts:
                continue
            if contents and contents[-1]["role"] == role:
                contents[-1]["parts"].extend(parts)
            else:
                contents.append({"role": role, "parts": parts})
        return contents

    @classmethod
    def _wire_turn(cls, m, role, client):
        """The parts of a user or model turn. A signature-only Thinking part gives its thoughtSignature to the
        part after it (or, at the end of a turn, to the answer's text): Gemini signatures are positional."""
        parts = []
        pending_sig = None
        first_call = True
        for p in m.parts:
            k = p.kind
            if k == "thinking":
                if p.source == "gemini" and p.signature:
                    if p.text:
                        parts.append({"text": p.text, "thought": True, "thoughtSignature": p.signature})
                    else:
                        pending_sig = p.signature
                elif client and (p.text or p.signature or p.encrypted or p.redacted):
                    part = {"text": p.text or "", "thought": True}
                    if p.signature or p.encrypted or p.redacted:
                        part["thoughtSignature"] = cls.client_signature(p)
                    parts.append(part)
                continue
            if k == "text":
                if not p.text:
                    continue
                part = {"text": p.text}
                if pending_sig and role == "model":
                    part["thoughtSignature"] = pending_sig
                    pending_sig = None
                parts.append(part)
            elif k in ("image", "file"):
                wm = cls._wire_media(p)
                if wm:
                    parts.append(wm)
            elif k == "tool_call":
                fc = {"name": p.name, "args": p.args_object()}
                if p.id and (client or not p.id.startswith("call_")):
                    fc["id"] = p.id
                part = {"functionCall": fc}
                sig = None
                if p.source == "gemini" and p.signature:
                    sig = p.signature
                elif pending_sig:
                    sig = pending_sig
                elif client and p.signature:
                    sig = cls.client_signature(p)
                elif first_call and not client:
                    sig = GEMINI_SKIP_SIGNATURE  # history without Gemini's own signature (formats.md §4.4)
                pending_sig = None
                if sig:
                    part["thoughtSignature"] = sig
                first_call = False
                parts.append(part)
        if pending_sig and role == "model":
            last = parts[-1] if parts else None
            if last is not None and "text" in last and not last.get("thought") and "thoughtSignature" not in last:
                last["thoughtSignature"] = pending_sig  # a signature carried after its answer's text
            else:
                parts.append({"thoughtSignature": pending_sig})
        return parts

    @classmethod
    def build_request(cls, req, model):
        contents = cls.build_contents(req)
        # Gemini wants the conversation to start with a user turn and end with a user or function-response turn.
        if contents and contents[0]["role"] == "model":
            contents.insert(0, {"role": "user", "parts": [{"text": "(continue)"}]})
        while contents and contents[-1]["role"] == "model":
            contents.pop()
        if not contents:
            text = req.system_text() or "(empty)"
            contents = [{"role": "user", "parts": [{"text": text}]}]
        body = {"contents": contents}
        if req.system and any(p.text.strip() for p in req.system if p.kind == "text"):
            body["systemInstruction"] = {"parts": [{"text": req.system_text()}]}
        tools = []
        decls = []
        for t in req.tools:
            params = custom_tool_schema() if t.tool_kind == "custom" else t.parameters
            d = {"name": re.sub(r"[^a-zA-Z0-9_.:-]", "_", t.name)[:128],
                 "parameters": clean_schema_for_gemini(params or {"type": "object", "properties": {}})}
            if t.description:
                d["description"] = t.description
            decls.append(d)
        if decls and req.tool_choice != "none":
            tools.append({"functionDeclarations": decls})
        if req.client_format == cls.name:
            tools.extend(req.native_tools)
        if tools:
            body["tools"] = tools
        tc = req.tool_choice
        if decls and tc is not None and tc != "none":
            cfg = {"mode": "AUTO"}
            if tc == "required":
                cfg = {"mode": "ANY"}
            elif isinstance(tc, dict):
                cfg = {"mode": "ANY", "allowedFunctionNames": [tc.get("name")]}
            body["toolConfig"] = {"functionCallingConfig": cfg}
        gc = {}
        if req.temperature is not None:
            gc["temperature"] = req.temperature
        if req.top_p is not None:
            gc["topP"] = req.top_p
        if req.top_k is not None:
            gc["topK"] = req.top_k
        if req.max_tokens is not None:
            gc["maxOutputTokens"] = req.max_tokens
        if req.stop:
            gc["stopSequences"] = req.stop[:5]
        if req.n and req.n > 1:
            gc["candidateCount"] = req.n
        for field, key in (("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty"),
                           ("seed", "seed")):
            if getattr(req, field) is not None:
                gc[key] = getattr(req, field)
        rf = req.response_format
        if rf:
            gc["responseMimeType"] = "application/json"
            if rf["type"] == "json_schema":
                gc["responseSchema"] = clean_schema_for_gemini(rf.get("schema") or {})
        native = req.passthrough.get("thinkingConfig") if req.client_format == cls.name else None
        if native is not None:
            gc["thinkingConfig"] = native  # a Gemini client's own settings, untouched on a Gemini route
        elif req.thinking is not None:
            tcfg = {}
            effort = thinking_effort(req.thinking)
            if cls.is_gemini3(model) and req.thinking.budget is None and effort not in (None, "auto", "none"):
                tcfg["thinkingLevel"] = {"minimal": "low", "xhigh": "high", "max": "high"}.get(effort, effort)
            else:
                budget = thinking_budget(req.thinking)
                if budget is not None and budget > 0:
                    budget = fit_thinking_budget(req, budget)
                if budget is not None:
                    tcfg["thinkingBudget"] = min(budget, 32768) if budget >= 0 else -1
            include = req.thinking.include_thoughts
            tcfg["includeThoughts"] = bool(effort != "none") if include is None else bool(include)
            gc["thinkingConfig"] = tcfg
        if gc:
            body["generationConfig"] = gc
        body["safetySettings"] = req.safety_settings if req.client_format == cls.name and \
            req.safety_settings is not None else GEMINI_DEFAULT_SAFETY
        return body

    # -- response: wire -> IR -------------------------------------------------------------------------------------
    @staticmethod
    def parse_usage(um):
        if not isinstance(um, dict):
            return None
        prompt = (gget(um, "promptTokenCount") or 0) + (gget(um, "toolUsePromptTokenCount") or 0)
        thoughts = gget(um, "thoughtsTokenCount") or 0
        return Usage(prompt, (gget(um, "candidatesTokenCount") or 0) + thoughts, gget(um, "cachedContentTokenCount")
                     or 0, 0, thoughts)

    @classmethod
    def parts_to_events(cls, parts, state):
        """IR events for one candidate's parts (shared by the non-stream parser and the stream decoder)."""
        out = []
        for p in parts or ():
            sig = gget(p, "thoughtSignature")
            if "text" in p and p.get("thought"):
                out.append(ThinkingDelta(p.get("text") or "", signature=sig, source="gemini"))
            elif "text" in p:
                if sig:
                    out.append(ThinkingDelta("", signature=sig, source="gemini"))
                if p.get("text"):
                    out.append(TextDelta(p["text"]))
            elif gget(p, "functionCall") is not None:
                fc = gget(p, "functionCall")
                n = state["tools"]
                state["tools"] += 1
                args = fc.get("args")
                out.append(ToolCallStart(n, fc.get("id") or new_id("call_"), fc.get("name") or "", "function",
                                         sig, "gemini" if sig else None))
                out.append(ToolCallDelta(n, json_dumps(args if isinstance(args, dict) else {})))
                out.append(ToolCallEnd(n))
            elif gget(p, "inlineData") is not None:
                data = gget(p, "inlineData")
                out.append(TextDelta("![image](data:%s;base64,%s)" % (gget(data, "mimeType") or "image/png",
                                                                       data.get("data") or "")))
            elif sig:
                out.append(ThinkingDelta("", signature=sig, source="gemini"))
        return out

    @classmethod
    def parse_response(cls, data):
        if isinstance(data, list):
            data = data[0] if data else {}
        if not isinstance(data, dict):
            raise UpstreamError("protocol", "upstream answer is not a JSON object")
        collector = ResponseCollector()
        collector.add(Start(gget(data, "responseId"), gget(data, "modelVersion")))
        cands = data.get("candidates") or []
        state = {"tools": 0}
        finish = "stop"
        if cands:
            cand = cands[0]
            for ev in cls.parts_to_events((cand.get("content") or {}).get("parts"), state):
                collector.add(ev)
            finish = GEMINI_FINISH_IN.get(gget(cand, "finishReason") or "STOP", "stop")
        elif gget(data, "promptFeedback"):
            finish = "content_filter"
        usage = cls.parse_usage(gget(data, "usageMetadata"))
        if usage:
            collector.add(UsageEvent(usage))
        collector.add(Finish("tool_calls" if state["tools"] else finish))
        return collector.result()

    # -- response: IR -> wire -------------------------------------------------------------------------------------
    @staticmethod
    def wire_usage(u):
        if u is None:
            return None
        out = {"promptTokenCount": u.input_tokens, "candidatesTokenCount": max(0, u.output_tokens - u.reasoning_tokens),
               "totalTokenCount": u.input_tokens + u.output_tokens}
        if u.reasoning_tokens:
            out["thoughtsTokenCount"] = u.reasoning_tokens
        if u.cached_tokens:
            out["cachedContentTokenCount"] = u.cached_tokens
        return out

    @classmethod
    def build_response(cls, resp, req):
        tmp = ChatRequest(req.model, [Message("assistant", resp.parts)])
        contents = cls.build_contents(tmp, client=True)
        parts = contents[0]["parts"] if contents else []
        has_calls = any("functionCall" in p for p in parts)
        out = {"candidates": [{"content": {"role": "model", "parts": parts or [{"text": ""}]},
                               "finishReason": "STOP" if has_calls else GEMINI_FINISH_OUT.get(resp.finish, "STOP"),
                               "index": 0}],
               "modelVersion": req.model, "responseId": resp.id or new_id("", 8)}
        usage = cls.wire_usage(resp.usage)
        if usage:
            out["usageMetadata"] = usage
        return out

    @classmethod
    def parse_embeddings(cls, body, model, batch):
        """`:embedContent` ({content, taskType, outputDimensionality}) or `:batchEmbedContents` ({requests})."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        items = body.get("requests") if batch else [body]
        if not isinstance(items, list) or not items:
            raise BadRequest("requests must be a non-empty array", "requests")
        texts = []
        for i, _, item in _objects(items, "requests"):
            content = item.get("content") if isinstance(item.get("content"), dict) else {}
            texts.append("".join(p.get("text") or "" for p in content.get("parts") or [] if isinstance(p, dict)))
        first = items[0]
        return EmbeddingRequest(model, texts, gget(first, "outputDimensionality"), gget(first, "taskType"), cls.name)

    @staticmethod
    def build_embeddings(emb, req, batch):
        if batch:
            return {"embeddings": [{"values": v} for v in emb.vectors]}
        return {"embedding": {"values": emb.vectors[0] if emb.vectors else []}}

    @staticmethod
    def model_entry(mid, display=None):
        return {"name": "models/" + mid, "version": "001", "displayName": display or mid, "description": mid,
                "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
                "supportedGenerationMethods": ["generateContent", "countTokens"]}

    # -- streams --------------------------------------------------------------------------------------------------
    RELAY_MODEL_KEY = "modelVersion"
    RELAY_TALLY = b'"usageMetadata"'  # cumulative, in many chunks: the last one counts
    RELAY_MARKS = (b'"finishReason"', b'"error"', b'"promptFeedback"')

    class StreamDecoder(EventDecoder):
        """Gemini SSE (`alt=sse`) -> IR events."""

        def __init__(self, req=None):
            EventDecoder.__init__(self, req)
            self.state = {"tools": 0}
            self.any = False

        def feed(self, event, data):
            obj = json_or_none(data)
            return self.feed_obj(obj) if obj is not None else []

        def feed_obj(self, obj):
            if isinstance(obj, list):
                obj = obj[0] if obj else {}
            if not isinstance(obj, dict):
                return []
            if "error" in obj:
                err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
                code = err.get("code") if isinstance(err.get("code"), int) else 502
                self.done = True
                return [ErrorEvent(code, err.get("message") or "upstream error", error_type_for_status(code))]
            out = []
            if not self.started:
                self.started = True
                out.append(Start(gget(obj, "responseId"), gget(obj, "modelVersion")))
            for cand in obj.get("candidates") or ():
                if cand.get("index", 0) != 0:
                    continue
                evs = Gemini.parts_to_events((cand.get("content") or {}).get("parts"), self.state)
                if evs:
                    self.any = True
                out.extend(evs)
                fr = gget(cand, "finishReason")
                if fr:
                    self.finish = GEMINI_FINISH_IN.get(fr, "stop")
            if gget(obj, "promptFeedback") and not obj.get("candidates"):
                self.finish = "content_filter"
            um = gget(obj, "usageMetadata")
            if um:
                self.usage = Gemini.parse_usage(um)
            return out

        def close(self):
            if self.done:
                return []
            self.done = True
            if self.finish is None and not self.any:
                return [ErrorEvent(502, "upstream stream ended without content", "upstream")]
            out = [UsageEvent(self.usage)] if self.usage else []
            reason = "tool_calls" if self.state["tools"] else (self.finish or "stop")
            return out + [Finish(reason)]

    class StreamEncoder(EventEncoder):
        """IR events -> Gemini stream chunks: SSE `data:` lines (alt=sse) or one JSON array written progressively.
        Function calls go out whole; nothing but data lines (python-genai and js-genai parse nothing else)."""

        def __init__(self, req, sse=True):
            EventEncoder.__init__(self, req)
            self.sse = sse
            self.first = True
            self.calls = {}
            self.rid = new_id("", 8)
            self.tools_seen = False

        def _chunk(self, parts, finish=None):
            cand = {"content": {"role": "model", "parts": parts}, "index": 0}
            if finish:
                cand["finishReason"] = finish
            obj = {"candidates": [cand], "modelVersion": self.req.model, "responseId": self.rid}
            if finish and self.usage is not None:
                obj["usageMetadata"] = Gemini.wire_usage(self.usage)
            return self._frame(obj)

        def _frame(self, obj):
            if self.sse:
                return b"data: " + json_bytes(obj) + b"\r\n\r\n"
            prefix = b"[" if self.first else b",\r\n"
            self.first = False
            return prefix + json_bytes(obj)

        def on_text(self, ev):
            return self._chunk([{"text": ev.text}])

        def on_thinking(self, ev):
            part = {"text": ev.text or "", "thought": True}
            if ev.signature or ev.redacted or ev.encrypted:
                sig = Gemini.client_signature(ev)
                if not ev.text:
                    return self._chunk([{"thoughtSignature": sig}])
                part["thoughtSignature"] = sig
            return self._chunk([part]) if ev.text else b""

        def on_tool_start(self, ev):
            self.tools_seen = True
            self.calls[ev.index] = [ev, ""]
            return b""

        def on_tool_delta(self, ev):
            if ev.index in self.calls:
                self.calls[ev.index][1] += ev.arguments
            return b""

        def on_tool_end(self, ev):
            item = self.calls.pop(ev.index, None)
            if item is None:
                return b""
            start, args = item
            call = ToolCall(start.id, start.name, args or "{}")
            part = {"functionCall": {"name": start.name, "args": call.args_object(), "id": start.id}}
            if start.signature:
                part["thoughtSignature"] = Gemini.client_signature(start)
            return self._chunk([part])

        def finish(self, ev):
            out = b""
            for index in sorted(self.calls):
                out += self.encode(ToolCallEnd(index))
            reason = "STOP" if self.tools_seen else GEMINI_FINISH_OUT.get(ev.reason, "STOP")
            return out + self._chunk([{"text": ""}], reason)

        def error_frame(self, err):
            """No in-band error form survives python-genai's SSE reader: the array form gets an error element,
            SSE gets a bare error object (js-genai raises on it); then the stream ends."""
            return self._frame(Gemini.error_body(err))

        def close(self):
            if self.sse:
                return b""
            return b"[]" if self.first else b"]"


class Responses(Codec):
    """OpenAI Responses API (`/v1/responses`), formats.md §2.6–2.8. Stateless: history comes in `input`."""
    name = "responses"
    file_store = OpenAIChat.file_store  # uploads to the same OpenAI account serve both APIs
    PART_SHAPE = {"type": "str", "text": "str", "refusal": "str", "image_url": "str", "detail": "str",
                  "file_data": "str", "file_url": "str", "file_id": "str", "filename": "str"}
    ITEM_SHAPE = {"type": "str", "role": "str", "content": ("str", [PART_SHAPE]), "id": "str", "call_id": "str",
                  "name": "str", "arguments": "str", "input": "str", "output": ("str", [PART_SHAPE]),
                  "summary": [{"type": "str", "text": "str"}], "encrypted_content": "str"}
    REQUEST_SHAPES = {"parse_request": {
        "model": "str", "instructions": "str", "input": ("str", [("str", ITEM_SHAPE)]), "stream": "bool",
        "max_output_tokens": "int", "temperature": "num", "top_p": "num", "user": "str", "metadata": "object",
        "safety_identifier": "str", "parallel_tool_calls": "bool", "reasoning": {"effort": "str", "summary": "str"},
        "text": {"format": {"type": "str", "name": "str", "schema": "object"}},
        "tools": [{"type": "str", "name": "str", "description": "str", "parameters": "object"}],
        "tool_choice": ("str", {"type": "str", "name": "str", "mode": "str"}), "include": ["str"]}}

    # -- request: wire -> IR --------------------------------------------------------------------------------------
    @classmethod
    def parse_request(cls, body):
        model = request_model(body)
        if body.get("previous_response_id") or body.get("conversation"):
            raise BadRequest("previous_response_id and conversation need server-side state, which this gateway "
                             "does not keep; send the whole history in 'input'", "previous_response_id")
        req = ChatRequest(model, client_format=cls.name)
        instr = body.get("instructions")
        if isinstance(instr, str) and instr:
            req.system.append(Text(instr))
        elif instr is not None and not isinstance(instr, str):
            raise BadRequest("'instructions' must be a string", "instructions")
        inp = body.get("input")
        if isinstance(inp, str):
            req.messages.append(Message("user", [Text(inp)]))
        elif isinstance(inp, list):
            cls._parse_items(req, inp)
        elif inp is not None:
            raise BadRequest("'input' must be a string or an array of items", "input")
        if not req.messages:
            raise BadRequest("'input' is required", "input")
        req.stream = bool(_expect(body.get("stream"), bool, "stream", "a boolean"))
        req.include_usage = True
        _read_settings(req, body, "max_tokens=max_output_tokens temperature top_p")
        req.user = body.get("safety_identifier") or body.get("user")
        req.metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else None
        req.parallel_tool_calls = _expect(body.get("parallel_tool_calls"), bool, "parallel_tool_calls", "a boolean")
        r = body.get("reasoning")
        if isinstance(r, dict) and (r.get("effort") or r.get("summary")):
            req.thinking = ThinkingConfig(effort=r.get("effort"), summary=r.get("summary"),
                                          include_thoughts=True if r.get("summary") else None)
        text = body.get("text")
        if isinstance(text, dict) and isinstance(text.get("format"), dict):
            f = text["format"]
            if f.get("type") == "json_schema":
                req.response_format = {"type": "json_schema", "name": f.get("name") or "response",
                                       "schema": f.get("schema") or {}, "strict": f.get("strict"),
                                       "description": f.get("description")}
            elif f.get("type") == "json_object":
                req.response_format = {"type": "json_object"}
        for i, t in enumerate(body.get("tools") or []):
            if not isinstance(t, dict):
                raise BadRequest("'tools[%d]' must be an object" % i, "tools")
            tt = t.get("type")
            if tt == "function":
                if not t.get("name"):
                    raise BadRequest("'tools[%d].name' is required" % i, "tools")
                req.tools.append(Tool(t["name"], t.get("description"), t.get("parameters"), "function",
                                      t.get("strict")))
            elif tt == "custom":
                req.tools.append(Tool(t.get("name") or "custom", t.get("description"), None, "custom",
                                      format=t.get("format")))
            else:
                req.native_tools.append(t)  # hosted tools (web_search, file_search, ...): Responses upstreams only
        tc = body.get("tool_choice")
        if isinstance(tc, str):
            req.tool_choice = tc if tc in ("auto", "none", "required") else None
        elif isinstance(tc, dict):
            if tc.get("type") in ("function", "custom") and tc.get("name"):
                req.tool_choice = {"name": tc["name"]}
            elif tc.get("type") == "allowed_tools":
                req.tool_choice = "required" if tc.get("mode") == "required" else "auto"
        for key in ("include", "store", "prompt_cache_key", "service_tier", "truncation", "text"):
            if key in body:
                req.passthrough[key] = body[key]
        req.cache_key = body.get("prompt_cache_key") if isinstance(body.get("prompt_cache_key"), str) else None
        return req

    @classmethod
    def _parts(cls, content, where):
        if isinstance(content, str):
            return [Text(content)] if content else []
        if not isinstance(content, list):
            raise BadRequest("'%s.content' must be a string or an array" % where, "input")
        parts = []
        for p in content:
            if not isinstance(p, dict):
                continue
            t = p.get("type")
            if t in ("input_text", "output_text", "text"):
                parts.append(Text(p.get("text") or ""))
            elif t == "refusal":
                parts.append(Text(p.get("refusal") or ""))
            elif t == "input_image":
                url = p.get("image_url")
                if isinstance(url, str):
                    split = data_url_split(url)
                    parts.append(Image(split[0], split[1], detail=p.get("detail")) if split
                                 else Image(url=url, detail=p.get("detail")))
            elif t == "input_file":
                fd = p.get("file_data")
                split = data_url_split(fd) if isinstance(fd, str) else None
                if split:
                    parts.append(File(split[0], split[1], filename=p.get("filename")))
                elif isinstance(fd, str):
                    parts.append(File("application/pdf", fd, filename=p.get("filename")))
                elif p.get("file_url"):
                    parts.append(File(url=p["file_url"], filename=p.get("filename")))
                elif isinstance(p.get("file_id"), str):
                    parts.append(File("application/pdf", file_id=p["file_id"], store="openai",
                                      filename=p.get("filename")))
        return parts

    @classmethod
    def _parse_items(cls, req, items):
        names = {}

        for i, it in enumerate(items):
            where = "input[%d]" % i
            if isinstance(it, str):
                req.messages.append(Message("user", [Text(it)]))
                continue
            if not isinstance(it, dict):
                raise BadRequest("'%s' must be an object" % where, "input")
            t = it.get("type") or ("message" if "role" in it else None)
            if t == "message":
                role = it.get("role")
                parts = cls._parts(it.get("content"), where)
                if role in ("system", "developer"):
                    if req.messages:
                        req.messages.append(Message("system", parts))
                    else:
                        req.system.extend(parts)
                elif role == "assistant":
                    req.turn("assistant").parts.extend(parts)
                elif role == "user":
                    req.messages.append(Message("user", parts))
                else:
                    raise BadRequest("'%s.role' must be user, assistant, system or developer" % where, "input")
            elif t == "function_call":
                call = ToolCall(it.get("call_id") or it.get("id") or new_id("call_"), it.get("name") or "",
                                it.get("arguments") or "{}")
                names[call.id] = call.name
                req.turn("assistant").parts.append(call)
            elif t == "custom_tool_call":
                call = ToolCall(it.get("call_id") or new_id("call_"), it.get("name") or "",
                                json_dumps({"input": it.get("input") or ""}), "custom")
                names[call.id] = call.name
                req.turn("assistant").parts.append(call)
            elif t in ("function_call_output", "custom_tool_call_output"):
                out = it.get("output")
                parts = [Text(out)] if isinstance(out, str) else cls._parts(out or [], where)
                cid = it.get("call_id") or ""
                req.turn("tool").parts.append(ToolResult(cid, names.get(cid), parts))
            elif t == "reasoning":
                summary = "".join(s.get("text") or "" for s in it.get("summary") or [] if isinstance(s, dict))
                enc = it.get("encrypted_content")
                th = Thinking(summary, source="responses", item_id=it.get("id"), encrypted=enc)
                fields = unpack_reasoning(enc)
                if fields is not None:
                    th = Thinking(summary, **fields)
                req.turn("assistant").parts.append(th)
            elif t == "item_reference":
                raise BadRequest("item_reference needs server-side state, which this gateway does not keep",
                                 "input")
            # hosted-tool items (web_search_call, ...) are results the upstream produced itself: skipped

    # -- request: IR -> wire (Codex / Responses upstream) ---------------------------------------------------------
    @classmethod
    def _wire_content(cls, parts, role):
        out = []
        kind = "output_text" if role == "assistant" else "input_text"
        for p in parts:
            if p.kind == "text":
                if p.text:
                    out.append({"type": kind, "text": p.text})
            elif p.kind == "image":
                url = p.url or "data:%s;base64,%s" % (p.mime or "image/png", p.data)
                item = {"type": "input_image", "image_url": url}
                if p.detail:
                    item["detail"] = p.detail
                out.append(item)
            elif p.kind == "file":
                if p.file_id:
                    out.append({"type": "input_file", "file_id": cls.file_ref(p)})
                elif p.data:
                    out.append({"type": "input_file", "filename": p.filename or "file",
                                "file_data": "data:%s;base64,%s" % (p.mime or "application/pdf", p.data)})
                elif p.url:
                    out.append({"type": "input_file", "file_url": p.url})
        return out

    @classmethod
    def build_request(cls, req, model):
        body = {"model": model, "instructions": req.system_text(), "input": cls._wire_items(req), "stream": True,
                "store": False}
        cls._wire_tools(req, body)
        effort = thinking_effort(req.thinking)
        if effort and effort != "auto":
            body["reasoning"] = {"effort": effort, "summary": (req.thinking.summary or "auto")}
            body["include"] = ["reasoning.encrypted_content"]
        if req.max_tokens is not None:
            body["max_output_tokens"] = max(16, req.max_tokens)
        if req.temperature is not None and not effort:
            body["temperature"] = req.temperature
        if req.top_p is not None and not effort:
            body["top_p"] = req.top_p
        rf = req.response_format
        if rf:
            if rf["type"] == "json_schema":
                fmt = {"type": "json_schema", "name": rf.get("name") or "response", "schema": rf.get("schema") or {}}
                if rf.get("strict") is not None:
                    fmt["strict"] = rf["strict"]
            else:
                fmt = {"type": "json_object"}
            body["text"] = {"format": fmt}
        if req.client_format == cls.name:
            for k, v in req.passthrough.items():
                body.setdefault(k, v)
        return body

    @classmethod
    def _wire_items(cls, req):
        """The conversation as input items: messages, calls and their outputs, our own reasoning items."""
        items = []
        custom = {t.name for t in req.tools if t.tool_kind == "custom"}
        for m in req.messages:
            if m.role == "tool":
                for r in m.parts:
                    text = r.text()
                    if r.name in custom:
                        items.append({"type": "custom_tool_call_output", "call_id": r.id, "output": text})
                    else:
                        items.append({"type": "function_call_output", "call_id": r.id, "output": text})
                continue
            if m.role == "assistant":
                texts = []
                for p in m.parts:
                    if p.kind == "text":
                        texts.append(p)
                        continue
                    if texts:
                        items.append({"type": "message", "role": "assistant",
                                      "content": cls._wire_content(texts, "assistant")})
                        texts = []
                    if p.kind == "tool_call":
                        if p.tool_kind == "custom" or p.name in custom:
                            items.append({"type": "custom_tool_call", "call_id": p.id, "name": p.name,
                                          "input": p.args_object().get("input", "")})
                        else:
                            items.append({"type": "function_call", "call_id": p.id, "name": p.name,
                                          "arguments": p.arguments or "{}"})
                    elif p.kind == "thinking" and p.source == "responses" and p.encrypted:
                        item = {"type": "reasoning", "summary": [{"type": "summary_text", "text": p.text}]
                                if p.text else [], "encrypted_content": p.encrypted}
                        if p.item_id:
                            item["id"] = p.item_id
                        items.append(item)
                if texts:
                    items.append({"type": "message", "role": "assistant",
                                  "content": cls._wire_content(texts, "assistant")})
                continue
            role = "developer" if m.role == "system" else "user"
            content = cls._wire_content(m.parts, role)
            if content:
                items.append({"type": "message", "role": role, "content": content})
        return items

    @classmethod
    def _wire_tools(cls, req, body):
        tools = []
        for t in req.tools:
            if t.tool_kind == "custom":
                tool = {"type": "custom", "name": t.name}
                if t.description:
                    tool["description"] = t.description
                if t.format:
                    tool["format"] = t.format
            else:
                tool = {"type": "function", "name": t.name,
                        "parameters": t.parameters or {"type": "object", "properties": {}}}
                if t.description:
                    tool["description"] = t.description
                if t.strict is not None:
                    tool["strict"] = t.strict
            tools.append(tool)
        if req.client_format == cls.name:
            tools.extend(req.native_tools)
        if tools:
            body["tools"] = tools
            tc = req.tool_choice
            body["tool_choice"] = {"type": "function", "name": tc["name"]} if isinstance(tc, dict) else (tc or "auto")
            body["parallel_tool_calls"] = req.parallel_tool_calls if req.parallel_tool_calls is not None else True

    # -- response: IR <-> wire ------------------------------------------------------------------------------------
    @staticmethod
    def parse_usage(u):
        return openai_family_usage(u, "input", "output")

    @staticmethod
    def wire_usage(u):
        u = u or Usage()
        return {"input_tokens": u.input_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.output_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                "total_tokens": u.input_tokens + u.output_tokens}

    @classmethod
    def parse_response(cls, data):
        if isinstance(data, dict) and isinstance(data.get("response"), dict):
            data = data["response"]
        if not isinstance(data, dict) or not isinstance(data.get("output"), list):
            raise UpstreamError("protocol", "upstream answer has no output")
        resp = ChatResponse(data.get("id"), data.get("model"), data.get("created_at"))
        for item in data["output"]:
            resp.parts.extend(cls.item_parts(item))
        status = data.get("status")
        reason = (data.get("incomplete_details") or {}).get("reason")
        resp.finish = "length" if reason == "max_output_tokens" else (
            "content_filter" if reason == "content_filter" else "stop")
        if status == "completed" and any(p.kind == "tool_call" for p in resp.parts):
            resp.finish = "tool_calls"
        resp.usage = cls.parse_usage(data.get("usage"))
        return resp

    @staticmethod
    def item_parts(item):
        t = item.get("type")
        if t == "message":
            return [Text(c.get("text") or c.get("refusal") or "") for c in item.get("content") or []
                    if c.get("type") in ("output_text", "refusal")]
        if t == "function_call":
            return [ToolCall(item.get("call_id") or item.get("id") or new_id("call_"), item.get("name") or "",
                             item.get("arguments") or "{}")]
        if t == "custom_tool_call":
            return [ToolCall(item.get("call_id") or new_id("call_"), item.get("name") or "",
                             json_dumps({"input": item.get("input") or ""}), "custom")]
        if t == "reasoning":
            summary = "".join(s.get("text") or "" for s in item.get("summary") or [])
            if not summary:
                summary = "".join(c.get("text") or "" for c in item.get("content") or [])
            return [Thinking(summary, source="responses", item_id=item.get("id"),
                             encrypted=item.get("encrypted_content"))]
        return []

    @classmethod
    def build_response(cls, resp, req, status=None):
        enc = cls.StreamEncoder(req)
        for p in resp.parts:
            for ev in cls._part_events(p):
                enc.encode(ev)
        enc.close_item()
        return enc.response_object(status or cls.status_for(resp.finish, enc.output), resp.usage, resp.finish)

    @staticmethod
    def _part_events(p):
        if p.kind == "text":
            return [TextDelta(p.text)]
        if p.kind == "thinking":
            return [ThinkingDelta(p.text, p.signature, p.redacted, p.encrypted, p.source, p.item_id)]
        if p.kind == "tool_call":
            return [ToolCallStart(0, p.id, p.name, p.tool_kind, p.signature, p.source),
                    ToolCallDelta(0, p.arguments or "{}"), ToolCallEnd(0)]
        return []

    @staticmethod
    def status_for(finish, output=()):
        return "incomplete" if finish in ("length", "content_filter") else "completed"

    # -- streams --------------------------------------------------------------------------------------------------
    RELAY_MARKS = (b"response.completed", b"response.incomplete", b"response.failed", b'"error"')

    class StreamDecoder(EventDecoder):
        """Responses SSE (type inside each data object) -> IR events."""

        def __init__(self, req=None):
            EventDecoder.__init__(self, req)
            self.items = {}  # output_index -> [kind, ir index, saw deltas]
            self.tools = 0

        def on_object(self, obj, t):
            oi = obj.get("output_index")
            if t == "response.output_text.delta":
                return [TextDelta(obj.get("delta") or "")] if obj.get("delta") else []
            if t in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
                slot = self.items.get(oi)
                if slot is not None:
                    slot[2] = True
                return [ThinkingDelta(obj.get("delta") or "", source="responses")] if obj.get("delta") else []
            if t == "response.function_call_arguments.delta":
                slot = self.items.get(oi)
                if slot is None or not obj.get("delta"):
                    return []
                slot[2] = True
                return [ToolCallDelta(slot[1], obj["delta"])]
            if t == "response.output_item.added":
                item = obj.get("item") or {}
                it = item.get("type")
                if it in ("function_call", "custom_tool_call"):
                    n = self.tools
                    self.tools += 1
                    self.items[oi] = [it, n, False]
                    return [ToolCallStart(n, item.get("call_id") or item.get("id") or new_id("call_"),
                                          item.get("name") or "", "custom" if it == "custom_tool_call"
                                          else "function")]
                self.items[oi] = [it, None, False]
                if it == "reasoning":
                    # announce the item id first, so a client stream keeps one identity for the item
                    return [ThinkingDelta("", source="responses", item_id=item.get("id"))]
                return []
            if t == "response.output_item.done":
                return self._item_done(obj.get("item") or {}, oi)
            if t in ("response.created", "response.in_progress"):
                if self.started:
                    return []
                self.started = True
                r = obj.get("response") or {}
                return [Start(r.get("id"), r.get("model"), r.get("created_at"))]
            if t in ("response.completed", "response.incomplete"):
                self.done = True
                r = obj.get("response") or {}
                out = []
                usage = Responses.parse_usage(r.get("usage"))
                if usage:
                    out.append(UsageEvent(usage))
                reason = (r.get("incomplete_details") or {}).get("reason")
                finish = "length" if reason == "max_output_tokens" else (
                    "content_filter" if reason == "content_filter" else "stop")
                if self.tools and finish == "stop":
                    finish = "tool_calls"
                return out + [Finish(finish)]
            if t in ("response.failed", "error"):
                self.done = True
                r = obj.get("response") or {}
                err = r.get("error") or obj.get("error") or obj
                code = err.get("code") or err.get("type") or ""
                status = {"rate_limit_exceeded": 429, "insufficient_quota": 429, "usage_limit_reached": 429,
                          "context_length_exceeded": 400, "invalid_prompt": 400, "server_error": 502}.get(code, 502)
                return [ErrorEvent(status, err.get("message") or "upstream response failed",
                                   error_type_for_status(status), code)]
            return []

        def _item_done(self, item, oi):
            """The end of an output item: a call's start (when its `added` was missed), arguments and end; a
            reasoning item's summary (unless it was streamed) and its state."""
            it = item.get("type")
            slot = self.items.get(oi) or [it, None, False]
            if it == "reasoning":
                text = "" if slot[2] else "".join(s.get("text") or "" for s in item.get("summary") or [])
                return [ThinkingDelta(text, encrypted=item.get("encrypted_content") or None, source="responses",
                                      item_id=item.get("id"))]
            if it not in ("function_call", "custom_tool_call"):
                return []
            out = []
            if slot[1] is None:
                slot[1] = self.tools
                self.tools += 1
                out.append(ToolCallStart(slot[1], item.get("call_id") or new_id("call_"), item.get("name") or "",
                                         "custom" if it == "custom_tool_call" else "function"))
            if it == "custom_tool_call":
                out.append(ToolCallDelta(slot[1], json_dumps({"input": item.get("input") or ""})))
            elif not slot[2] and item.get("arguments"):
                out.append(ToolCallDelta(slot[1], item["arguments"]))
            return out + [ToolCallEnd(slot[1])]

        def close(self):
            if self.done:
                return []
            self.done = True
            return [ErrorEvent(502, "stream closed before response.completed", "upstream")]

    class StreamEncoder(EventEncoder):
        """IR events -> the full Responses event sequence: created, in_progress, per item added/deltas/done with
        unique increasing output_index, then completed (or incomplete/failed) carrying every item and usage."""

        def __init__(self, req):
            EventEncoder.__init__(self, req)
            self.id = new_id("resp_")
            self.created = now_s()
            self.seq = 0
            self.output = []
            self.cur = None  # dict describing the open item
            self.started = False
            self.custom = {t.name for t in req.tools if t.tool_kind == "custom"}
            self.tool_items = {}

        def _ev(self, obj):
            obj["sequence_number"] = self.seq
            self.seq += 1
            return ("event: %s\ndata: %s\n\n" % (obj["type"], json_dumps(obj))).encode()

        def response_object(self, status, usage=None, finish=None):
            req = self.req
            obj = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                   "error": None, "incomplete_details": None,
                   "instructions": req.system_text() or None, "max_output_tokens": req.max_tokens,
                   "model": req.model, "output": list(self.output), "parallel_tool_calls":
                   req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
                   "previous_response_id": None,
                   "reasoning": {"effort": thinking_effort(req.thinking),
                                 "summary": req.thinking.summary if req.thinking else None},
                   "store": False, "temperature": req.temperature if req.temperature is not None else 1.0,
                   "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
                   "top_p": req.top_p if req.top_p is not None else 1.0, "truncation": "disabled",
                   "usage": Responses.wire_usage(usage) if usage is not None or status != "in_progress" else None,
                   "user": None, "metadata": req.metadata or {}}
            if status == "in_progress":
                obj["usage"] = None
            if status == "incomplete":
                obj["incomplete_details"] = {"reason": "content_filter" if finish == "content_filter"
                                             else "max_output_tokens"}
            if status == "completed":
                obj["completed_at"] = now_s()
            return obj

        def _start(self):
            if self.started:
                return b""
            self.started = True
            resp = self.response_object("in_progress")
            return self._ev({"type": "response.created", "response": resp}) + \
                self._ev({"type": "response.in_progress", "response": resp})

        def close_item(self):
            cur = self.cur
            if cur is None:
                return b""
            self.cur = None
            idx = cur["index"]
            out = b""
            kind = cur["kind"]
            if kind == "message":
                part = {"type": "output_text", "text": cur["text"], "annotations": [], "logprobs": []}
                out += self._ev({"type": "response.output_text.done", "item_id": cur["id"], "output_index": idx,
                                 "content_index": 0, "text": cur["text"], "logprobs": []})
                out += self._ev({"type": "response.content_part.done", "item_id": cur["id"], "output_index": idx,
                                 "content_index": 0, "part": part})
                item = {"id": cur["id"], "type": "message", "status": "completed", "role": "assistant",
                        "content": [part]}
            elif kind == "reasoning":
                summary = []
                if cur["text"]:
                    summary = [{"type": "summary_text", "text": cur["text"]}]
                    out += self._ev({"type": "response.reasoning_summary_text.done", "item_id": cur["id"],
                                     "output_index": idx, "summary_index": 0, "text": cur["text"]})
                    out += self._ev({"type": "response.reasoning_summary_part.done", "item_id": cur["id"],
                                     "output_index": idx, "summary_index": 0, "part": summary[0]})
                item = {"id": cur["id"], "type": "reasoning", "summary": summary}
                if cur.get("encrypted"):
                    item["encrypted_content"] = cur["encrypted"]
                elif cur.get("source") not in (None, "responses"):  # another family's reasoning without state
                    item["encrypted_content"] = pack_reasoning(ThinkingDelta("", source=cur["source"]))
            elif kind == "custom_tool_call":
                inp = ToolCall("", "", cur["args"]).args_object().get("input", cur["args"])
                if not isinstance(inp, str):
                    inp = json_dumps(inp)
                out += self._ev({"type": "response.custom_tool_call_input.done", "item_id": cur["id"],
                                 "output_index": idx, "input": inp})
                item = {"id": cur["id"], "type": "custom_tool_call", "status": "completed",
                        "call_id": cur["call_id"], "name": cur["name"], "input": inp}
            else:
                args = cur["args"] or "{}"
                out += self._ev({"type": "response.function_call_arguments.done", "item_id": cur["id"],
                                 "output_index": idx, "name": cur["name"], "arguments": args})
                item = {"id": cur["id"], "type": "function_call", "status": "completed", "call_id": cur["call_id"],
                        "name": cur["name"], "arguments": args}
            self.output.append(item)
            return out + self._ev({"type": "response.output_item.done", "output_index": idx, "item": item})

        def _open(self, kind, item, **state):
            out = self.close_item()
            idx = len(self.output)
            self.cur = dict(state, kind=kind, index=idx, id=item["id"])
            return out + self._ev({"type": "response.output_item.added", "output_index": idx, "item": item})

        def on_start(self, ev):
            return self._start()

        def on_text(self, ev):
            out = self._start()
            cur = self.cur
            if cur is None or cur["kind"] != "message":
                mid = new_id("msg_")
                out += self._open("message", {"id": mid, "type": "message", "status": "in_progress",
                                              "role": "assistant", "content": []}, text="")
                out += self._ev({"type": "response.content_part.added", "item_id": mid,
                                 "output_index": self.cur["index"], "content_index": 0,
                                 "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
            self.cur["text"] += ev.text
            return out + self._ev({"type": "response.output_text.delta", "item_id": self.cur["id"],
                                   "output_index": self.cur["index"], "content_index": 0, "delta": ev.text,
                                   "logprobs": []})

        def on_thinking(self, ev):
            out = self._start()
            cur = self.cur
            marker = not ev.text and ev.signature and ev.source == "gemini"
            if cur is None or cur["kind"] != "reasoning" or (cur.get("sealed") and ev.text) or \
                    (marker and (cur["text"] or cur.get("sealed"))):
                rid = ev.item_id if ev.source == "responses" and ev.item_id else new_id("rs_")
                out += self._open("reasoning", {"id": rid, "type": "reasoning", "summary": []}, text="",
                                  encrypted=None, sealed=False, source=ev.source)
            cur = self.cur
            if ev.text:
                if not cur["text"]:
                    out += self._ev({"type": "response.reasoning_summary_part.added", "item_id": cur["id"],
                                     "output_index": cur["index"], "summary_index": 0,
                                     "part": {"type": "summary_text", "text": ""}})
                cur["text"] += ev.text
                out += self._ev({"type": "response.reasoning_summary_text.delta", "item_id": cur["id"],
                                 "output_index": cur["index"], "summary_index": 0, "delta": ev.text})
            if ev.source == "responses" and ev.encrypted:
                cur["encrypted"] = ev.encrypted
                cur["sealed"] = True
            elif ev.redacted or ev.signature:
                cur["encrypted"] = pack_reasoning(ev)
                cur["sealed"] = True
            return out

        def on_tool_start(self, ev):
            out = self._start()
            if ev.signature and ev.source:
                # carry a per-call signature (Gemini) in a reasoning item just before the call
                out += self._open("reasoning", {"id": new_id("rs_"), "type": "reasoning", "summary": []},
                                  text="", encrypted=pack_reasoning(ev), sealed=True)
            fid = new_id("fc_")
            if ev.tool_kind == "custom" or ev.name in self.custom:
                out += self._open("custom_tool_call", {"id": fid, "type": "custom_tool_call",
                                                       "status": "in_progress", "call_id": ev.id,
                                                       "name": ev.name, "input": ""},
                                  call_id=ev.id, name=ev.name, args="", tool=ev.index)
            else:
                out += self._open("function_call", {"id": fid, "type": "function_call", "status": "in_progress",
                                                    "call_id": ev.id, "name": ev.name, "arguments": ""},
                                  call_id=ev.id, name=ev.name, args="", tool=ev.index)
            return out

        def on_tool_delta(self, ev):
            out = self._start()
            cur = self.cur
            if cur is not None and cur.get("tool") == ev.index:
                cur["args"] += ev.arguments
                if cur["kind"] == "function_call":
                    out += self._ev({"type": "response.function_call_arguments.delta", "item_id": cur["id"],
                                     "output_index": cur["index"], "delta": ev.arguments})
            return out

        def on_tool_end(self, ev):
            out = self._start()
            cur = self.cur
            if cur is not None and cur.get("tool") == ev.index:
                out += self.close_item()
            return out

        def finish(self, ev):
            out = self._start()
            out += self.close_item()
            status = Responses.status_for(ev.reason)
            name = "response.incomplete" if status == "incomplete" else "response.completed"
            return out + self._ev({"type": name, "response": self.response_object(status, self.usage,
                                                                                    ev.reason)})

        def error_frame(self, err):
            out = self._start()
            resp = self.response_object("failed")
            codes = {429: "rate_limit_exceeded", 400: "invalid_prompt"}
            resp["error"] = {"code": err.code or codes.get(err.status, "server_error"), "message": err.message}
            resp["usage"] = None
            return out + self._ev({"type": "response.failed", "response": resp})


OLLAMA_VERSION = "0.12.10"


class Ollama(Codec):
    """Ollama `/api/chat` and `/api/generate` (formats.md §5): NDJSON streams, streaming unless `stream: false`,
    tool-call arguments as objects, model names with or without `:latest`."""
    name = "ollama"
    stream_content_type = "application/x-ndjson"
    CLIENT_PARSERS = Codec.CLIENT_PARSERS + ("parse_generate",)
    OPTIONS_SHAPE = {"temperature": "num", "top_p": "num", "top_k": "num", "num_predict": "int", "seed": "int",
                     "presence_penalty": "num", "frequency_penalty": "num", "stop": ("str", ["str"])}
    COMMON_SHAPE = {"model": "str", "options": OPTIONS_SHAPE, "format": ("str", "object"), "think": ("bool", "str"),
                    "stream": "bool", "images": ["str"]}
    REQUEST_SHAPES = {
        "parse_request": dict(COMMON_SHAPE, tools=[OpenAIChat.TOOL_SHAPE], messages=[{
            "role": "str", "content": "str", "images": ["str"], "thinking": "str", "tool_name": "str", "name": "str",
            "tool_call_id": "str", "tool_calls": [{"id": "str", "function": {"name": "str",
                                                                            "arguments": ("str", "object")}}]}]),
        "parse_generate": dict(COMMON_SHAPE, prompt="str", system="str", suffix="str"),
        "parse_embeddings": {"model": "str", "input": ("str", ["str"]), "prompt": "str"}}

    @staticmethod
    def error_body(err):
        return {"error": err.message}

    @classmethod
    def parse_embeddings(cls, body, legacy):
        """`/api/embed` ({model, input: text or texts}) or the older `/api/embeddings` ({model, prompt})."""
        model = request_model(body, "model is required")
        texts = body.get("prompt") if legacy else body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("%s must be a string%s" % ("prompt" if legacy else "input",
                                                         "" if legacy else " or an array of strings"), "input")
        return EmbeddingRequest(model, texts, client_format=cls.name)

    @staticmethod
    def build_embeddings(emb, req, legacy):
        if legacy:
            return {"embedding": emb.vectors[0] if emb.vectors else []}
        return {"model": req.model, "embeddings": emb.vectors, "total_duration": 0, "load_duration": 0,
                "prompt_eval_count": emb.usage.input_tokens}

    @staticmethod
    def _options(req, body):
        opts = body.get("options")
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise BadRequest("options must be an object", "options")
        _read_settings(req, opts, "temperature top_p top_k max_tokens=num_predict seed presence_penalty "
                       "frequency_penalty", "options.")
        if req.max_tokens is not None and req.max_tokens < 0:
            req.max_tokens = None
        req.stop = _stop_list(opts.get("stop"), "options.stop")
        fmt = body.get("format")
        if fmt == "json":
            req.response_format = {"type": "json_object"}
        elif isinstance(fmt, dict):
            req.response_format = {"type": "json_schema", "name": "response", "schema": fmt}
        think = body.get("think")
        if think is True:
            req.thinking = ThinkingConfig(effort="medium", include_thoughts=True)
        elif think is False:
            req.thinking = ThinkingConfig(effort="none")
        elif isinstance(think, str):
            req.thinking = ThinkingConfig(effort=think.lower(), include_thoughts=True)
        stream = body.get("stream")
        req.stream = True if stream is None else bool(_expect(stream, bool, "stream", "a boolean"))
        req.include_usage = True

    @staticmethod
    def _images(imgs, where):
        if imgs is None:
            return []
        if not isinstance(imgs, list):
            raise BadRequest("%s.images must be an array of base64 strings" % where, "images")
        out = []
        for b64 in imgs:
            if not isinstance(b64, str):
                raise BadRequest("%s.images must be an array of base64 strings" % where, "images")
            if b64:
                split = data_url_split(b64)
                out.append(Image(split[0], split[1]) if split else Image(sniff_image_mime(b64), b64))
        return out

    @classmethod
    def parse_request(cls, body):
        model = request_model(body, "model is required")
        msgs = _array(body, "messages")
        req = ChatRequest(model, client_format=cls.name)
        names = {}
        seen_turn = False
        for i, where, m in _objects(msgs, "messages"):
            role = (m.get("role") or "").lower()
            content = m.get("content") or ""
            if not isinstance(content, str):
                raise BadRequest("%s.content must be a string" % where, "messages")
            if role == "system":
                if seen_turn:
                    req.messages.append(Message("system", [Text(content)]))
                else:
                    req.system.append(Text(content))
                continue
            seen_turn = True
            if role == "user":
                req.messages.append(Message("user", ([Text(content)] if content else []) +
                                            cls._images(m.get("images"), where)))
            elif role == "assistant":
                parts = []
                if m.get("thinking"):
                    parts.append(Thinking(m["thinking"], source="ollama"))
                if content:
                    parts.append(Text(content))
                for tc in m.get("tool_calls") or []:
                    f = (tc or {}).get("function") or {}
                    args = f.get("arguments")
                    if isinstance(args, str):
                        try:
                            args = json.loads(args)
                        except ValueError:
                            args = {}
                    call = ToolCall(tc.get("id") or new_id("call_", 4), f.get("name") or "",
                                    json_dumps(args if isinstance(args, dict) else {}))
                    names.setdefault(call.name, []).append(call.id)
                    parts.append(call)
                req.messages.append(Message("assistant", parts))
            elif role == "tool":
                name = m.get("tool_name") or m.get("name") or ""
                tid = m.get("tool_call_id")
                queue = names.get(name) or []
                if tid and tid in queue:
                    queue.remove(tid)
                elif not tid and queue:
                    tid = queue.pop(0)
                result = ToolResult(tid or new_id("call_", 4), name, [Text(content)])
                req.turn("tool").parts.append(result)
            else:
                raise BadRequest("%s.role must be system, user, assistant or tool" % where, "messages")
        for i, t in enumerate(body.get("tools") or []):
            req.tools.append(OpenAIChat._parse_tool(t, i))
        cls._options(req, body)
        return req

    @classmethod
    def parse_generate(cls, body):
        model = request_model(body, "model is required")
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string", "prompt")
        req = ChatRequest(model)
        req.client_format = "ollama-generate"
        if isinstance(body.get("system"), str) and body["system"]:
            req.system.append(Text(body["system"]))
        parts = ([Text(prompt)] if prompt else []) + cls._images(body.get("images"), "request")
        if parts:
            req.messages.append(Message("user", parts))
        if isinstance(body.get("suffix"), str) and body["suffix"]:
            req.system.append(Text("Continue the text so that it ends right before: " + body["suffix"]))
        cls._options(req, body)
        return req

    # -- response: IR -> wire -------------------------------------------------------------------------------------
    @staticmethod
    def metrics(usage, started):
        total = int((time.monotonic() - started) * 1e9)
        u = usage or Usage()
        return {"total_duration": total, "load_duration": 0, "prompt_eval_count": u.input_tokens,
                "prompt_eval_duration": max(1, total // 10), "eval_count": u.output_tokens,
                "eval_duration": max(1, total - total // 10)}

    @staticmethod
    def done_reason(finish):
        return "length" if finish == "length" else "stop"

    @staticmethod
    def wire_calls(calls):
        return [{"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.args_object()}}
                for i, c in enumerate(calls)]

    @classmethod
    def build_response(cls, resp, req, generate=False, started=None):
        text = "".join(p.text for p in resp.parts if p.kind == "text")
        thinking = "".join(p.text or "" for p in resp.parts if p.kind == "thinking")
        calls = [p for p in resp.parts if p.kind == "tool_call"]
        out = {"model": req.model, "created_at": rfc3339_now()}
        if generate:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        else:
            msg = {"role": "assistant", "content": text}
            if thinking:
                msg["thinking"] = thinking
            if calls:
                msg["tool_calls"] = cls.wire_calls(calls)
            out["message"] = msg
        out["done"] = True
        out["done_reason"] = cls.done_reason(resp.finish)
        out.update(cls.metrics(resp.usage, started or time.monotonic()))
        return out

    class StreamEncoder(EventEncoder):
        """IR events -> NDJSON lines; tool calls are sent whole (arguments as objects) in a done:false line."""

        def __init__(self, req, generate=False):
            EventEncoder.__init__(self, req)
            self.generate = generate
            self.started = time.monotonic()
            self.calls = {}
            self.prefix = '{"model":%s,"created_at":"' % json_dumps(req.model)

        def _line(self, payload_json, done=False):
            return (self.prefix + rfc3339_now() + '",' + payload_json + ',"done":false}\n').encode()

        def on_text(self, ev):
            if self.generate:
                return self._line('"response":' + json_dumps(ev.text))
            return self._line('"message":{"role":"assistant","content":' + json_dumps(ev.text) + "}")

        def on_thinking(self, ev):
            if not ev.text:
                return b""
            if self.generate:
                return self._line('"response":"","thinking":' + json_dumps(ev.text))
            return self._line('"message":{"role":"assistant","content":"","thinking":' + json_dumps(ev.text) + "}")

        def on_tool_start(self, ev):
            self.calls[ev.index] = ToolCall(ev.id, ev.name, "")
            return b""

        def on_tool_delta(self, ev):
            call = self.calls.get(ev.index)
            if call is not None:
                call.arguments += ev.arguments
            return b""

        def on_tool_end(self, ev):
            call = self.calls.pop(ev.index, None)
            if call is None or self.generate:
                return b""
            wire = Ollama.wire_calls([call])
            wire[0]["function"]["index"] = ev.index
            return self._line('"message":{"role":"assistant","content":"","tool_calls":' + json_dumps(wire) + "}")

        def finish(self, ev):
            out = b""
            for index in sorted(self.calls):
                out += self.encode(ToolCallEnd(index))
            final = {"model": self.req.model, "created_at": rfc3339_now()}
            if self.generate:
                final["response"] = ""
            else:
                final["message"] = {"role": "assistant", "content": ""}
            final["done"] = True
            final["done_reason"] = Ollama.done_reason(ev.reason)
            final.update(Ollama.metrics(self.usage, self.started))
            return out + json_bytes(final) + b"\n"

        def error_frame(self, err):
            return json_bytes({"error": err.message}) + b"\n"


class Completions(Codec):
    """OpenAI legacy Completions (`/v1/completions`): a prompt in, text out, served through the chat IR."""
    name = "completions"
    REQUEST_SHAPES = {"parse_request": {"model": "str", "prompt": ("str", ["str"]), "stream": "bool", "max_tokens": "int",
                                        "temperature": "num", "top_p": "num", "n": "int", "stop": ("str", ["str"]),
                                        "user": "str", "suffix": "str"}}


    @classmethod
    def parse_request(cls, body):
        model = request_model(body)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            if all(isinstance(p, str) for p in prompt):
                prompt = "\n".join(prompt)
            else:
                raise BadRequest("token-id prompts are not supported; send text", "prompt")
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string or an array of strings", "prompt")
        req = ChatRequest(model, [Message("user", [Text(prompt)])])
        req.client_format = cls.name
        req.stream = bool(_expect(body.get("stream"), bool, "stream", "a boolean"))
        so = body.get("stream_options")
        req.include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
        _read_settings(req, body, "max_tokens temperature top_p n presence_penalty frequency_penalty seed")
        if req.max_tokens is None:
            req.max_tokens = 16
        req.stop = _stop_list(body.get("stop"))
        req.user = body.get("user")
        if isinstance(body.get("suffix"), str) and body["suffix"]:
            req.system.append(Text("Continue the text so that it ends right before: " + body["suffix"]))
        return req

    @classmethod
    def build_response(cls, resp, req):
        text = "".join(p.text for p in resp.parts if p.kind == "text")
        out = {"id": new_id("cmpl-"), "object": "text_completion", "created": resp.created or now_s(),
               "model": req.model, "choices": [{"text": text, "index": 0, "logprobs": None,
                                                "finish_reason": "length" if resp.finish == "length" else (
                                                    "content_filter" if resp.finish == "content_filter" else "stop")}]}
        usage = cls.wire_usage(resp.usage)
        if usage:
            out["usage"] = usage
        return out

    @staticmethod
    def wire_usage(u):
        """Legacy completions report only the three totals."""
        if u is None:
            return None
        return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                "total_tokens": u.input_tokens + u.output_tokens}

    class StreamEncoder(EventEncoder):
        def __init__(self, req):
            EventEncoder.__init__(self, req)
            self.id = new_id("cmpl-")
            self.created = now_s()

        def _chunk(self, text, finish=None):
            obj = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.req.model,
                   "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            return b"data: " + json_bytes(obj) + b"\n\n"

        def on_text(self, ev):
            return self._chunk(ev.text)

        def finish(self, ev):
            out = self._chunk("", "length" if ev.reason == "length" else "stop")
            if self.req.include_usage and self.usage is not None:
                obj = {"id": self.id, "object": "text_completion", "created": self.created,
                       "model": self.req.model, "choices": [], "usage": Completions.wire_usage(self.usage)}
                out += b"data: " + json_bytes(obj) + b"\n\n"
            return out + b"data: [DONE]\n\n"

        def error_frame(self, err):
            return b"data: " + json_bytes(OpenAIChat.error_body(err)) + b"\n\n"


CODECS = {c.name: c for c in (OpenAIChat, Anthropic, Gemini, Responses, Ollama, Completions)}

# === 9. Credentials ===
# Owns: what one account or API key is (Credential) and how `providers:` entries become credentials. It keeps
# each credential's live counters (in flight, uses, cooldowns); it does not pick among them (that is routing).

def apikey_credential_id(provider_id, key, base_url, proxy_url):
    """`<provider>:apikey:<12 hex>` — stable across restarts, so cooldowns and usage rows line up."""
    h = hashlib.sha256((provider_id + ":apikey").encode())
    for part in (key, base_url, proxy_url):
        h.update(b"\x00" + part.strip().encode())
    return "%s:apikey:%s" % (provider_id, h.hexdigest()[:12])


class ModelState:
    """A credential's health for one model: cooling until `until`; `level` counts hint-less 429s in a row."""

    __slots__ = ("until", "level", "last_error", "status")

    def __init__(self):
        self.until, self.level, self.last_error, self.status = 0.0, 0, None, "active"


class Credential:
    """One account or API key. State is live (never a stale copy): routing reads and writes it directly."""

    __slots__ = ("id", "provider_id", "label", "api_key", "base_url", "proxy_url", "headers", "in_flight", "uses",
                 "usage_score", "usage_at", "states", "until_all", "disabled", "last_error", "path", "meta",
                 "refresh_task", "refresh_after", "refresh_error", "stamp", "project", "quota", "last_refresh",
                 "transport")

    def __init__(self, id, provider_id, label, api_key="", base_url="", proxy_url="", headers=()):
        self.quota = {}  # window -> what the upstream last reported about it ({used_percent, resets_at, at})
        self.transport = None  # what carries its requests when not the HTTP client (a browser relay session)
        self.last_refresh = None  # epoch of this process's last successful token refresh
        self.path = None  # a credential file in auth-dir, for OAuth accounts
        self.meta = {}  # that file's JSON (tokens, expiry, email, ...)
        self.refresh_task = None  # the one refresh in flight for this credential (single flight)
        self.refresh_after = 0.0  # epoch seconds before which a failed refresh is not retried
        self.refresh_error = None
        self.stamp = None  # (mtime_ns, size) of the file as last read
        self.project = None  # the project of a virtual per-project credential (Gemini CLI)
        self.id, self.provider_id, self.label = id, provider_id, label
        self.api_key, self.base_url, self.proxy_url, self.headers = api_key, base_url, proxy_url, list(headers)
        self.in_flight = 0
        self.uses = 0
        self.usage_score = 0.0  # requests, decaying with a one-minute half-life: "recently used"
        self.usage_at = 0.0
        self.states = {}  # model -> ModelState
        self.until_all = 0.0  # credential-scoped cooldown (e.g. Claude's 5-hour window): every model waits
        self.disabled = None  # None, or the reason the credential was taken out (revoked token, ...)
        self.last_error = None

    def mask(self, text):
        """`text` with this credential's secrets (key, tokens) masked: upstream errors sometimes echo them."""
        secrets = [self.api_key] + [self.meta.get(k) for k in ("access_token", "refresh_token", "api_key")]
        for secret in secrets:
            if isinstance(secret, str) and len(secret) >= 8 and secret in text:
                text = text.replace(secret, mask_secret(secret))
        return text

    def cooling_until(self, model):
        st = self.states.get(model)
        return max(st.until if st is not None else 0.0, self.until_all)

    def recent_usage(self, now):
        return self.usage_score * 0.5 ** ((now - self.usage_at) / 60.0)

    def note_use(self, now):
        self.usage_score = self.recent_usage(now) + 1.0
        self.usage_at = now
        self.uses += 1


EXPIRY_FIELDS = ("expired", "expire", "expires_at", "expiresAt", "expiry", "expires")


def credential_expiry(meta):
    """Epoch seconds when the access token expires (gateway.md §2.10: several spellings, nested `token`)."""
    for holder in (meta, meta.get("token") if isinstance(meta.get("token"), dict) else None,
                   meta.get("Token") if isinstance(meta.get("Token"), dict) else None):
        if not holder:
            continue
        for key in EXPIRY_FIELDS:
            if holder.get(key) not in (None, ""):
                when = parse_instant(holder[key])
                if when is not None:
                    return when
    return None


def read_credential_file(path):
    """(meta, stamp) for a credential file, or raises ValueError with a clear reason."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except OSError as e:
        raise ValueError("cannot read: %s" % (e.strerror or e))
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError("not valid JSON: %s" % e)
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    if not isinstance(meta.get("type"), str) or not meta["type"].strip():
        raise ValueError("has no 'type'")
    return meta, (st.st_mtime_ns, st.st_size)


def scan_auth_dir(auth_dir):
    """{file name: (meta, stamp)} for every readable *.json credential; broken files are logged and skipped."""
    found = {}
    try:
        names = sorted(os.listdir(auth_dir))
    except OSError:
        return found
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(auth_dir, name)
        try:
            found[name] = read_credential_file(path)
        except ValueError as e:
            log.warning("credential file %s skipped: %s", name, e)
    return found


def load_credential_files(auth_dir):
    """{credential id: Credential} for every credential file in auth_dir."""
    return {c.id: c for name, (meta, stamp) in scan_auth_dir(auth_dir).items()
            for c in credentials_from_file(name, meta, stamp, auth_dir)}


def recover_auth_dir(auth_dir):
    """At start: tighten a readable-by-others auth dir to 0700, and settle the temp files a process killed in the
    middle of writing a credential left behind (`<name>.json.tmp-<pid>-<hex>`). A complete one (a JSON credential)
    newer than the file it was meant to replace holds the latest tokens — a refresh that rotated them — and is put in
    place; anything else is deleted. Each is logged."""
    try:
        st = os.stat(auth_dir)
    except OSError:
        return
    if st.st_mode & 0o077:
        try:
            os.chmod(auth_dir, 0o700)
            log.warning("auth dir %s was readable by others (mode %o): tightened to 0700", auth_dir,
                        st.st_mode & 0o777)
        except OSError as e:
            log.warning("auth dir %s is readable by others (mode %o) and cannot be tightened: %s", auth_dir,
                        st.st_mode & 0o777, e.strerror or e)
    for name in sorted(os.listdir(auth_dir)):
        m = re.match(r"(.+\.json)\.tmp-\d+-[0-9a-f]+\Z", name)
        if m is None:
            continue
        tmp, target = os.path.join(auth_dir, name), os.path.join(auth_dir, m.group(1))
        try:
            meta, _ = read_credential_file(tmp)
            newer = not os.path.exists(target) or os.stat(tmp).st_mtime_ns >= os.stat(target).st_mtime_ns
        except (ValueError, OSError):
            meta, newer = None, False
        try:
            if meta is not None and newer:
                os.chmod(tmp, 0o600)
                os.replace(tmp, target)
                log.warning("auth dir: %s was left half-installed by a process that stopped; it is complete and newer "
                            "than %s, so it is now in place (its tokens are the latest)", name, m.group(1))
            else:
                os.unlink(tmp)
                log.warning("auth dir: deleted %s, left by a process that stopped while writing %s (%s)", name,
                            m.group(1), "incomplete" if meta is None else "older than the file")
        except OSError as e:
            log.warning("auth dir: cannot settle %s: %s", name, e.strerror or e)


def auth_dir_listing(auth_dir):
    """{file name: (mtime_ns, size)} of the *.json files in auth_dir (hidden files excepted)."""
    out = {}
    try:
        names = os.listdir(auth_dir)
    except OSError:
        return out
    for name in names:
        if name.endswith(".json") and not name.startswith("."):
            try:
                st = os.stat(os.path.join(auth_dir, name))
            except OSError:
                continue
            out[name] = (st.st_mtime_ns, st.st_size)
    return out


def reread_credentials(auth_dir, live, listing):
    """{id: Credential} for the files of `listing`: a file unchanged since it was read keeps its live credential
    objects (cooldowns, counters, tokens); new or changed files are read afresh; broken ones are logged, skipped."""
    by_file = {}
    for cred in live.values():
        by_file.setdefault(os.path.basename(cred.path), []).append(cred)
    files = {}
    for name, stamp in listing.items():
        olds = by_file.get(name) or []
        if olds and all(c.stamp == stamp for c in olds):
            files.update((c.id, c) for c in olds)
            continue
        try:
            meta, real_stamp = read_credential_file(os.path.join(auth_dir, name))
        except ValueError as e:
            log.warning("credential file %s skipped: %s", name, e)
            continue
        files.update((c.id, c) for c in credentials_from_file(name, meta, real_stamp, auth_dir))
    return files


def file_provider_id(meta):
    """The provider id of a credential file: its class's file_type (`gemini` files are Gemini CLI's), else its type."""
    cls = PROVIDERS.file_class(meta)
    return cls.file_type if cls is not None else meta["type"].strip().lower()


def credentials_from_file(name, meta, stamp, auth_dir):
    """The credentials one file holds: usually one; a Gemini CLI file whose project_id lists several projects
    holds one virtual credential per project (id `<file>::<project>`), all sharing the file's token (§1.1)."""
    pid = file_provider_id(meta)
    label = meta.get("email") or meta.get("label") or name
    projects = [p.strip() for p in str(meta.get("project_id") or "").split(",") if p.strip()]
    specs = [(name, None)]
    if pid == "gemini-cli" and len(projects) > 1:
        specs = [("%s::%s" % (name, re.sub(r"[/\\ ]", "_", p)), p) for p in projects]
    out = []
    for cid, project in specs:
        cred = Credential(cid, pid, "%s (%s)" % (label, project) if project else label,
                          proxy_url=(meta.get("proxy_url") or "").strip())
        cred.path = os.path.join(auth_dir, name)
        cred.meta = meta
        cred.stamp = stamp
        cred.project = project
        if meta.get("disabled") is True:
            cred.disabled = "disabled in its file"
        out.append(cred)
    return out


def credentials_for_entry(entry):
    seen = {}
    out = []
    for key, proxy in entry.keys:
        cid = apikey_credential_id(entry.provider_id, key, entry.base_url, proxy or entry.proxy_url)
        n = seen.get(cid, 0)
        seen[cid] = n + 1
        if n:
            cid = "%s-%d" % (cid, n)
        label = "%s key %s" % (entry.name, mask_secret(key) if key else "(none)")
        out.append(Credential(cid, entry.provider_id, label, key, entry.base_url, proxy or entry.proxy_url,
                              entry.headers))
    return out


class LockTimeout(Exception):
    """Another process held a credential's refresh lock for longer than we may wait."""


class FileTokens:
    """Where a refreshed token goes without a shared store: the credential's own file. Single flight across
    processes sharing the auth dir is an exclusive lock file beside it (flock); under the lock the file is read
    again, so a token another process already rotated is adopted."""

    def __init__(self, lock_timeout=30.0):
        self.lock_timeout = lock_timeout

    async def lock(self, cred):
        try:
            import fcntl
        except ImportError:  # not POSIX: in-process single flight only
            return None
        path = cred.path
        lock_path = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LockTimeout("another process holds the refresh lock for %s" % os.path.basename(path))
                await asyncio.sleep(0.05)

    async def unlock(self, fd):
        if fd is not None:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    async def read(self, cred):
        """(meta, stamp) as stored now."""
        try:
            return read_credential_file(cred.path)
        except ValueError:
            return cred.meta, cred.stamp

    async def adopted(self, cred, meta):
        """A token rotated elsewhere was taken over: the file already holds it."""

    async def save(self, cred, meta):
        """Store a rotated token (atomically, 0600) and make it the credential's."""
        write_file_atomic(cred.path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n", 0o600)
        st = os.stat(cred.path)
        cred.meta, cred.stamp = meta, (st.st_mtime_ns, st.st_size)
        SECRET_MASK.add(*(meta.get(k) for k in ("access_token", "refresh_token", "id_token", "api_key")))


class SealedBox:
    """Authenticated encryption from the standard library alone (it has no AES): HMAC-SHA256 in counter mode is
    the keystream (a PRF-based stream cipher), HMAC-SHA256 over nonce and ciphertext authenticates it
    (encrypt-then-MAC), with independent encryption and MAC keys derived from the configured key by PBKDF2.
    A sealed value is `v1.<base64url(16-byte random nonce | ciphertext | 32-byte tag)>`."""

    def __init__(self, key):
        secret = bytes.fromhex(key) if re.match(r"(?:[0-9a-fA-F]{2}){16,}\Z", key) else key.encode("utf-8")
        master = hashlib.pbkdf2_hmac("sha256", secret, b"llm-mux store v1", 100000)
        self.enc = hmac.new(master, b"encryption", hashlib.sha256).digest()
        self.mac = hmac.new(master, b"authentication", hashlib.sha256).digest()

    def _stream(self, nonce, data):
        out = bytearray(len(data))
        for block in range(0, len(data), 32):
            pad = hmac.new(self.enc, nonce + struct.pack("!Q", block // 32), hashlib.sha256).digest()
            chunk = data[block:block + 32]
            out[block:block + len(chunk)] = bytes(a ^ b for a, b in zip(chunk, pad))
        return bytes(out)

    def seal(self, plaintext):
        nonce = os.urandom(16)
        body = nonce + self._stream(nonce, plaintext)
        tag = hmac.new(self.mac, body, hashlib.sha256).digest()
        return "v1." + base64.urlsafe_b64encode(body + tag).decode().rstrip("=")

    def open(self, sealed):
        if not sealed.startswith("v1."):
            raise ValueError("not a sealed value")
        raw = b64url_decode(sealed[3:])
        if len(raw) < 48:
            raise ValueError("sealed value too short")
        body, tag = raw[:-32], raw[-32:]
        if not hmac.compare_digest(tag, hmac.new(self.mac, body, hashlib.sha256).digest()):
            raise ValueError("sealed value fails authentication (wrong store.encryption-key, or tampered)")
        return self._stream(body[:16], body[16:])


def advisory_key(text):
    """A signed 64-bit PostgreSQL advisory-lock key for `text`."""
    return struct.unpack("!q", hashlib.sha256(("llm-mux:" + text).encode()).digest()[:8])[0]


class CredentialStore:
    """The shared store (`store.postgres-url`): credential files by name (content sealed with
    `store.encryption-key`, or plain JSON when no key is set), each credential's cooldown and disabled state,
    and client-key counters. Every change takes a new version from one sequence and is announced on the
    `llm_mux` channel as `{"kind", "name", "version", "by"}`; `by` is the replica that made it."""

    CHANNEL = "llm_mux"
    SCHEMA = (
        "CREATE SEQUENCE IF NOT EXISTS llm_mux_version",
        "CREATE TABLE IF NOT EXISTS llm_mux_credentials (name TEXT PRIMARY KEY, content TEXT NOT NULL, "
        "version BIGINT NOT NULL, deleted BOOLEAN NOT NULL DEFAULT false, updated_by TEXT NOT NULL DEFAULT '', "
        "updated_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        "CREATE TABLE IF NOT EXISTS llm_mux_credential_state (id TEXT PRIMARY KEY, disabled TEXT, "
        "until_all DOUBLE PRECISION NOT NULL DEFAULT 0, models JSONB NOT NULL DEFAULT '{}', version BIGINT NOT NULL, "
        "updated_by TEXT NOT NULL DEFAULT '')",
        "CREATE TABLE IF NOT EXISTS llm_mux_key_events (id BIGSERIAL PRIMARY KEY, key TEXT NOT NULL, "
        "at DOUBLE PRECISION NOT NULL, requests INTEGER NOT NULL DEFAULT 0, tokens BIGINT NOT NULL DEFAULT 0, "
        "usd DOUBLE PRECISION NOT NULL DEFAULT 0)",
        "CREATE INDEX IF NOT EXISTS idx_llm_mux_key_events ON llm_mux_key_events (key, at)",
    )

    def __init__(self, url, encryption_key="", replica=None, lock_timeout=30.0):
        self.settings = pg_settings(url)
        if self.settings["application_name"] == "llm-mux":  # which process holds a lock, in pg_stat_activity
            self.settings["application_name"] = "llm-mux/%d" % os.getpid()
        self.where = redact_url(url)
        self.pool = PgPool(self.settings, size=4)
        self.box = SealedBox(encryption_key) if encryption_key else None
        self.replica = replica or "%s:%d:%s" % (socket.gethostname(), os.getpid(), new_id("", 3))
        self.lock_timeout = lock_timeout

    async def migrate(self):
        async with self.pool.transaction() as db:
            await db.execute("SELECT pg_advisory_xact_lock($1)", advisory_key("schema"))
            for statement in self.SCHEMA:
                await db.execute(statement)

    # -- credentials --------------------------------------------------------------------------------------------
    def _seal(self, meta):
        text = json.dumps(meta, ensure_ascii=False, sort_keys=True)
        return self.box.seal(text.encode("utf-8")) if self.box is not None else text

    def _unseal(self, content):
        if content.startswith("v1."):
            if self.box is None:
                raise ValueError("the store holds encrypted credentials and store.encryption-key is not set")
            content = self.box.open(content).decode("utf-8")
        return json.loads(content)

    async def credentials_since(self, version):
        """[(name, meta or None when deleted, version)] changed after `version`, oldest first. A row that cannot
        be read (wrong key) is logged and skipped."""
        out = []
        for name, content, v, deleted in await self.pool.fetch(
                "SELECT name, content, version, deleted FROM llm_mux_credentials WHERE version > $1 ORDER BY version",
                version):
            try:
                out.append((name, None if deleted else self._unseal(content), v))
            except ValueError as e:
                log.error("store: credential %s cannot be read: %s", name, e)
        return out

    async def credential(self, name):
        row = await self.pool.fetchrow("SELECT content, deleted FROM llm_mux_credentials WHERE name = $1", name)
        return None if row is None or row[1] else self._unseal(row[0])

    async def put_credential(self, name, meta, db=None):
        """Store a credential file's content (a new version, announced); the version."""
        async def run(db):
            version = await db.fetchval(
                "INSERT INTO llm_mux_credentials (name, content, version, deleted, updated_by, updated_at) "
                "VALUES ($1, $2, nextval('llm_mux_version'), false, $3, now()) ON CONFLICT (name) DO UPDATE SET "
                "content = EXCLUDED.content, version = EXCLUDED.version, deleted = false, "
                "updated_by = EXCLUDED.updated_by, updated_at = now() RETURNING version",
                name, self._seal(meta), self.replica)
            await self._announce(db, "credential", name, version)
            return version
        if db is not None:
            return await run(db)
        async with self.pool.transaction() as db:
            return await run(db)

    async def delete_credential(self, name):
        async with self.pool.transaction() as db:
            version = await db.fetchval(
                "UPDATE llm_mux_credentials SET deleted = true, content = '', version = nextval('llm_mux_version'), "
                "updated_by = $2, updated_at = now() WHERE name = $1 AND NOT deleted RETURNING version",
                name, self.replica)
            if version is not None:
                await self._announce(db, "credential", name, version)
            return version

    async def _announce(self, db, kind, name, version):
        await db.execute("SELECT pg_notify($1, $2)", self.CHANNEL, json.dumps(
            {"kind": kind, "name": name, "version": version, "by": self.replica}))

    # -- cooldown and disabled state ----------------------------------------------------------------------------
    async def put_state(self, cred_id, disabled, until_all, models):
        """A credential's cooldowns (epoch seconds) and disabled reason, as one replica last saw them."""
        async with self.pool.transaction() as db:
            version = await db.fetchval(
                "INSERT INTO llm_mux_credential_state (id, disabled, until_all, models, version, updated_by) "
                "VALUES ($1, $2, $3, $4::jsonb, nextval('llm_mux_version'), $5) ON CONFLICT (id) DO UPDATE SET "
                "disabled = EXCLUDED.disabled, until_all = EXCLUDED.until_all, models = EXCLUDED.models, "
                "version = EXCLUDED.version, updated_by = EXCLUDED.updated_by RETURNING version",
                cred_id, disabled, until_all, models, self.replica)
            await self._announce(db, "state", cred_id, version)
            return version

    async def states_since(self, version):
        return await self.pool.fetch("SELECT id, disabled, until_all, models, version, updated_by FROM "
                                     "llm_mux_credential_state WHERE version > $1 ORDER BY version", version)

    # -- the refresh lock ---------------------------------------------------------------------------------------
    async def lock(self, name, clock):
        """Hold credential `name`'s advisory lock on a connection of its own (a replica that dies drops the
        connection and with it the lock); LockTimeout past lock_timeout."""
        conn = await PgConnection(self.settings).connect()
        try:
            deadline = clock.now() + self.lock_timeout
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", advisory_key("cred:" + name)):
                if clock.now() > deadline:
                    raise LockTimeout("another replica holds the refresh lock for %s" % name)
                await clock.sleep(0.1)
        except BaseException:
            conn.close()
            raise
        return conn

    # -- client-key counters ------------------------------------------------------------------------------------
    async def admit_key(self, key, rpm, tpm, budget, budget_seconds):
        """Count one request against `key` if its limits allow, atomically across replicas (the key's advisory
        transaction lock serialises admissions); None when admitted, else (what, seconds to wait)."""
        async with self.pool.transaction() as db:
            await db.execute("SELECT pg_advisory_xact_lock($1)", advisory_key("key:" + key))
            now = await db.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
            if rpm is not None:
                n, oldest = await db.fetchrow("SELECT count(*), min(at) FROM llm_mux_key_events WHERE key = $1 "
                                              "AND requests > 0 AND at > $2", key, now - 60)
                if n >= rpm:
                    return "%d requests per minute" % rpm, oldest + 60 - now
            if tpm is not None:
                tokens, oldest = await db.fetchrow("SELECT COALESCE(sum(tokens), 0)::bigint, min(at) FROM "
                                                   "llm_mux_key_events WHERE key = $1 AND tokens > 0 AND at > $2",
                                                   key, now - 60)
                if tokens >= tpm:
                    return "%d tokens per minute" % tpm, oldest + 60 - now
            if budget is not None:
                usd, oldest = await db.fetchrow("SELECT COALESCE(sum(usd), 0)::float8, min(at) FROM "
                                                "llm_mux_key_events WHERE key = $1 AND usd > 0 AND at > $2",
                                                key, now - budget_seconds)
                if usd >= budget:
                    return "a budget of %s USD per %s" % (budget, format_seconds(budget_seconds)), \
                        oldest + budget_seconds - now
            await db.execute("INSERT INTO llm_mux_key_events (key, at, requests) VALUES ($1, $2, 1)", key, now)
        return None

    async def spend_key(self, key, tokens, usd):
        await self.pool.execute("INSERT INTO llm_mux_key_events (key, at, tokens, usd) VALUES "
                                "($1, extract(epoch FROM clock_timestamp()), $2, $3)", key, tokens, usd)

    async def key_usage(self, key, budget_seconds):
        """{requests_last_minute, tokens_last_minute, spent_usd} across all replicas."""
        row = await self.pool.fetchrow(
            "SELECT COALESCE(sum(requests) FILTER (WHERE at > e - 60), 0)::bigint, "
            "COALESCE(sum(tokens) FILTER (WHERE at > e - 60), 0)::bigint, "
            "COALESCE(sum(usd) FILTER (WHERE at > e - $2), 0)::float8 FROM llm_mux_key_events, "
            "(SELECT extract(epoch FROM clock_timestamp()) AS e) AS t WHERE key = $1", key, budget_seconds)
        return {"requests_last_minute": row[0], "tokens_last_minute": row[1], "spent_usd": round(row[2], 6)}

    async def prune_key_events(self, horizon):
        await self.pool.execute("DELETE FROM llm_mux_key_events WHERE at < extract(epoch FROM clock_timestamp()) - "
                                "$1 AND (usd = 0 OR at < extract(epoch FROM clock_timestamp()) - $2)", 120.0,
                                max(120.0, horizon))

    def close(self):
        self.pool.close()


class StoreTokens(FileTokens):
    """Refresh coordination through the shared store: the lock is the credential's advisory lock (on its own
    connection), the token is re-read from the store under it, and the rotated token is committed to the store
    (and announced) before this replica uses it or writes its local file."""

    def __init__(self, store, clock):
        FileTokens.__init__(self, store.lock_timeout)
        self.store, self.clock = store, clock

    @staticmethod
    def _name(cred):
        return os.path.basename(cred.path)

    async def lock(self, cred):
        try:
            return await self.store.lock(self._name(cred), self.clock)
        except PgError as e:  # unreachable store: do not risk a second refresh of a rotating token
            raise LockTimeout("the shared store is unreachable (%s); not refreshing without its lock" % e.message)

    async def unlock(self, conn):
        if conn is not None:
            conn.close()  # the session ends and the server releases its advisory locks

    async def read(self, cred):
        try:
            meta = await self.store.credential(self._name(cred))
        except (PgError, ValueError) as e:
            log.warning("store: cannot read %s (%s); using the local copy", self._name(cred), e)
            meta = None
        if meta is None:
            return await FileTokens.read(self, cred)
        return meta, cred.stamp

    async def adopted(self, cred, meta):
        await FileTokens.save(self, cred, meta)  # the local file follows the store

    async def save(self, cred, meta):
        try:
            await self.store.put_credential(self._name(cred), meta)
        except PgError as e:  # kept locally; the store sync pushes it when the store answers again
            log.error("store: the rotated token of %s could not be stored (%s); kept locally", cred.label, e)
        await FileTokens.save(self, cred, meta)


# === 10. Providers ===
# Owns: one class per upstream, shaping the upstream request (URL, headers, body via a codec), decoding its
# answers and streams into the IR, and classifying its errors. Providers do not choose credentials or retry.

class UpstreamFailure:
    """A classified upstream error: what the client sees, and how routing treats the credential.
    category: user_error | auth_revoked | auth_error | quota | permission | not_found | transient | midstream |
    unknown (gateway.md §6.8) | local (the gateway's own shortage, e.g. file descriptors: never the credential's); scope: "model" or "credential" (every model of the credential cools down)."""

    __slots__ = ("status", "message", "type", "category", "retry_after", "scope", "disable", "retryable", "code")

    def __init__(self, status, message, type, category="unknown", retry_after=None, scope="model", disable=False,
                 retryable=True, code=None):
        self.status, self.message, self.type, self.category = status, message, type, category
        self.retry_after, self.scope, self.disable, self.retryable = retry_after, scope, disable, retryable
        self.code = error_code(status, message, code)


def upstream_error_message(body):
    """The human message inside an upstream error body (OpenAI, Anthropic and Google shapes), else the text."""
    data = body if isinstance(body, (dict, list)) else json_or_none(body)
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(data.get("message"), str):
            return data["message"]
        if isinstance(data.get("detail"), str):
            return data["detail"]
    text = body.decode("utf-8", "replace").strip() if isinstance(body, bytes) else str(body)
    return text[:500] or "upstream error"


def parse_retry_after(headers):
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or HTTP date); None when absent."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = (headers.get("retry-after") or "").strip()
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        when = parse_instant(ra)
        return None if when is None else max(0.0, when - time.time())


ANTHROPIC_UNIFIED_WINDOWS = ("5h", "7d", "7d_oi", "")


def retry_hint(headers, data):
    """When the upstream says the limit lifts, in seconds from now, and whether it binds the whole credential.
    Reads Retry-After, Anthropic's unified-window headers (5-hour / 7-day: credential-scoped), Google's RetryInfo
    and quota-reset details, and Codex's resets_at / resets_in_seconds. Hints are honoured in full (no cap):
    the latest deadline wins."""
    now = time.time()
    hints = []
    scope = "model"
    ra = parse_retry_after(headers)
    if ra is not None:
        hints.append(ra)
    for window in ANTHROPIC_UNIFIED_WINDOWS:
        prefix = "anthropic-ratelimit-unified-" + (window + "-" if window else "")
        if (headers.get(prefix + "status") or "").lower() == "rejected":
            scope = "credential"
            when = parse_instant(headers.get(prefix + "reset"))
            if when is not None:
                hints.append(max(0.0, when - now))
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        for d in err.get("details") or ():
            if not isinstance(d, dict):
                continue
            for key in ("retryDelay", "quotaResetDelay"):
                v = parse_duration(d.get(key) or (d.get("metadata") or {}).get(key))
                if v is not None:
                    hints.append(v)
            meta = d.get("metadata") or {}
            for v in (meta.get("quotaResetTimeStamp"), (meta.get("quotaInfo") or {}).get("resetTime"),
                      d.get("resetTime")):
                when = parse_instant(v)
                if when is not None:
                    hints.append(max(0.0, when - now))
        when = parse_instant(err.get("resets_at"))
        if when is not None and when > now:
            hints.append(when - now)
        elif isinstance(err.get("resets_in_seconds"), (int, float)):
            hints.append(float(err["resets_in_seconds"]))
        if not hints and isinstance(err.get("message"), str):
            # Cloud Code words it in the message: "... Please retry after 12s" / "after 1h2m3s" (providers.md §F.6)
            m = _RETRY_AFTER_TEXT.search(err["message"])
            if m:
                v = parse_duration(m.group(1))
                if v is not None:
                    hints.append(v)
    return (max(hints) if hints else None), scope


_RETRY_AFTER_TEXT = re.compile(r"after ((?:\d+(?:\.\d+)?(?:h|ms|m|s))+)")


_REVOKED = ("invalid_grant", "token has been expired or revoked", "token revoked", "oauth_token_revoked")
_USER_ERROR = ("invalid_argument", "invalid request", "malformed", "missing required", "invalid json",
               "please use a valid", "not supported", "must be non-empty", "cannot be empty")
_QUOTA = ("resource_exhausted", "quota", "rate limit", "rate_limit", "too many requests", "credit balance is too low",
          "overloaded_error", "usage_limit_reached")


def classify_failure(status, headers, body):
    """The generic policy (gateway.md §6.8, providers.md §1.3): category by message, then by status."""
    data = json_or_none(body) if isinstance(body, (bytes, str)) else body
    message = upstream_error_message(body)
    low = message.lower() + " " + (body.decode("utf-8", "replace").lower()[:2000] if isinstance(body, bytes) else "")
    hint, scope = retry_hint(headers, data)
    err = data.get("error") if isinstance(data, dict) else None
    code = err.get("code") if isinstance(err, dict) and isinstance(err.get("code"), str) else None
    if error_code(status, message, code) == CONTEXT_OVERFLOW:  # the request's fault: no credential would take it
        return UpstreamFailure(400, message, "invalid_request", "user_error", retryable=False, code=CONTEXT_OVERFLOW)
    if any(s in low for s in _REVOKED):
        return UpstreamFailure(status or 401, message, "authentication", "auth_revoked", scope="credential",
                               disable=True)
    if status == 429 or scope == "credential" or (status >= 400 and any(s in low for s in _QUOTA)
                                                  and status not in (400, 404)):
        etype = "overloaded" if status in (503, 529) else "rate_limit"
        return UpstreamFailure(status if status >= 400 else 429, message, etype, "quota", hint, scope)
    if status == 401:
        return UpstreamFailure(status, message, "authentication", "auth_error", hint)
    if status == 402:
        return UpstreamFailure(status, message, "permission", "quota", hint)
    if status == 403:
        return UpstreamFailure(status, message, "permission", "permission", hint)
    if status == 404:
        return UpstreamFailure(status, message, "not_found", "not_found", hint)
    if status in (408, 500, 502, 503, 504, 529) or status >= 500:
        return UpstreamFailure(status, message, error_type_for_status(status), "transient", hint)
    if 400 <= status < 500 or any(s in low for s in _USER_ERROR):
        # The request itself is at fault: another credential would fail the same way.
        return UpstreamFailure(status, message, error_type_for_status(status), "user_error", retryable=False,
                               code=code)
    return UpstreamFailure(status or 502, message, "upstream", "unknown", hint)


class LoginError(Exception):
    """A login or import that cannot finish; the reason is one line for the user."""


class LoginFlow:
    """Base of the login flows. A flow knows its provider's OAuth details and nothing of the terminal or HTTP API
    that drives it (the CLI's `llm-mux login` and the management API use the same objects). Defining a subclass
    with `provider_class` makes it that provider's `login`. Kinds: browser (url / code_from_paste / exchange),
    device (device_start / device_poll / device_finish), token (finish from a pasted token)."""

    kind = "browser"
    provider_class = None
    cli_options = ("no-browser", "callback-port", "timeout")  # the `llm-mux login <name>` options it takes

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("provider_class") is not None:
            cls.provider_class.login = cls


CALLBACK_PATHS = ("/callback", "/oauth2callback", "/auth/callback", "/oauth-callback")


async def listen_for_login_callback(flow, port, got):
    """Serve the provider's redirect (`GET /callback?code=…&state=…`, or the other providers' paths) on
    127.0.0.1:port for a browser login; the code, or the provider's refusal as a LoginError, lands in the future
    `got`. Returns the server (the caller shuts it down); OSError when the port is taken. Used by `llm-mux login`
    and the management API's oauth/start alike."""
    async def app(req):
        q = req.query
        if req.path not in CALLBACK_PATHS:
            return Response(404, b"not found", None, "text/plain")
        if q.get("error"):
            if not got.done():
                got.set_exception(LoginError("the provider refused the login: %s %s" % (
                    q["error"], q.get("error_description", ""))))
            return Response(400, b"Login failed; see the terminal or the dashboard.", None, "text/plain")
        if q.get("state") != flow.state:
            return Response(400, b"State mismatch: this is not the login that is waiting.", None, "text/plain")
        if not got.done():
            got.set_result(q.get("code", ""))
        return Response(200, b"<html><body><h2>llm-mux: login complete.</h2>You can close this window.</body></html>",
                        None, "text/html; charset=utf-8")
    cfg = Config.defaults(environ={})
    server = HttpServer(app, lambda: ServerLimits(cfg), access_log=False)
    await server.listen("127.0.0.1", port)
    return server


def pkce_pair():
    """(verifier, S256 challenge): 96 random bytes, base64url without padding (providers.md §A.1)."""
    verifier = b64url(os.urandom(96))
    return verifier, b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def jwt_claims(token):
    """The (unverified) payload of a JWT such as an id_token, or {}."""
    try:
        body = token.split(".")[1]
        return json.loads(b64url_decode(body))
    except (IndexError, ValueError, AttributeError, binascii.Error):
        return {}


class Provider:
    """Base class: an upstream reached with a Credential, and everything the gateway knows about it. Defining a
    subclass registers it (PROVIDERS): `config_type` makes it serve `providers:` entries of that type, `file_type`
    credential files of that type. Subclasses set `codec` and override what differs:
      build(req, cred, model) -> (method, url, headers, body)   the upstream request for one attempt
      parse_response / stream_decoder / frame_parser             its answers into the IR
      classify_error(status, headers, body) -> UpstreamFailure   how routing treats an error
      count_tokens / parse_count                                 its token counter, where it has one
      refresh(cred, client) -> new file content                  OAuth providers (with `refresh_lead`)
    plus the flags shared code asks (never the class name), its login flow (`login`, a LoginFlow subclass naming
    this class) and `import_official(home, auth_dir, cfg)` for its official tool's stored credentials."""

    config_type = None  # `type` of the `providers:` entries it serves (API keys)
    file_type = None  # `type` of the credential files it serves (OAuth accounts)
    file_aliases = ()  # other file types it reads
    provider_id = None  # the id of its API-key credentials (cooldowns, breaker); None: the entry's name
    display_name = None  # its name in model lists with show-provider-prefixes; None: the entry's name
    needs_base_url = needs_models = False  # what a `providers:` entry must give
    needs_key = True
    version_suffixes = ()  # version segments a `base-url` may end with that the provider adds itself (dropped)
    login_name = None  # `llm-mux login <name>`
    login = None  # its LoginFlow class (set when the flow class is defined)
    token_field = "access_token"  # the credential-file field holding the token requests use
    base_url_field = None  # the credential-file field that overrides the default base URL
    expiry_field = None  # the field holding that token's expiry, when not one of the usual ones (EXPIRY_FIELDS)
    official_tool = None  # the official tool whose stored credentials `import_official` reads
    codec = None
    default_base_url = ""
    default_models = ()
    stream_only = False  # the upstream is always asked for a stream; non-stream clients get it collected
    quota_groups = False  # a quota error on one model cools every model of its family (claude-*, gemini-*, ...)
    inline_media = False  # the upstream cannot fetch image/file URLs: the gateway downloads them and sends them inline
    refresh_lead = None  # seconds before expiry to refresh an OAuth token (providers.md §1.2); None: no refresh
    relays_frames = True  # its stream is its codec's format as is: a same-format client gets it relayed

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        PROVIDERS.add(cls)

    def __init__(self, entry, credentials=None):
        self.entry = entry
        self.id = entry.provider_id
        self.name = entry.name
        self.credentials = credentials if credentials is not None else credentials_for_entry(entry)

    def quota_windows(self, headers):
        """The quota windows an answer's headers report ({window: {used, resets_at, ...}}), for the credential
        health view; {} when the provider reports none."""
        return {}

    def transport(self, cred):
        """What performs this credential's requests: None for the shared HTTP client; a provider whose requests
        travel another way (a browser relay) returns an object with the same `request` method."""
        return None

    async def probe_quota(self, cred, client):
        """Ask the upstream's quota endpoint now ({window: {...}}); None when the provider has no such endpoint."""
        return None

    async def _probe_json(self, client, cred, url, headers):
        try:
            resp = await client.request("GET", url, headers, None, cred.proxy_url, timeout=15, stream_timeout=30)
            raw = await resp.read(1 << 20)
        except UpstreamError as e:
            raise RefreshError("quota endpoint unreachable: %s" % e.message)
        data = json_or_none(raw)
        if resp.status >= 300 or not isinstance(data, dict):
            raise RefreshError("quota endpoint answered %d: %s" % (resp.status,
                                                                  cred.mask(upstream_error_message(raw)[:200])))
        return data

    async def refresh(self, cred, client):
        """New credential-file content with fresh tokens (providers with `refresh_lead` implement it)."""
        raise NotImplementedError

    def token_expiry(self, cred):
        """When the token requests use expires (epoch seconds), or None if unknown."""
        if self.expiry_field:
            return parse_instant(cred.meta.get(self.expiry_field))
        return credential_expiry(cred.meta)

    def has_token(self, cred):
        return bool(cred.meta.get(self.token_field))

    @staticmethod
    async def post_token(client, url, body, cred, form=False, require=None):
        """POST to an OAuth token endpoint; returns the JSON answer (holding the field `require` names, when it
        names one) or raises RefreshError."""
        if form:
            payload = urllib.parse.urlencode(body).encode()
            ctype = "application/x-www-form-urlencoded"
        else:
            payload = json_bytes(body)
            ctype = "application/json"
        try:
            resp = await client.request("POST", url, [("Content-Type", ctype), ("Accept", "application/json")],
                                        payload, cred.proxy_url, timeout=15, stream_timeout=30)
            raw = await resp.read(1 << 20)
        except UpstreamError as e:
            raise RefreshError("token endpoint unreachable: %s" % e.message)
        data = json_or_none(raw)
        if resp.status < 300 and isinstance(data, dict) and require and not data.get(require):
            raise RefreshError("token endpoint answered without an %s" % require)
        if resp.status >= 300 or not isinstance(data, dict):
            message = upstream_error_message(raw)
            low = raw.decode("utf-8", "replace").lower()
            raise RefreshError("token endpoint answered %d: %s" % (resp.status, message[:300]),
                               revoked=any(s in low for s in _REVOKED),
                               retry_after=parse_retry_after(resp.headers))
        return data

    def model_list(self, excluded=False):
        """[(client-visible id, upstream model name)] after exclusions (with `excluded`, the ones excluded)."""
        out = []
        for name, alias in self.entry.models or [(m, "") for m in self.default_models]:
            visible = alias or name
            if any(glob_match(p, visible) or glob_match(p, name) for p in self.entry.excluded) == excluded:
                out.append((visible, name))
        return out

    def base_url(self, cred):
        return ((self.base_url_field and cred.meta.get(self.base_url_field)) or cred.base_url or
                self.default_base_url).rstrip("/")

    @staticmethod
    def json_headers(token, stream, *extra):
        """Content-Type and Accept (an event stream when streaming) for a JSON request, a bearer token when there
        is one, then the `extra` pairs."""
        headers = [("Content-Type", "application/json"),
                   ("Accept", "text/event-stream" if stream else "application/json")]
        if token:
            headers.append(("Authorization", "Bearer " + token))
        return headers + list(extra)

    def build(self, req, cred, model):
        """(method, url, header pairs, body bytes) for one attempt."""
        raise NotImplementedError

    def stream_decoder(self, req):
        return self.codec.StreamDecoder(req)

    @staticmethod
    def frame_parser(resp):
        """Splits the upstream body into (event, data) frames: SSE for every provider but Kiro."""
        return SSEParser()

    def count_tokens(self, req, cred, model):
        """(method, url, headers, body) for the upstream's token counter, or None when it has none."""
        return None

    embeddings = False  # has an embeddings API: build_embeddings / parse_embeddings

    def build_embeddings(self, req, cred, model):
        """(method, url, headers, body) for embedding `req.inputs` with `model`."""
        raise NotImplementedError

    def parse_embeddings(self, data):
        """An Embeddings from the upstream's answer."""
        raise NotImplementedError

    @staticmethod
    def parse_count(data):
        return None

    def parse_response(self, data):
        return self.codec.parse_response(data)

    def classify_error(self, status, headers, body):
        """Generic policy (providers.md §1.3); providers refine it with their own bodies and hints."""
        return classify_failure(status, headers, body)


class RefreshError(Exception):
    def __init__(self, message, revoked=False, retry_after=None):
        super().__init__(message)
        self.message, self.revoked, self.retry_after = message, revoked, retry_after


class OpenAICompatProvider(Provider):
    """`type: openai`: any OpenAI-compatible Chat Completions endpoint (providers.md §L)."""

    config_type = "openai"
    needs_base_url = needs_models = True
    needs_key = False
    codec = OpenAIChat

    def build(self, req, cred, model):
        body = req.encode(self.codec.build_request(req, model))
        headers = [("Content-Type", "application/json"), ("User-Agent", USER_AGENT)]
        if cred.api_key:
            headers.append(("Authorization", "Bearer " + cred.api_key))
        if req.stream:
            headers.append(("Accept", "text/event-stream"))
            headers.append(("Cache-Control", "no-cache"))
        else:
            headers.append(("Accept", "application/json"))
        headers.extend(cred.headers)
        return "POST", self.base_url(cred) + "/chat/completions", headers, body

    embeddings = True

    def build_embeddings(self, req, cred, model):
        body = {"model": model, "input": req.inputs, "encoding_format": "float"}
        if req.dimensions:
            body["dimensions"] = req.dimensions
        headers = self.json_headers(cred.api_key, False, ("User-Agent", USER_AGENT), *cred.headers)
        return "POST", self.base_url(cred) + "/embeddings", headers, json_bytes(body)

    @staticmethod
    def parse_embeddings(data):
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise UpstreamError("protocol", "upstream embeddings answer has no data")
        items = sorted((i for i in items if isinstance(i, dict)), key=lambda i: i.get("index") or 0)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return Embeddings([i.get("embedding") or [] for i in items], Usage(usage.get("prompt_tokens") or 0))


class AnthropicProvider(Provider):
    """`type: anthropic`: the Messages API with an API key (providers.md §A.3, §A.7)."""

    config_type = "anthropic"
    version_suffixes = ("/v1",)
    provider_id = "claude"
    display_name = "Claude"
    codec = Anthropic
    default_base_url = "https://api.anthropic.com"
    default_models = ("claude-opus-4-5-20251101", "claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001",
                      "claude-opus-4-1-20250805", "claude-opus-4-20250514", "claude-sonnet-4-20250514",
                      "claude-3-7-sonnet-20250219", "claude-3-5-haiku-20241022")

    def _headers(self, req, cred, stream):
        base = self.base_url(cred)
        headers = [("Content-Type", "application/json"), ("anthropic-version", "2023-06-01"),
                   ("User-Agent", USER_AGENT), ("Accept", "text/event-stream" if stream else "application/json")]
        # First-party keys go in x-api-key; Anthropic-compatible relays expect a bearer token (providers.md §A.3).
        if base == self.default_base_url:
            headers.append(("x-api-key", cred.api_key))
        else:
            headers.append(("Authorization", "Bearer " + cred.api_key))
        beta = req.betas
        if beta and req.client_format == "anthropic":
            headers.append(("anthropic-beta", beta))
        headers.extend(cred.headers)
        return headers

    def build(self, req, cred, model):
        body = req.encode(self.codec.build_request(req, model))
        return "POST", self.base_url(cred) + "/v1/messages", self._headers(req, cred, req.stream), body

    def count_tokens(self, req, cred, model):
        full = self.codec.build_request(req, model)
        body = {k: v for k, v in full.items() if k in ("model", "messages", "system", "tools", "tool_choice",
                                                       "thinking")}
        return ("POST", self.base_url(cred) + "/v1/messages/count_tokens", self._headers(req, cred, False),
                json_bytes(body))

    @staticmethod
    def parse_count(data):
        return data.get("input_tokens") if isinstance(data, dict) else None


class GeminiProvider(Provider):
    """`type: gemini`: the Generative Language API with an API key (providers.md §D.3)."""

    config_type = "gemini"
    version_suffixes = ("/v1beta", "/v1")
    provider_id = "gemini"
    codec = Gemini
    inline_media = True
    default_base_url = "https://generativelanguage.googleapis.com"
    default_models = ("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-3-pro-preview",
                      "gemini-3-flash-preview")
    path = "/v1beta/models/%s:%s"

    def _url(self, cred, model, action):
        return self.base_url(cred) + self.path % (model, action)

    def _headers(self, cred):
        return [("Content-Type", "application/json"), ("User-Agent", USER_AGENT),
                ("x-goog-api-key", cred.api_key)] + cred.headers

    def build(self, req, cred, model):
        body = req.encode(self.codec.build_request(req, model))
        action = "streamGenerateContent?alt=sse" if req.stream else "generateContent"
        return "POST", self._url(cred, model, action), self._headers(cred), body

    def count_tokens(self, req, cred, model):
        full = self.codec.build_request(req, model)
        body = {"contents": full["contents"]}
        return "POST", self._url(cred, model, "countTokens"), self._headers(cred), json_bytes(body)

    @staticmethod
    def parse_count(data):
        return gget(data, "totalTokens") if isinstance(data, dict) else None

    embeddings = True
    embed_predict = False  # Vertex embeds through :predict; the Gemini API through :batchEmbedContents

    def build_embeddings(self, req, cred, model):
        if self.embed_predict:
            body = {"instances": [dict({"content": t}, **({"task_type": req.task} if req.task else {}))
                                  for t in req.inputs]}
            if req.dimensions:
                body["parameters"] = {"outputDimensionality": req.dimensions}
            return "POST", self._url(cred, model, "predict"), self._headers(cred), json_bytes(body)
        extra = {"taskType": req.task} if req.task else {}
        if req.dimensions:
            extra["outputDimensionality"] = req.dimensions
        body = {"requests": [dict({"model": "models/" + model, "content": {"parts": [{"text": t}]}}, **extra)
                             for t in req.inputs]}
        return "POST", self._url(cred, model, "batchEmbedContents"), self._headers(cred), json_bytes(body)

    def parse_embeddings(self, data):
        if not isinstance(data, dict):
            raise UpstreamError("protocol", "upstream embeddings answer is not an object")
        if self.embed_predict:
            preds = [p.get("embeddings") or {} for p in data.get("predictions") or [] if isinstance(p, dict)]
            tokens = sum(int((p.get("statistics") or {}).get("token_count") or 0) for p in preds)
            return Embeddings([p.get("values") or [] for p in preds], Usage(tokens))
        return Embeddings([e.get("values") or [] for e in data.get("embeddings") or [] if isinstance(e, dict)])


class VertexCompatProvider(GeminiProvider):
    """`type: vertex-compat`: Vertex-style paths with an API key (providers.md §G.3)."""

    config_type = "vertex-compat"
    embed_predict = True
    version_suffixes = ("/v1",)
    provider_id = "vertex"
    display_name = "Vertex AI"
    default_base_url = "https://aiplatform.googleapis.com"
    path = "/v1/publishers/google/models/%s:%s"


class CodexProvider(Provider):
    """`type: codex`: the OpenAI Responses API with an API key (providers.md §B.3, §B.7); always streamed."""

    config_type = "codex"
    provider_id = "codex"
    display_name = "Codex"
    codec = Responses
    default_base_url = "https://api.openai.com/v1"
    default_models = ("gpt-5", "gpt-5-codex", "gpt-5.1", "gpt-5.1-codex", "gpt-5.1-codex-max")
    stream_only = True

    def build(self, req, cred, model):
        body = req.encode(self.codec.build_request(req, model))
        headers = self.json_headers(cred.api_key, True, ("User-Agent", USER_AGENT), *cred.headers)
        return "POST", self.base_url(cred) + "/responses", headers, body

    def quota_windows(self, headers):
        return codex_quota_windows(headers)


def anthropic_quota_windows(headers):
    """Anthropic's unified rate-limit headers: the 5-hour and 7-day windows' utilisation (0..1), reset and status."""
    out = {}
    for window in ("5h", "7d", "7d_oi"):
        prefix = "anthropic-ratelimit-unified-%s-" % window
        used, reset = headers.get(prefix + "utilization"), headers.get(prefix + "reset")
        if used is None and reset is None:
            continue
        entry = {"status": headers.get(prefix + "status") or ""}
        try:
            entry["used_percent"] = round(float(used) * 100, 2)
        except (TypeError, ValueError):
            pass
        when = parse_instant(reset)
        if when is not None:
            entry["resets_at"] = rfc3339(when)
        out[{"5h": "five_hour", "7d": "seven_day", "7d_oi": "seven_day_opus"}[window]] = entry
    return out


class ClaudeOAuthProvider(AnthropicProvider):
    """Claude Pro/Max through OAuth credential files (`type: claude`), providers.md §A.2–A.3: the Messages API
    with a bearer token, Claude Code's identity headers and betas, and its required system prompt placed before
    (never instead of) the client's own."""

    official_tool = "Claude Code"
    file_type = login_name = "claude"
    token_url = "https://platform.claude.com/v1/oauth/token"
    client_id = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    refresh_lead = 4 * 3600  # providers.md §1.2 (llm-mux's lead)
    identity = "You are Claude Code, Anthropic's official CLI for Claude."
    betas = "claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"

    def _headers(self, req, cred, stream):
        beta = self.betas
        client_beta = req.betas if req.client_format == "anthropic" else None
        if client_beta:
            extra = [b.strip() for b in client_beta.split(",") if b.strip() and b.strip() not in beta]
            beta = ",".join([beta] + extra)
        return self.json_headers(cred.meta.get("access_token"), stream,
                ("anthropic-version", "2023-06-01"), ("anthropic-beta", beta),
                ("anthropic-dangerous-direct-browser-access", "true"), ("x-app", "cli"),
                ("User-Agent", "claude-cli/2.1.220 (external, cli)"), ("X-Stainless-Lang", "js"),
                ("X-Stainless-Runtime", "node"), ("X-Stainless-Retry-Count", "0"),
                ("X-Stainless-Package-Version", "0.94.0"), ("X-Stainless-Runtime-Version", "v26.3.0"),
                ("X-Stainless-OS", "MacOS"), ("X-Stainless-Arch", "arm64"))

    def build(self, req, cred, model):
        body = self.codec.build_request(req, model)
        if not model.startswith("claude-3-5-haiku"):
            system = body.get("system") or []
            body["system"] = [{"type": "text", "text": self.identity}] + [
                b for b in system if b.get("text") != self.identity]
        body.setdefault("metadata", {"user_id": req.user or "llm-mux-user"})
        return ("POST", self.base_url(cred) + "/v1/messages?beta=true", self._headers(req, cred, req.stream),
                req.encode(body))

    def count_tokens(self, req, cred, model):
        method, url, headers, body = AnthropicProvider.count_tokens(self, req, cred, model)
        return method, url.replace("/count_tokens", "/count_tokens?beta=true"), headers, body

    def quota_windows(self, headers):
        return anthropic_quota_windows(headers)

    async def probe_quota(self, cred, client):
        """Claude Code's usage endpoint: five_hour / seven_day utilisation (percent) and reset times."""
        data = await self._probe_json(client, cred, self.base_url(cred) + "/api/oauth/usage", [
            ("Authorization", "Bearer %s" % cred.meta.get("access_token")), ("anthropic-beta", "oauth-2025-04-20"),
            ("Accept", "application/json"), ("User-Agent", "claude-cli/2.1.220 (external, cli)")])
        out = {}
        for name, window in data.items():
            if isinstance(window, dict) and ("utilization" in window or "resets_at" in window):
                entry = {}
                if isinstance(window.get("utilization"), (int, float)):
                    entry["used_percent"] = float(window["utilization"])
                when = parse_instant(window.get("resets_at"))
                if when is not None:
                    entry["resets_at"] = rfc3339(when)
                out[name] = entry
        return out

    async def refresh(self, cred, client):
        data = await self.post_token(client, self.token_url, {
            "client_id": self.client_id, "grant_type": "refresh_token",
            "refresh_token": cred.meta.get("refresh_token")}, cred, require="access_token")
        meta = dict(cred.meta)
        meta["access_token"] = data["access_token"]
        meta["refresh_token"] = data.get("refresh_token") or meta.get("refresh_token")  # rotated, or kept
        now = time.time()
        meta["expired"] = rfc3339(now + float(data.get("expires_in") or 3600))
        meta["last_refresh"] = rfc3339(now)
        email = (data.get("account") or {}).get("email_address")
        if email:
            meta["email"] = email
        return meta

    @staticmethod
    def import_official(home, auth_dir=None, cfg=None):
        """Claude Code's own store: $CLAUDE_CONFIG_DIR/.credentials.json or ~/.claude/.credentials.json."""
        path, data = read_json_file(os.environ.get("CLAUDE_CONFIG_DIR") or os.path.join(home, ".claude"),
                                    ".credentials.json")
        oauth = data.get("claudeAiOauth") or data.get("claude_ai_oauth") or {}
        if not oauth.get("accessToken") or not oauth.get("refreshToken"):
            raise ValueError("no claudeAiOauth tokens in %s" % path)
        email = ""
        try:
            with open(os.path.join(home, ".claude.json"), "r", encoding="utf-8") as f:
                email = (json.load(f).get("oauthAccount") or {}).get("emailAddress") or ""
        except (OSError, ValueError):
            pass
        expires = oauth.get("expiresAt")
        meta = {"type": "claude", "email": email or "claude-code", "access_token": oauth["accessToken"],
                "refresh_token": oauth["refreshToken"], "id_token": "",
                "expired": rfc3339(expires / 1000.0 if expires and expires > 1e12 else (expires or time.time())),
                "last_refresh": rfc3339(time.time())}
        return path, "claude-%s.json" % meta["email"], meta


class ClaudeLogin(LoginFlow):
    """Claude Pro/Max: authorization code + PKCE with a local callback on port 54545 (providers.md §A.1)."""

    provider_class = ClaudeOAuthProvider
    authorize_url = "https://claude.ai/oauth/authorize"
    redirect_uri = "http://localhost:54545/callback"
    callback_port = 54545
    scope = "org:create_api_key user:profile user:inference"

    def __init__(self):
        self.verifier, self.challenge = pkce_pair()
        self.state = b64url(os.urandom(24))

    def url(self):
        q = urllib.parse.urlencode({"code": "true", "client_id": ClaudeOAuthProvider.client_id,
                                    "response_type": "code", "redirect_uri": self.redirect_uri, "scope": self.scope,
                                    "code_challenge": self.challenge, "code_challenge_method": "S256",
                                    "state": self.state})
        return self.authorize_url + "?" + q

    def code_from_paste(self, text):
        """A pasted redirect URL (…/callback?code=…&state=…) or a bare `code#state`."""
        text = text.strip()
        if "code=" in text:
            q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(text).query))
            code, state = q.get("code", ""), q.get("state")
        else:
            code, _, state = text.partition("#")
        if state and state != self.state:
            raise LoginError("the pasted state does not match this login (stale or foreign URL)")
        return code

    async def exchange(self, client, code):
        """Trade the code for tokens; returns (file name, credential-file content)."""
        code, _, state = code.partition("#")
        data = await Provider.post_token(client, ClaudeOAuthProvider.token_url, {
            "grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri,
            "client_id": ClaudeOAuthProvider.client_id, "code_verifier": self.verifier, "state": state or self.state},
            Credential("login", "claude", "login"))
        email = (data.get("account") or {}).get("email_address") or ""
        if not data.get("access_token") or not email:
            raise LoginError("the token endpoint answered without an access token or account e-mail")
        now = time.time()
        meta = {"type": "claude", "email": email, "access_token": data["access_token"],
                "refresh_token": data.get("refresh_token") or "", "id_token": "",
                "expired": rfc3339(now + float(data.get("expires_in") or 3600)), "last_refresh": rfc3339(now)}
        org = data.get("organization") or {}
        if org.get("uuid"):
            meta["organization_uuid"], meta["organization_name"] = org["uuid"], org.get("name") or ""
        if (data.get("account") or {}).get("uuid"):
            meta["account_uuid"] = data["account"]["uuid"]
        return "claude-%s.json" % email, meta


def codex_quota_windows(headers):
    """Codex's x-codex-primary-* / x-codex-secondary-* headers: used percent, window length, reset."""
    out = {}
    for window in ("primary", "secondary"):
        prefix = "x-codex-%s-" % window
        used = headers.get(prefix + "used-percent")
        if used is None:
            continue
        entry = {}
        try:
            entry["used_percent"] = float(used)
            if headers.get(prefix + "window-minutes"):
                entry["window_minutes"] = int(float(headers.get(prefix + "window-minutes")))
            if headers.get(prefix + "reset-after-seconds"):
                entry["resets_at"] = rfc3339(time.time() + float(headers.get(prefix + "reset-after-seconds")))
        except ValueError:
            continue
        out[window] = entry
    return out


class CodexOAuthProvider(CodexProvider):
    """Codex through a ChatGPT account (`type: codex` credential files), providers.md §B.2–B.3: the Responses API at
    chatgpt.com/backend-api/codex, always streamed, with the Codex CLI's identity headers and body rules."""

    official_tool = "Codex CLI"
    file_type = login_name = "codex"
    default_base_url = "https://chatgpt.com/backend-api/codex"
    token_url = "https://auth.openai.com/oauth/token"
    client_id = "app_EMoamEEZ73f0CkXaXp7hrann"
    refresh_lead = 5 * 86400  # providers.md §1.2 (llm-mux's lead)
    default_models = ("gpt-5.5", "gpt-5.4", "gpt-5.4-mini", "gpt-5.1-codex-max", "gpt-5.1-codex", "gpt-5.1",
                      "gpt-5-codex", "gpt-5")
    user_agent = "codex-tui/0.146.0 (Mac OS 26.5.0; arm64) iTerm.app/3.6.10 (codex-tui; 0.146.0)"

    def build(self, req, cred, model):
        body = self.codec.build_request(req, model)
        for field in ("max_output_tokens", "temperature", "top_p"):  # the ChatGPT backend rejects these
            body.pop(field, None)
        body["store"] = False
        body["stream"] = True
        body["include"] = ["reasoning.encrypted_content"]
        if body.get("tools"):
            body["parallel_tool_calls"] = True
        cache_key = body.get("prompt_cache_key") or req.conversation_key()
        body["prompt_cache_key"] = cache_key
        headers = self.json_headers(cred.meta.get("access_token"), True, ("User-Agent", self.user_agent),
                                    ("Originator", "codex-tui"), ("Session-Id", cache_key))
        if cred.meta.get("account_id"):
            headers.append(("Chatgpt-Account-Id", cred.meta["account_id"]))
        return "POST", self.base_url(cred) + "/responses", headers, req.encode(body)

    async def refresh(self, cred, client):
        data = await self.post_token(client, self.token_url, {
            "client_id": self.client_id, "grant_type": "refresh_token",
            "refresh_token": cred.meta.get("refresh_token") or "", "scope": "openid profile email"}, cred, form=True,
            require="access_token")
        return codex_meta(data, cred.meta)

    @staticmethod
    def import_official(home, auth_dir=None, cfg=None):
        """Codex CLI's own store: $CODEX_HOME/auth.json or ~/.codex/auth.json (`tokens.{id,access,refresh}_token`)."""
        path, data = read_json_file(os.environ.get("CODEX_HOME") or os.path.join(home, ".codex"), "auth.json")
        tokens = data.get("tokens") or {}
        if not tokens.get("access_token") or not tokens.get("refresh_token"):
            raise ValueError("no ChatGPT tokens in %s (an API-key login is not imported)" % path)
        meta = codex_meta({"id_token": tokens.get("id_token"), "access_token": tokens["access_token"],
                           "refresh_token": tokens["refresh_token"]}, {"account_id": tokens.get("account_id") or ""})
        exp = jwt_claims(tokens["access_token"]).get("exp")
        if exp:
            meta["expired"] = rfc3339(float(exp))
        if not meta["email"]:
            raise ValueError("no e-mail in the id_token of %s" % path)
        return path, "codex-%s.json" % meta["email"], meta


class CodexLogin(ClaudeLogin):
    """ChatGPT (Codex): authorization code + PKCE, local callback on 1455 (providers.md §B.1); or the device-code
    flow, where the user types a code at auth.openai.com/codex/device."""

    cli_options = ("no-browser", "callback-port", "timeout", "device")

    provider_class = CodexOAuthProvider
    authorize_url = "https://auth.openai.com/oauth/authorize"
    redirect_uri = "http://localhost:1455/auth/callback"
    callback_port = 1455
    scope = "openid email profile offline_access"
    device_url = "https://auth.openai.com/codex/device"
    usercode_url = "https://auth.openai.com/api/accounts/deviceauth/usercode"
    device_token_url = "https://auth.openai.com/api/accounts/deviceauth/token"
    device_redirect = "https://auth.openai.com/deviceauth/callback"

    def url(self):
        q = urllib.parse.urlencode({"response_type": "code", "client_id": CodexOAuthProvider.client_id,
                                    "redirect_uri": self.redirect_uri, "scope": self.scope, "state": self.state,
                                    "code_challenge": self.challenge, "code_challenge_method": "S256",
                                    "prompt": "login", "id_token_add_organizations": "true",
                                    "codex_cli_simplified_flow": "true"})
        return self.authorize_url + "?" + q

    async def exchange(self, client, code, redirect_uri=None, verifier=None):
        code = code.partition("#")[0]
        data = await Provider.post_token(client, CodexOAuthProvider.token_url, {
            "grant_type": "authorization_code", "client_id": CodexOAuthProvider.client_id, "code": code,
            "redirect_uri": redirect_uri or self.redirect_uri, "code_verifier": verifier or self.verifier},
            Credential("login", "codex", "login"), form=True)
        if not data.get("access_token"):
            raise LoginError("the token endpoint answered without an access token")
        meta = codex_meta(data)
        if not meta["email"]:
            raise LoginError("the id_token carries no e-mail address")
        return "codex-%s.json" % meta["email"], meta

    async def device_start(self, client):
        """Ask for a user code."""
        data = await Provider.post_token(client, self.usercode_url, {"client_id": CodexOAuthProvider.client_id},
                                         Credential("login", "codex", "login"))
        code = data.get("user_code") or data.get("usercode")
        if not data.get("device_auth_id") or not code:
            raise LoginError("the device-code endpoint answered without a code")
        try:
            interval = max(1, int(data.get("interval") or 5))
        except ValueError:
            interval = 5
        return {"url": self.device_url, "code": code, "interval": interval, "expires_in": 900,
                "id": data["device_auth_id"]}

    async def device_finish(self, client, got):
        code, verifier = got
        return await self.exchange(client, code, self.device_redirect, verifier)

    async def device_poll(self, client, started):
        """None while the user has not finished; then (authorization_code, code_verifier)."""
        body = json_bytes({"device_auth_id": started["id"], "user_code": started["code"]})
        try:
            resp = await client.request("POST", self.device_token_url, [("Content-Type", "application/json"),
                                                                        ("Accept", "application/json")], body,
                                        timeout=15, stream_timeout=30)
            raw = await resp.read(1 << 20)
        except UpstreamError as e:
            log.debug("device poll failed: %s", e.message)
            return None
        if resp.status in (403, 404, 428):
            return None
        data = json_or_none(raw) or {}
        if resp.status >= 300 or not data.get("authorization_code"):
            raise LoginError("device login failed: HTTP %d %s" % (resp.status, upstream_error_message(raw)[:200]))
        return data["authorization_code"], data.get("code_verifier") or ""


class GeminiCLIProvider(GeminiProvider):
    """Gemini through a Google account (Gemini CLI's Code Assist, `type: gemini` files), providers.md §E: the
    `v1internal` envelope {model, project, request} at cloudcode-pa, answers wrapped in `response`. A file listing
    several projects gives one virtual credential per project; rotating among them on quota is
    `quota-exceeded.switch-project`."""

    official_tool = "Gemini CLI"
    embeddings = False  # Cloud Code has no embeddings API
    relays_frames = False  # its frames are Gemini's wrapped in the Code Assist envelope
    file_type = "gemini-cli"
    file_aliases = ("gemini",)
    display_name = "Gemini CLI"
    login_name = "gemini"
    default_base_url = "https://cloudcode-pa.googleapis.com/v1internal"
    token_url = "https://oauth2.googleapis.com/token"
    client_id = "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com"
    client_secret = "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"
    client_metadata = "ideType=IDE_UNSPECIFIED,platform=PLATFORM_UNSPECIFIED,pluginType=GEMINI"
    refresh_lead = 600  # providers.md §1.2 (llm-mux's lead)
    default_models = ("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-3-pro-preview",
                      "gemini-3.1-pro-preview", "gemini-3-flash-preview")

    @staticmethod
    def project_of(cred):
        return cred.project or str(cred.meta.get("project_id") or "").split(",")[0].strip()

    def _headers(self, cred, stream=False):
        token = cred.meta.get("access_token") or (cred.meta.get("token") or {}).get("access_token")
        return self.json_headers(token, stream, ("User-Agent", "google-api-nodejs-client/9.15.1"),
                                 ("X-Goog-Api-Client", "gl-node/22.17.0"), ("Client-Metadata", self.client_metadata))

    def build(self, req, cred, model):
        request = self.codec.build_request(req, model)
        body = {"model": model, "project": self.project_of(cred), "request": request}
        action = ":streamGenerateContent?alt=sse" if req.stream else ":generateContent"
        return "POST", self.base_url(cred) + action, self._headers(cred, req.stream), req.encode(body, request)

    def count_tokens(self, req, cred, model):
        request = self.codec.build_request(req, model)
        request.pop("safetySettings", None)
        return ("POST", self.base_url(cred) + ":countTokens", self._headers(cred),
                json_bytes({"request": {"model": "models/" + model, "contents": request["contents"]}}))

    def parse_response(self, data):
        return self.codec.parse_response(data.get("response", data) if isinstance(data, dict) else data)

    def stream_decoder(self, req):
        return EnvelopeDecoder(self.codec.StreamDecoder(req))

    async def refresh(self, cred, client):
        token = dict(cred.meta.get("token") or {})
        refresh_token = cred.meta.get("refresh_token") or token.get("refresh_token")
        data = await self.post_token(client, token.get("token_uri") or self.token_url, {
            "grant_type": "refresh_token", "refresh_token": refresh_token or "",
            "client_id": token.get("client_id") or self.client_id,
            "client_secret": token.get("client_secret") or self.client_secret}, cred, form=True,
            require="access_token")
        return google_token_meta(cred.meta, data)

    @staticmethod
    def import_official(home, auth_dir=None, cfg=None):
        """Gemini CLI's own store: ~/.gemini/oauth_creds.json (`expiry_date` in ms). The project comes from
        GOOGLE_CLOUD_PROJECT, else Code Assist discovery."""
        path, data = read_json_file(home, ".gemini", "oauth_creds.json")
        if not data.get("refresh_token"):
            raise ValueError("no refresh_token in %s" % path)
        email = jwt_claims(data.get("id_token") or "").get("email") or ""
        project = os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT_ID") or ""
        if not project and cfg is not None and data.get("access_token"):
            async def discover():
                client = HttpClient(lambda: cfg)
                try:
                    return await GeminiCLILogin().discover_project(client, data["access_token"])
                finally:
                    client.close_idle()
            try:
                project = asyncio.run(discover())
            except LoginError as e:
                raise ValueError("project discovery failed (%s); set GOOGLE_CLOUD_PROJECT" % e)
        if not project:
            raise ValueError("no project known; set GOOGLE_CLOUD_PROJECT")
        expires = data.get("expiry_date")
        token = {"access_token": data.get("access_token") or "", "refresh_token": data["refresh_token"],
                 "token_type": data.get("token_type") or "Bearer",
                 "expiry": rfc3339(expires / 1000.0 if expires and expires > 1e12 else (expires or time.time())),
                 "token_uri": GeminiCLILogin.token_url, "client_id": GeminiCLIProvider.client_id,
                 "client_secret": GeminiCLIProvider.client_secret, "scopes": (data.get("scope") or "").split()}
        meta = {"type": "gemini", "email": email or "gemini-cli", "project_id": project, "auto": False, "checked": True,
                "token": token, "access_token": token["access_token"], "refresh_token": token["refresh_token"],
                "expiry": token["expiry"]}
        return path, "gemini-%s-%s.json" % (meta["email"], project), meta


class GoogleLogin(ClaudeLogin):
    """Google's installed-app flow (authorization code, no PKCE) plus Cloud Code project discovery: the parts
    Gemini CLI and Antigravity logins share (providers.md §E.1, §F.1)."""

    authorize_url = "https://accounts.google.com/o/oauth2/v2/auth"
    token_url = "https://oauth2.googleapis.com/token"
    userinfo_url = "https://www.googleapis.com/oauth2/v1/userinfo?alt=json"
    code_assist = "https://cloudcode-pa.googleapis.com/v1internal"
    metadata = {"ideType": "IDE_UNSPECIFIED", "platform": "PLATFORM_UNSPECIFIED", "pluginType": "GEMINI"}

    def __init__(self, project=None):
        ClaudeLogin.__init__(self)
        self.project = project

    def url(self):
        q = urllib.parse.urlencode({"client_id": self.provider_class.client_id, "redirect_uri": self.redirect_uri,
                                    "response_type": "code", "scope": self.scope, "access_type": "offline",
                                    "prompt": "consent", "state": self.state})
        return self.authorize_url + "?" + q

    async def _json(self, client, method, url, token, body=None, headers=()):
        hdrs = [("Authorization", "Bearer " + token), ("Accept", "application/json"),
                ("Content-Type", "application/json")] + list(headers)
        try:
            resp = await client.request(method, url, hdrs, json_bytes(body) if body is not None else None,
                                        timeout=15, stream_timeout=60)
            raw = await resp.read(1 << 20)
        except UpstreamError as e:
            raise LoginError("%s failed: %s" % (url, e.message))
        if resp.status >= 300:
            raise LoginError("%s answered %d: %s" % (url.split("?")[0], resp.status, upstream_error_message(raw)[:200]))
        return json_or_none(raw) or {}

    @staticmethod
    def _project_id(value):
        if isinstance(value, dict):
            return value.get("id") or value.get("projectId") or ""
        return value or ""

    async def discover_project(self, client, token, requested=None, sleep=asyncio.sleep):
        """loadCodeAssist, then onboardUser until done: the Code Assist project this account uses."""
        body = {"metadata": self.metadata}
        if requested:
            body["cloudaicompanionProject"] = requested
        data = await self._json(client, "POST", self.code_assist + ":loadCodeAssist", token, body)
        found = self._project_id(data.get("cloudaicompanionProject")) or data.get("projectId") or data.get("project")
        if found and not requested:
            return found
        tier = next((t.get("id") for t in data.get("allowedTiers") or [] if t.get("isDefault")), None) or \
            (data.get("currentTier") or {}).get("id") or "legacy-tier"
        onboard = {"tierId": tier, "metadata": self.metadata}
        if requested:
            onboard["cloudaicompanionProject"] = requested
        for _ in range(15):
            op = await self._json(client, "POST", self.code_assist + ":onboardUser", token, onboard)
            if op.get("done"):
                got = self._project_id((op.get("response") or {}).get("cloudaicompanionProject"))
                return requested or got or found
            await sleep(2)
        raise LoginError("Code Assist onboarding did not finish; try again later")

    async def tokens(self, client, code):
        data = await Provider.post_token(client, self.token_url, {
            "code": code.partition("#")[0], "client_id": self.provider_class.client_id,
            "client_secret": self.provider_class.client_secret, "redirect_uri": self.redirect_uri,
            "grant_type": "authorization_code"}, Credential("login", self.provider_class.file_type, "login"), form=True)
        if not data.get("access_token"):
            raise LoginError("the token endpoint answered without an access token")
        info = await self._json(client, "GET", self.userinfo_url, data["access_token"])
        if not info.get("email"):
            raise LoginError("could not read the account's e-mail address")
        return data, info["email"]


class GeminiCLILogin(GoogleLogin):
    """Gemini CLI (Code Assist): port 8085; `--project ID`, `--project A,B` or `--project ALL` chooses projects
    (several projects make one virtual credential each); without it the account's own project is discovered."""

    cli_options = ("no-browser", "callback-port", "timeout", "project")

    provider_class = GeminiCLIProvider
    authorize_url = "https://accounts.google.com/o/oauth2/auth"
    redirect_uri = "http://localhost:8085/oauth2callback"
    callback_port = 8085
    scope = ("https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/userinfo.email "
             "https://www.googleapis.com/auth/userinfo.profile")
    projects_url = "https://cloudresourcemanager.googleapis.com/v1/projects"
    serviceusage = "https://serviceusage.googleapis.com/v1/projects/%s/services/cloudaicompanion.googleapis.com"

    async def enable_api(self, client, token, project):
        """Make sure the Gemini for Cloud API (cloudaicompanion) is enabled in a chosen project (§E.1 step 4)."""
        url = self.serviceusage % project
        state = await self._json(client, "GET", url, token)
        if state.get("state") == "ENABLED":
            return
        try:
            await self._json(client, "POST", url + ":enable", token, {})
        except LoginError as e:
            if "already enabled" not in str(e).lower():
                raise LoginError("project %s: the Gemini for Cloud API could not be enabled (%s)" % (project, e))

    async def exchange(self, client, code):
        data, email = await self.tokens(client, code)
        token = data["access_token"]
        requested = [p.strip() for p in (self.project or "").split(",") if p.strip()]
        if requested == ["ALL"]:
            listing = await self._json(client, "GET", self.projects_url, token)
            requested = [p.get("projectId") for p in listing.get("projects") or [] if p.get("projectId")]
            if not requested:
                raise LoginError("this account can see no Google Cloud projects")
        projects = [await self.discover_project(client, token, p) for p in requested] if requested else \
            [await self.discover_project(client, token)]
        projects = [p for p in projects if p]
        for p in requested:
            await self.enable_api(client, token, p)
        if not projects:
            raise LoginError("no Code Assist project found; pass --project <id>")
        meta = google_token_meta({"type": "gemini", "email": email, "project_id": ",".join(projects), "auto": False,
                                  "checked": True, "token": {
                                      "token_uri": self.token_url, "client_id": self.provider_class.client_id,
                                      "client_secret": self.provider_class.client_secret,
                                      "scopes": self.scope.split(), "universe_domain": "googleapis.com",
                                      "refresh_token": data.get("refresh_token") or ""}}, data)
        suffix = "all" if len(projects) > 1 else projects[0]
        return "gemini-%s-%s.json" % (email, suffix), meta


class AntigravityProvider(GeminiCLIProvider):
    """Antigravity accounts (`type: antigravity` files), providers.md §F: Cloud Code's v1internal with the
    Antigravity client identity and envelope {model, project, userAgent, requestType, requestId, request}; the
    daily and prod hosts are used in turn. Models of one family share a quota (a 429 on one cools them all)."""

    file_type = login_name = "antigravity"
    display_name = "Antigravity"
    quota_groups = True
    bases = ("https://daily-cloudcode-pa.googleapis.com/v1internal", "https://cloudcode-pa.googleapis.com/v1internal")
    client_id = "1071006060591-tmhssin2h21lcre235vtolojh4g403ep.apps.googleusercontent.com"
    client_secret = "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"
    refresh_lead = 300  # providers.md §1.2 (llm-mux's lead)
    user_agent = "antigravity/hub/2.9.1 darwin/arm64"
    default_models = ("claude-opus-4-6-thinking", "claude-sonnet-4-6", "gemini-3-flash", "gemini-3.1-pro-low",
                      "gemini-3.5-flash-low", "gemini-3.6-flash-high", "gemini-3.7-flash-high", "gpt-oss-120b-medium")

    def __init__(self, entry, credentials=None):
        GeminiCLIProvider.__init__(self, entry, credentials)
        self._turn = 0

    def base_url(self, cred):
        if cred.meta.get("base_url"):
            return cred.meta["base_url"].rstrip("/") + "/v1internal"
        self._turn += 1
        return self.bases[(self._turn - 1) % 2]  # daily, then prod, in turn (as llm-mux does)

    def _headers(self, cred, stream=False):
        return self.json_headers(cred.meta.get("access_token"), stream,
                                 ("User-Agent", cred.meta.get("user_agent") or self.user_agent))

    def build(self, req, cred, model):
        request = self.codec.build_request(req, model)
        request.pop("safetySettings", None)
        first = next((m for m in req.messages if m.role == "user"), None)
        seed = first.text() if first is not None else ""
        digest = hashlib.sha256(seed.encode("utf-8", "replace")).digest() if seed else os.urandom(8)
        request["sessionId"] = "-%d" % (int.from_bytes(digest[:8], "big") & 0x7FFFFFFFFFFFFFFF)
        if request.get("tools"):
            request.setdefault("toolConfig", {}).setdefault("functionCallingConfig", {})["mode"] = "VALIDATED"
        body = {"model": model, "project": self.project_of(cred), "userAgent": "antigravity", "requestType": "agent",
                "requestId": "agent-" + new_id("", 16), "request": request}
        action = ":streamGenerateContent?alt=sse" if req.stream else ":generateContent"
        return "POST", self.base_url(cred) + action, self._headers(cred, req.stream), req.encode(body, request)

    async def refresh(self, cred, client):
        data = await self.post_token(client, self.token_url, {
            "client_id": self.client_id, "client_secret": self.client_secret, "grant_type": "refresh_token",
            "refresh_token": cred.meta.get("refresh_token") or ""}, cred, form=True, require="access_token")
        return antigravity_meta(data, cred.meta)


def antigravity_meta(data, old=None):
    meta = dict(old or {})
    now = time.time()
    expires_in = int(data.get("expires_in") or 3600)
    meta.update({"type": "antigravity", "access_token": data["access_token"], "expires_in": expires_in,
                 "timestamp": int(now * 1000), "expired": rfc3339(now + expires_in)})
    if data.get("refresh_token"):
        meta["refresh_token"] = data["refresh_token"]
    return meta


def google_token_meta(old, data):
    """Gemini CLI file content after a Google token answer: the nested `token` map and its top-level mirrors."""
    meta = dict(old)
    token = dict(meta.get("token") or {})
    now = time.time()
    expiry = rfc3339(now + float(data.get("expires_in") or 3600))
    for target in (token, meta):
        target["access_token"] = data["access_token"]
        target["token_type"] = data.get("token_type") or "Bearer"
        target["expiry"] = expiry
        if data.get("refresh_token"):
            target["refresh_token"] = data["refresh_token"]
    meta["token"] = token
    meta["last_refresh"] = rfc3339(now)
    return meta


class AntigravityLogin(GoogleLogin):
    """Antigravity: port 51121, path /oauth-callback; the project is discovered (onboarded when new)."""

    provider_class = AntigravityProvider
    redirect_uri = "http://localhost:51121/oauth-callback"
    callback_port = 51121
    scope = ("https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/userinfo.email "
             "https://www.googleapis.com/auth/userinfo.profile https://www.googleapis.com/auth/cclog "
             "https://www.googleapis.com/auth/experimentsandconfigs")
    metadata = {"ideType": "ANTIGRAVITY"}

    async def exchange(self, client, code):
        data, email = await self.tokens(client, code)
        project = await self.discover_project(client, data["access_token"], self.project)
        if not project:
            raise LoginError("no Code Assist project found for this account")
        meta = antigravity_meta(data, {"email": email, "project_id": project})
        return "antigravity-%s.json" % email.replace("@", "_").replace(".", "_"), meta


class EnvelopeDecoder:
    """Unwraps `{"response": {...}}` stream chunks (Cloud Code's envelope) for the Gemini decoder."""

    def __init__(self, inner):
        self.inner = inner

    def feed(self, event, data):
        obj = json_or_none(data)
        if isinstance(obj, dict) and isinstance(obj.get("response"), dict):
            obj = obj["response"]
        return self.inner.feed_obj(obj) if obj is not None else []

    def close(self):
        return self.inner.close()


class AwsEventStream:
    """The AWS binary event stream (`application/vnd.amazon.eventstream`), decoded by hand (providers.md §J.4):
    each frame is a 12-byte prelude (total length, headers length, CRC32 of those 8 bytes), headers, a JSON
    payload, and a CRC32 of everything before it. Both CRCs are checked: a corrupt frame is an error, never
    skipped. Frames may arrive split across reads. Yields (event type, payload text)."""

    MAX_FRAME = 16 << 20

    def __init__(self):
        self.buf = bytearray()

    @staticmethod
    def headers(data):
        """The header block of a frame; an UpstreamError when it is cut off (its CRCs can be valid even so)."""
        try:
            return AwsEventStream._headers(data)
        except IndexError:
            raise UpstreamError("protocol", "event stream: a frame's header block is cut off")

    @staticmethod
    def _headers(data):
        out = {}
        pos = 0
        end = len(data)

        def need(n):
            if pos + n > end:
                raise UpstreamError("protocol", "event stream: a frame's header block is cut off")
        while pos < end:
            n = data[pos]
            need(1 + n + 1)
            name = data[pos + 1:pos + 1 + n].decode("utf-8", "replace")
            pos += 1 + n
            kind = data[pos]
            pos += 1
            if kind in (0, 1):
                value = kind == 0
            elif kind in (2, 3, 4, 5, 8, 9):
                size = {2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}[kind]
                need(size)
                value = data[pos:pos + size]
                pos += size
            elif kind in (6, 7):
                need(2)
                size = int.from_bytes(data[pos:pos + 2], "big")
                need(2 + size)
                value = data[pos + 2:pos + 2 + size]
                if kind == 7:
                    value = value.decode("utf-8", "replace")
                pos += 2 + size
            else:
                raise UpstreamError("protocol", "event stream: unknown header value type %d" % kind)
            out[name] = value
        return out

    def feed(self, chunk):
        self.buf += chunk
        out = []
        while len(self.buf) >= 12:
            total = int.from_bytes(self.buf[0:4], "big")
            hlen = int.from_bytes(self.buf[4:8], "big")
            if total < 16 or total > self.MAX_FRAME or hlen > total - 16:
                raise UpstreamError("protocol", "event stream: bad frame lengths (%d, %d)" % (total, hlen))
            if zlib.crc32(bytes(self.buf[0:8])) != int.from_bytes(self.buf[8:12], "big"):
                raise UpstreamError("protocol", "event stream: prelude CRC mismatch")
            if len(self.buf) < total:
                break
            frame = bytes(self.buf[:total])
            del self.buf[:total]
            if zlib.crc32(frame[:-4]) != int.from_bytes(frame[-4:], "big"):
                raise UpstreamError("protocol", "event stream: message CRC mismatch")
            headers = self.headers(frame[12:12 + hlen])
            payload = frame[12 + hlen:-4].decode("utf-8", "replace")
            mtype = headers.get(":message-type", "event")
            if mtype in ("error", "exception"):
                message = headers.get(":error-message") or headers.get(":exception-type") or payload
                out.append(("error", json_dumps({"error": {"message": str(message)[:500]}})))
            else:
                out.append((headers.get(":event-type"), payload))
        return out

    def finish(self):
        if self.buf:
            raise UpstreamError("protocol", "event stream ended inside a frame")
        return []


class JsonBody:
    """A whole JSON body handed to a stream decoder as one frame (Kiro may answer plain JSON)."""

    def __init__(self):
        self.parts = []

    def feed(self, chunk):
        self.parts.append(chunk)
        return []

    def finish(self):
        return [("json", b"".join(self.parts).decode("utf-8", "replace"))]


KIRO_MODELS = {
    "claude-sonnet-4-5": "CLAUDE_SONNET_4_5_20250929_V1_0", "claude-sonnet-4-5-20250929": "CLAUDE_SONNET_4_5_20250929_V1_0",
    "claude-sonnet-4-20250514": "CLAUDE_SONNET_4_20250514_V1_0",
    "amazonq-claude-sonnet-4-20250514": "CLAUDE_SONNET_4_20250514_V1_0", "claude-4-sonnet": "CLAUDE_SONNET_4_20250514_V1_0",
    "claude-3-7-sonnet-20250219": "CLAUDE_3_7_SONNET_20250219_V1_0",
    "amazonq-claude-3-7-sonnet-20250219": "CLAUDE_3_7_SONNET_20250219_V1_0",
    "claude-opus-4-20250514": "CLAUDE_OPUS_4_20250514_V1_0", "claude-opus-4-5-20251101": "CLAUDE_OPUS_4_5_20251101_V1_0",
    "claude-3-5-sonnet-20241022": "CLAUDE_3_5_SONNET_20241022_V1_0",
    "claude-3-5-haiku-20241022": "CLAUDE_3_5_HAIKU_20241022_V1_0"}


class KiroProvider(Provider):
    """Kiro / Amazon Q with Kiro IDE tokens (`type: kiro` files), providers.md §J: the CodeWhisperer
    `generateAssistantResponse` API with a conversationState body, answered as an AWS binary event stream."""

    official_tool = "Kiro IDE"
    file_type = login_name = "kiro"
    display_name = "Kiro"
    codec = OpenAIChat  # only for the error shape; requests and answers are Kiro's own (below)
    relays_frames = False
    default_base_url = "https://codewhisperer.us-east-1.amazonaws.com"
    refresh_lead = 300  # providers.md §1.2 (llm-mux's lead)
    stream_only = True
    default_models = tuple(KIRO_MODELS)

    def build(self, req, cred, model):
        body = kiro_request(req, KIRO_MODELS.get(model, model))
        if cred.meta.get("profile_arn"):
            body["profileArn"] = cred.meta["profile_arn"]
        headers = self.json_headers(cred.meta.get("access_token"), False, ("x-amzn-kiro-agent-mode", "vibe"),
                                    ("x-amz-user-agent", "aws-sdk-js/1.0.7 KiroIDE-0.1.25 llm-mux"),
                                    ("amz-sdk-request", "attempt=1; max=1"))
        return "POST", self.base_url(cred) + "/generateAssistantResponse", headers, json_bytes(body)

    @staticmethod
    def frame_parser(resp):
        ctype = (resp.headers.get("content-type") or "").lower()
        return JsonBody() if ctype.startswith("application/json") else AwsEventStream()

    def stream_decoder(self, req):
        return KiroStreamDecoder()

    async def refresh(self, cred, client):
        return await kiro_refresh(client, cred)

    @staticmethod
    def import_official(home, auth_dir=None, cfg=None):
        """The Kiro IDE's tokens in ~/.aws/sso/cache/*.json (the first file with a refresh token not imported yet)."""
        cache = os.path.join(home, ".aws", "sso", "cache")
        names = sorted(os.listdir(cache))  # FileNotFoundError -> "not found"
        known = set()
        if auth_dir and os.path.isdir(auth_dir):
            for n in os.listdir(auth_dir):
                if n.startswith("kiro-") and n.endswith(".json"):
                    try:
                        with open(os.path.join(auth_dir, n), encoding="utf-8") as f:
                            known.add(json.load(f).get("refresh_token"))
                    except (OSError, ValueError):
                        pass
        for name in names:
            if not name.endswith(".json"):
                continue
            path = os.path.join(cache, name)
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            rt = data.get("refreshToken") or data.get("refresh_token")
            if not rt or rt in known:
                continue
            expires = data.get("expiresAt") or data.get("expires_at")
            meta = {"type": "kiro", "access_token": data.get("accessToken") or data.get("access_token") or "",
                    "refresh_token": rt, "expires_at": rfc3339(parse_instant(expires) or time.time()),
                    "region": data.get("region") or "us-east-1",
                    "auth_method": (data.get("authMethod") or data.get("auth_method") or "social").lower()}
            for src, dst in (("profileArn", "profile_arn"), ("profile_arn", "profile_arn"), ("provider", "provider"),
                             ("clientId", "client_id"), ("clientSecret", "client_secret"), ("startUrl", "start_url")):
                if data.get(src):
                    meta[dst] = data[src]
            meta["email"] = meta.get("provider") or "kiro"
            return path, "kiro-%d.json" % int(time.time()), meta
        raise ValueError("no Kiro token with a new refresh token in %s" % cache)


def kiro_request(req, model_id):
    """IR -> Kiro's conversationState (providers.md §J.3): system text first in the first user turn, strictly
    alternating history, tool results and tools on the current message."""
    turns = []  # ("user"|"assistant", dict)
    for m in repair_tool_turns(req.messages):
        if m.role in ("user", "system"):
            msg = {"content": m.text(), "modelId": model_id, "origin": "AI_EDITOR"}
            images = [{"format": (p.mime or "image/png").split("/")[-1], "source": {"bytes": p.data}}
                      for p in m.parts if p.kind == "image" and p.data]
            if images:
                msg["images"] = images
            turns.append(("user", msg))
        elif m.role == "tool":
            results = [{"content": [{"text": r.text()}], "status": "error" if r.is_error else "success",
                        "toolUseId": r.id} for r in m.parts]
            turns.append(("user", {"content": "", "modelId": model_id, "origin": "AI_EDITOR",
                                   "userInputMessageContext": {"toolResults": results}}))
        else:
            msg = {"content": "".join(p.text for p in m.parts if p.kind == "text")}
            uses = [{"input": p.args_object(), "name": p.name, "toolUseId": p.id} for p in m.parts
                    if p.kind == "tool_call"]
            if uses:
                msg["toolUses"] = uses
            turns.append(("assistant", msg))
    merged = []
    for role, msg in turns:
        if merged and merged[-1][0] == role:
            prev = merged[-1][1]
            prev["content"] = "\n\n".join(x for x in (prev.get("content"), msg.get("content")) if x)
            if role == "user":
                ctx = msg.get("userInputMessageContext", {}).get("toolResults")
                if ctx:
                    prev.setdefault("userInputMessageContext", {}).setdefault("toolResults", []).extend(ctx)
            elif msg.get("toolUses"):
                prev.setdefault("toolUses", []).extend(msg["toolUses"])
            continue
        merged.append((role, msg))
    if not merged or merged[0][0] != "user":
        merged.insert(0, ("user", {"content": "Continue", "modelId": model_id, "origin": "AI_EDITOR"}))
    if merged[-1][0] != "user":
        merged.append(("user", {"content": "Continue", "modelId": model_id, "origin": "AI_EDITOR"}))
    system = "\n".join(p.text for p in req.system if p.kind == "text")
    if system.strip():
        first = merged[0][1]
        first["content"] = system + "\n\n" + (first.get("content") or "")
    current = merged[-1][1]
    if not current.get("content"):
        current["content"] = "Continue"
    if req.tools:
        current.setdefault("userInputMessageContext", {})["tools"] = [
            {"toolSpecification": {"name": t.name, "description": t.description or t.name, "inputSchema": {
                "json": (custom_tool_schema() if t.tool_kind == "custom" else t.parameters) or
                {"type": "object", "properties": {}}}}} for t in req.tools]
    history = []
    for role, msg in merged[:-1]:
        history.append({"userInputMessage": msg} if role == "user" else {"assistantResponseMessage": msg})
    return {"conversationState": {"chatTriggerType": "MANUAL", "conversationId": new_id("", 16),
                                  "currentMessage": {"userInputMessage": current}, "history": history}}


class KiroStreamDecoder(EventDecoder):
    """Kiro event payloads -> IR events (assistantResponseEvent, toolUseEvent, reasoningContentEvent, usage ...)."""

    def __init__(self):
        self.started = False
        self.tools = {}  # toolUseId -> our index
        self.open = set()
        self.usage = None
        self.done = False
        self.seen_tool = False

    def _start(self):
        if self.started:
            return []
        self.started = True
        return [Start()]

    def feed(self, event, data):
        obj = json_or_none(data)
        if not isinstance(obj, dict):
            return []
        if event == "json":  # a plain JSON answer: reuse the event shapes
            msg = ((obj.get("conversationState") or {}).get("currentMessage") or {}).get("assistantResponseMessage") \
                or obj.get("assistantResponseMessage") or obj
            out = self._start()
            if msg.get("content"):
                out.append(TextDelta(msg["content"]))
            for use in msg.get("toolUses") or obj.get("toolUsages") or []:
                out.extend(self._whole_tool(use))
            u = obj.get("usage") or {}
            if u:
                self.usage = Usage(u.get("inputTokens") or 0, u.get("outputTokens") or 0)
            return out
        if not isinstance(obj, dict):
            return []
        out = self._start()
        if obj.get("error") or obj.get("type") == "error":
            err = obj.get("error")
            message = err.get("message") if isinstance(err, dict) else (err or obj.get("message") or "Kiro error")
            self.done = True
            return out + [ErrorEvent(502, str(message), "upstream")]
        if isinstance(obj.get("assistantResponseEvent"), dict):
            obj = obj["assistantResponseEvent"]
        if "toolUseId" in obj:
            tid = obj["toolUseId"]
            if tid not in self.tools:
                self.tools[tid] = len(self.tools)
                self.open.add(tid)
                self.seen_tool = True
                out.append(ToolCallStart(self.tools[tid], tid, obj.get("name") or ""))
            piece = obj.get("input")
            if isinstance(piece, dict):
                piece = json_dumps(piece)
            if piece:
                out.append(ToolCallDelta(self.tools[tid], piece))
            if obj.get("stop") and tid in self.open:
                self.open.discard(tid)
                out.append(ToolCallEnd(self.tools[tid]))
            return out
        if isinstance(obj.get("content"), str) and obj["content"]:
            out.append(TextDelta(obj["content"]))
        if isinstance(obj.get("reasoningContentEvent"), dict) or event == "reasoningContentEvent":
            text = (obj.get("reasoningContentEvent") or obj).get("text") or ""
            if text:
                out.append(ThinkingDelta(text, source="kiro"))
        for use in obj.get("toolUsages") or []:
            out.extend(self._whole_tool(use))
        if "inputTokens" in obj or "outputTokens" in obj:
            self.usage = Usage(obj.get("inputTokens") or 0, obj.get("outputTokens") or 0)
        return out

    def _whole_tool(self, use):
        tid = use.get("toolUseId") or new_id("tooluse_")
        n = self.tools.setdefault(tid, len(self.tools))
        self.seen_tool = True
        args = use.get("input")
        return [ToolCallStart(n, tid, use.get("name") or ""),
                ToolCallDelta(n, json_dumps(args) if isinstance(args, (dict, list)) else (args or "{}")),
                ToolCallEnd(n)]

    def close(self):
        if self.done:
            return []
        self.done = True
        out = self._start()
        for tid in sorted(self.open, key=self.tools.get):
            out.append(ToolCallEnd(self.tools[tid]))
        if self.usage is not None:
            out.append(UsageEvent(self.usage))
        return out + [Finish("tool_calls" if self.seen_tool else "stop")]


async def kiro_refresh(client, cred):
    """Social sign-in: JSON at prod.<region>.auth.desktop.kiro.dev. IAM / Builder ID: AWS SSO-OIDC CreateToken;
    its documented body is JSON with camelCase fields, which is tried first; llm-mux's form body is the fallback
    (providers.md §J.2 marks the form variant unverified)."""
    meta = dict(cred.meta)
    region = meta.get("region") or "us-east-1"
    rt = meta.get("refresh_token") or ""
    if (meta.get("auth_method") or "social") == "social":
        data = await Provider.post_token(client, "https://prod.%s.auth.desktop.kiro.dev/refreshToken" % region,
                                         {"refreshToken": rt}, cred)
    else:
        url = "https://oidc.%s.amazonaws.com/token" % region
        try:
            data = await Provider.post_token(client, url, {"grantType": "refresh_token", "refreshToken": rt,
                                                           "clientId": meta.get("client_id") or "",
                                                           "clientSecret": meta.get("client_secret") or ""}, cred)
        except RefreshError as e:
            if e.revoked:
                raise
            data = await Provider.post_token(client, url, {"grant_type": "refresh_token", "refresh_token": rt,
                                                           "client_id": meta.get("client_id") or "",
                                                           "client_secret": meta.get("client_secret") or ""},
                                             cred, form=True)
    access = data.get("accessToken") or data.get("access_token")
    if not access:
        raise RefreshError("Kiro refresh answered without an access token")
    now = time.time()
    expires_in = float(data.get("expiresIn") or data.get("expires_in") or 3600)
    meta.update({"type": "kiro", "access_token": access, "expires_at": rfc3339(now + expires_in),
                 "expires_in": int(expires_in), "last_refresh": rfc3339(now)})
    if data.get("refreshToken") or data.get("refresh_token"):
        meta["refresh_token"] = data.get("refreshToken") or data.get("refresh_token")
    if data.get("profileArn"):
        meta["profile_arn"] = data["profileArn"]
    return meta


class IFlowProvider(OpenAICompatProvider):
    """iFlow accounts (`type: iflow` files), providers.md §I: OpenAI chat at apis.iflow.cn with the account's API
    key (from the OAuth user-info exchange or a platform cookie), every request signed as iFlow CLI signs it."""

    file_type = login_name = "iflow"
    display_name = "iFlow"
    default_base_url = "https://apis.iflow.cn/v1"
    client_id = "10009311001"
    client_secret = "4Z3YjXycVsQvyGF1etiNlIBB4RsqSDtW"
    token_url = "https://iflow.cn/oauth/token"
    userinfo_url = "https://iflow.cn/api/oauth/getUserInfo"
    apikey_url = "https://platform.iflow.cn/api/openapi/apikey"
    token_field, base_url_field = "api_key", "base_url"
    refresh_lead = 86400  # providers.md §1.2 (llm-mux's lead)
    default_models = ("qwen3-coder-plus", "qwen3-max", "qwen3-vl-plus", "qwen3-max-preview", "glm-4.6", "kimi-k2",
                      "deepseek-v3.2", "deepseek-v3.1", "deepseek-r1", "deepseek-v3", "qwen3-32b",
                      "qwen3-235b-a22b-thinking-2507", "qwen3-235b-a22b-instruct", "qwen3-235b", "minimax-m2")

    @staticmethod
    def token_expiry(cred):
        exp = credential_expiry(cred.meta)
        if exp is not None and cred.meta.get("cookie") and not cred.meta.get("refresh_token"):
            return exp - 86400  # cookie-issued keys are renewed 48 h ahead (the lead is 24 h)
        return exp


    def build(self, req, cred, model):
        body = self.codec.build_request(req, model)
        effort = thinking_effort(req.thinking)
        if effort is not None:
            body.pop("reasoning_effort", None)
            on = effort != "none"
            if model.startswith("glm") or model.startswith(("deepseek-v3.2", "deepseek-v3.1")):
                body["chat_template_kwargs"] = {"enable_thinking": on}
                if on and model.startswith("glm"):
                    body["chat_template_kwargs"]["clear_thinking"] = False
            elif model.startswith("minimax"):
                body["reasoning_split"] = on
        key = cred.meta.get("api_key") or ""
        session = "session-" + new_id("", 16)
        stamp = str(int(time.time() * 1000))
        signature = hmac.new(key.encode(), ("iFlow-Cli:%s:%s" % (session, stamp)).encode(), hashlib.sha256).hexdigest()
        headers = self.json_headers(key, req.stream, ("User-Agent", "iFlow-Cli"), ("session-id", session),
                                    ("x-iflow-timestamp", stamp), ("x-iflow-signature", signature))
        return "POST", self.base_url(cred) + "/chat/completions", headers, req.encode(body)

    @classmethod
    def basic(cls):
        return "Basic " + base64.b64encode(("%s:%s" % (cls.client_id, cls.client_secret)).encode()).decode()

    @classmethod
    async def oauth_token(cls, client, form, cred):
        try:
            resp = await client.request("POST", cls.token_url, [
                ("Content-Type", "application/x-www-form-urlencoded"), ("Accept", "application/json"),
                ("Authorization", cls.basic())], urllib.parse.urlencode(form).encode(), cred.proxy_url,
                timeout=15, stream_timeout=30)
            raw = await resp.read(1 << 20)
        except UpstreamError as e:
            raise RefreshError("iFlow token endpoint unreachable: %s" % e.message)
        data = json_or_none(raw) or {}
        if resp.status >= 300 or not data.get("access_token"):
            low = raw.decode("utf-8", "replace").lower()
            raise RefreshError("iFlow token endpoint answered %d: %s" % (resp.status, upstream_error_message(raw)[:200]),
                               revoked=any(x in low for x in _REVOKED))
        return data

    @classmethod
    async def user_info(cls, client, access_token, cred):
        try:
            resp = await client.request("GET", cls.userinfo_url + "?accessToken=" + urllib.parse.quote(access_token),
                                        [("Accept", "application/json")], None, cred.proxy_url, timeout=15,
                                        stream_timeout=30)
            data = json_or_none(await resp.read(1 << 20)) or {}
        except UpstreamError as e:
            raise RefreshError("iFlow user info unreachable: %s" % e.message)
        info = data.get("data") or {}
        if not data.get("success") or not info.get("apiKey"):
            raise RefreshError("iFlow user info gave no API key")
        return info

    @classmethod
    async def cookie_key(cls, client, cookie, name, cred, create=False):
        headers = [("Cookie", cookie), ("Accept", "application/json, text/plain, */*"),
                   ("User-Agent", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                                  "Chrome/91.0.4472.124 Safari/537.36"),
                   ("Accept-Language", "zh-CN,zh;q=0.9,en;q=0.8"), ("Origin", "https://platform.iflow.cn"),
                   ("Referer", "https://platform.iflow.cn/")]
        try:
            if create:
                resp = await client.request("POST", cls.apikey_url, headers + [("Content-Type", "application/json")],
                                            json_bytes({"name": name}), cred.proxy_url, timeout=15, stream_timeout=30)
            else:
                resp = await client.request("GET", cls.apikey_url, headers, None, cred.proxy_url, timeout=15,
                                            stream_timeout=30)
            data = json_or_none(await resp.read(1 << 20)) or {}
        except UpstreamError as e:
            raise RefreshError("iFlow platform unreachable: %s" % e.message)
        info = data.get("data") or {}
        key = info.get("apiKey") or info.get("apiKeyMask")
        if not data.get("success") or not key:
            raise RefreshError("iFlow platform refused the cookie: %s" % (data.get("message") or "no API key"),
                               revoked=create is False and resp.status in (401, 403))
        return info, key

    async def refresh(self, cred, client):
        meta = dict(cred.meta)
        now = time.time()
        if meta.get("refresh_token"):
            data = await self.oauth_token(client, {"grant_type": "refresh_token", "refresh_token": meta["refresh_token"],
                                                   "client_id": self.client_id, "client_secret": self.client_secret},
                                          cred)
            info = await self.user_info(client, data["access_token"], cred)
            meta.update({"access_token": data["access_token"], "refresh_token": data.get("refresh_token") or
                         meta["refresh_token"], "api_key": info["apiKey"],
                         "expired": rfc3339(now + float(data.get("expires_in") or 86400 * 2))})
        elif meta.get("cookie"):
            info, key = await self.cookie_key(client, meta["cookie"], meta.get("email") or "", cred, create=True)
            meta.update({"api_key": key, "expired": info.get("expireTime") or meta.get("expired")})
        else:
            raise RefreshError("iFlow credential has neither a refresh token nor a cookie", revoked=True)
        meta["last_refresh"] = rfc3339(now)
        return meta


class IFlowLogin(ClaudeLogin):
    """iFlow: authorization code (no PKCE) on port 11451, then the user-info exchange that yields the API key
    (providers.md §I.1a). `llm-mux login iflow --cookie '<platform.iflow.cn cookie>'` is the cookie path (§I.1b)."""

    cli_options = ("no-browser", "callback-port", "timeout", "cookie")

    provider_class = IFlowProvider
    authorize_url = "https://iflow.cn/oauth"
    redirect_uri = "http://localhost:11451/oauth2callback"
    callback_port = 11451

    def url(self):
        q = urllib.parse.urlencode({"loginMethod": "phone", "type": "phone", "redirect": self.redirect_uri,
                                    "state": self.state, "client_id": IFlowProvider.client_id})
        return self.authorize_url + "?" + q

    async def exchange(self, client, code):
        cred = Credential("login", "iflow", "login")
        try:
            data = await IFlowProvider.oauth_token(client, {
                "grant_type": "authorization_code", "code": code.partition("#")[0], "redirect_uri": self.redirect_uri,
                "client_id": IFlowProvider.client_id, "client_secret": IFlowProvider.client_secret}, cred)
            info = await IFlowProvider.user_info(client, data["access_token"], cred)
        except RefreshError as e:
            raise LoginError(e.message)
        account = info.get("email") or info.get("phone") or "iflow"
        now = time.time()
        meta = {"type": "iflow", "access_token": data["access_token"], "refresh_token": data.get("refresh_token") or "",
                "api_key": info["apiKey"], "email": account, "token_type": data.get("token_type") or "bearer",
                "scope": data.get("scope") or "", "cookie": "", "last_refresh": rfc3339(now),
                "expired": rfc3339(now + float(data.get("expires_in") or 86400 * 2))}
        return "iflow-%s.json" % account, meta

    async def cookie_login(self, client, cookie):
        """The cookie path (providers.md §I.1b): a platform.iflow.cn browser cookie yields the API key."""
        cookie = " ".join(cookie.split())
        if "BXAuth=" not in cookie:
            raise LoginError("the cookie must contain BXAuth= (copy it from platform.iflow.cn while logged in)")
        if not cookie.endswith(";"):
            cookie += ";"
        info, key = await IFlowProvider.cookie_key(client, cookie, "", Credential("login", "iflow", "login"))
        name = info.get("name") or "iflow"
        meta = {"type": "iflow", "api_key": key, "email": name, "expired": info.get("expireTime") or "",
                "cookie": cookie, "last_refresh": rfc3339(time.time())}
        return "iflow-%s.json" % re.sub(r"[^A-Za-z0-9@._-]", "_", name), meta


class CopilotProvider(OpenAICompatProvider):
    """GitHub Copilot (`type: github-copilot` files), providers.md §C: the stored GitHub token is exchanged for a
    short-lived Copilot API token (renewed 5 min before it expires); chat goes to the Copilot API with the editor
    and integration headers. The API base comes from the token answer: `endpoints.api` first (what llm-mux's
    structure and GitHub's answers carry), else a top-level `endpoint` (the reading of CLIProxyAPI PR #4978), else
    api.githubcopilot.com."""

    file_type = "github-copilot"
    display_name = "GitHub Copilot"
    login_name = "copilot"
    default_base_url = "https://api.githubcopilot.com"
    token_exchange_url = "https://api.github.com/copilot_internal/v2/token"
    user_info_url = "https://api.github.com/copilot_internal/user"
    token_field, base_url_field, expiry_field = "copilot_token", "copilot_api", "copilot_expires_at"
    refresh_lead = 300  # providers.md §1.2 (llm-mux's lead)
    default_models = ("gpt-4.1", "gpt-4o", "gpt-5", "gpt-5-mini", "gpt-5.1", "gpt-5.2", "claude-sonnet-4",
                      "claude-sonnet-4.5", "claude-haiku-4.5", "claude-opus-4.5", "gemini-2.5-pro", "gemini-3-flash",
                      "gemini-3-pro-preview", "grok-code-fast-1")


    def build(self, req, cred, model):
        body = self.codec.build_request(req, model)
        body["stream"] = bool(req.stream)
        headers = self.json_headers(cred.meta.get("copilot_token"), req.stream, ("User-Agent", "GithubCopilot/1.0"),
                                    ("Editor-Version", "vscode/1.104.1"), ("Editor-Plugin-Version", "copilot/1.300.0"),
                                    ("Openai-Intent", "conversation-panel"), ("Copilot-Integration-Id", "vscode-chat"),
                                    ("X-Request-Id", new_id("", 16)))
        return "POST", self.base_url(cred) + "/chat/completions", headers, req.encode(body)

    @classmethod
    async def exchange(cls, client, github_token, proxy=""):
        try:
            resp = await client.request("GET", cls.token_exchange_url, [
                ("Authorization", "token " + github_token), ("Accept", "application/json"),
                ("User-Agent", "GithubCopilot/1.0"), ("Editor-Version", "vscode/1.100.0"),
                ("Editor-Plugin-Version", "copilot/1.300.0")], None, proxy, timeout=15, stream_timeout=30)
            raw = await resp.read(1 << 20)
        except UpstreamError as e:
            raise RefreshError("Copilot token exchange unreachable: %s" % e.message)
        data = json_or_none(raw)
        if resp.status >= 300 or not isinstance(data, dict) or not data.get("token"):
            raise RefreshError("Copilot token exchange answered %d: %s" % (resp.status,
                                                                         upstream_error_message(raw)[:200]),
                               revoked=resp.status == 401)
        return data

    async def probe_quota(self, cred, client):
        """GitHub's Copilot user endpoint: the quota snapshots (chat, completions, premium requests) and reset."""
        data = await self._probe_json(client, cred, self.user_info_url, [
            ("Authorization", "token %s" % cred.meta.get("access_token")), ("Accept", "application/json"),
            ("User-Agent", "GithubCopilot/1.0"), ("Editor-Version", "vscode/1.100.0")])
        out = {}
        for name, snap in (data.get("quota_snapshots") or {}).items():
            if isinstance(snap, dict):
                entry = {k: snap[k] for k in ("entitlement", "remaining", "unlimited") if k in snap}
                if isinstance(snap.get("percent_remaining"), (int, float)):
                    entry["used_percent"] = round(100.0 - float(snap["percent_remaining"]), 2)
                if data.get("quota_reset_date"):
                    entry["resets_at"] = data["quota_reset_date"]
                out[name] = entry
        return out

    async def refresh(self, cred, client):
        data = await self.exchange(client, cred.meta.get("access_token") or "", cred.proxy_url)
        meta = dict(cred.meta)
        meta["copilot_token"] = data["token"]
        meta["copilot_expires_at"] = float(data.get("expires_at") or time.time() + 25 * 60)
        api = (data.get("endpoints") or {}).get("api") or data.get("endpoint")
        if api:
            meta["copilot_api"] = api
        return meta


class DeviceLogin(LoginFlow):
    """Shared polling rules of RFC 8628 device flows (GitHub, Qwen): pending, slow_down, or a final error."""

    cli_options = ("timeout",)

    kind = "device"

    @staticmethod
    async def poll_form(client, url, form, pending_statuses=(400,)):
        try:
            resp = await client.request("POST", url, [("Content-Type", "application/x-www-form-urlencoded"),
                                                      ("Accept", "application/json")],
                                        urllib.parse.urlencode(form).encode(), timeout=15, stream_timeout=30)
            raw = await resp.read(1 << 20)
        except UpstreamError as e:
            log.debug("device poll failed: %s", e.message)
            return None
        data = json_or_none(raw) or {}
        err = data.get("error")
        if err in ("authorization_pending",):
            return None
        if err == "slow_down":
            return "slow_down"
        if err or resp.status >= 300 or not data.get("access_token"):
            raise LoginError("device login failed: %s" % (data.get("error_description") or err or resp.status))
        return data


class CopilotLogin(DeviceLogin):
    """GitHub's device flow, then one Copilot token exchange to prove the account has Copilot (providers.md §C.1)."""

    provider_class = CopilotProvider
    client_id = "Iv1.b507a08c87ecfe98"
    code_url = "https://github.com/login/device/code"
    token_url = "https://github.com/login/oauth/access_token"
    user_url = "https://api.github.com/user"

    async def device_start(self, client):
        data = await Provider.post_token(client, self.code_url, {"client_id": self.client_id, "scope": "user:email"},
                                         Credential("login", self.provider_class.file_type, "login"), form=True)
        if not data.get("device_code") or not data.get("user_code"):
            raise LoginError("GitHub answered without a device code")
        return {"url": data.get("verification_uri") or "https://github.com/login/device", "code": data["user_code"],
                "interval": max(5, int(data.get("interval") or 5)), "expires_in": min(900, int(
                    data.get("expires_in") or 900)), "id": data["device_code"]}

    async def device_poll(self, client, started):
        return await self.poll_form(client, self.token_url, {
            "client_id": self.client_id, "device_code": started["id"],
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code"}, pending_statuses=(200,))

    async def device_finish(self, client, data):
        token = data["access_token"]
        try:
            resp = await client.request("GET", self.user_url, [("Authorization", "Bearer " + token),
                                                               ("Accept", "application/json"), ("User-Agent", USER_AGENT)],
                                        timeout=15, stream_timeout=30)
            user = json_or_none(await resp.read(1 << 20)) or {}
        except UpstreamError as e:
            raise LoginError("cannot read the GitHub user: %s" % e.message)
        login = user.get("login")
        if not login:
            raise LoginError("GitHub did not say who this token belongs to")
        try:
            await CopilotProvider.exchange(client, token)
        except RefreshError as e:
            raise LoginError("this GitHub account has no Copilot access (%s)" % e.message)
        meta = {"type": "github-copilot", "access_token": token, "token_type": data.get("token_type") or "bearer",
                "scope": data.get("scope") or "", "username": login, "email": login, "timestamp": int(time.time() * 1000)}
        return "github-copilot-%s.json" % login, meta


class QwenProvider(OpenAICompatProvider):
    """Qwen Code accounts (`type: qwen` files), providers.md §H: OpenAI chat at the account's `resource_url`."""

    file_type = login_name = "qwen"
    display_name = "Qwen"
    default_base_url = "https://portal.qwen.ai/v1"
    token_url = "https://chat.qwen.ai/api/v1/oauth2/token"
    client_id = "f0304373b74a44d2b584a3fb70ca9e56"
    refresh_lead = 3 * 3600  # providers.md §1.2 (llm-mux's lead)
    default_models = ("qwen3-coder-plus", "qwen3-coder-flash", "vision-model", "coder-model")
    user_agent = "QwenCode/0.14.2 (darwin; arm64)"

    def base_url(self, cred):
        url = (cred.meta.get("resource_url") or "").strip()
        if not url:
            return self.default_base_url
        if "://" not in url:
            url = "https://" + url
        url = url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    def build(self, req, cred, model):
        method, url, headers, body = OpenAICompatProvider.build(self, req, cred, model)
        headers = [(k, v) for k, v in headers if k not in ("Authorization", "User-Agent")] + [
            ("Authorization", "Bearer " + (cred.meta.get("access_token") or "")), ("User-Agent", self.user_agent),
            ("X-Dashscope-Cachecontrol", "enable"), ("X-Dashscope-Authtype", "qwen-oauth"),
            ("X-Dashscope-Useragent", self.user_agent)]
        return method, url, headers, body

    def classify_error(self, status, headers, body):
        failure = classify_failure(status, headers, body)
        low = (body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)).lower()
        if status in (403, 429) and any(s in low for s in ("insufficient_quota", "quota_exceeded", "quota exceeded")):
            failure.status, failure.type, failure.category, failure.retryable = 429, "rate_limit", "quota", True
        return failure

    async def refresh(self, cred, client):
        data = await self.post_token(client, self.token_url, {
            "grant_type": "refresh_token", "refresh_token": cred.meta.get("refresh_token") or "",
            "client_id": self.client_id}, cred, form=True, require="access_token")
        return qwen_meta(data, cred.meta)


def qwen_meta(data, old=None):
    meta = dict(old or {})
    now = time.time()
    meta.update({"type": "qwen", "access_token": data["access_token"], "last_refresh": rfc3339(now),
                 "expired": rfc3339(now + float(data.get("expires_in") or 3600))})
    for key in ("refresh_token", "resource_url"):
        if data.get(key):
            meta[key] = data[key]
    return meta


class QwenLogin(DeviceLogin):
    """Qwen Code: device flow with PKCE (providers.md §H.1). Qwen returns no e-mail: `--alias` names the account."""

    cli_options = ("timeout", "alias")

    provider_class = QwenProvider
    code_url = "https://chat.qwen.ai/api/v1/oauth2/device/code"
    alias = None

    def __init__(self):
        self.verifier = b64url(os.urandom(32))
        self.challenge = b64url(hashlib.sha256(self.verifier.encode("ascii")).digest())

    async def device_start(self, client):
        data = await Provider.post_token(client, self.code_url, {
            "client_id": QwenProvider.client_id, "scope": "openid profile email model.completion",
            "code_challenge": self.challenge, "code_challenge_method": "S256"},
            Credential("login", self.provider_class.file_type, "login"), form=True)
        if not data.get("device_code") or not data.get("user_code"):
            raise LoginError("Qwen answered without a device code")
        return {"url": data.get("verification_uri_complete") or data.get("verification_uri"),
                "code": data["user_code"], "interval": int(data.get("interval") or 2),
                "expires_in": int(data.get("expires_in") or 300), "id": data["device_code"]}

    async def device_poll(self, client, started):
        return await self.poll_form(client, QwenProvider.token_url, {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code", "client_id": QwenProvider.client_id,
            "device_code": started["id"], "code_verifier": self.verifier})

    async def device_finish(self, client, data):
        alias = self.alias or "qwen-" + hashlib.sha256((data.get("refresh_token") or "").encode()).hexdigest()[:8]
        meta = qwen_meta(data, {"email": alias})
        return "qwen-%s.json" % alias, meta


class ClineProvider(OpenAICompatProvider):
    """Cline accounts (`type: cline` files), providers.md §K: OpenAI chat at api.cline.bot with a `workos:` bearer;
    short-lived access tokens renewed from the exported refresh token."""

    file_type = login_name = "cline"
    display_name = "Cline"
    default_base_url = "https://api.cline.bot/api/v1"
    refresh_url = "https://api.cline.bot/api/v1/auth/refresh"
    refresh_lead = 120  # providers.md §1.2 (llm-mux's lead)
    default_models = ("minimax/minimax-m2", "x-ai/grok-code-fast-1")

    def build(self, req, cred, model):
        method, url, headers, body = OpenAICompatProvider.build(self, req, cred, model)
        headers = [(k, v) for k, v in headers if k != "Authorization"] + [
            ("Authorization", "Bearer workos:" + (cred.meta.get("access_token") or ""))]
        return method, url, headers, body

    async def refresh(self, cred, client):
        return await cline_exchange(client, cred.meta.get("refresh_token") or "", cred, cred.meta)


async def cline_exchange(client, refresh_token, cred, old=None):
    data = await Provider.post_token(client, ClineProvider.refresh_url, {"refreshToken": refresh_token,
                                                                         "grantType": "refresh_token"}, cred)
    inner = data.get("data") or {}
    if not data.get("success") or not inner.get("accessToken"):
        raise RefreshError("Cline refused the refresh token: %s" % upstream_error_message(json_bytes(data))[:200],
                           revoked=True)
    meta = dict(old or {})
    now = time.time()
    expires = parse_instant(inner.get("expiresAt")) or now + 600
    meta.update({"type": "cline", "access_token": inner["accessToken"],
                 "refresh_token": inner.get("refreshToken") or refresh_token, "last_refresh": rfc3339(now),
                 "expired": rfc3339(expires)})
    email = (inner.get("userInfo") or {}).get("email")
    if email:
        meta["email"] = email
    return meta


class ClineLogin(LoginFlow):
    """Cline: paste the refresh token from "Cline: Export Auth Token"; it is exchanged at once (providers.md §K.1)."""

    cli_options = ()

    kind = "token"
    provider_class = ClineProvider
    prompt = "Paste the refresh token from the Cline extension (Cline: Export Auth Token) and press Enter:"

    async def finish(self, client, pasted):
        meta = await cline_exchange(client, pasted.strip(), Credential("login", "cline", "login"))
        if not meta.get("email"):
            meta["email"] = "cline-" + hashlib.sha256(pasted.encode()).hexdigest()[:8]
        return "cline-%s.json" % meta["email"], meta


def codex_meta(data, old=None):
    """A Codex credential file from a token answer (the id_token carries e-mail and ChatGPT account id)."""
    meta = dict(old or {})
    meta["type"] = "codex"
    for key in ("id_token", "access_token", "refresh_token"):
        if data.get(key):
            meta[key] = data[key]
    claims = jwt_claims(meta.get("id_token") or "")
    auth = claims.get("https://api.openai.com/auth") or {}
    meta["account_id"] = auth.get("chatgpt_account_id") or meta.get("account_id") or ""
    meta["email"] = claims.get("email") or meta.get("email") or ""
    if auth.get("chatgpt_plan_type"):
        meta["plan_type"] = auth["chatgpt_plan_type"]
    now = time.time()
    meta["expired"] = rfc3339(now + float(data.get("expires_in") or 3600))
    meta["last_refresh"] = rfc3339(now)
    return meta


# -- RS256 JWTs for Vertex service accounts (RsaKey is in Small helpers) -----------------------------------------

def jwt_rs256(claims, key, kid=None):
    header = {"alg": "RS256", "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing_input = (b64url(json_bytes(header)) + "." + b64url(json_bytes(claims))).encode("ascii")
    return signing_input.decode("ascii") + "." + b64url(key.sign_sha256(signing_input))


# -- AI Studio through a browser relay (gateway.md §8) -------------------------------------------------------------

class RelayResponse(ResponseBody):
    """An upstream answer that arrives over a relay socket, read like an UpstreamResponse (ResponseBody): whole
    (`http_response`) or as chunks (`stream_chunk` ... `stream_end`)."""

    def __init__(self, status, headers, body=None, queue=None, idle_timeout=600.0, on_close=None):
        self.status, self.headers = status, headers
        self._body, self._queue, self._idle = body, queue, idle_timeout
        self._on_close = on_close
        self._next = None  # a message `wait` received, for `take`

    def close(self):
        """The call is over: answers still arriving for it are dropped."""
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def take(self):
        if self._body is not None:
            body, self._body, self.ended = self._body, None, True
            return body
        parts = []
        while not self.ended:
            item, self._next = self._next, None
            if item is None:
                if self._queue.empty():
                    break
                item = self._queue.get_nowait()
            kind, payload = item
            if kind == "stream_chunk":
                data = payload.get("data", "")
                parts.append(data.encode("utf-8") if isinstance(data, str) else bytes(data))
            elif kind in ("stream_end", "http_response"):
                self.ended = True
            elif kind == "error":
                raise UpstreamError("upstream", relay_error_text(payload))
        return b"".join(parts)

    async def wait(self):
        if self._next is None:
            try:
                self._next = await asyncio.wait_for(self._queue.get(), self._idle)
            except asyncio.TimeoutError:
                raise UpstreamError("timeout", "the relay sent nothing for %ds" % self._idle)


def relay_error_text(payload):
    return "%s (status=%s)" % (payload.get("error") or "relay error", payload.get("status") or 502)


def relay_headers(raw):
    items = []
    for name, value in (raw or {}).items() if isinstance(raw, dict) else ():
        for v in value if isinstance(value, list) else [value]:
            items.append((str(name).lower(), str(v)))
    return Headers(items)


class RelaySession:
    """One browser relay connected to `/v1/ws`: the gateway's upstream requests go to it as `http_request`
    messages and its answers come back by id — `http_response`, or `stream_start` / `stream_chunk` / `stream_end`,
    or `error` — as JSON text frames or llm-mux's binary frames (type byte 1 chunk, 2 end, 3 start; 2-byte id
    length; id; data). A slow reader holds the socket back (back-pressure), nothing is dropped; a closing socket
    fails whatever is pending."""

    BINARY = {1: "stream_chunk", 2: "stream_end", 3: "stream_start"}

    def __init__(self, ws, channel, idle_timeout=600.0, answer_timeout=120.0):
        self.ws, self.channel = ws, channel
        self.idle_timeout, self.answer_timeout = idle_timeout, answer_timeout
        self.pending = {}  # request id -> bounded queue of (kind, payload)
        self.closed = None
        self.authenticated = False

    async def request(self, method, url, headers, body, proxy_url="", head_timeout=None, total_timeout=None):
        """The HTTP client's `request`, over the socket: the page's first answer is awaited for head_timeout (or
        answer_timeout); proxy_url and total_timeout do not apply to a page."""
        if self.closed is not None:
            raise UpstreamError("connect", "the relay %s is gone (%s)" % (self.channel, self.closed))
        rid = new_id("", 16)
        queue = self.pending[rid] = asyncio.Queue(64)
        grouped = {}
        for k, v in headers:
            grouped.setdefault(k, []).append(v)
        try:
            await self.ws.send_json({"id": rid, "type": "http_request", "payload": {
                "method": method, "url": url, "headers": grouped,
                "body": (body or b"").decode("utf-8", "replace"), "sent_at": rfc3339(time.time())}})
            wait = head_timeout or self.answer_timeout
            kind, payload = await asyncio.wait_for(queue.get(), wait)
        except asyncio.TimeoutError:
            self.pending.pop(rid, None)
            raise UpstreamError("timeout", "the relay %s did not answer within %ds" % (self.channel, wait))
        except WebSocketClosed as e:
            self.pending.pop(rid, None)
            raise UpstreamError("connect", "the relay %s closed (%d)" % (self.channel, e.code))
        status = payload.get("status")
        status = int(status) if str(status).isdigit() and 100 <= int(status) < 600 else 200
        if kind == "error":
            self.pending.pop(rid, None)
            raise UpstreamError("upstream", relay_error_text(payload))
        if kind == "http_response":
            self.pending.pop(rid, None)
            body = payload.get("body", "")
            return RelayResponse(status, relay_headers(payload.get("headers")),
                                 body=body.encode("utf-8") if isinstance(body, str) else bytes(body or b""))
        forget = functools.partial(self.pending.pop, rid, None)
        if kind == "stream_start":
            return RelayResponse(status, relay_headers(payload.get("headers")), queue=queue,
                                 idle_timeout=self.idle_timeout, on_close=forget)
        queue.put_nowait((kind, payload))  # a chunk before any start: it is the body's first piece
        return RelayResponse(status, Headers(), queue=queue, idle_timeout=self.idle_timeout, on_close=forget)

    async def run(self):
        """Read the socket until it closes; hand each answer to its request."""
        try:
            while True:
                message = await self.ws.receive()
                if isinstance(message, bytes):
                    if len(message) < 3:
                        continue
                    kind = self.BINARY.get(message[0])
                    n = struct.unpack("!H", message[1:3])[0]
                    rid, data = message[3:3 + n].decode("utf-8", "replace"), message[3 + n:]
                    payload = {"data": data} if kind != "stream_start" else {}
                else:
                    try:
                        msg = json.loads(message)
                        kind, rid, payload = msg.get("type"), msg.get("id"), msg.get("payload") or {}
                    except (ValueError, AttributeError):
                        continue
                    if kind == "ping":
                        await self.ws.send_json({"id": rid, "type": "pong"})
                        continue
                queue = self.pending.get(rid)
                if queue is None or kind not in ("http_response", "stream_start", "stream_chunk", "stream_end",
                                                 "error") or not isinstance(payload, dict):
                    continue  # an answer for a request nobody waits for any more
                await queue.put((kind, payload))
                if kind in ("http_response", "stream_end", "error"):
                    self.pending.pop(rid, None)
        except WebSocketClosed as e:
            self.close("closed (%d%s)" % (e.code, ": " + e.reason if e.reason else ""))

    def close(self, why):
        if self.closed is None:
            self.closed = why
        for rid, queue in list(self.pending.items()):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(("error", {"error": "the relay %s" % why, "status": 502}))
        self.pending.clear()


class AIStudioProvider(GeminiProvider):
    """AI Studio through a browser relay (gateway.md §8): each page connected to `/v1/ws` is a temporary
    credential whose requests — the Gemini API's own — travel over that socket and are performed by the page with
    its signed-in session. The models are what the page's session lists (or the usual Gemini models)."""

    file_type = "aistudio"
    provider_id = "aistudio"
    display_name = "AI Studio (relay)"
    config_type = None

    def transport(self, cred):
        return cred.transport

    def _headers(self, cred):
        return [("Content-Type", "application/json")]

    def model_list(self, excluded=False):
        found = sorted({m for c in self.credentials for m in c.meta.get("models") or ()})
        if not found:
            return GeminiProvider.model_list(self, excluded)
        return [(m, m) for m in found
                if any(glob_match(p, m) for p in self.entry.excluded) == excluded]


class VertexProvider(GeminiProvider):
    """Vertex AI with a service-account credential file (`type: vertex`), providers.md §G: an RS256 JWT signed with
    the account's key is exchanged for an access token, renewed before it expires."""

    file_type = "vertex"
    display_name = "Vertex AI"
    embed_predict = True
    scope = "https://www.googleapis.com/auth/cloud-platform"
    default_token_uri = "https://oauth2.googleapis.com/token"
    refresh_lead = 300  # providers.md §1.2 (llm-mux's lead)

    def base_url(self, cred):
        loc = cred.meta.get("location") or "us-central1"
        return "https://aiplatform.googleapis.com" if loc == "global" else \
            "https://%s-aiplatform.googleapis.com" % loc

    def _url(self, cred, model, action):
        loc = cred.meta.get("location") or "us-central1"
        project = cred.meta.get("project_id") or (cred.meta.get("service_account") or {}).get("project_id")
        return "%s/v1/projects/%s/locations/%s/publishers/google/models/%s:%s" % (
            self.base_url(cred), project, loc, model, action)

    def _headers(self, cred):
        return self.json_headers(cred.meta.get("access_token"), False, ("User-Agent", USER_AGENT))

    async def refresh(self, cred, client):
        sa = cred.meta.get("service_account") or {}
        try:
            key = RsaKey.from_pem(sa.get("private_key") or "")
        except ValueError as e:
            raise RefreshError("service account private key unusable: %s" % e, revoked=True)
        token_uri = sa.get("token_uri") or self.default_token_uri
        now = int(time.time())
        assertion = jwt_rs256({"iss": sa.get("client_email"), "scope": self.scope, "aud": token_uri, "iat": now,
                               "exp": now + 3600}, key, sa.get("private_key_id"))
        data = await self.post_token(client, token_uri, {
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}, cred, form=True,
            require="access_token")
        meta = dict(cred.meta)
        meta["access_token"] = data["access_token"]
        meta["expired"] = rfc3339(now + float(data.get("expires_in") or 3600))
        meta["last_refresh"] = rfc3339(now)
        return meta


def import_cli_credentials(auth_dir, home=None, out=None, cfg=None, only=None):
    """Find the credentials official CLIs stored and convert them into auth-dir files. Returns (imported, skipped)."""
    out = out or sys.stdout
    home = home or os.path.expanduser("~")
    imported, skipped = [], []
    for provider_class in PROVIDERS.importers():
        label = provider_class.official_tool
        if only and label != only:
            continue
        try:
            source, name, meta = provider_class.import_official(home, auth_dir, cfg)
        except FileNotFoundError as e:
            skipped.append((label, "not found (looked for %s)" % e.filename if e.filename else "not found"))
            continue
        except (OSError, ValueError, KeyError, AttributeError) as e:
            skipped.append((label, str(e)))
            continue
        path = os.path.join(auth_dir, name)
        write_file_atomic(path, json.dumps(meta, indent=2) + "\n", 0o600)
        imported.append((label, source, path))
    for label, source, path in imported:
        print("imported %s credentials from %s -> %s" % (label, source, path), file=out)
    for label, why in skipped:
        print("skipped %s: %s" % (label, why), file=out)
    return imported, skipped


def vertex_credential(sa, location="us-central1", source="the service account"):
    """(file name, content) of the `vertex-<project>.json` credential for a Google service-account key, checked:
    type service_account, project, e-mail and a usable RSA private key."""
    if not isinstance(sa, dict) or sa.get("type") != "service_account":
        raise LoginError("%s is not a service-account key (its type is not 'service_account')" % source)
    for field in ("project_id", "client_email", "private_key"):
        if not sa.get(field) or not isinstance(sa[field], str):
            raise LoginError("%s has no %s" % (source, field))
    try:
        RsaKey.from_pem(sa["private_key"])
    except ValueError as e:
        raise LoginError("service account private key unusable: %s" % e)
    name = "vertex-%s.json" % re.sub(r"[^A-Za-z0-9_.-]", "_", sa["project_id"])
    return name, {"type": "vertex", "service_account": sa, "project_id": sa["project_id"],
                  "email": sa["client_email"], "location": location}


def import_vertex(sa_path, auth_dir, location="us-central1"):
    """Turn a Google service-account JSON key file into `vertex-<project>.json` in auth-dir (0600); the path."""
    try:
        with open(sa_path, "r", encoding="utf-8") as f:
            sa = json.load(f)
    except (OSError, ValueError) as e:
        raise LoginError("cannot read service account %s: %s" % (sa_path, e))
    name, meta = vertex_credential(sa, location, "service account %s" % sa_path)
    path = os.path.join(auth_dir, name)
    write_file_atomic(path, json.dumps(meta, indent=2) + "\n", 0o600)
    return path


# === 11. Routing ===
# Owns: the model registry (model id -> routes across providers and credentials), picking a credential, and the
# attempt loop that fails over to the next credential before the first byte reaches the client. It does not
# shape requests (providers) or speak client formats (codecs, handlers).

class Route:
    """One way to serve a client-visible model: a provider, the upstream model name, and its credentials."""

    __slots__ = ("provider", "model", "visible", "priority")

    def __init__(self, provider, model, visible, priority=1):
        self.provider, self.model, self.visible, self.priority = provider, model, visible, priority


class Registry:
    """Built from a Config snapshot; rebuilt (not mutated) when the config changes."""

    def __init__(self, cfg, previous=None, files=None):
        self.cfg = cfg
        self.providers = []
        self.routes = {}
        self.lower = {}
        self.excluded = set()  # models the exclusion rules took out (lower case)
        live = {c.id: c for p in previous.providers for c in p.credentials} if previous is not None else {}
        providers = []
        for entry in cfg.providers:
            cls = PROVIDERS.entries.get(entry.type)
            if cls is None:
                log.warning("provider %s (type %s) is not supported yet; skipped", entry.name, entry.type)
                continue
            providers.append(cls(entry))
        by_type = {}
        for cred in (files or {}).values():
            by_type.setdefault(cred.provider_id, []).append(cred)
        excluded = cfg.oauth_excluded_models
        for ptype, creds in sorted(by_type.items()):
            cls = PROVIDERS.files.get(ptype)
            if cls is None:
                log.warning("credential files of type %r are not supported yet: %s", ptype,
                            ", ".join(c.id for c in creds))
                continue
            provider = cls(synthetic_entry(ptype, excluded.get(ptype) or ()), creds)
            lead = cfg.refresh_lead.get(ptype) or next((v for k, v in cfg.refresh_lead.items()
                                                        if PROVIDERS.files.get(k) is cls), None)
            if lead is not None and cls.refresh_lead:
                provider.refresh_lead = lead
            providers.append(provider)
        for provider in providers:
            # A reload keeps each unchanged credential's live object: cooldowns and in-flight counts carry over,
            # and requests already running keep decrementing the object they hold.
            for i, cred in enumerate(provider.credentials):
                old = live.get(cred.id)
                if old is not None and old.disabled and old.disabled.startswith("rejected:"):
                    old.disabled = None  # the config or a credential file changed: worth asking again
                if old is not None and old is not cred:
                    old.label, old.headers, old.proxy_url = cred.label, cred.headers, cred.proxy_url
                    if cred.path is not None and cred.stamp != old.stamp:
                        old.meta, old.stamp, old.path = cred.meta, cred.stamp, cred.path
                        if old.disabled == "disabled in its file" or cred.disabled:
                            old.disabled = cred.disabled
                    provider.credentials[i] = old
            self.providers.append(provider)
            self.excluded.update(visible.lower() for visible, _ in provider.model_list(excluded=True))
            priority = cfg.routing["provider-priority"].get(provider.id) or \
                cfg.routing["provider-priority"].get(provider.name) or 1
            for visible, upstream in provider.model_list():
                self.routes.setdefault(visible, []).append(Route(provider, upstream, visible, max(1, priority)))
                self.lower.setdefault(visible.lower(), visible)
        for routes in self.routes.values():
            routes.sort(key=lambda r: r.priority)  # stable: equal priorities keep config order

    @staticmethod
    def display_name(provider):
        return provider.display_name or provider.name

    def resolve(self, model):
        """Routes for a requested model id, after `routing.aliases`; `provider://model` or `[Display] model`
        (as listed with show-provider-prefixes) pins the provider."""
        aliases = self.cfg.routing["aliases"]
        model = aliases.get(model, model)
        prefix = None
        if model.startswith("[") and "] " in model:
            prefix, _, model = model[1:].partition("] ")
            model = aliases.get(model, model)
        elif "://" in model:
            prefix, _, model = model.partition("://")
            model = aliases.get(model, model)
        routes = self.routes.get(model)
        if routes is None:
            key = self.lower.get(model.lower())
            routes = self.routes.get(key) if key else None
        if not routes:
            return []
        if prefix:
            p = prefix.lower()
            routes = [r for r in routes if p in (r.provider.id, r.provider.name.lower(),
                                                 self.display_name(r.provider).lower())]
        return routes

    def model_entries(self):
        """[(id, owner)] for model lists: one entry per id, or with show-provider-prefixes one per provider as
        `[Display] id` (which requests may use to pin that provider)."""
        if self.cfg.show_provider_prefixes:
            out = []
            for visible, routes in self.routes.items():
                seen = set()
                for r in routes:
                    name = self.display_name(r.provider)
                    if name not in seen:
                        seen.add(name)
                        out.append(("[%s] %s" % (name, visible), r.provider.name))
            return out
        return [(visible, routes[0].provider.name) for visible, routes in self.routes.items()]

    TIERS = ("haiku", "sonnet", "opus", "nano", "mini", "flash-lite", "flash", "pro", "codex")

    def family_stand_in(self, model):
        """A served model of the same family for an unknown one (the helper models tools ask for on their own,
        such as Claude Code's small fast model): same family and tier first, else the family's first model."""
        family = model.lower().split("-", 1)[0]
        if not family or family == model.lower() or model.lower() in self.excluded:
            return None  # an excluded model stays unserved
        same = [v for v in self.routes if v.lower().split("-", 1)[0] == family]
        tier = next((t for t in self.TIERS if t in model.lower()), None)
        matching = [v for v in same if tier and tier in v.lower()]
        return (matching or same or [None])[0]

    def preview_variants(self, model):
        """Models named `<model>-preview...`: where quota-exceeded.switch-preview-model sends a failing request."""
        return sorted(v for v in self.routes if v.startswith(model + "-preview"))


class CircuitBreaker:
    """Per-provider breaker (gateway.md §6.12): trips when a 10 s window holds at least 10 calls and either 5
    failures in a row or a failure ratio of 0.5; stays open 30 s; then lets 3 trial calls through."""

    WINDOW, MIN_CALLS, CONSECUTIVE, RATIO, OPEN_FOR, TRIALS = 10.0, 10, 5, 0.5, 30.0, 3

    def __init__(self, name):
        self.name = name
        self.state = "closed"
        self.window_start = 0.0
        self.calls = self.failures = self.consecutive = 0
        self.opened_at = 0.0
        self.trials = self.trial_ok = 0

    def _move(self, state, now):
        log.info("circuit breaker %s: %s -> %s", self.name, self.state, state)
        self.state = state
        if state == "open":
            self.opened_at = now
        elif state == "half-open":
            self.trials = self.trial_ok = 0
        else:
            self.window_start, self.calls, self.failures, self.consecutive = now, 0, 0, 0

    def ready(self, now):
        """Whether calls may go through now (or a half-open trial may start), without changing state."""
        if self.state == "open":
            return now - self.opened_at >= self.OPEN_FOR
        return self.state == "closed" or self.trials < self.TRIALS

    def allows(self, now):
        if self.state == "open" and now - self.opened_at >= self.OPEN_FOR:
            self._move("half-open", now)
        if self.state == "open":
            return False
        if self.state == "half-open":
            if self.trials >= self.TRIALS:
                return False
            self.trials += 1
        return True

    def record(self, ok, now):
        if self.state == "half-open":
            if not ok:
                self._move("open", now)
            else:
                self.trial_ok += 1
                if self.trial_ok >= self.TRIALS:
                    self._move("closed", now)
            return
        if self.state == "open":
            return
        if now - self.window_start >= self.WINDOW:
            self.window_start, self.calls, self.failures = now, 0, 0
        self.calls += 1
        if ok:
            self.consecutive = 0
        else:
            self.failures += 1
            self.consecutive += 1
            if self.calls >= self.MIN_CALLS and (self.consecutive >= self.CONSECUTIVE or
                                                 self.failures >= self.calls * self.RATIO):
                self._move("open", now)


class Router:
    """Chooses credentials and runs attempts until one succeeds (gateway.md §6.6–6.12, with the originals' quirks
    fixed: live state only, hints honoured in full, one source of truth for cooldowns)."""

    AFFINITY_TTL = 3600.0
    AFFINITY_MAX = 10000
    BACKOFF_BASE, BACKOFF_CAP = 0.05, 2.0

    def __init__(self, settings, client, refresher, clock=None):
        self.settings = settings  # () -> the current Config snapshot
        self.client, self.refresher = client, refresher
        self.clock = clock or Clock()
        self.breakers = {}
        self.affinity = {}  # conversation key -> (credential id, expires)
        self.observers = []  # callables told of every finished Call (usage records, metrics)
        self.warned = set()  # upstream URLs already reported as wrong

    def breaker(self, provider_id):
        b = self.breakers.get(provider_id)
        if b is None:
            b = self.breakers[provider_id] = CircuitBreaker(provider_id)
        return b

    # -- selection ------------------------------------------------------------------------------------------------
    def candidates(self, routes, now, skip=()):
        """Ready (route, credential) pairs, least busy and least recently used first; and the earliest time a
        cooling one recovers. Providers whose breaker is open are left out unless every provider's is."""
        ready = []
        earliest = None
        for order, route in enumerate(routes):
            for cred in route.provider.credentials:
                if cred.disabled:
                    continue
                until = cred.cooling_until(route.model)
                if until > now:
                    earliest = until if earliest is None else min(earliest, until)
                    continue
                if (cred.id, route.model) in skip:
                    continue
                ready.append((route.priority, cred.in_flight, round(cred.recent_usage(now), 3), order, len(ready),
                              route, cred))
        ready.sort(key=lambda t: t[:5])
        return [(t[5], t[6]) for t in ready], earliest

    def pick(self, req, pairs, now):
        key = req.conversation_key()
        bound = self.affinity.get(key)
        if bound is not None and bound[1] > now:
            best = pairs[0][0].priority
            for route, cred in pairs:
                if cred.id == bound[0] and route.priority == best:
                    return route, cred, key
        return pairs[0][0], pairs[0][1], key

    def bind(self, key, cred, now):
        if key is None:
            return
        if len(self.affinity) >= self.AFFINITY_MAX:
            for k in [k for k, (_, exp) in self.affinity.items() if exp <= now][:1000] or \
                    list(self.affinity)[:self.AFFINITY_MAX // 10]:
                self.affinity.pop(k, None)
        self.affinity[key] = (cred.id, now + self.AFFINITY_TTL)

    # -- outcomes -------------------------------------------------------------------------------------------------
    def settle(self, call):
        """What a finished Call teaches routing: the breaker's count, a cooldown for a failure, affinity and a
        clean slate for a success. Auxiliary calls (token counting) leave credential health alone."""
        if call.kind not in ("chat", "embed"):
            return
        now = self.clock.now()
        route, cred = call.route, call.cred
        breaker = self.breaker(route.provider.id)
        if call.outcome == "failed":
            failure = call.failure
            breaker.record(failure.category in ("user_error", "not_found", "local"), now)
            self.cool(cred, route.model, failure, now, route.provider)
        elif call.outcome != "refreshed" and call.status is not None and call.status < 300:
            # A client that goes away mid-stream is not the upstream's fault.
            breaker.record(True, now)
            self.succeeded(cred, route.model)
            self.bind(call.key, cred, now)

    def cool(self, cred, model, failure, now, provider=None):
        """Cooldown per credential x model (gateway.md §6.9), or for the whole credential when the quota is
        credential-scoped. Revoked tokens disable the credential and say so."""
        cred.last_error = "HTTP %d: %s" % (failure.status, failure.message)
        cat = failure.category
        if failure.disable or cat == "auth_error":
            # A revoked token, or a key (or freshly refreshed token) the upstream rejects: out of rotation until
            # its config entry or credential file changes, not a cooldown that reads as a rate limit.
            cred.disabled = "%s: %s" % ("revoked" if failure.disable else "rejected", failure.message[:300])
            log.error("credential %s disabled (%s): %s", cred.label, cat, failure.message[:300])
            failure.retryable = True  # the next credential may well work
            return
        if cat in ("user_error", "midstream", "config", "local"):
            return
        st = cred.states.get(model)
        if st is None:
            st = cred.states[model] = ModelState()
        if failure.status == 429 or (cat == "quota" and failure.status != 402):
            if self.settings().disable_cooling:
                return
            if failure.retry_after is not None:
                seconds = failure.retry_after
            else:
                seconds = min(1800.0, float(2 ** st.level))
                st.level += 1
        elif failure.status == 402:
            seconds = 1800.0
        elif failure.status == 404:
            seconds = 12 * 3600.0
        elif cat in ("transient", "permission"):
            seconds = failure.retry_after if failure.retry_after is not None else 60.0
        else:
            seconds = failure.retry_after if failure.retry_after is not None else 30.0
        until = now + seconds
        st.status, st.last_error = "cooling", failure.message
        if failure.scope == "credential":
            cred.until_all = max(cred.until_all, until)
        else:
            st.until = max(st.until, until)
        if provider is not None and provider.quota_groups and cat == "quota":
            family = re.split(r"[-_.]", model, 1)[0]
            for _, other in provider.model_list():
                if other != model and re.split(r"[-_.]", other, 1)[0] == family:
                    ost = cred.states.setdefault(other, ModelState())
                    ost.until, ost.status = max(ost.until, until), "cooling"
        if cred.project and cat == "quota" and provider is not None and \
                not self.settings().quota_exceeded["switch-project"]:
            # Without switch-project the account's other projects are not an escape from its quota.
            for sibling in provider.credentials:
                if sibling.path == cred.path and sibling is not cred:
                    sst = sibling.states.setdefault(model, ModelState())
                    sst.until, sst.status = max(sst.until, until), "cooling"
        log.info("credential %s cooling for %s on %s: %ds (%s %d)", cred.label,
                 "every model" if failure.scope == "credential" else model, failure.category, seconds,
                 "HTTP", failure.status)

    @staticmethod
    def succeeded(cred, model):
        st = cred.states.get(model)
        if st is not None:
            st.until, st.level, st.last_error, st.status = 0.0, 0, None, "active"
        cred.last_error = None

    # -- the attempt loop -----------------------------------------------------------------------------------------
    async def send(self, req, chain):
        """Send `req` along `chain` (the requested model's routes, then each fallback model's); returns the open
        Call whose upstream accepted it. Until then a failure moves to the next credential, waits for one that
        recovers within max-retry-interval, then moves to the fallback models; attempts per model are bounded by
        request-retry."""
        cfg = self.settings()
        state = {"last": None, "earliest": None, "refreshed": set()}
        for routes in chain:
            call = await self._send_on(req, routes, cfg, state)
            if call is not None:
                return call
        last = state["last"]
        if last is not None:
            raise self._error(last)
        if state["earliest"] is not None:
            wait = max(1, math.ceil(state["earliest"] - self.clock.now()))
            errors = sorted(set(c.last_error for routes in chain for r in routes for c in r.provider.credentials
                                if c.last_error))
            raise GatewayError(429, "all credentials for model '%s' are cooling down; retry in %ds%s"
                               % (req.model, wait, " (last error: %s)" % errors[-1][:300] if errors else ""),
                               "rate_limit", headers=[("Retry-After", str(wait))])
        rejected = [c for routes in chain for r in routes for c in r.provider.credentials
                    if c.disabled and c.disabled.startswith(("rejected:", "revoked:"))]
        if rejected:
            raise GatewayError(401, "no usable credential for model '%s': %s" % (
                req.model, "; ".join("%s is %s" % (c.label, c.disabled) for c in rejected[:3])), "authentication")
        raise GatewayError(503, "no credential can serve model '%s'" % req.model, "overloaded")

    async def _send_on(self, req, routes, cfg, state):
        """Attempts on one model's routes; the accepted Call, or None when they are used up."""
        attempts_left = max(0, cfg.request_retry) + 1
        tried = set()
        attempt = 0
        while attempts_left > 0:
            now = self.clock.now()
            pairs, earliest = self.candidates(routes, now, tried)
            usable = [(r, c) for r, c in pairs if self.breaker(r.provider.id).ready(now)] or pairs
            if not usable:
                if earliest is None:
                    return None
                state["earliest"] = earliest if state["earliest"] is None else min(state["earliest"], earliest)
                wait = earliest - now
                if not (0 < wait <= cfg.max_retry_interval and state["last"] is not None):
                    return None
                log.info("waiting %.1fs for a credential of %s to recover", wait, routes[0].visible)
                await self.clock.sleep(wait)
                tried.clear()
                continue
            route, cred, key = self.pick(req, usable, now)
            tried.add((cred.id, route.model))
            if route.provider.refresh_lead is not None and not await self.refresher.ensure(cred, route.provider):
                state["last"] = state["last"] or UpstreamFailure(401, "credential %s has no valid token: %s" % (
                    cred.label, cred.refresh_error or cred.disabled), "authentication", "auth_error")
                continue
            if not self.breaker(route.provider.id).allows(now) and len(usable) > 1:
                continue
            if attempt > 0:  # exponential backoff with full jitter between attempts
                await self.clock.sleep(random_uniform(0, min(self.BACKOFF_CAP, self.BACKOFF_BASE * 2 ** (attempt - 1))))
            attempt += 1
            attempts_left -= 1
            if req.kind == "embed":
                spec = route.provider.build_embeddings(req, cred, route.model)
            else:
                spec = route.provider.build(req, cred, route.model)
            call = Call(self, req, route, cred, req.kind, key)
            resp, failure = await call.send(spec)
            if resp is not None:
                return call
            if call.outcome is None and failure.status == 401 and route.provider.refresh_lead is not None \
                    and cred.id not in state["refreshed"]:
                # An expired or rotated token: refresh once, then try again without cooling the credential.
                state["refreshed"].add(cred.id)
                if await self.refresher.ensure(cred, route.provider, force=True):
                    call.finish("refreshed", failure)
                    tried.discard((cred.id, route.model))
                    attempts_left += 1
                    continue
                if not cred.disabled:  # the refresh failed for now (it backs off); not proof the account is gone
                    failure.category = "transient"
            call.fail(failure)
            state["last"] = failure
            if not failure.retryable:
                raise self._error(failure)
        return None

    async def count(self, req, routes):
        """The upstream's own token count from the first ready credentials whose provider has a counter, through
        a Call like any other upstream request; None when none answers."""
        pairs, _ = self.candidates(routes, self.clock.now())
        for route, cred in pairs[:2]:
            spec = route.provider.count_tokens(req, cred, route.model)
            if spec is None:
                continue
            call = Call(self, req, route, cred, "count")
            resp, failure = await call.send(spec)
            if resp is None:
                call.fail(failure)
                continue
            try:
                n = route.provider.parse_count(await resp.json())
            except UpstreamError as e:
                call.fail(call.network_failure(e))
                continue
            call.finish("ok")
            if isinstance(n, int):
                return n
        return None

    def path_not_found(self, provider, url, failure):
        """A 404 that does not name the model: the upstream has no such route, so every model would fail the same
        way. A configuration error (502 naming the URL and the answer, a warning the first time), not a cooldown."""
        where = redact_url(url.split("?")[0])
        if where not in self.warned:
            self.warned.add(where)
            log.warning("upstream %s has no route %s (HTTP 404: %s): check base-url for this provider (type %s)",
                        provider.name, where, failure.message[:200], provider.entry.type)
        return UpstreamFailure(502, "upstream %s answered 404 for %s (%s): the URL is wrong; check the provider's "
                               "base-url" % (provider.name, where, failure.message[:300]), "upstream", "config",
                               retryable=False)

    def _error(self, failure):
        headers = []
        if failure.retry_after is not None and failure.status in (429, 503, 529):
            headers.append(("Retry-After", str(max(1, math.ceil(failure.retry_after)))))
        return GatewayError(failure.status, failure.message, failure.type, headers=headers, code=failure.code)


class Call:
    """One upstream attempt, owned from open to finish. Routing opens it (credential chosen, in-flight counted);
    `send` performs the request; the answer is read through `answer()`, or as a stream (`stream()`, then `pull()`
    and `wait()` in turn, or `events()`); `finish(outcome)` runs exactly once however the attempt ends, and is the
    only place where the breaker, cooldowns, affinity, in-flight counts and the call observers (usage, metrics)
    learn how it went.
    outcome: ok | failed (with `failure`) | refreshed (a 401 that a token refresh answers; the retry is a new
    call) | client_gone (the client left before the end) | cancelled."""

    __slots__ = ("router", "req", "route", "cred", "kind", "key", "started", "first_byte", "ended", "status",
                 "outcome", "failure", "usage", "response", "method", "url", "wall_started", "_decoder", "_split",
                 "_split_end", "_broken")

    def __init__(self, router, req, route, cred, kind="chat", key=None):
        self.router, self.req, self.route, self.cred, self.kind, self.key = router, req, route, cred, kind, key
        self.started, self.wall_started = router.clock.now(), router.clock.wall()
        self.first_byte = self.ended = self.status = self.outcome = self.failure = None
        self.usage = self.response = self.method = self.url = self._broken = None
        cred.in_flight += 1
        cred.note_use(self.started)

    @property
    def provider(self):
        return self.route.provider

    def finish(self, outcome, failure=None):
        """Record how the attempt ended; later calls are ignored (returns False)."""
        if self.outcome is not None:
            return False
        self.outcome, self.failure, self.ended = outcome, failure, self.router.clock.now()
        self.cred.in_flight -= 1
        if self.response is not None:
            self.response.close()
        self.router.settle(self)
        for observe in self.router.observers:
            try:
                observe(self)
            except Exception:
                log.exception("call observer failed")
        return True

    def fail(self, failure):
        self.finish("failed", failure)
        return failure

    def network_failure(self, e):
        """An UpstreamError (connect, TLS, timeout, broken framing) as a classified failure."""
        if e.kind == "local":  # the gateway's own shortage: no cooldown, no breaker count for the upstream
            return UpstreamFailure(503, e.message, "server", "local")
        timeout = e.kind == "timeout"
        return UpstreamFailure(504 if timeout else 502, "upstream %s: %s" % (self.provider.name, e.message),
                               "timeout" if timeout else "upstream", "transient" if timeout else "unknown")

    async def send(self, spec):
        """Send (method, url, headers, body). Returns (response, None) for a 2xx answer, else (None, failure). A
        network failure finishes the call; an HTTP error answer leaves the verdict (refresh or fail) to routing."""
        method, url, headers, body = spec
        self.method, self.url = method, redact_url(url)
        try:
            transport = self.provider.transport(self.cred) or self.router.client
            # A stream's headers come at once from a healthy upstream: a stuck one fails over after
            # response-header-timeout. A whole answer may take minutes to start: it has stream-timeout.
            settings = self.router.settings()
            head = settings.response_header_timeout if (
                getattr(self.req, "stream", False) or self.provider.stream_only) else None
            resp = await transport.request(method, url, headers, body, self.cred.proxy_url,
                                           head_timeout=head or None, total_timeout=settings.request_timeout or None)
            self.status, self.first_byte = resp.status, self.router.clock.now()
            windows = self.provider.quota_windows(resp.headers)
            if windows:
                seen = rfc3339(self.router.clock.wall())
                for window in windows.values():
                    window["reported_at"] = seen
                self.cred.quota.update(windows)
            if resp.status < 300:
                self.response = resp
                return resp, None
            err_body = await resp.read(1 << 20)
        except UpstreamError as e:
            log.warning("upstream %s failed for %s via %s: %s", self.provider.name, self.route.model,
                        self.cred.label, e.message)
            return None, self.fail(self.network_failure(e))
        except BaseException:
            self.finish("cancelled")
            raise
        failure = self.provider.classify_error(resp.status, resp.headers, err_body)
        failure.message = self.cred.mask(failure.message)
        if resp.status == 404 and self.route.model.lower() not in failure.message.lower():
            failure = self.router.path_not_found(self.provider, url, failure)
        if failure.category in ("auth_error", "auth_revoked"):
            failure.message = "upstream %s rejected credential %s (HTTP %d): %s" % (
                self.provider.name, self.cred.label, resp.status, failure.message)
        log.warning("upstream %s answered %d for %s via %s: %s", self.provider.name, resp.status, self.route.model,
                    self.cred.label, failure.message[:200])
        return None, failure

    async def answer(self):
        """The whole answer as a ChatResponse (a stream-only upstream's stream collected); finishes the call."""
        if self.provider.stream_only:
            collector = ResponseCollector()
            async for ev in self.events():
                collector.add(ev)
            if collector.error is not None:
                raise collector.error.error()
            return collector.result()
        try:
            data = await self.response.json()
            answer = self._guard(self.provider.parse_embeddings if self.kind == "embed" else
                                 self.provider.parse_response, data)
        except UpstreamError as e:
            failure = self.fail(self.network_failure(e))
            raise GatewayError(failure.status, failure.message, failure.type)
        except BaseException:
            self.finish("cancelled")
            raise
        self.usage = answer.usage
        self.finish("ok")
        return answer

    def stream(self, relay=None):
        """Read the answer as a stream of IR events: `pull` what has arrived, `wait` for more. With a FrameRelay as
        the decoder, the events are relayed frames plus what the relay decoded."""
        if relay is not None:
            self._decoder, self._split, self._split_end = relay, relay.split, relay.split_end
        else:
            parser = self.provider.frame_parser(self.response)
            self._decoder, self._split, self._split_end = self.provider.stream_decoder(self.req), parser.feed, \
                parser.finish

    def pull(self):
        """The IR events in what the upstream has sent since the last pull ([] when nothing has come), ending at the
        first error event (a network failure becomes one). Never waits. Once the stream is over the call is finished
        (`outcome` set) before its last events are handed on: routing learns of a failure before the client sees
        it."""
        out = []
        if self.outcome is not None:
            if self._broken is not None:  # the failure `wait` met, once
                out.append(self._broken)
                self._broken = None
            return out
        resp = self.response
        try:
            data = resp.take()
            if data:
                self._decode(out, self._split(data))
            if resp.ended and self.outcome is None:
                self._decode(out, self._split_end(), final=True)
                self.finish("ok")
        except UpstreamError as e:
            failure = self.fail(self.network_failure(e))
            out.append(ErrorEvent(failure.status, failure.message, failure.type))
        return out

    async def wait(self):
        """Wait until more of the stream arrives. A network failure (silence past stream-timeout, a broken
        connection) finishes the call, and the next `pull` returns its error event."""
        try:
            await self.response.wait()
        except UpstreamError as e:
            failure = self.fail(self.network_failure(e))
            self._broken = ErrorEvent(failure.status, failure.message, failure.type)

    def listen(self, callback):
        """Have `callback` called as the stream's bytes arrive (ResponseBody.listen); None stops it."""
        if self.response is not None:
            self.response.listen(callback)

    async def events(self, relay=None):
        """The stream's IR events one by one (`stream`, then `pull` and `wait` in turn). Closing the generator
        early (the client went away) finishes the call as client_gone."""
        self.stream(relay)
        outcome = "client_gone"
        try:
            while True:
                for ev in self.pull():
                    yield ev
                if self.outcome is not None:
                    return
                await self.wait()
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.finish(outcome)

    def _decode(self, out, frames, final=False):
        """Append the events of upstream `frames` (and with `final`, the decoder's last ones) to `out`, up to the
        first that ends the call (an error event)."""
        decoder = self._decoder
        for event, data in frames:
            if self._add(out, self._guard(decoder.feed, event, data)):
                return
        if final:
            self._add(out, self._guard(decoder.close))

    def _add(self, out, events):
        """Append `events` to `out`, noting usage and errors; True once one of them ended the call."""
        for ev in events:
            out.append(ev)
            if ev.kind in ("usage", "error"):
                self._note(ev)
                if self.outcome is not None:
                    return True
        return False

    def _guard(self, fn, *args):
        """An upstream event of the wrong shape (`{"choices": [null]}`) is the upstream's protocol error — an
        error event for the client, never a crash or a silently cut stream."""
        try:
            out = fn(*args)
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError) as e:
            raise UpstreamError("protocol", "malformed event or answer (%s: %s)" % (type(e).__name__, str(e)[:160]))
        problem = ir_problem(out)
        if problem:
            raise UpstreamError("protocol", "malformed event or answer (%s)" % problem)
        return out

    def _note(self, ev):
        if ev.kind == "usage":
            self.usage = ev.usage
        else:  # a stream that dies mid-way is classified like the same error before the first byte ...
            failure = self.provider.classify_error(ev.status, EMPTY_HEADERS, {"error": {"message": ev.message,
                                                                                       "code": ev.code}})
            if failure.category != "quota":
                # The upstream accepted this credential and request: the breaker counts the death (repeated
                # ones open it), but one broken stream does not cool the model. A quota keeps its own reset.
                failure.category, failure.disable = "midstream", False
            self.fail(failure)


class Refresher:
    """Keeps OAuth tokens fresh (gateway.md §6.14, providers.md §1.2): a background sweep refreshes each token
    `refresh_lead` before it expires; requests refresh an expired token on demand, and a 401 forces one refresh.
    Single flight per credential inside the process (one task that every caller awaits) and across processes
    sharing the auth dir (an exclusive lock file beside the credential; a token another process already rotated
    is adopted, not refreshed again). The new token is written atomically, mode 0600, before it is used, so a
    rotated refresh token is never lost. Failures back off (1 min, then 5 min) and show in the status."""

    SWEEP = 30.0
    BACKGROUND = 10.0  # a token still valid this long is used while its refresh runs, never waited for

    def __init__(self, client, providers, clock=None, tokens=None):
        self.client = client
        self.providers = providers  # () -> the providers to keep fresh
        self.clock = clock or Clock()
        self.tokens = tokens or FileTokens()  # where tokens are locked, re-read and saved (file or shared store)
        self.task = None
        self.refresh_calls = self.refresh_failures = 0

    def due(self, cred, margin, provider, now=None):
        exp = provider.token_expiry(cred)
        if exp is None:
            return not provider.has_token(cred)
        return exp - (now or self.clock.wall()) <= margin

    async def ensure(self, cred, provider, force=False, margin=60.0):
        """True when the credential holds a usable token, refreshing it first when it expires within `margin`
        seconds (or, with `force`, because the upstream just rejected it). A token that is still good for a while
        is used at once and refreshed in the background (a refresh may wait on another replica's lock)."""
        if provider.refresh_lead is None or cred.path is None:
            return True
        task = cred.refresh_task
        if task is None or task.done():
            if not force and not self.due(cred, margin, provider):
                return True
            if self.clock.wall() < cred.refresh_after and not force:
                return not self.due(cred, 0, provider)
            task = cred.refresh_task = asyncio.ensure_future(self._refresh(cred, provider, force, margin))
        if not force and not self.due(cred, self.BACKGROUND, provider):
            return True
        return await asyncio.shield(task)

    async def _refresh(self, cred, provider, force, margin):
        held = None
        rejected = cred.meta.get("access_token")  # what we held when we decided to refresh
        try:
            try:
                held = await self.tokens.lock(cred)
            except LockTimeout as e:
                raise RefreshError(str(e))
            # Decide again under the lock, from the stored copy: another process or replica (or a login, or our
            # own watcher) may have rotated the token while we waited; then it is adopted, not refreshed again.
            meta, stamp = await self.tokens.read(cred)
            if meta.get("access_token") != rejected:
                cred.meta, cred.stamp = meta, stamp
                if not self.due(cred, 60 if force else margin, provider):
                    await self.tokens.adopted(cred, meta)
                    log.info("credential %s: adopted the token refreshed by another process", cred.label)
                    return True
            elif not force and not self.due(cred, margin, provider):
                return True
            self.refresh_calls += 1
            new = await provider.refresh(cred, self.client)
            await self.tokens.save(cred, new)
            cred.refresh_error, cred.refresh_after, cred.last_refresh = None, 0.0, self.clock.wall()
            exp = provider.token_expiry(cred)
            log.info("credential %s refreshed; token valid until %s", cred.label, rfc3339(exp) if exp else "?")
            return True
        except RefreshError as e:
            cred.refresh_error = e.message
            self.refresh_failures += 1
            if e.revoked:
                cred.disabled = "revoked: " + e.message[:200]
                log.error("credential %s disabled: refresh token revoked (%s)", cred.label, e.message[:300])
                return False
            backoff = 300.0 if cred.refresh_after else 60.0
            if e.retry_after is not None:
                backoff = min(300.0, max(5.0, e.retry_after))
            cred.refresh_after = self.clock.wall() + backoff
            log.warning("credential %s: refresh failed (%s); next try in %ds", cred.label, e.message[:300], backoff)
            return not self.due(cred, 0, provider)
        finally:
            await self.tokens.unlock(held)

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self._sweep())

    def stop(self):
        if self.task is not None:
            self.task.cancel()

    async def _sweep(self):
        while True:
            try:
                now = self.clock.wall()
                for provider in self.providers():
                    if provider.refresh_lead is None:
                        continue
                    for cred in provider.credentials:
                        if cred.disabled or cred.path is None or now < cred.refresh_after:
                            continue
                        if self.due(cred, provider.refresh_lead, provider, now):
                            asyncio.ensure_future(self.ensure(cred, provider, margin=provider.refresh_lead))
            except Exception:
                log.exception("refresh sweep failed")
            await self.clock.sleep(self.SWEEP)


def random_uniform(a, b):
    return a + (b - a) * (int.from_bytes(os.urandom(4), "big") / 4294967296.0)


# === 12. Usage and metrics ===
# Owns: turning each finished Call into one usage record and keeping it (the SQLite store with its versioned
# schema, the writer thread fed by a bounded queue, retention) and into Prometheus metrics; per-key limits; and,
# with `request-log`, one file per client request and its answer. The event loop only enqueues and counts;
# nothing here decides routing.

_TEXT, _INT = "TEXT NOT NULL DEFAULT ''", "INTEGER NOT NULL DEFAULT 0"
LLM_MUX_COLUMNS = tuple(  # llm-mux's own usage_records (gateway.md §7.2)
    [(c, _TEXT) for c in ("provider", "model", "api_key", "auth_id")] +
    [("auth_index", _INT), ("source", _TEXT), ("requested_at", "TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP"),
     ("failed", "BOOLEAN NOT NULL DEFAULT 0")] +
    [(c, _INT) for c in ("input_tokens", "output_tokens", "reasoning_tokens", "cached_tokens", "total_tokens",
                         "audio_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                         "tool_use_prompt_tokens")])
USAGE_COLUMNS = LLM_MUX_COLUMNS + tuple(  # and ours
    [(c, _TEXT) for c in ("request_id", "client_format", "model_requested", "error_class", "record_id")] +
    [("kind", "TEXT NOT NULL DEFAULT 'chat'"), ("outcome", "TEXT NOT NULL DEFAULT 'ok'"), ("status", _INT),
     ("stream", "BOOLEAN NOT NULL DEFAULT 0"), ("latency_ms", "REAL NOT NULL DEFAULT 0"), ("ttft_ms", "REAL"),
     ("uncached_input_tokens", _INT), ("cost_usd", "REAL"), ("subscription_value_usd", "REAL")])
USAGE_SCHEMA_VERSION = 1


def usage_cost(record, prices):
    """USD for a record's tokens at `prices` (per million: input, output, cache read, cache write)."""
    p_in, p_out, p_read, p_write = prices
    return round((record["uncached_input_tokens"] * p_in + record["output_tokens"] * p_out +
                  record["cache_read_input_tokens"] * p_read + record["cache_creation_input_tokens"] * p_write)
                 / 1e6, 8)


def usage_record(call, wall_started, pricing=()):
    """One usage record (a dict of USAGE_COLUMNS) for a finished Call. Tokens are normalised whatever the formats:
    input counts cache reads and writes (IR convention), `uncached_input_tokens` leaves them out."""
    u = call.usage or Usage()
    failure = call.failure
    record = {
        "provider": call.provider.id, "model": call.route.model or "unknown", "api_key": call.req.client_key,
        "auth_id": call.cred.id, "source": call.cred.label,
        "requested_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(wall_started)),
        "failed": call.outcome != "ok", "input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
        "reasoning_tokens": u.reasoning_tokens, "cached_tokens": u.cached_tokens, "total_tokens": u.total_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens, "cache_read_input_tokens": u.cached_tokens,
        "uncached_input_tokens": max(0, u.input_tokens - u.cached_tokens - u.cache_write_tokens),
        "request_id": call.req.request_id, "client_format": call.req.client_format or "",
        "record_id": new_id("", 12),  # unique: a record drained twice from the spool is stored once
        "model_requested": call.req.model, "kind": call.kind, "outcome": call.outcome,
        "error_class": failure.category if failure is not None else "", "status": call.status or 0,
        "stream": bool(call.req.stream or call.provider.stream_only),
        "latency_ms": round((call.ended - call.started) * 1000, 3),
        "ttft_ms": round((call.first_byte - call.started) * 1000, 3) if call.first_byte is not None else None,
        "auth_index": 0, "audio_tokens": 0, "tool_use_prompt_tokens": 0,  # every column: one itemgetter call
        "cost_usd": None, "subscription_value_usd": 0,  # no price known (else set below)
    }
    prices = price_of(record["model"], pricing)
    if prices is not None:  # an OAuth account (a subscription) spends nothing per token: record what it saved
        cost = usage_cost(record, prices)
        subscription = call.cred.path is not None
        record["cost_usd"], record["subscription_value_usd"] = (0.0, cost) if subscription else (cost, 0.0)
    return record


class UsageStore:
    """The SQLite usage database (WAL). Opening creates or migrates the schema; a database written by a newer
    llm-mux is opened read-only for this process (never written), and says so."""

    def __init__(self, path):
        import sqlite3
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30, check_same_thread=False)
        if os.stat(path).st_size == 0:
            os.chmod(path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a process crash loses nothing committed, no fsync per batch
        self.writable = self._migrate()

    def _migrate(self):
        db = self.db
        db.execute("CREATE TABLE IF NOT EXISTS llm_mux_schema (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM llm_mux_schema").fetchone()
        if row is not None and row[0] > USAGE_SCHEMA_VERSION:
            log.error("usage database %s has schema version %d, newer than this llm-mux (%d): not writing to it",
                      self.path, row[0], USAGE_SCHEMA_VERSION)
            return False
        db.execute("CREATE TABLE IF NOT EXISTS usage_records (id INTEGER PRIMARY KEY AUTOINCREMENT, %s)"
                   % ", ".join("%s %s" % c for c in LLM_MUX_COLUMNS))
        have = {r[1] for r in db.execute("PRAGMA table_info(usage_records)")}
        for name, decl in USAGE_COLUMNS:  # llm-mux's own migrations and ours: add what is missing
            if name not in have:
                db.execute("ALTER TABLE usage_records ADD COLUMN %s %s" % (name, decl))
        for index, cols in (("idx_usage_requested_at", "requested_at"), ("idx_usage_api_key", "api_key"),
                            ("idx_usage_provider_model", "provider, model")):
            db.execute("CREATE INDEX IF NOT EXISTS %s ON usage_records(%s)" % (index, cols))
        db.execute("DELETE FROM llm_mux_schema")
        db.execute("INSERT INTO llm_mux_schema (version) VALUES (?)", (USAGE_SCHEMA_VERSION,))
        db.commit()
        return True

    def write(self, records):
        """Rows go in as multi-row INSERTs of up to 999 parameters (SQLite's oldest limit), not a statement per
        row: the writer thread holds the GIL, and hands it back and forth with the event loop, far less often."""
        names, rows = usage_rows(records)
        per_statement = 999 // len(names)
        head = "INSERT INTO usage_records (%s) VALUES " % ", ".join(names)
        row_marks = "(%s)" % ", ".join("?" * len(names))
        with self.db:
            for i in range(0, len(rows), per_statement):
                chunk = rows[i:i + per_statement]
                self.db.execute(head + ", ".join([row_marks] * len(chunk)), [v for row in chunk for v in row])

    def prune(self, days):
        with self.db:
            self.db.execute("DELETE FROM usage_records WHERE requested_at < datetime('now', ?)", ("-%d days" % days,))

    def count(self):
        return self.db.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0]

    def close(self):
        self.db.close()


USAGE_NAMES = [c for c, _ in USAGE_COLUMNS]
_usage_row = operator.itemgetter(*USAGE_NAMES)


def usage_rows(records):
    """Records as tuples in USAGE_COLUMNS order (missing numbers 0, missing optional figures NULL)."""
    rows = []
    for r in records:
        try:
            rows.append(_usage_row(r))  # a record from usage_record has every column
        except KeyError:
            rows.append(tuple(r.get(n, None if n in ("ttft_ms", "cost_usd") else 0) for n in USAGE_NAMES))
    return USAGE_NAMES, rows


def pg_column(decl):
    """A USAGE_COLUMNS declaration (SQLite) in PostgreSQL's types (times with their zone, as llm-mux's own
    PostgreSQL backend has them, so a database it wrote is used as is)."""
    return (decl.replace("INTEGER", "BIGINT").replace("REAL", "DOUBLE PRECISION")
            .replace("BOOLEAN NOT NULL DEFAULT 0", "BOOLEAN NOT NULL DEFAULT false")
            .replace("TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP", "TIMESTAMPTZ NOT NULL DEFAULT now()"))


class PgUsageStore:
    """Usage records in PostgreSQL (`usage.postgres-url`), the same table and columns as the SQLite store. It
    lives in the usage writer thread, which runs its own event loop for it: the gateway's loop never waits on
    the database. Several replicas may write one database; the schema is created or migrated under an advisory
    lock, and `record_id` is unique, so a batch written twice (a spool drained after a crash) is stored once."""

    MIGRATION_LOCK = 0x6c6d7578  # "lmux"

    def __init__(self, url):
        self.url, self.path = url, redact_url(url)
        self.loop = asyncio.new_event_loop()
        self.pool = PgPool(url, size=1)
        self.writable = True
        self.migrated = False

    def _run(self, coro):
        return self.loop.run_until_complete(coro)

    async def _migrate(self):
        async with self.pool.transaction() as db:
            await db.execute("SELECT pg_advisory_xact_lock($1)", self.MIGRATION_LOCK)
            await db.execute("CREATE TABLE IF NOT EXISTS llm_mux_schema (version INTEGER NOT NULL)")
            version = await db.fetchval("SELECT max(version) FROM llm_mux_schema")
            if version is not None and version > USAGE_SCHEMA_VERSION:
                self.writable = False
                log.error("usage database %s has schema version %d, newer than this llm-mux (%d): not writing to it",
                          self.path, version, USAGE_SCHEMA_VERSION)
                return
            await db.execute("CREATE TABLE IF NOT EXISTS usage_records (id BIGSERIAL PRIMARY KEY)")
            for name, decl in USAGE_COLUMNS:
                await db.execute("ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS %s %s" % (name, pg_column(decl)))
            for index, cols in (("idx_usage_requested_at", "requested_at"), ("idx_usage_api_key", "api_key"),
                                ("idx_usage_provider_model", "provider, model")):
                await db.execute("CREATE INDEX IF NOT EXISTS %s ON usage_records(%s)" % (index, cols))
            await db.execute("CREATE UNIQUE INDEX IF NOT EXISTS idx_usage_record_id ON usage_records(record_id) "
                             "WHERE record_id <> ''")
            await db.execute("DELETE FROM llm_mux_schema")
            await db.execute("INSERT INTO llm_mux_schema (version) VALUES ($1)", USAGE_SCHEMA_VERSION)
        self.migrated = True

    async def _write(self, records):
        if not self.migrated:
            await self._migrate()
        if not self.writable:
            return
        names, rows = usage_rows(records)
        per = len(names)
        async with self.pool.transaction() as db:
            for i in range(0, len(rows), 200):  # 200 rows x ~35 columns: well under the 65535 parameter limit
                chunk = rows[i:i + 200]
                marks = ", ".join("(%s)" % ", ".join("$%d" % (j * per + k + 1) for k in range(per))
                                  for j in range(len(chunk)))
                await db.execute("INSERT INTO usage_records (%s) VALUES %s ON CONFLICT (record_id) WHERE "
                                 "record_id <> '' DO NOTHING" % (", ".join(names), marks),
                                 *[v for row in chunk for v in row])

    def write(self, records):
        self._run(self._write(records))

    def prune(self, days):
        self._run(self.pool.execute("DELETE FROM usage_records WHERE requested_at < now() at time zone 'utc' - "
                                    "make_interval(days => $1)", days))

    def count(self):
        return self._run(self.pool.fetchval("SELECT count(*) FROM usage_records"))

    def close(self):
        self.pool.close()
        self.loop.close()


class SpoolingStore:
    """A primary store that may be unreachable (PostgreSQL) with a bounded local SQLite spool: a batch the
    primary refuses goes to the spool; once the primary answers again the spool drains into it, oldest first.
    Past `max_records` spooled records, new ones are dropped and counted (the disk stays bounded)."""

    def __init__(self, primary, spool, max_records):
        self.primary, self.spool, self.max_records = primary, spool, max_records
        self.path, self.writable = primary.path, True
        self.spooled = self.spool.count()
        self.dropped = 0
        self.down_since = None

    def write(self, records):
        try:
            if self.spooled:
                self.drain()
            self.primary.write(records)
        except (PgError, OSError) as e:
            self._spool(records, e)
            return
        if self.down_since is not None:
            log.info("usage database %s is back; the spool is drained", self.path)
            self.down_since = None

    def _spool(self, records, error):
        if self.down_since is None:
            self.down_since = time.time()
            log.warning("usage database %s unreachable (%s): spooling records to %s", self.path, error,
                        self.spool.path)
        room = max(0, self.max_records - self.spooled)
        if room < len(records):
            self.dropped += len(records) - room
            log.warning("usage spool %s is full (%d records): %d records dropped", self.spool.path,
                        self.max_records, len(records) - room)
        if room:
            self.spool.write(records[:room])
            self.spooled += min(room, len(records))

    def drain(self):
        """Move spooled records to the primary, a batch at a time; stops at the first failure (raised)."""
        names = [c for c, _ in USAGE_COLUMNS]
        while self.spooled:
            rows = self.spool.db.execute("SELECT id, %s FROM usage_records ORDER BY id LIMIT 500"
                                         % ", ".join(names)).fetchall()
            if not rows:
                self.spooled = 0
                return
            records = [dict(zip(names, row[1:])) for row in rows]
            for r in records:
                r["failed"], r["stream"] = bool(r["failed"]), bool(r["stream"])
            self.primary.write(records)
            with self.spool.db:
                self.spool.db.execute("DELETE FROM usage_records WHERE id <= ?", (rows[-1][0],))
            self.spooled = max(0, self.spooled - len(rows))

    def prune(self, days):
        self.primary.prune(days)

    def count(self):
        return self.primary.count()

    def close(self):
        try:
            if self.spooled:
                self.drain()
        except (PgError, OSError):
            pass  # still down: the spool keeps them for the next start
        self.primary.close()
        self.spool.close()


class UsageWriter:
    """One writer thread fed by a bounded queue: records are written in batched transactions at least every
    `flush_interval` seconds (a kill -9 loses at most that much), drained completely by `close()` (SIGTERM and
    Ctrl-C lose nothing). A full queue or a failing disk costs records, never requests; each is logged once and
    counted (`dropped`, `errors`)."""

    def __init__(self, store, flush_interval=1.0, batch_size=100, retention_days=30, queue_size=10000):
        import threading
        self.store, self.flush_interval, self.batch_size = store, flush_interval, batch_size
        self.retention_days, self.queue_size = retention_days, queue_size
        # A deque, not a queue.Queue: append and popleft are atomic, and the writer polls on its interval, so no
        # lock and no condition are taken per record on the event loop.
        self.queue = collections.deque()
        self.dropped = self.errors = self.written = 0
        self.warned = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llm-mux-usage", daemon=True)
        self.thread.start()

    def record(self, record):
        """Enqueue one usage record (the event loop never touches the disk)."""
        if not self.store.writable:
            return
        if len(self.queue) < self.queue_size:
            self.queue.append(record)
        else:  # the writer cannot keep up
            self.dropped += 1
            self._warn("full", "usage queue full: dropping records until the writer catches up")

    def _warn(self, key, message, *args):
        if key not in self.warned:
            self.warned.add(key)
            log.warning(message, *args)

    def _run(self):
        """Wake once per flush interval (not once per record: a wake-up per record would take the GIL from the
        event loop thousands of times a second), write what has queued in batches, prune once a day."""
        next_prune = time.monotonic() + 60
        while True:
            stopping = self.stopping.wait(self.flush_interval)
            batch = []
            while True:
                try:
                    batch.append(self.queue.popleft())
                except IndexError:
                    break
                if len(batch) >= self.batch_size:
                    self._write(batch)
                    batch = []
            self._write(batch)
            if not batch and getattr(self.store, "spooled", 0):
                self._drain()
            if stopping:
                return
            if self.retention_days > 0 and time.monotonic() > next_prune:
                next_prune = time.monotonic() + 24 * 3600
                self._guarded(self.store.prune, self.retention_days)

    def _write(self, batch):
        if batch and self._guarded(self.store.write, batch):
            self.written += len(batch)

    def _drain(self):
        try:
            self.store.drain()
        except (PgError, OSError):
            pass  # still unreachable: the spool keeps the records and the next quiet interval tries again

    @property
    def lost(self):
        """Records dropped: queue full, disk errors, or a full spool."""
        return self.dropped + self.errors + getattr(self.store, "dropped", 0)

    def _guarded(self, fn, *args):
        try:
            fn(*args)
            return True
        except Exception as e:  # a full or read-only disk: logged once, counted, requests keep flowing
            self.errors += 1
            self._warn(type(e).__name__, "usage database %s: %s (records are being lost)", self.store.path, e)
            return False

    def close(self, timeout=30):
        """Write everything queued, then stop."""
        self.stopping.set()
        self.thread.join(timeout)
        self.store.close()


class Metrics:
    """Prometheus metrics. Counters and histograms are fed by finished Calls (`observe`, a Call observer); gauges
    (in flight, credential health, breakers, the process) are read from the Gateway at scrape time. Label values
    are bounded: provider ids, served model names, client formats, outcomes, error classes, client-key names and
    credential ids; never a secret or a request id."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
    TOKEN_KINDS = (("input_uncached", "uncached_input_tokens"), ("cache_read", "cache_read_input_tokens"),
                   ("cache_write", "cache_creation_input_tokens"), ("output", "output_tokens"),
                   ("reasoning", "reasoning_tokens"))

    def __init__(self):
        self.requests = {}  # (provider, model, format, outcome, key) -> count
        self.errors = {}  # (provider, error class) -> count
        self.tokens = {}  # (provider, model, kind) -> count
        self.durations = {}  # (provider, model) -> [bucket counts..., sum, count]
        self.ttfb = {}
        self.cost = {}  # (provider, model, kind: api | subscription) -> USD

    def observe(self, r):
        """Count one usage record."""
        labels = (r["provider"], r["model"], r["client_format"], r["outcome"], r["api_key"])
        self.requests[labels] = self.requests.get(labels, 0) + 1
        if r["error_class"]:
            key = (r["provider"], r["error_class"])
            self.errors[key] = self.errors.get(key, 0) + 1
        for kind, column in self.TOKEN_KINDS:
            if r[column]:
                key = (r["provider"], r["model"], kind)
                self.tokens[key] = self.tokens.get(key, 0) + r[column]
        for kind, column in (("api", "cost_usd"), ("subscription", "subscription_value_usd")):
            if r.get(column):
                key = (r["provider"], r["model"], kind)
                self.cost[key] = round(self.cost.get(key, 0.0) + r[column], 8)
        self._histogram(self.durations, (r["provider"], r["model"]), r["latency_ms"] / 1000.0)
        if r["ttft_ms"] is not None:
            self._histogram(self.ttfb, (r["provider"], r["model"]), r["ttft_ms"] / 1000.0)

    def _histogram(self, table, labels, value):
        """Counts per bucket (made cumulative when rendered), then sum and count."""
        h = table.get(labels)
        if h is None:
            h = table[labels] = [0] * (len(self.BUCKETS) + 2)
        i = bisect.bisect_left(self.BUCKETS, value)
        if i < len(self.BUCKETS):
            h[i] += 1
        h[-2] += value
        h[-1] += 1

    @staticmethod
    def _labels(names, values):
        def esc(v):
            return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return "{%s}" % ",".join('%s="%s"' % (n, esc(v)) for n, v in zip(names, values))

    def _family(self, out, name, kind, help, names, table):
        out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, help, name, kind))
        for values, value in sorted(table.items()):
            out.append("%s%s %s\n" % (name, self._labels(names, values), value))

    def _histograms(self, out, name, help, table):
        out.append("# HELP %s %s\n# TYPE %s histogram\n" % (name, help, name))
        for labels, h in sorted(table.items()):
            running = 0
            for i, bound in enumerate(self.BUCKETS):
                running += h[i]
                le = self._labels(("provider", "model", "le"), labels + (bound,))
                out.append("%s_bucket%s %d\n" % (name, le, running))
            inf = self._labels(("provider", "model", "le"), labels + ("+Inf",))
            out.append("%s_bucket%s %d\n" % (name, inf, h[-1]))
            out.append("%s_sum%s %.6f\n%s_count%s %d\n" % (name, self._labels(("provider", "model"), labels), h[-2],
                                                             name, self._labels(("provider", "model"), labels), h[-1]))

    def render(self, gw):
        """The text exposition format (version 0.0.4)."""
        out = []
        self._family(out, "llm_mux_requests_total", "counter", "Upstream attempts by how they ended.",
                     ("provider", "model", "format", "outcome", "key"), self.requests)
        self._family(out, "llm_mux_upstream_errors_total", "counter", "Failed upstream attempts by error class.",
                     ("provider", "class"), self.errors)
        self._family(out, "llm_mux_tokens_total", "counter", "Tokens by kind (input without cache, cache read, "
                     "cache write, output, reasoning).", ("provider", "model", "kind"), self.tokens)
        self._family(out, "llm_mux_cost_usd_total", "counter", "USD at list prices: spent through API keys (api) or "
                     "saved by subscriptions (subscription).", ("provider", "model", "kind"), self.cost)
        self._histograms(out, "llm_mux_request_duration_seconds", "Upstream attempt duration.", self.durations)
        self._histograms(out, "llm_mux_time_to_first_byte_seconds", "Time to the upstream's first byte.", self.ttfb)
        now = gw.clock.now()
        in_flight, usable, cooling, disabled = {}, {}, {}, {}
        for p in gw.registry.providers:
            in_flight[(p.id,)] = in_flight.get((p.id,), 0) + sum(c.in_flight for c in p.credentials)
            for c in p.credentials:
                left = max([0.0] + [c.cooling_until(m) - now for _, m in p.model_list()])
                usable[(p.id, c.id)] = int(not c.disabled and left <= 0)
                cooling[(p.id, c.id)] = round(left, 3)
                disabled[(p.id, c.id)] = int(bool(c.disabled))
        self._family(out, "llm_mux_in_flight_requests", "gauge", "Upstream attempts under way.", ("provider",),
                     in_flight)
        creds = ("provider", "credential")
        self._family(out, "llm_mux_credential_usable", "gauge", "1 when the credential can take requests.", creds,
                     usable)
        self._family(out, "llm_mux_credential_cooling_seconds", "gauge", "Seconds until the credential's longest "
                     "cooldown ends.", creds, cooling)
        self._family(out, "llm_mux_credential_disabled", "gauge", "1 when revoked or rejected upstream.", creds,
                     disabled)
        self._family(out, "llm_mux_circuit_breaker_open", "gauge", "1 while the provider's breaker is open or "
                     "half-open.", ("provider",), {(k,): int(b.state != "closed")
                                                   for k, b in gw.router.breakers.items()})
        self._family(out, "llm_mux_refreshes_total", "counter", "Token refreshes attempted.", (),
                     {(): gw.refresher.refresh_calls})
        self._family(out, "llm_mux_refresh_failures_total", "counter", "Token refreshes that failed.", (),
                     {(): gw.refresher.refresh_failures})
        writer = gw.usage
        self._family(out, "llm_mux_usage_records_lost_total", "counter", "Usage records dropped (queue full or "
                     "disk error).", (), {(): writer.lost if writer else 0})
        self._family(out, "llm_mux_process_resident_memory_bytes", "gauge", "Resident memory.", (),
                     {(): process_rss()})
        self._family(out, "llm_mux_process_cpu_seconds_total", "counter", "CPU time used.", (),
                     {(): round(sum(os.times()[:2]), 3)})
        self._family(out, "llm_mux_process_open_fds", "gauge", "Open file descriptors.", (), {(): open_fds()})
        self._family(out, "llm_mux_fd_exhaustion_total", "counter", "Connections not accepted for want of file "
                     "descriptors.", (), {(): getattr(gw, "fd_exhaustions", 0)})
        return "".join(out).replace("{}", "")


def process_rss():
    """Resident memory in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def open_fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def parse_day(text, end=False):
    """Epoch seconds from `YYYY-MM-DD` (its start, or with `end` its last second) or RFC 3339."""
    if re.match(r"\d{4}-\d{2}-\d{2}\Z", text or ""):
        import calendar
        start = calendar.timegm(time.strptime(text, "%Y-%m-%d"))
        return start + 86399 if end else start
    when = parse_instant(text)
    if when is None:
        raise ValueError("%r is neither YYYY-MM-DD nor RFC 3339" % text)
    return when


class UsageReader:
    """Read-only queries on the usage records in SQLite or PostgreSQL, for reports and the start-up rebuild of
    client-key spend; used from a worker thread (a PostgreSQL reader runs its own short-lived event loop). SQL is
    written once with `?` placeholders; the dialect differences are the time expressions (day, hour, epoch second)."""

    def __init__(self, target):
        self.kind, self.where = target  # ("sqlite", path) or ("postgres", url)
        self.db = self.loop = None

    def __enter__(self):
        if self.kind == "sqlite":
            import sqlite3
            self.db = sqlite3.connect("file:%s?mode=ro" % self.where, uri=True, timeout=30)
            self.day, self.hour = "substr(requested_at, 1, 10)", "CAST(substr(requested_at, 12, 2) AS INTEGER)"
            self.epoch = "CAST(strftime('%s', requested_at) AS INTEGER)"  # the stored text is UTC
        else:
            self.loop = asyncio.new_event_loop()
            self.db = self.loop.run_until_complete(PgConnection(pg_settings(self.where)).connect())
            self.day, self.hour = "to_char(requested_at, 'YYYY-MM-DD')", "CAST(EXTRACT(HOUR FROM requested_at) AS INTEGER)"
            self.epoch = "CAST(FLOOR(EXTRACT(EPOCH FROM requested_at)) AS BIGINT)"
        return self

    def rows(self, sql, args=()):
        if self.kind == "sqlite":
            return self.db.execute(sql, args).fetchall()
        numbered = iter(range(1, len(args) + 1))
        return self.loop.run_until_complete(self.db.fetch(re.sub(r"\?", lambda m: "$%d" % next(numbered), sql), *args))

    def __exit__(self, *exc):
        self.db.close()
        if self.loop is not None:
            self.loop.close()


def usage_report(target, since, until, filters):
    """The usage view of gateway.md §7.4, every figure scoped to [since, until] and the filters (provider,
    model, key, credential), with cost. Runs in a worker thread on its own read-only connection."""
    where = ["requested_at >= ?", "requested_at <= ?"]
    args = [time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) for t in (since, until)]
    for name, column in (("provider", "provider"), ("model", "model"), ("key", "api_key"),
                         ("credential", "auth_id")):
        if name in filters:
            where.append("%s = ?" % column)
            args.append(filters[name])
    sums = ("COUNT(*), SUM(CASE WHEN failed THEN 0 ELSE 1 END), SUM(CASE WHEN failed THEN 1 ELSE 0 END), " +
            ", ".join("CAST(SUM(%s) AS BIGINT)" % c for c in ("total_tokens", "input_tokens", "output_tokens",
                                                              "reasoning_tokens")) +
            ", SUM(COALESCE(cost_usd, 0)), SUM(COALESCE(subscription_value_usd, 0))")
    with UsageReader(target) as db:
        def grouped(keys):
            sql = "SELECT %s, %s FROM usage_records WHERE %s GROUP BY %s ORDER BY COUNT(*) DESC" % (
                keys, sums, " AND ".join(where), keys)
            return db.rows(sql, args)

        def figures(row):
            n, ok, failed, total, inp, out, reasoning, cost, saved = [x or 0 for x in row]
            return {"requests": n, "success": int(ok), "failure": int(failed), "cost_usd": round(cost, 6),
                    "subscription_value_usd": round(saved, 6),
                    "tokens": {"total": total, "input": inp, "output": out, "reasoning": reasoning}}
        (total,) = db.rows("SELECT %s FROM usage_records WHERE %s" % (sums, " AND ".join(where)), args)
        s = figures(total)
        report = {"summary": {"total_requests": s["requests"], "success_count": s["success"],
                              "failure_count": s["failure"], "tokens": s["tokens"], "cost_usd": s["cost_usd"],
                              "subscription_value_usd": s["subscription_value_usd"]},
                  "by_provider": {}, "by_account": {}, "by_model": {}, "by_key": {}}
        for row in grouped("provider"):
            report["by_provider"][row[0] or "unknown"] = figures(row[1:])
        for row in grouped("provider, auth_id"):
            report["by_account"]["%s:%s" % row[:2]] = dict(figures(row[2:]), provider=row[0], auth_id=row[1])
        for row in grouped("model, provider"):  # keyed by model and provider: both survive when they differ
            report["by_model"]["%s (%s)" % row[:2]] = dict(figures(row[2:]), model=row[0], provider=row[1])
        for row in grouped("api_key"):
            report["by_key"][row[0] or "(none)"] = figures(row[1:])
        days = grouped(db.day)
        hours = grouped(db.hour)

    def point(r):
        return {"requests": r[1], "failures": int(r[3] or 0), "tokens": r[4] or 0, "cost_usd": round(r[8] or 0, 6)}
    report["timeline"] = {"by_day": sorted([dict(point(r), day=r[0]) for r in days], key=lambda d: d["day"]),
                          "by_hour": sorted([dict(point(r), hour=r[0]) for r in hours], key=lambda h: h["hour"])}
    return report


class KeyLimits:
    """Per client key: requests and tokens in the last minute and spend over the budget period, checked before any
    upstream call (gateway clock). Fed by every usage record; rebuilt from the usage store at start, so a restart
    resets nothing. Spend is the API-equivalent cost: API-key spend plus what subscriptions saved. Counts are kept
    per second (a bucket [second, amounts...]), so memory follows the seconds with traffic, not the requests: a
    day's budget at 2,000 requests a second is at most 86,400 buckets, not 170 million entries."""

    def __init__(self, clock):
        self.clock = clock
        self.requests = {}  # key name -> deque of [second, requests] (last minute)
        self.spent = {}  # key name -> deque of [second, tokens, usd] (the longer of a minute and the budget period)

    @staticmethod
    def _window(table, name, horizon, now):
        """`name`'s buckets, those `horizon` seconds old or older dropped."""
        buckets = table.get(name)
        if buckets is None:
            buckets = table[name] = collections.deque()
        while buckets and buckets[0][0] <= now - horizon:
            buckets.popleft()
        return buckets

    @staticmethod
    def _add(buckets, when, *amounts):
        second = int(when)
        last = buckets[-1] if buckets else None
        if last is not None and last[0] == second:
            for i, amount in enumerate(amounts, 1):
                last[i] += amount
        else:
            buckets.append([second] + list(amounts))

    def admit(self, cfg, req):
        key = next((k for k in cfg.client_keys if k.name == req.client_key), None)
        if key is None:
            return
        if not key.allows(req.model):
            raise GatewayError(403, "API key %s may not use model '%s'" % (key.name, req.model), "permission", "model")
        now = self.clock.wall()
        times = self._window(self.requests, key.name, 60, now)
        if key.rpm is not None and sum(b[1] for b in times) >= key.rpm:
            self.limited(key, "%d requests per minute" % key.rpm, times[0][0] + 60 - now)
        spent = self._window(self.spent, key.name, max(60.0, key.budget_seconds), now)
        if key.tpm is not None:
            minute = [b for b in spent if b[0] > now - 60]
            if minute and sum(b[1] for b in minute) >= key.tpm:
                self.limited(key, "%d tokens per minute" % key.tpm, minute[0][0] + 60 - now)
        if key.max_budget is not None:
            window = [b for b in spent if b[0] > now - key.budget_seconds]
            if window and sum(b[2] for b in window) >= key.max_budget:
                self.limited(key, "a budget of %s USD per %s" % (key.max_budget, format_seconds(key.budget_seconds)),
                              window[0][0] + key.budget_seconds - now)
        self._add(times, now, 1)

    def snapshot(self, key):
        """What a key has used: requests and tokens in the last minute, spend in its budget period."""
        now = self.clock.wall()
        spent = list(self.spent.get(key.name, ()))
        return {"requests_last_minute": sum(b[1] for b in self.requests.get(key.name, ()) if b[0] > now - 60),
                "tokens_last_minute": sum(b[1] for b in spent if b[0] > now - 60),
                "spent_usd": round(sum(b[2] for b in spent if b[0] > now - key.budget_seconds), 6)}

    def note_request(self, name):
        """A request admitted elsewhere (the shared store): counted here too, for this replica's own view."""
        now = self.clock.wall()
        self._add(self._window(self.requests, name, 60, now), now, 1)

    @staticmethod
    def limited(key, what, wait):
        wait = max(1, math.ceil(wait))
        raise GatewayError(429, "API key %s is over its limit of %s; retry in %ds" % (key.name, what, wait),
                           "rate_limit", headers=[("Retry-After", str(wait))])

    def account(self, record, when):
        """Count a usage record's tokens and cost against its key."""
        if record["api_key"]:
            usd = (record.get("cost_usd") or 0) + (record.get("subscription_value_usd") or 0)
            self._add(self.spent.setdefault(record["api_key"], collections.deque()), when, record["total_tokens"],
                      usd)

    def rebuild(self, target, horizon):
        """Spend and tokens of the last `horizon` seconds from the usage store (at start, before serving), summed
        per key and second by the database: a row per second with traffic, not one per request, and no time parsed
        in Python (a million records in a 30-day budget took 8 s to read one by one)."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - horizon))
        with UsageReader(target) as db:
            rows = db.rows("SELECT api_key, %s AS at_second, SUM(total_tokens), SUM(COALESCE(cost_usd, 0) + "
                           "COALESCE(subscription_value_usd, 0)), COUNT(*) FROM usage_records WHERE api_key != '' "
                           "AND requested_at >= ? GROUP BY api_key, at_second ORDER BY at_second" % db.epoch,
                           (since,))
        now = time.time()
        for name, second, tokens, usd, count in rows:
            second = int(second)
            self._add(self.spent.setdefault(name, collections.deque()), second, int(tokens or 0), float(usd or 0))
            if second > now - 60:  # attempts of the last minute count towards rpm (close to the requests)
                self._add(self.requests.setdefault(name, collections.deque()), second, int(count))


class RequestLog:
    """`request-log: true`: each client request and its answer written to `<logs>/requests/`, one file per
    request: method, path, headers with secrets masked, bodies cut at 64 KiB (streams: the first 64 KiB of what
    was sent), status and time. Failed ones (status 400 and up, or a stream that ended in an error event) are
    named `error-*.log`, which the management API lists and serves; the newest `KEEP` files of each kind stay."""

    MAX_BODY = 64 << 10
    KEEP = 500

    def __init__(self, cfg):
        self.cfg = cfg  # () -> the running Config
        self.written = 0

    def directory(self):
        return os.path.join(logs_dir(self.cfg()), "requests")

    def capture(self, req, resp, started):
        """Log `resp` to `req` once it is complete (a stream: when it ends); returns the response to send."""
        if isinstance(resp, StreamResponse):
            kept = bytearray()  # the first MAX_BODY bytes sent

            def keep(piece):
                if len(kept) < self.MAX_BODY:
                    kept.extend(piece[:self.MAX_BODY - len(kept)])
                return piece

            def written():
                body = bytes(kept)
                failed = b"event: error" in body or b'"type": "error"' in body or b'"type":"error"' in body
                self.write(req, resp.status, resp.headers, body, started, failed)
            resp.filters.append(keep)
            resp.after.append(written)
            return resp
        self.write(req, resp.status, resp.headers, resp.body or b"", started)
        return resp

    def write(self, req, status, headers, body, started, failed=False):
        try:
            self._write(req, status, headers, body, started, failed or status >= 400)
        except OSError as e:  # a full disk costs the log, never the request
            log.warning("request log not written: %s", e.strerror or e)

    def _write(self, req, status, headers, body, started, failed):
        d = self.directory()
        os.makedirs(d, mode=0o700, exist_ok=True)
        now = time.time()
        name = "%s%s-%s.log" % ("error-" if failed else "request-",
                                time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)), new_id("", 6))
        lines = ["%s %s" % (req.method, redact_url(req.target) if req.target else req.path),
                 "peer: %s" % req.peer, "time: %s (%.0f ms)" % (rfc3339(now), (now - started) * 1000), "",
                 "-- request headers"]
        lines += ["%s: %s" % (k, v) for k, v in redact_headers(req.headers.items)]
        lines += ["", "-- request body (%d bytes)" % len(req.body or b""), self._body(req.body or b""), "",
                  "-- response %d" % status]
        lines += ["%s: %s" % (k, v) for k, v in redact_headers(headers)]
        lines += ["", "-- response body", self._body(body), ""]
        write_file_atomic(os.path.join(d, name), "\n".join(lines), 0o600)
        self.written += 1
        if self.written % 50 == 1:
            self.rotate(d)

    def _body(self, body):
        text = bytes(body[:self.MAX_BODY]).decode("utf-8", "replace")
        text = re.sub(r'("(?:api[_-]?key|access_token|refresh_token|id_token|token|secret|password)"\s*:\s*")'
                      r'([^"]{3,})(")', lambda m: m.group(1) + mask_secret(m.group(2)) + m.group(3), text, flags=re.I)
        return text + ("\n[... %d more bytes]" % (len(body) - self.MAX_BODY) if len(body) > self.MAX_BODY else "")

    def rotate(self, d):
        """Keep the newest KEEP request logs and the newest KEEP error logs."""
        for prefix in ("request-", "error-"):
            names = sorted(n for n in os.listdir(d) if n.startswith(prefix) and n.endswith(".log"))
            for old in names[:-self.KEEP]:
                try:
                    os.unlink(os.path.join(d, old))
                except OSError:
                    pass


def usage_target(cfg):
    """Where usage goes: ("postgres", URL) for `usage.postgres-url` or a postgres:// `usage.dsn`; ("sqlite", PATH)
    for `usage.dsn: sqlite://PATH`, `usage.database-path`, or `usage.db` beside the auth dir. None when off."""
    usage = cfg.usage
    if not usage["enabled"]:
        return None
    dsn = usage["dsn"].strip()
    if usage["postgres-url"].strip():
        return ("postgres", usage["postgres-url"].strip())
    if dsn.startswith(("postgres://", "postgresql://")):
        return ("postgres", dsn)
    if dsn:
        if not dsn.startswith("sqlite://"):
            log.warning("usage.dsn %s: use sqlite://PATH or postgres://...; usage is not recorded", redact_url(dsn))
            return None
        return ("sqlite", expand_path(dsn[len("sqlite://"):]))
    if usage["database-path"]:
        return ("sqlite", expand_path(usage["database-path"]))
    return ("sqlite", os.path.join(state_dir(cfg), "usage.db"))


def state_dir(cfg):
    """The directory beside the auth dir where local state lives (usage.db, the usage spool)."""
    return os.path.dirname(cfg.auth_dir.rstrip("/")) or "."


def open_usage_store(cfg, target):
    """The store for `target`: SQLite, or PostgreSQL with its local spool."""
    if target[0] == "sqlite":
        return UsageStore(target[1])
    spool = expand_path(cfg.usage["spool-path"]) if cfg.usage["spool-path"] else \
        os.path.join(state_dir(cfg), "usage-spool.db")
    return SpoolingStore(PgUsageStore(target[1]), UsageStore(spool), max(0, cfg.usage["spool-max-records"]))


# === 13. Gateway ===
# Owns: the assembled runtime: the config snapshot, credential files, registry, HTTP client, router, refresher
# and clock, and the hooks that observe every finished Call (usage records, metrics, limits hang here). It hands
# each piece what it needs; nothing reaches back through it. It speaks no client API (that is the Client API).

REJECTED_FILE = ".llm-mux-rejected"
RESTART_KEYS = ("host", "port", "tls")  # read once at start: a reload keeps the running values


class StoreSync:
    """With `store.postgres-url`, keeps this replica in step with the shared store. Credential files: the store is
    the source of truth and auth-dir a local mirror (0600 files, as on a single instance); a file added, changed or
    removed locally (login, upload, a file dropped in, a refresh) is pushed, a change made elsewhere is pulled
    and written here. Cooldowns and upstream rejections a replica sees are published and applied everywhere.
    Changes arrive by LISTEN/NOTIFY within a moment, and by polling every `store.poll-interval` as the fallback.
    While the store is unreachable the replica serves with the credentials it last had and keeps retrying."""

    def __init__(self, gw, store):
        self.gw, self.store = gw, store
        self.known = {}  # file name -> the content last agreed with the store
        self.version = 0  # newest credential version applied
        self.state_version = 0
        self.lock = asyncio.Lock()
        self.dirty = set()  # credential ids whose state must be published
        self.tasks = set()
        self.listener = None
        self.poller = None
        self.wake = asyncio.Event()
        self.healthy = False

    def _spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def start(self):
        """Before serving: migrate, seed an empty store from auth-dir or bring auth-dir up to the store."""
        try:
            await self.store.migrate()
            await self.sync(seed=True)
        except PgError as e:
            log.error("store %s unreachable at start (%s): serving with the local credentials; retrying",
                      self.store.where, e)
        self.listener = PgListener(self.store.settings, [self.store.CHANNEL], self._notified,
                                   on_connect=self._resync, clock=self.gw.clock).start()
        self.poller = self._spawn(self._poll())

    async def _resync(self):
        self.wake.set()

    def _notified(self, channel, payload, pid):
        try:
            note = json.loads(payload)
        except ValueError:
            return
        if note.get("by") != self.store.replica:
            self.wake.set()

    async def _poll(self):
        interval = parse_duration(self.gw.cfg.store["poll-interval"]) or 5.0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), interval)
            self.wake.clear()
            try:
                await self.sync()
                await self._publish_states()
                if not self.healthy:
                    log.info("store %s: in step", self.store.where)
                self.healthy = True
            except (PgError, OSError) as e:
                if self.healthy:
                    log.warning("store %s unreachable (%s): serving with the credentials last seen", self.store.where, e)
                self.healthy = False

    async def sync(self, seed=False):
        """Pull what changed in the store, apply it to auth-dir and the live credentials, push local changes."""
        async with self.lock:
            rows = await self.store.credentials_since(self.version)
            local = scan_auth_dir(self.gw.cfg.auth_dir)
            if seed and self.version == 0 and not rows and local:
                log.info("store %s is empty: seeding it with %d credential file(s) from %s", self.store.where,
                         len(local), self.gw.cfg.auth_dir)
            changed = False
            for name, meta, version in rows:
                self.version = max(self.version, version)
                changed |= self._apply_file(name, meta, local)
            for state in await self.store.states_since(self.state_version):
                self.state_version = max(self.state_version, state[4])
                if state[5] != self.store.replica:
                    self._apply_state(*state[:4])
            if changed:
                self.gw.reload_credentials(push=False)
            await self._push(scan_auth_dir(self.gw.cfg.auth_dir))

    def _apply_file(self, name, meta, local):
        if name != os.path.basename(name) or not name.endswith(".json"):
            return False
        path = os.path.join(self.gw.cfg.auth_dir, name)
        if meta is None:
            self.known.pop(name, None)
            if name in local:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                log.info("store: credential %s removed (by another replica)", name)
                return True
            return False
        self.known[name] = meta
        if name in local and local[name][0] == meta:
            return False
        write_file_atomic(path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n", 0o600)
        log.info("store: credential %s %s (from the store)", name, "updated" if name in local else "added")
        return True

    async def _push(self, local):
        for name, (meta, _) in sorted(local.items()):
            if self.known.get(name) != meta:
                self.version = max(self.version, await self.store.put_credential(name, meta))
                self.known[name] = meta
                log.info("store: credential %s pushed", name)
        for name in sorted(set(self.known) - set(local)):
            version = await self.store.delete_credential(name)
            self.known.pop(name, None)
            if version:
                self.version = max(self.version, version)
                log.info("store: credential %s deleted", name)

    def local_change(self):
        """auth-dir changed here (the watcher, a login, an upload): push it soon."""
        if self.poller is not None:
            self.wake.set()

    # -- cooldown and disabled state ----------------------------------------------------------------------------
    def observe(self, call):
        if call.outcome == "failed":
            self.mark(call.cred)

    def mark(self, cred):
        """Publish `cred`'s cooldowns and disabled state (now, coalesced with others)."""
        self.dirty.add(cred.id)
        self.wake.set()

    async def _publish_states(self):
        if not self.dirty:
            return
        dirty, self.dirty = self.dirty, set()
        now, wall = self.gw.clock.now(), self.gw.clock.wall()
        creds = {c.id: c for p in self.gw.registry.providers for c in p.credentials}
        try:
            for cid in sorted(dirty):
                cred = creds.get(cid)
                if cred is None:
                    continue
                models = {m: {"until": wall + st.until - now, "level": st.level, "last_error": st.last_error,
                              "status": st.status} for m, st in cred.states.items() if st.until > now}
                disabled = cred.disabled if cred.disabled and not cred.meta.get("disabled") else None
                until_all = wall + cred.until_all - now if cred.until_all > now else 0.0
                self.state_version = max(self.state_version, await self.store.put_state(
                    cid, disabled, until_all, json.dumps(models)))
        except PgError:
            self.dirty |= dirty
            raise

    def _apply_state(self, cid, disabled, until_all, models):
        now, wall = self.gw.clock.now(), self.gw.clock.wall()
        for p in self.gw.registry.providers:
            for cred in p.credentials:
                if cred.id != cid:
                    continue
                cred.until_all = now + until_all - wall if until_all > wall else 0.0
                for model, st in (models or {}).items():
                    state = cred.states.setdefault(model, ModelState())
                    state.until = now + float(st.get("until", 0)) - wall
                    state.level, state.last_error = int(st.get("level", 0)), st.get("last_error")
                    state.status = st.get("status") or "active"
                for model, state in cred.states.items():
                    if model not in (models or {}):
                        state.until = 0.0
                if disabled:
                    cred.disabled = disabled
                elif cred.disabled and not cred.meta.get("disabled"):
                    cred.disabled = None

    async def close(self):
        if self.poller is not None:
            self.poller.cancel()
        with contextlib.suppress(PgError, OSError, asyncio.CancelledError):
            await asyncio.wait_for(self._publish_states(), 5)
        if self.listener is not None:
            await self.listener.close()
        for task in list(self.tasks):
            task.cancel()
        self.store.close()


class Gateway:
    """Everything a running gateway holds. `apply_config` swaps in a new Config snapshot; requests already running
    keep the objects they hold."""

    MAX_INLINE_MEDIA = 20 * 1024 * 1024

    def __init__(self, cfg, files=None, clock=None, debug=False, config_file=None):
        self.debug = debug  # --debug on the command line: wins over the config's `debug` across reloads
        self.config_file = config_file  # a ConfigFile when the config came from a file (management writes it)
        self.clock = clock or Clock()
        self.cfg = cfg
        self.client = HttpClient(lambda: self.cfg)
        self.registry = None
        self.store = None  # the shared CredentialStore (`store.postgres-url`), its StoreSync in self.sync
        self.sync = None
        if cfg.store["postgres-url"]:
            self.store = CredentialStore(cfg.store["postgres-url"], cfg.store["encryption-key"],
                                         lock_timeout=parse_duration(cfg.store["lock-timeout"]) or 30.0)
        tokens = StoreTokens(self.store, self.clock) if self.store is not None else None
        self.refresher = Refresher(self.client, lambda: self.registry.providers, self.clock, tokens)
        self.router = Router(lambda: self.cfg, self.client, self.refresher, self.clock)
        self.files = files if files is not None else load_credential_files(cfg.auth_dir)
        self.apply_config(cfg)
        self.started = time.time()
        self.metrics = Metrics()
        self.key_limits = KeyLimits(self.clock)
        self.recording = True  # usage-statistics-enabled: false stops storing records (metrics still count)
        self.router.observers.extend((self._note_rejection, self._debug_call, self._account))
        if self.store is not None:
            self.sync = StoreSync(self, self.store)
            self.router.observers.append(self.sync.observe)
        self.store_warned = False
        self.fd_exhaustions = 0  # accept() failures for want of file descriptors (metrics)
        self.fd_warned = 0.0
        self.runtime = {}  # channel -> the Credential of a connected browser relay
        self.usage = None
        self.usage_target = None  # ("sqlite", path) or ("postgres", url) while usage is recorded
        self.recent = {}  # credential id -> (epoch, tokens, failed) of its recent calls (the quota view)
        self.request_log = RequestLog(lambda: self.cfg)
        self.stand_ins_logged = set()

    def apply_files(self, files, push=True):
        """A new set of credential files (added, changed or removed ones); the registry is rebuilt around it."""
        self.registry = Registry(self.cfg, self.registry, self._with_runtime(files))
        self._known_secrets()
        self._adopt_live_files(files)
        self.save_rejections()
        if push and self.sync is not None:
            self.sync.local_change()

    def write_credential(self, name, meta):
        """Write a credential file (0600, atomically) into auth-dir and put it in rotation at once; its path."""
        os.makedirs(self.cfg.auth_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.cfg.auth_dir, os.path.basename(name))
        write_file_atomic(path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n", 0o600)
        self.reload_credentials()
        return path

    def reload_credentials(self, push=True):
        """Read auth-dir again now (the watcher would within a second); unchanged files keep their live state."""
        self.apply_files(reread_credentials(self.cfg.auth_dir, self.files, auth_dir_listing(self.cfg.auth_dir)),
                         push)

    def broken_files(self):
        """{file name: why} for the *.json files in auth-dir that give no credential."""
        used = {os.path.basename(c.path) for c in self.files.values()}
        out = {}
        for name in auth_dir_listing(self.cfg.auth_dir):
            if name in used:
                continue
            try:
                meta, _ = read_credential_file(os.path.join(self.cfg.auth_dir, name))
                out[name] = "unknown credential type %r" % meta.get("type")
            except ValueError as e:
                out[name] = str(e)
        return out

    def _note_rejection(self, call):
        if call.outcome == "failed" and (call.cred.disabled or "").startswith("rejected:"):
            self.save_rejections()

    def save_rejections(self):
        """Credentials the upstream rejected, in `<auth-dir>/.llm-mux-rejected` (0600) for `llm-mux env` to show;
        removed once none is left (a config or file change puts them back in rotation)."""
        rejected = {c.id: {"label": c.label, "provider": p.name, "reason": c.disabled}
                    for p in self.registry.providers for c in p.credentials
                    if c.disabled and c.disabled.startswith("rejected:")}
        path = os.path.join(self.cfg.auth_dir, REJECTED_FILE)
        try:
            if rejected:
                write_file_atomic(path, json.dumps(rejected, indent=2) + "\n", 0o600)
            elif os.path.exists(path):
                os.unlink(path)
        except OSError as e:
            log.warning("cannot record rejected credentials in %s: %s", path, e.strerror or e)

    def _adopt_live_files(self, files):
        """Keep `files` pointing at the live credential objects the registry kept, so stamps stay current."""
        live = {c.id: c for p in self.registry.providers for c in p.credentials if c.path is not None}
        self.files = {name: live.get(name, cred) for name, cred in files.items()}

    def adopt(self, cfg):
        """A config read from the file (reload or management write): keys that need a restart keep their running
        values (with a warning); everything else applies at once."""
        old = self.cfg
        for w in cfg.warnings:
            log.warning("config: %s", w)
        for key in RESTART_KEYS:
            if cfg.data.get(key) != old.data.get(key):
                log.warning("config: '%s' changed; it takes effect after a restart", key)
                cfg.data[key] = old.data[key]
                setattr(cfg, key.replace("-", "_"), getattr(old, key.replace("-", "_")))
        self.apply_config(cfg)

    def apply_config(self, cfg):
        """Swap in a new snapshot; requests already running keep the objects they hold."""
        if self.registry is not None and cfg.auth_dir != self.cfg.auth_dir:
            self.files = load_credential_files(cfg.auth_dir)
        if cfg.ws_auth and not getattr(self.cfg, "ws_auth", True):
            for cred in list(getattr(self, "runtime", {}).values()):  # relays let in without a key: out now
                if not cred.transport.authenticated:
                    asyncio.ensure_future(cred.transport.ws.close(1008, "ws-auth turned on: reconnect with a key"))
        self.cfg = cfg
        self.limits = ServerLimits(cfg)
        self.registry = Registry(cfg, self.registry, self._with_runtime(self.files))
        self._known_secrets()
        self._adopt_live_files(self.files)
        log.setLevel(logging.DEBUG if cfg.debug or self.debug else logging.INFO)
        log_to_file(os.path.join(logs_dir(cfg), "llm-mux.log") if cfg.logging_to_file else None)
        if self.registry is not None and getattr(self, "started", None):
            self.save_rejections()


    def _known_secrets(self):
        """Refresh SECRET_MASK with every secret the running gateway holds."""
        secrets = [k.secret for k in self.cfg.client_keys]
        for p in self.registry.providers:
            for c in p.credentials:
                secrets.append(c.api_key)
                secrets += [c.meta.get(k) for k in ("access_token", "refresh_token", "id_token", "api_key")]
                token = c.meta.get("token")
                if isinstance(token, dict):
                    secrets += [token.get(k) for k in ("access_token", "refresh_token")]
        secrets += [self.cfg.store["encryption-key"], self.cfg.data["remote-management"]["secret-key"]]
        SECRET_MASK.update(secrets)

    def _with_runtime(self, files):
        """Credential files plus the runtime-only credentials (browser relays), which have no file."""
        runtime = getattr(self, "runtime", None)
        return dict(files, **runtime) if runtime else files

    async def relay(self, ws, authenticated):
        """A browser relay on /v1/ws for as long as its socket is open: a temporary `aistudio` credential whose
        requests travel over the socket. Its models are asked of the page (15 s), else the usual Gemini list."""
        channel = "aistudio-" + "".join("abcdefghijklmnopqrstuvwxyz0123456789"[b % 36] for b in os.urandom(16))
        session = RelaySession(ws, channel, idle_timeout=float(self.cfg.stream_timeout))
        session.authenticated = authenticated
        cred = Credential(channel, "aistudio", channel)
        cred.meta = {"email": channel, "runtime_only": True}
        cred.transport = session
        self.runtime[channel] = cred
        reader = asyncio.ensure_future(session.run())
        log.info("relay %s connected", channel)
        try:
            try:
                resp = await asyncio.wait_for(session.request(
                    "GET", "https://generativelanguage.googleapis.com/v1beta/models", [], b""), 15)
                data = await resp.json() if resp.status == 200 else {}
                models = [str(m.get("name", "")).split("/", 1)[-1] for m in (data.get("models") or [])
                          if isinstance(m, dict) and m.get("name")]
                if models:
                    cred.meta["models"] = models
            except (UpstreamError, asyncio.TimeoutError, AttributeError) as e:
                log.info("relay %s: its models are not known (%s); serving the usual Gemini models", channel,
                         getattr(e, "message", None) or type(e).__name__)
            self.apply_files(self.files, push=False)
            await reader
        finally:
            reader.cancel()
            session.close("disconnected")
            self.runtime.pop(channel, None)
            self.apply_files(self.files, push=False)
            log.info("relay %s disconnected", channel)

    async def admit(self, req):
        """A client key's model permission and limits, before any upstream call. With a shared store the limits
        are counted there, across replicas; if it cannot be reached this replica's own counts decide."""
        key = next((k for k in self.cfg.client_keys if k.name == req.client_key), None)
        if key is None:
            return
        if self.store is None or (key.rpm is None and key.tpm is None and key.max_budget is None):
            self.key_limits.admit(self.cfg, req)
            return
        if not key.allows(req.model):
            raise GatewayError(403, "API key %s may not use model '%s'" % (key.name, req.model), "permission", "model")
        try:
            over = await self.store.admit_key(key.name, key.rpm, key.tpm, key.max_budget, key.budget_seconds)
        except PgError as e:
            if not self.store_warned:
                log.warning("store unreachable for client-key limits (%s): counting on this replica only", e)
                self.store_warned = True
            self.key_limits.admit(self.cfg, req)
            return
        self.store_warned = False
        self.key_limits.note_request(key.name)
        if over is not None:
            KeyLimits.limited(key, over[0], over[1])

    def _account(self, call):
        """Every finished Call becomes one usage record: counted in the metrics, in its credential's recent
        history (the quota view), against its client key, and queued for the usage store."""
        record = usage_record(call, call.wall_started, self.cfg.pricing)
        self.metrics.observe(record)
        recent = self.recent.get(call.cred.id)
        if recent is None:
            import collections
            recent = self.recent[call.cred.id] = collections.deque(maxlen=5000)
        recent.append((call.wall_started, record["total_tokens"], call.outcome == "failed"))
        self.key_limits.account(record, call.wall_started)
        if self.sync is not None and record["api_key"] and (record["total_tokens"] or record.get("cost_usd") or
                                                            record.get("subscription_value_usd")):
            usd = (record.get("cost_usd") or 0) + (record.get("subscription_value_usd") or 0)
            self.sync._spawn(self._spend(record["api_key"], record["total_tokens"], usd))
        if self.usage is not None and self.recording:
            self.usage.record(record)

    async def _spend(self, key, tokens, usd):
        try:
            await self.store.spend_key(key, tokens, usd)
        except PgError as e:
            log.warning("store: spend of key %s not counted across replicas (%s)", key, e)

    def _debug_call(self, call):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("upstream call %s %s -> %s in %.0f ms via %s (%s)", call.method, call.url, call.status or "-",
                      (call.ended - call.started) * 1000, call.cred.label, call.outcome)

    def start(self):
        self.refresher.start()
        self.start_usage()

    def start_usage(self):
        """Open the usage store (and rebuild client-key spend from it), unless it is open or usage is off."""
        target = usage_target(self.cfg)
        if target is not None and self.usage is None:
            where = redact_url(target[1])
            try:
                interval = parse_duration(self.cfg.usage["flush-interval"]) or 1.0
                self.usage = UsageWriter(open_usage_store(self.cfg, target), min(interval, 1.0),
                                         max(1, self.cfg.usage["batch-size"]), self.cfg.usage["retention-days"])
            except Exception as e:  # an unusable database costs the records, never the gateway
                log.error("usage database %s cannot be opened: %s; usage is not recorded", where, e)
            else:
                self.usage_target = target
                log.info("usage records go to %s", where)
                horizon = max([60.0] + [k.budget_seconds for k in self.cfg.client_keys if k.max_budget is not None])
                try:
                    self.key_limits.rebuild(target, horizon)
                except Exception as e:
                    log.warning("client-key spend could not be rebuilt from %s: %s", where, e)

    def stop_usage(self):
        """Write every queued usage record (SIGTERM and Ctrl-C lose none)."""
        if self.usage is not None:
            usage, self.usage = self.usage, None
            usage.close()

    def stop(self):
        self.refresher.stop()
        self.stop_usage()
        self.client.close_idle()

    # -- models ---------------------------------------------------------------------------------------------------
    def known_routes(self, mid):
        routes = self.registry.resolve(split_thinking_suffix(mid)[0])
        if not routes:
            raise GatewayError(404, "The model '%s' does not exist" % mid, "not_found", "model",
                               code="model_not_found")
        return routes

    def resolve_model(self, ir):
        """The routes to try, in order: the requested model's, then each `routing.fallbacks` model's. A
        `model(high)` / `model(16384)` suffix selects thinking."""
        name = ir.model
        routes = self.registry.resolve(name)
        if not routes:
            base, thinking = split_thinking_suffix(name)
            if thinking is not None:
                routes = self.registry.resolve(base)
                if routes:
                    ir.thinking = thinking
                    name = base
        chain = [routes] if routes else []
        fallbacks = self.cfg.routing["fallbacks"]
        extra = list(fallbacks.get(name) or fallbacks.get(self.cfg.routing["aliases"].get(name, name)) or [])
        if self.cfg.quota_exceeded["switch-preview-model"]:
            extra += self.registry.preview_variants(name)
        for fb in extra:
            fb_routes = self.registry.resolve(fb)
            if fb_routes and fb_routes not in chain:
                chain.append(fb_routes)
        if not chain and self.cfg.routing["family-fallback"]:
            stand_in = self.registry.family_stand_in(name)
            if stand_in is not None:
                if (name, stand_in) not in self.stand_ins_logged:
                    self.stand_ins_logged.add((name, stand_in))
                    log.info("model %s is not served; %s of the same family answers for it (routing.family-fallback)",
                             name, stand_in)
                chain.append(self.registry.resolve(stand_in))
        if not chain:
            raise GatewayError(404, "The model '%s' does not exist or is not served by this gateway" % ir.model,
                               "not_found", "model", code="model_not_found")
        return chain

    # -- calls ----------------------------------------------------------------------------------------------------
    async def call(self, ir):
        """Route `ir` and return the open Call an upstream accepted (the caller reads its answer or events)."""
        chain = self.resolve_model(ir)
        await self.inline_remote_media(ir, [r for routes in chain for r in routes])
        ir.request_id = ir.request_id or new_id("req_")
        return await self.router.send(ir, chain)

    async def embed(self, ir):
        """Embeddings for an EmbeddingRequest, from the model's providers that have an embeddings API."""
        chain = [[r for r in routes if r.provider.embeddings] for routes in self.resolve_model(ir)]
        chain = [routes for routes in chain if routes]
        if not chain:
            raise GatewayError(400, "model '%s' is not served by a provider with an embeddings API (openai, gemini, "
                               "vertex-compat or a Vertex AI account)" % ir.model, "invalid_request", "model")
        ir.request_id = ir.request_id or new_id("req_")
        call = await self.router.send(ir, chain)
        return await call.answer()

    async def count_tokens(self, ir):
        """Ask the upstream's counter where it has one; otherwise estimate (logged as an estimate)."""
        n = await self.router.count(ir, self.resolve_model(ir)[0])
        if n is not None:
            return n
        n = estimate_tokens(ir)
        log.info("count_tokens for %s: estimated %d tokens (about 4 characters per token; the upstream has no "
                 "token counter)", ir.model, n)
        return n

    async def inline_remote_media(self, ir, routes):
        """Providers that cannot fetch arbitrary URLs (`inline_media`, e.g. Gemini, formats.md §6.6) get them
        downloaded and sent inline. Uses the gateway's own client, so proxies and upstream-overrides apply; a
        failed download is a 400."""
        if not any(r.provider.inline_media for r in routes):
            return
        media = [p for m in ir.messages for p in m.parts if p.kind in ("image", "file") and not p.data and p.url
                 and p.url.startswith(("http://", "https://"))]
        media += [c for m in ir.messages for p in m.parts if p.kind == "tool_result" for c in p.content
                  if c.kind in ("image", "file") and not c.data and c.url and c.url.startswith(("http://", "https://"))]
        for p in media:
            try:
                resp = await self.client.request("GET", p.url, [("Accept", "image/*, */*")], timeout=15,
                                                 stream_timeout=30, max_size=self.MAX_INLINE_MEDIA)
                data = await resp.read()
            except UpstreamError as e:
                raise BadRequest("could not download %s to send it inline: %s" % (p.url, e.message), "messages")
            if resp.status >= 300:
                raise BadRequest("could not download %s to send it inline: HTTP %d" % (p.url, resp.status),
                                 "messages")
            mime = (resp.headers.get("content-type") or "").split(";")[0].strip()
            p.data = base64.b64encode(data).decode("ascii")
            p.mime = mime if "/" in mime else (p.mime or sniff_image_mime(p.data))
            p.url = None


# -- the release channel (shared by `llm-mux update` and the management API's latest-version) --------------------

RELEASE_MANIFEST_URL = "https://github.com/nghyane/llm-mux/releases/latest/download/llm-mux-manifest.json"
RELEASE_PUBLIC_KEYS = (  # manifests must be signed by one of these (tools/release.py signs; see README "Updating")
    """-----BEGIN PUBLIC KEY-----
MIIBojANBgkqhkiG9w0BAQEFAAOCAY8AMIIBigKCAYEAwt3LbCwshdBbF5XrKu/z
Ty9d9r9hpdid2KFA+NGiU1bsE098q0oh9HWqCqj1RJ8ej7eBKnuV7qrbGzGkuAcV
nzGX/VUvZ4k8+gXg4hwN1JasDwcCcy66ntID/VQlT1YHvOQVQOqau8tEvYd8EJOb
fTpFOGsTk+yBLD5qialZ5pxu71k/IpzeKVma39EpA+yTRjhpLKZLfrODfXvkIt0i
45AWu3CUJ1/t46a8TfVKs9NiwldCUaNIGHN3bcElNEGYgjY2L3ZIPzKFggoR8AEt
hUTJRFui4xr/45zuIFvB6wwlAwkuzXcpkvAtDz/XMWF64ebJs3JrqtqW0n3x8bKq
2CRuFW953hTE+H/TUVIn7qfdcitjR/3W9/BQlkz8M/bzEXc1ck+scA3+twAT+Ty0
DYoaGhTjiAIpt2DMLQ3Fih0CuihHRRkTIEu934TyLIH2yHGY8Kqt400FewVxd875
hs+IjtI3bqNrGE3gaIUMqwCvZF3F8WA7Pwb3cCk7+MMLAgMBAAE=
-----END PUBLIC KEY-----""",
)


class ReleaseError(Exception):
    """The release channel cannot be trusted or reached; nothing was changed."""


def version_tuple(version):
    """(major, minor, patch, ...) of `v1.2.3`; a part that is not a number counts as 0."""
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", str(version).strip().lstrip("vV"))[:4])


def release_keys():
    """The keys a manifest may be signed with: the ones built into this file, or, for a private release channel,
    the PEM file named by LLM_MUX_UPDATE_PUBLIC_KEY (whoever sets a process's environment can replace its file)."""
    path = os.environ.get("LLM_MUX_UPDATE_PUBLIC_KEY", "").strip()
    if path:
        try:
            with open(path) as f:
                return [RsaPublicKey.from_pem(f.read())]
        except (OSError, ValueError) as e:
            raise ReleaseError("LLM_MUX_UPDATE_PUBLIC_KEY %s: %s" % (path, e))
    return [RsaPublicKey.from_pem(pem) for pem in RELEASE_PUBLIC_KEYS]


def verify_manifest(raw):
    """The release described by a signed manifest (`{"payload": base64url(JSON), "alg": "RS256", "signature":
    base64url}`); ReleaseError unless the signature verifies with a release key and the fields make sense."""
    try:
        envelope = json.loads(raw)
        payload, signature = b64url_decode(envelope["payload"]), b64url_decode(envelope["signature"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise ReleaseError("the release manifest is not a signed manifest (payload, alg, signature)")
    if envelope.get("alg") != "RS256":
        raise ReleaseError("the release manifest's signature algorithm %r is not RS256" % envelope.get("alg"))
    if not any(key.verify_sha256(payload, signature) for key in release_keys()):
        raise ReleaseError("the release manifest's signature does not verify with the release key: not installing")
    try:
        release = json.loads(payload)
    except ValueError:
        raise ReleaseError("the signed manifest is not JSON")
    if not (isinstance(release, dict) and isinstance(release.get("version"), str) and
            isinstance(release.get("url"), str) and re.match(r"[0-9a-f]{64}\Z", str(release.get("sha256"))) and
            isinstance(release.get("size"), int) and 0 < release["size"] <= 256 << 20):
        raise ReleaseError("the signed manifest lacks version, url, sha256 or size")
    return release


async def fetch_release(client, url):
    """The newest release on the channel at `url`, verified; its `url` made absolute."""
    try:
        resp = await client.request("GET", url, [("Accept", "application/json"), ("User-Agent", USER_AGENT)], None,
                                    timeout=30, stream_timeout=30)
        raw = await resp.read(1 << 20)
    except UpstreamError as e:
        raise ReleaseError("cannot fetch the release manifest %s: %s" % (redact_url(url), e.message))
    if resp.status != 200:
        raise ReleaseError("the release manifest %s answered %d" % (redact_url(url), resp.status))
    release = verify_manifest(raw)
    release["url"] = urllib.parse.urljoin(url, release["url"])
    return release


# === 14. Management API ===
# Owns: everything under /v1/management and the dashboard page: who may call (the hashed management key,
# loopback unless allow-remote, bans after repeated failures), the {"data", "meta"} envelope and its errors,
# settings and lists written back to config.yaml (ConfigFile) and applied at once, credential health and
# actions, logins driven through the providers' LoginFlow objects, logs and request logs. It reads and changes the
# Gateway; it speaks no client API.

class ManagementError(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def bad_request(message):
    return ManagementError(400, "INVALID_REQUEST", message)


def management_json(req, what="a JSON body"):
    """The request's JSON body, or a 400 that says what was expected."""
    if not req.body:
        raise bad_request("invalid body: expected %s" % what)
    try:
        return json.loads(req.body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request("invalid body: malformed JSON (%s); expected %s" % (e, what))


SECRET_FIELDS = {"api-key", "secret-key", "upstream-api-key", "key", "access_token", "refresh_token", "token",
                 "id_token", "api_key", "password", "private_key", "cookie", "encryption-key", "postgres-url",
                 "dsn"}


def secret_paths(data, path=()):
    """The paths of the secret strings in config data: keys, tokens, secret headers (hashed values excepted)."""
    if isinstance(data, dict):
        for k, v in data.items():
            p = path + (k,)
            secret_header = len(path) >= 1 and path[-1] == "headers" and re.search(
                r"auth|key|token|secret|cookie", str(k), re.I)
            if isinstance(v, str) and (k in SECRET_FIELDS or secret_header):
                if v and not is_hashed_secret(v) and not v.startswith("sha256:"):
                    yield p
            else:
                yield from secret_paths(v, p)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            if isinstance(v, str) and path and path[-1] == "api-keys":
                if v and not v.startswith("sha256:"):
                    yield path + (i,)
            else:
                yield from secret_paths(v, path + (i,))


def get_path(data, path):
    for p in path:
        try:
            data = data[p]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def set_path(data, path, value):
    for p in path[:-1]:
        data = data[p]
    data[path[-1]] = value


def masked_copy(data):
    """`data` with every secret masked (mask_secret): what the management API shows."""
    out = json.loads(json.dumps(data))
    for p in list(secret_paths(out)):
        set_path(out, p, mask_secret(get_path(out, p)))
    return out


def unmask(new, old):
    """A masked secret sent back unchanged (a dashboard or the original UI saving what it was shown) becomes the
    real secret again: wherever `new` holds exactly the mask of the secret `old` holds at the same path."""
    for p in list(secret_paths(new)):
        value, before = get_path(new, p), get_path(old, p)
        if isinstance(before, str) and before and "..." in value and value == mask_secret(before):
            set_path(new, p, before)
    return new


class LoginSession:
    """One login started from the management API, polled through oauth/status."""

    __slots__ = ("state", "provider", "flow", "kind", "status", "error", "created", "ended", "task", "got",
                 "server", "info", "file")

    def __init__(self, state, provider, flow, kind, now):
        self.state, self.provider, self.flow, self.kind = state, provider, flow, kind
        self.status, self.error, self.created, self.ended = "pending", None, now, None
        self.task = self.got = self.server = self.file = None
        self.info = {}

    def view(self):
        out = {"state": self.state, "id": self.state, "provider": self.provider, "flow_type": self.kind,
               "status": self.status, "mode": "webui"}
        if self.error:
            out["error"] = self.error
        if self.file:
            out["file"] = os.path.basename(self.file)
        out.update(self.info)
        return out


class LoginSessions:
    """The logins the management API is running: the same LoginFlow objects `llm-mux login` drives. Browser flows
    answer with the URL and listen on the flow's own callback port (a pasted redirect URL works too); device flows
    answer with the code and page and poll in the background; token flows wait for the pasted token. Each ends
    completed (credential written and registered), failed (why), cancelled or timed out (failed: "timed out"),
    and is forgotten `KEEP` seconds after it ends."""

    TIMEOUT = 600.0
    KEEP = 900.0
    ALIASES = {"anthropic": "claude", "gemini-cli": "gemini", "github-copilot": "copilot", "ag": "antigravity"}

    def __init__(self, gateway):
        self.gw = gateway
        self.sessions = {}

    def _purge(self):
        now = self.gw.clock.wall()
        for state, s in list(self.sessions.items()):
            if s.ended is not None and now - s.ended > self.KEEP:
                del self.sessions[state]

    async def start(self, body):
        name = str(body.get("provider") or "").strip().lower()
        if not name:
            raise bad_request("provider is required")
        name = self.ALIASES.get(name, name)
        logins = PROVIDERS.logins()
        if name not in logins:
            raise bad_request("unsupported login provider: %s (one of %s)" % (name, ", ".join(sorted(logins))))
        self._purge()
        provider_class = logins[name]
        flow_class = provider_class.login
        state = b64url(os.urandom(18))
        if flow_class is None:  # no login of its own (Kiro): import the official tool's stored tokens
            session = LoginSession(state, name, None, "import", self.gw.clock.wall())
            self.sessions[state] = session
            session.task = asyncio.ensure_future(self._run(session, self._import(provider_class)))
            await asyncio.wait([session.task], timeout=30)
            return session.view()
        project = body.get("project_id") or body.get("project")
        if project is not None and not isinstance(project, str):
            raise bad_request("project_id must be a string")
        flow = flow_class(project) if project and "project" in flow_class.cli_options else flow_class()
        kind = "device" if flow.kind == "device" or body.get("device") else flow.kind
        if kind == "device" and not hasattr(flow, "device_start"):
            raise bad_request("%s has no device-code login" % name)
        session = LoginSession(getattr(flow, "state", None) or state, name, flow, kind, self.gw.clock.wall())
        if kind == "device":
            try:
                started = await flow.device_start(self.gw.client)
            except (RefreshError, UpstreamError, LoginError) as e:
                raise ManagementError(502, "INTERNAL_ERROR", "could not start the %s device login: %s" % (
                    name, getattr(e, "message", None) or e))
            session.info = {"user_code": started["code"], "verification_url": started["url"],
                            "auth_url": started.get("complete_url") or started["url"],
                            "expires_in": started.get("expires_in") or int(self.TIMEOUT),
                            "interval": started.get("interval") or 5}
            session.task = asyncio.ensure_future(self._run(session, self._device(session, started)))
        elif kind == "token":
            session.got = asyncio.get_running_loop().create_future()
            session.info = {"prompt": flow.prompt}
            session.task = asyncio.ensure_future(self._run(session, self._pasted(session)))
        else:
            session.got = asyncio.get_running_loop().create_future()
            port = body.get("callback_port", flow.callback_port)
            if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
                raise bad_request("callback_port must be a port number")
            session.info = {"auth_url": flow.url(), "callback_port": port}  # the PKCE verifier stays here
            try:
                session.server = await listen_for_login_callback(flow, port, session.got)
                session.info["callback"] = "listening on 127.0.0.1:%d" % port
            except OSError as e:
                session.info["callback"] = ("port %d is busy (%s): paste the redirect URL through oauth/callback"
                                            % (port, e.strerror or e))
            session.task = asyncio.ensure_future(self._run(session, self._pasted(session)))
        self.sessions[session.state] = session
        log.info("management: %s login started (%s flow, state %s…)", name, kind, session.state[:6])
        return session.view()

    async def _run(self, session, work):
        try:
            filename, meta = await asyncio.wait_for(work, self.TIMEOUT) if session.kind != "device" else await work
            if filename is not None:
                session.file = self.gw.write_credential(filename, meta)
            session.status = "completed"
            log.info("management: %s login completed: %s", session.provider, os.path.basename(session.file or ""))
        except asyncio.CancelledError:
            session.status = "cancelled"
        except asyncio.TimeoutError:
            session.status, session.error = "failed", "timed out: no answer within %d s" % self.TIMEOUT
        except (LoginError, RefreshError, UpstreamError) as e:
            session.status, session.error = "failed", str(getattr(e, "message", None) or e)
            log.warning("management: %s login failed: %s", session.provider, session.error)
        except Exception as e:  # a flow bug must end the session, not hang it
            session.status, session.error = "failed", "unexpected %s: %s" % (type(e).__name__, e)
            log.exception("management: %s login failed", session.provider)
        finally:
            session.ended = self.gw.clock.wall()
            if session.server is not None:
                server, session.server = session.server, None
                await server.shutdown(0.5)

    async def _import(self, provider_class):
        loop = asyncio.get_running_loop()
        out = io.StringIO()
        imported, skipped = await loop.run_in_executor(None, lambda: import_cli_credentials(
            self.gw.cfg.auth_dir, out=out, cfg=self.gw.cfg, only=provider_class.official_tool))
        if not imported:
            raise LoginError("nothing to import from %s: %s" % (provider_class.official_tool, "; ".join(
                why for _, why in skipped) or "not found"))
        self.gw.reload_credentials()
        return None, None

    async def _device(self, session, started):
        flow, client = session.flow, self.gw.client
        deadline = self.gw.clock.wall() + min(self.TIMEOUT, float(started.get("expires_in") or self.TIMEOUT))
        interval = started.get("interval") or 5
        while True:
            if self.gw.clock.wall() >= deadline:
                raise LoginError("timed out: the code expired before the login was finished")
            got = await flow.device_poll(client, started)
            if got == "slow_down":
                interval += 5
            elif got is not None:
                return await flow.device_finish(client, got)
            await self.gw.clock.sleep(interval)

    async def _pasted(self, session):
        """Browser flows: the callback listener or a pasted redirect URL; token flows: the pasted token."""
        text = await session.got
        if session.kind == "token":
            return await session.flow.finish(self.gw.client, text)
        if not text:
            raise LoginError("no authorization code received")
        return await session.flow.exchange(self.gw.client, text)

    def status(self, state):
        self._purge()
        session = self.sessions.get(state)
        if session is None:
            raise ManagementError(404, "NOT_FOUND", "login state not found or expired")
        return session.view()

    def cancel(self, state):
        session = self.sessions.get(state)
        if session is None or session.status != "pending":
            raise ManagementError(404, "NOT_FOUND", "login state not found or already finished")
        session.task.cancel()
        log.info("management: %s login cancelled", session.provider)

    def paste(self, state, text):
        """A pasted redirect URL or code (browser flows) or token (token flows)."""
        session = self.sessions.get(state)
        if session is None or session.status != "pending":
            raise ManagementError(404, "NOT_FOUND", "login state not found or already finished")
        if session.got is None:
            raise bad_request("this %s login is a device-code login: enter the code on the provider's page"
                              % session.provider)
        if session.kind != "token":
            try:
                text = session.flow.code_from_paste(text)
            except LoginError as e:
                raise bad_request(str(e))
        if not session.got.done():
            session.got.set_result(text)

    def close(self):
        for s in self.sessions.values():
            if s.task is not None and not s.task.done():
                s.task.cancel()


# Setting endpoints (gateway.md §5.5): path -> (config path, type, bounds)
SETTINGS = {
    "debug": (("debug",), bool, None),
    "logging-to-file": (("logging-to-file",), bool, None),
    "request-log": (("request-log",), bool, None),
    "ws-auth": (("ws-auth",), bool, None),
    "request-retry": (("request-retry",), int, (0, 100)),
    "max-retry-interval": (("max-retry-interval",), int, (0, 86400)),
    "quota-window": (("quota-window",), int, (10, 7 * 86400)),
    "proxy-url": (("proxy-url",), str, None),
    "quota-exceeded/switch-project": (("quota-exceeded", "switch-project"), bool, None),
    "quota-exceeded/switch-preview-model": (("quota-exceeded", "switch-preview-model"), bool, None),
}
TYPE_WORDS = {bool: "bool", int: "int", str: "string"}


class Management:
    """Route table for /v1/management (gateway.md §5) plus the dashboard page. Each call passes the gate of §5.1:
    remote callers need `remote-management.allow-remote`; every caller the management key (stored hashed in
    `remote-management.secret-key`, or LLM_MUX_MANAGEMENT_KEY; sent as `Authorization` or `X-Management-Key`,
    compared in constant time); 5 failures from one remote address ban it for 30 minutes; no key configured
    answers 403. Successes are enveloped {"data", "meta"}; errors are {"error": text, "code", "message"} (a
    string `error`, which the original's web UI can show; see the README)."""

    PREFIX = "/v1/management"
    PAGES = ("/dashboard", "/dashboard/", "/management.html")
    BAN_AFTER, BAN_FOR = 5, 1800.0
    MAX_UPLOAD = 1 << 20

    def __init__(self, gateway):
        self.gw = gateway
        self.failures = {}  # remote address -> failed attempts in a row
        self.banned = {}  # remote address -> until (clock)
        self.verified = set()  # digests of keys that matched the stored hash (scrypt runs once per key)
        self.logins = LoginSessions(gateway)
        self.latest = None  # (fetched at, version) of the newest release
        r = self.routes = {}
        r[("GET", "/usage")] = self.usage
        r[("GET", "/usage-statistics-enabled")] = self.get_recording
        r[("PUT", "/usage-statistics-enabled")] = r[("PATCH", "/usage-statistics-enabled")] = self.put_recording
        for name in SETTINGS:
            r[("GET", "/" + name)] = functools.partial(self.get_setting, name)
            r[("PUT", "/" + name)] = r[("PATCH", "/" + name)] = functools.partial(self.put_setting, name)
        r[("DELETE", "/proxy-url")] = self.delete_proxy_url
        r[("GET", "/config")] = self.get_config
        r[("GET", "/config.yaml")] = self.get_config_yaml
        r[("PUT", "/config.yaml")] = self.put_config_yaml
        r[("GET", "/latest-version")] = self.latest_version
        r[("GET", "/api-keys")] = self.get_api_keys
        r[("PUT", "/api-keys")] = self.put_api_keys
        r[("PATCH", "/api-keys")] = self.patch_api_keys
        r[("DELETE", "/api-keys")] = self.delete_api_keys
        r[("POST", "/api-keys")] = self.create_api_key
        r[("GET", "/providers")] = self.get_providers
        r[("PUT", "/providers")] = self.put_providers
        r[("PATCH", "/providers")] = self.patch_providers
        r[("DELETE", "/providers")] = self.delete_providers
        r[("GET", "/oauth-excluded-models")] = self.get_excluded
        r[("PUT", "/oauth-excluded-models")] = self.put_excluded
        r[("PATCH", "/oauth-excluded-models")] = self.patch_excluded
        r[("DELETE", "/oauth-excluded-models")] = self.delete_excluded
        r[("GET", "/logs")] = self.get_logs
        r[("DELETE", "/logs")] = self.delete_logs
        r[("GET", "/request-error-logs")] = self.list_error_logs
        r[("GET", "/auth-files")] = self.list_auth_files
        r[("GET", "/auth-files/download")] = self.download_auth_file
        r[("POST", "/auth-files")] = self.upload_auth_files
        r[("DELETE", "/auth-files")] = self.delete_auth_files
        r[("POST", "/auth-files/import")] = self.import_auth_files
        r[("POST", "/auth-files/refresh")] = self.refresh_auth_file
        r[("PATCH", "/auth-files/status")] = r[("PUT", "/auth-files/status")] = self.auth_file_status
        r[("POST", "/auth-files/reset")] = self.reset_auth_file
        r[("GET", "/auth-files/quota")] = self.probe_auth_file
        r[("POST", "/vertex/import")] = self.vertex_import
        r[("POST", "/oauth/start")] = self.oauth_start
        r[("POST", "/oauth/callback")] = self.oauth_callback
        r[("GET", "/models")] = self.models
        r[("GET", "/overview")] = self.overview
        self.prefixed = {("GET", "/request-error-logs/"): self.get_error_log, ("GET", "/oauth/status/"): self.oauth_status,
                         ("POST", "/oauth/cancel/"): self.oauth_cancel}

    def handles(self, path):
        return path == self.PREFIX or path.startswith(self.PREFIX + "/") or path in self.PAGES

    async def __call__(self, req):
        if req.path in self.PAGES:
            if req.method not in ("GET", "HEAD"):
                return json_response({"error": "method not allowed", "code": "INVALID_REQUEST"}, 405)
            return Response(200, DASHBOARD_HTML, [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                                                  ("X-Frame-Options", "DENY"),
                                                  ("Content-Security-Policy", "default-src 'self'; script-src "
                                                   "'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:")],
                            "text/html; charset=utf-8")
        sub = req.path[len(self.PREFIX):]
        try:
            handler = self.routes.get((req.method, sub))
            arg = None
            if handler is None:
                for (method, prefix), h in self.prefixed.items():
                    if req.method == method and sub.startswith(prefix) and len(sub) > len(prefix):
                        handler, arg = h, urllib.parse.unquote(sub[len(prefix):])
            self.check(req)
            if handler is None:
                if any(p == sub for _, p in self.routes):
                    raise ManagementError(405, "INVALID_REQUEST", "method %s not allowed on %s" % (req.method, req.path))
                raise ManagementError(404, "NOT_FOUND", "no management endpoint %s %s" % (req.method, req.path))
            data = await (handler(req, arg) if arg is not None else handler(req))
            if isinstance(data, (Response, StreamResponse)):
                return data
            return json_response({"data": data, "meta": {"timestamp": rfc3339(time.time()), "version": __version__}})
        except ManagementError as e:
            if e.status >= 500:
                log.error("management %s %s -> %d: %s", req.method, req.path, e.status, e.message)
            return json_response({"error": e.message, "code": e.code, "message": e.message}, e.status)

    # -- the gate -------------------------------------------------------------------------------------------------
    def check(self, req):
        cfg = self.gw.cfg.data["remote-management"]
        now, peer = self.gw.clock.now(), req.peer
        local = is_loopback_host(peer)
        if not local:
            until = self.banned.get(peer, 0)
            if until > now:
                raise ManagementError(403, "FORBIDDEN", "IP banned due to too many failed attempts. Try again in "
                                                        "%ds" % math.ceil(until - now))
            if not cfg["allow-remote"]:
                raise ManagementError(403, "FORBIDDEN", "remote management disabled")
        self.check_key(req, local)

    def key_configured(self):
        return bool(self.gw.cfg.data["remote-management"]["secret-key"] or os.environ.get("LLM_MUX_MANAGEMENT_KEY"))

    def check_key(self, req, local):
        """The management key must be presented; remote failures count towards a ban."""
        stored = self.gw.cfg.data["remote-management"]["secret-key"]
        from_env = os.environ.get("LLM_MUX_MANAGEMENT_KEY") or ""
        now, peer = self.gw.clock.now(), req.peer
        if not stored and not from_env:
            raise ManagementError(403, "FORBIDDEN", "management key not configured (run `%s init` or set "
                                                    "remote-management.secret-key)" % program_name())
        auth = req.headers.get("authorization") or ""
        presented = (auth[7:] if auth.lower().startswith("bearer ") else auth).strip() or \
            (req.headers.get("x-management-key") or "").strip()
        if presented and self._matches(stored, from_env, presented):
            self.failures.pop(peer, None)
            return
        if not local:
            self.failures[peer] = self.failures.get(peer, 0) + 1
            if self.failures[peer] >= self.BAN_AFTER:
                self.failures.pop(peer)
                self.banned[peer] = now + self.BAN_FOR
                log.warning("management: %s banned for 30 minutes after %d failed attempts", peer, self.BAN_AFTER)
        raise ManagementError(401, "UNAUTHORIZED", "invalid management key" if presented else
                              "missing management key")

    def _matches(self, stored, from_env, presented):
        if from_env and hmac.compare_digest(presented.encode("utf-8", "replace"), from_env.encode("utf-8", "replace")):
            return True
        if not stored:
            return False
        memo = hashlib.sha256((stored + "\0" + presented).encode("utf-8", "replace")).digest()
        if memo in self.verified:
            return True
        if verify_secret(stored, presented):
            if len(self.verified) > 64:
                self.verified.clear()
            self.verified.add(memo)
            return True
        return False

    def audit(self, req, what):
        """Every change is logged: what, from where (never a secret)."""
        log.info("management: %s (from %s)", what, req.peer)

    # -- persistence ----------------------------------------------------------------------------------------------
    async def persist(self, req, what, change, bad_status=400):
        """Apply `change(data)` to config.yaml (validated as a whole, written atomically with untouched lines
        kept) and to the running gateway at once. Invalid results change nothing: 400 (or `bad_status`) with the
        line that is wrong."""
        cf = self.gw.config_file
        if cf is None:
            raise ManagementError(409, "WRITE_FAILED", "this gateway runs without a config file; start it with one "
                                                       "(--config) to change settings from the API")
        try:
            cfg = await asyncio.get_running_loop().run_in_executor(None, cf.update, change)
        except ConfigError as e:
            raise ManagementError(bad_status, "INVALID_REQUEST" if bad_status == 400 else "INVALID_CONFIG", str(e))
        except OSError as e:
            raise ManagementError(500, "WRITE_FAILED", "failed to save config: %s" % (e.strerror or e))
        self.gw.adopt(cfg)
        self.audit(req, what)
        return cfg

    # -- settings -------------------------------------------------------------------------------------------------
    @staticmethod
    def _value(req, kind):
        body = management_json(req, '{"value": %s}' % TYPE_WORDS[kind])
        value = body.get("value") if isinstance(body, dict) else None
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            raise bad_request('invalid body: expected {"value": %s}' % TYPE_WORDS[kind])
        return value

    async def get_setting(self, name, req):
        path = SETTINGS[name][0]
        return {path[-1]: get_path(self.gw.cfg.data, path)}

    async def put_setting(self, name, req):
        path, kind, bounds = SETTINGS[name]
        value = self._value(req, kind)
        if bounds and not bounds[0] <= value <= bounds[1]:
            raise bad_request("%s must be between %d and %d" % (name, bounds[0], bounds[1]))
        if name == "proxy-url" and value:
            try:
                ProxySpec(value)
            except UpstreamError as e:
                raise bad_request("proxy-url: %s" % e.message)

        def change(data):
            holder = data
            for p in path[:-1]:
                if not isinstance(holder.get(p), dict):
                    holder[p] = {}
                holder = holder[p]
            holder[path[-1]] = value
        shown = redact_url(value) if name == "proxy-url" and value else value
        await self.persist(req, "%s set to %s" % (name, json.dumps(shown)), change)
        return {path[-1]: value}

    async def delete_proxy_url(self, req):
        await self.persist(req, "proxy-url cleared", lambda data: data.__setitem__("proxy-url", ""))
        return {"proxy-url": ""}

    async def get_recording(self, req):
        return {"usage-statistics-enabled": self.gw.recording and self.gw.cfg.usage["enabled"]}

    async def put_recording(self, req):
        value = self._value(req, bool)

        def change(data):
            if not isinstance(data.get("usage"), dict):
                data["usage"] = {}
            data["usage"]["enabled"] = value
        await self.persist(req, "usage recording turned %s" % ("on" if value else "off"), change)
        self.gw.recording = value
        if value:
            self.gw.start_usage()  # takes effect at once (the original needed a restart)
        return {"usage-statistics-enabled": value}

    # -- config -----------------------------------------------------------------------------------------------------
    async def get_config(self, req):
        data = masked_copy(self.gw.cfg.data)
        rm = data.get("remote-management") or {}
        rm["secret-key"] = "(set)" if self.key_configured() else ""
        return data

    def _file_text(self):
        cf = self.gw.config_file
        if cf is None or not os.path.exists(cf.path):
            raise ManagementError(404, "NOT_FOUND", "config file not found")
        try:
            return cf.read()
        except (OSError, ConfigError) as e:
            raise ManagementError(500, "INTERNAL_ERROR", "cannot read config: %s" % e)

    async def get_config_yaml(self, req):
        """The file as it is, with secrets masked in place (every other byte as on disk)."""
        text = self._file_text()
        try:
            data = yaml_load(text)[0]
            if isinstance(data, dict):
                text = yaml_edit(text, masked_copy(data))
        except ConfigError:
            pass  # a file the gateway cannot read has nothing it could mask; show it as it is
        return Response(200, text.encode("utf-8"), [("Cache-Control", "no-store"),
                                                    ("X-Content-Type-Options", "nosniff")],
                        "application/yaml; charset=utf-8")

    async def put_config_yaml(self, req):
        if len(req.body) > 10 << 20:
            raise ManagementError(413, "INVALID_REQUEST", "config larger than 10 MiB")
        try:
            text = req.body.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("the config must be UTF-8 text")
        cf = self.gw.config_file
        if cf is None:
            raise ManagementError(409, "WRITE_FAILED", "this gateway runs without a config file")
        try:
            new = yaml_load(text, cf.path)[0]
        except YamlError as e:
            raise bad_request(str(e))
        if new is not None and not isinstance(new, dict):
            raise bad_request("%s: the top level must be a mapping of keys" % cf.path)
        old = yaml_load(self._file_text())[0] or {}
        new = new or {}
        restored = unmask(json.loads(json.dumps(new)), old)
        if restored != new:
            text = yaml_edit(text, restored)
        try:
            cfg = await asyncio.get_running_loop().run_in_executor(None, cf.replace, text)
        except ConfigError as e:
            raise ManagementError(422, "INVALID_CONFIG", str(e))
        except OSError as e:
            raise ManagementError(500, "WRITE_FAILED", "failed to write config: %s" % (e.strerror or e))
        changed = sorted(k for k in set(old) | set(restored) if old.get(k) != restored.get(k))
        self.gw.adopt(cfg)
        self.audit(req, "config.yaml replaced (%s)" % (", ".join(changed) or "no key changed"))
        return {"ok": True, "changed": changed}

    async def latest_version(self, req):
        """The newest release on the signed release channel (`update-url`; cached 15 minutes, a stale answer when
        the fetch fails) — the same check as `llm-mux update --check`."""
        now = self.gw.clock.wall()
        if self.latest and now - self.latest[0] < 900:
            return self._latest(cached=True)
        try:
            release = await fetch_release(self.gw.client, self.gw.cfg.update_url or RELEASE_MANIFEST_URL)
        except ReleaseError as e:
            if self.latest:
                return self._latest(cached=True, stale=True)
            raise ManagementError(502, "INTERNAL_ERROR", str(e))
        self.latest = (now, release["version"])
        return self._latest()

    def _latest(self, **flags):
        version = self.latest[1]
        return dict({"latest-version": version, "current-version": __version__,
                     "update-available": version_tuple(version) > version_tuple(__version__)}, **flags)

    # -- api-keys ---------------------------------------------------------------------------------------------------
    def _file_data(self):
        cf = self.gw.config_file
        if cf is None:
            return self.gw.cfg.data
        try:
            return yaml_load(cf.read())[0] or {}
        except ConfigError:
            return {}

    async def get_api_keys(self, req):
        keys = []
        for i, k in enumerate(self.gw.cfg.client_keys):
            entry = {"index": i, "name": k.name, "key": "(hashed)" if k.digest is not None else mask_secret(k.secret),
                     "models": list(k.models), "rpm": k.rpm, "tpm": k.tpm, "max-budget": k.max_budget,
                     "budget-duration": format_seconds(k.budget_seconds),
                     "expires": rfc3339(k.expires) if k.expires else None, "disabled": k.disabled}
            entry["usage"] = self.gw.key_limits.snapshot(k)
            if self.gw.store is not None:
                try:  # across replicas
                    entry["usage"] = await self.gw.store.key_usage(k.name, k.budget_seconds)
                except PgError:
                    entry["usage"]["replica_only"] = True
            keys.append(entry)
        return {"api-keys": [k["key"] for k in keys], "keys": keys}

    @staticmethod
    def _items(body, what):
        if isinstance(body, dict) and "items" in body:
            body = body["items"]
            if not body:
                raise bad_request("items must not be empty (send [] to clear)")
        if not isinstance(body, list):
            raise bad_request("invalid body: expected a JSON array of %s or {\"items\": [...]}" % what)
        return body

    @staticmethod
    def _check_key_entry(entry):
        if isinstance(entry, str):
            if not entry.strip():
                raise bad_request("an API key must not be empty")
            return entry.strip()
        if isinstance(entry, dict):
            unknown = set(entry) - set(ClientKey.LIMIT_FIELDS)
            if unknown:
                raise bad_request("unknown API key field(s): %s (known: %s)" % (
                    ", ".join(sorted(unknown)), ", ".join(ClientKey.LIMIT_FIELDS)))
            if not isinstance(entry.get("key"), str) or not entry["key"].strip():
                raise bad_request("an API key object needs \"key\" (the key, or sha256:<hex>)")
            return entry
        raise bad_request("an API key is a string or an object with \"key\", got %s" % type(entry).__name__)

    async def _replace_list(self, req, key, what, check):
        """PUT of a whole list setting: every entry checked; a masked secret sent back keeps the file's value."""
        items = [check(e) for e in self._items(management_json(req, "a list of " + what), what)]

        def change(data):
            data[key] = unmask({key: items}, {key: data.get(key) or []})[key]
        await self.persist(req, "%s replaced (%d %s)" % (key, len(items), what), change)
        return {"status": "ok"}

    async def put_api_keys(self, req):
        return await self._replace_list(req, "api-keys", "API keys", self._check_key_entry)

    async def patch_api_keys(self, req):
        body = management_json(req, '{"index": i, "value": key} or {"old": key, "new": key}')
        if not isinstance(body, dict):
            raise bad_request("invalid body")
        what = []

        def change(data):
            keys = data.get("api-keys") or []
            if isinstance(body.get("index"), int) and not isinstance(body["index"], bool) and "value" in body:
                i = body["index"]
                if not 0 <= i < len(keys):
                    raise bad_request("index %d out of range (0..%d)" % (i, len(keys) - 1))
                keys[i] = unmask({"k": [self._check_key_entry(body["value"])]}, {"k": [keys[i]]})["k"][0]
                what.append("api key #%d replaced" % i)
            elif "old" in body and "new" in body:
                if not isinstance(body["old"], str):
                    raise bad_request("old must be the key (a string)")
                new = self._check_key_entry(body["new"])
                for i, k in enumerate(keys):
                    secret = k.get("key") if isinstance(k, dict) else k
                    if isinstance(secret, str) and hmac.compare_digest(secret.encode(), body["old"].encode()):
                        keys[i] = new
                        what.append("api key #%d replaced" % i)
                        break
                else:
                    keys.append(new)
                    what.append("api key added")
            else:
                raise bad_request('missing fields: expected {"index", "value"} or {"old", "new"}')
            data["api-keys"] = keys
        await self.persist(req, "api-keys changed", change)
        return {"status": "ok"}

    async def delete_api_keys(self, req):
        q = req.query

        def change(data):
            keys = data.get("api-keys") or []
            if (q.get("index") or "").strip().isdigit():
                i = int(q["index"])
                if not 0 <= i < len(keys):
                    raise bad_request("index %d out of range" % i)
                del keys[i]
            elif q.get("value") or q.get("name"):
                cfg_keys = self.gw.cfg.client_keys
                value, name = (q.get("value") or "").strip(), (q.get("name") or "").strip()
                before = len(keys)
                kept = []
                for i, k in enumerate(keys):
                    secret = k.get("key") if isinstance(k, dict) else k
                    named = cfg_keys[i].name if i < len(cfg_keys) else None
                    hit = (value and isinstance(secret, str) and (hmac.compare_digest(secret.encode(), value.encode())
                                                                  or secret == "sha256:" + hashlib.sha256(
                                value.encode()).hexdigest())) or (name and named == name)
                    if not hit:
                        kept.append(k)
                if len(kept) == before:
                    raise ManagementError(404, "NOT_FOUND", "no such API key")
                keys[:] = kept
            else:
                raise bad_request("missing index, value or name")
            data["api-keys"] = keys
        await self.persist(req, "api key revoked", change)
        return {"status": "ok"}

    async def create_api_key(self, req):
        """A new key with limits, generated here; only its SHA-256 is stored, the key is shown once."""
        body = management_json(req, '{"name": ..., "models"?, "rpm"?, "tpm"?, "max-budget"?, ...}')
        if not isinstance(body, dict):
            raise bad_request("invalid body: expected an object")
        if "key" in body:
            raise bad_request("keys are generated here; leave out \"key\" (PATCH api-keys adds a key you have)")
        entry = dict(body)
        if not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise bad_request("name is required")
        if any(k.name == entry["name"] for k in self.gw.cfg.client_keys):
            raise bad_request("an API key named %r exists" % entry["name"])
        secret = "sk-mux-" + binascii.hexlify(os.urandom(20)).decode()
        entry = dict({"key": "sha256:" + hashlib.sha256(secret.encode()).hexdigest()}, **entry)
        self._check_key_entry(entry)

        def change(data):
            data["api-keys"] = (data.get("api-keys") or []) + [entry]
        await self.persist(req, "api key %r created" % entry["name"], change)
        return {"status": "ok", "name": entry["name"], "key": secret}

    # -- providers --------------------------------------------------------------------------------------------------
    async def get_providers(self, req):
        out = []
        for i, raw in enumerate(self.gw.cfg.data["providers"]):
            entry = masked_copy(raw)
            entry["index"] = i
            out.append(entry)
        return {"providers": out}

    @staticmethod
    def _check_provider(p):
        if not isinstance(p, dict):
            raise bad_request("a provider is an object with \"type\", got %s" % type(p).__name__)
        if not isinstance(p.get("type"), str) or not p["type"]:
            raise bad_request("a provider needs \"type\" (one of %s)" % ", ".join(sorted(PROVIDERS.entries)))
        if p["type"] not in PROVIDERS.entries:
            raise bad_request("unknown provider type %r (one of %s)" % (p["type"], ", ".join(sorted(PROVIDERS.entries))))
        unknown = set(p) - set(PROVIDER_SCHEMA) - {"index"}
        if unknown:
            raise bad_request("unknown provider field(s): %s" % ", ".join(sorted(unknown)))
        return {k: v for k, v in p.items() if k != "index"}

    async def put_providers(self, req):
        return await self._replace_list(req, "providers", "providers", self._check_provider)

    async def patch_providers(self, req):
        body = management_json(req, '{"index": i, "value": provider}')
        if not isinstance(body, dict) or not isinstance(body.get("index"), int) or isinstance(body["index"], bool):
            raise bad_request('invalid body: expected {"index": i, "value": provider}')
        value = self._check_provider(body.get("value"))

        def change(data):
            items = data.get("providers") or []
            i = body["index"]
            if not 0 <= i < len(items):
                raise bad_request("index %d out of range" % i)
            items[i] = unmask({"p": [value]}, {"p": [items[i]]})["p"][0]
            data["providers"] = items
        await self.persist(req, "provider #%d changed" % body["index"], change)
        return {"status": "ok"}

    async def delete_providers(self, req):
        raw = (req.query.get("index") or "").strip()
        if not raw.isdigit():
            raise bad_request("missing or invalid index")

        def change(data):
            items = data.get("providers") or []
            if int(raw) >= len(items):
                raise bad_request("missing or invalid index")
            del items[int(raw)]
            data["providers"] = items
        await self.persist(req, "provider #%s removed" % raw, change)
        return {"status": "ok"}

    # -- oauth-excluded-models --------------------------------------------------------------------------------------
    async def get_excluded(self, req):
        return {"oauth-excluded-models": self.gw.cfg.data["oauth-excluded-models"]}

    @staticmethod
    def _patterns(models, provider):
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise bad_request("models for %s must be a list of strings" % provider)
        return sorted({m.strip() for m in models if m.strip()})

    def _provider_name(self, name):
        if not isinstance(name, str) or not name.strip():
            raise bad_request("invalid provider")
        name = name.strip().lower()
        if name not in PROVIDERS.files and name not in PROVIDERS.entries and name not in PROVIDERS.logins():
            raise bad_request("unknown provider %r" % name)
        return name

    async def put_excluded(self, req):
        body = management_json(req, "{provider: [patterns]}")
        if isinstance(body, dict) and "items" in body:
            body = body["items"]
        if not isinstance(body, dict):
            raise bad_request("invalid body: expected {provider: [patterns]}")
        table = {self._provider_name(k): self._patterns(v, k) for k, v in body.items()}
        table = {k: v for k, v in table.items() if v}
        await self.persist(req, "oauth-excluded-models replaced", lambda data: data.__setitem__(
            "oauth-excluded-models", table))
        return {"status": "ok"}

    async def patch_excluded(self, req):
        body = management_json(req, '{"provider": name, "models": [patterns]}')
        if not isinstance(body, dict):
            raise bad_request("invalid body")
        provider = self._provider_name(body.get("provider"))
        models = self._patterns(body.get("models", []), provider)

        def change(data):
            table = data.get("oauth-excluded-models") or {}
            if models:
                table[provider] = models
            elif provider in table:
                del table[provider]
            else:
                raise ManagementError(404, "NOT_FOUND", "provider not found")
            data["oauth-excluded-models"] = table
        await self.persist(req, "oauth-excluded-models for %s changed" % provider, change)
        return {"status": "ok"}

    async def delete_excluded(self, req):
        if not req.query.get("provider"):
            raise bad_request("missing provider")
        provider = req.query["provider"].strip().lower()

        def change(data):
            table = data.get("oauth-excluded-models") or {}
            if provider not in table:
                raise ManagementError(404, "NOT_FOUND", "provider not found")
            del table[provider]
            data["oauth-excluded-models"] = table
        await self.persist(req, "oauth-excluded-models for %s removed" % provider, change)
        return {"status": "ok"}

    # -- logs -------------------------------------------------------------------------------------------------------
    def _log_file(self):
        return os.path.join(logs_dir(self.gw.cfg), "llm-mux.log")

    async def get_logs(self, req):
        """The newest log lines: from the log file (and its rotations) with logging-to-file, else from memory.
        `after` (epoch seconds) keeps newer lines, `limit` the last N."""
        q = req.query
        try:
            after = float(q.get("after") or 0)
            limit = int(q["limit"]) if q.get("limit") else None
            if limit is not None and limit <= 0:
                raise ValueError
        except ValueError:
            raise bad_request("invalid after or limit")
        if self.gw.cfg.logging_to_file:
            lines, scanned = await asyncio.get_running_loop().run_in_executor(None, read_log_files,
                                                                              self._log_file(), after)
        else:
            lines = LOG_RING.since(after)
            scanned = len(LOG_RING.lines)
        if limit:
            lines = lines[-limit:]
        latest = max([after] + [t for t, _ in lines])
        return {"lines": [line for _, line in lines], "line_count": scanned, "latest_timestamp": int(latest),
                "source": "file" if self.gw.cfg.logging_to_file else "memory"}

    async def delete_logs(self, req):
        LOG_RING.lines.clear()
        removed = 0
        path = self._log_file()
        if self.gw.cfg.logging_to_file and os.path.exists(path):
            for n in range(1, 10):
                try:
                    os.unlink("%s.%d" % (path, n))
                    removed += 1
                except OSError:
                    pass
            with open(path, "r+b") as f:
                f.truncate(0)
        self.audit(req, "logs cleared")
        return {"success": True, "message": "Logs cleared successfully", "removed": removed}

    async def list_error_logs(self, req):
        d = self.gw.request_log.directory()
        files = []
        try:
            names = os.listdir(d)
        except OSError:
            names = []
        for name in names:
            if name.startswith("error-") and name.endswith(".log"):
                try:
                    st = os.stat(os.path.join(d, name))
                except OSError:
                    continue
                files.append({"name": name, "size": st.st_size, "modified": int(st.st_mtime)})
        files.sort(key=lambda f: (f["modified"], f["name"]), reverse=True)
        return {"files": files, "request-log": self.gw.cfg.request_log}

    async def get_error_log(self, req, name):
        if "/" in name or "\\" in name or name.startswith("."):
            raise bad_request("invalid name")
        if not (name.startswith("error-") and name.endswith(".log")):
            raise ManagementError(404, "NOT_FOUND", "no such request error log")
        path = os.path.join(self.gw.request_log.directory(), name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            raise ManagementError(404, "NOT_FOUND", "no such request error log")
        return Response(200, data, [("Content-Disposition", 'attachment; filename="%s"' % name),
                                    ("Cache-Control", "no-store")], "text/plain; charset=utf-8")

    # -- credentials ------------------------------------------------------------------------------------------------
    def _credential(self, name):
        """The live credentials of the auth file `name` (several for a multi-project Gemini file)."""
        if not isinstance(name, str) or not name or "/" in name or "\\" in name:
            raise bad_request("invalid name")
        found = [(p, c) for p in self.gw.registry.providers for c in p.credentials
                 if c.path is not None and os.path.basename(c.path) == name]
        if not found:
            raise ManagementError(404, "NOT_FOUND", "no credential file %s" % name)
        return found

    def _health(self, provider, cred, now, wall):
        window = float(self.gw.cfg.quota_window)
        recent = [r for r in self.gw.recent.get(cred.id, ()) if r[0] > wall - window]
        cooldowns = []
        for model, st in sorted(cred.states.items()):
            if st.until > now:
                cooldowns.append({"model": model, "seconds_left": math.ceil(st.until - now),
                                  "until": rfc3339(wall + st.until - now), "reason": st.last_error or ""})
        if cred.until_all > now:
            cooldowns.insert(0, {"model": "*", "seconds_left": math.ceil(cred.until_all - now),
                                 "until": rfc3339(wall + cred.until_all - now), "reason": cred.last_error or ""})
        exp = provider.token_expiry(cred)
        meta_refresh = parse_instant(next((cred.meta.get(k) for k in ("last_refresh", "lastRefresh",
                                                                       "last_refreshed_at") if cred.meta.get(k)), None))
        last_refresh = cred.last_refresh or meta_refresh
        try:
            st = os.stat(cred.path)
            size, modtime = st.st_size, rfc3339(st.st_mtime)
        except OSError:
            size, modtime = 0, None
        status = "disabled" if cred.disabled else "cooling" if cooldowns else "error" if cred.refresh_error \
            else "active"
        tokens = sum(r[1] for r in recent)
        return {
            "id": cred.id, "name": os.path.basename(cred.path), "provider": provider.id, "type": provider.id,
            "provider_name": provider.name, "label": cred.label, "email": cred.meta.get("email") or "",
            "account": cred.meta.get("email") or cred.meta.get("username") or cred.label,
            "account_type": "oauth", "project": cred.project, "status": status,
            "status_message": cred.disabled or cred.refresh_error or cred.last_error or "",
            "disabled": bool(cred.disabled), "unavailable": bool(cooldowns) or bool(cred.disabled),
            "runtime_only": False, "source": "file", "size": size, "modtime": modtime,
            "expires_at": rfc3339(exp) if exp else None,
            "expires_in_seconds": int(exp - wall) if exp else None,
            "last_refresh": rfc3339(last_refresh) if last_refresh else None, "refresh_error": cred.refresh_error,
            "last_error": cred.last_error, "in_flight": cred.in_flight, "uses": cred.uses,
            "cooldowns": cooldowns, "quota": dict(cred.quota),
            "quota_probe": type(provider).probe_quota is not Provider.probe_quota,
            "recent": {"window_seconds": int(window), "requests": len(recent), "tokens": tokens,
                       "errors": sum(1 for r in recent if r[2])},
            "quota_state": {"active_requests": cred.in_flight, "total_tokens_used": tokens,
                            "in_cooldown": bool(cooldowns),
                            "cooldown_remaining_seconds": max([c["seconds_left"] for c in cooldowns] or [0]),
                            "learned_limit": None},
        }

    async def list_auth_files(self, req):
        now, wall = self.gw.clock.now(), self.gw.clock.wall()
        entries = [self._health(p, c, now, wall) for p in self.gw.registry.providers for c in p.credentials
                   if c.path is not None]
        listed = {e["name"] for e in entries}
        for name, problem in sorted(self.gw.broken_files().items()):  # files the gateway could not use
            if name not in listed:
                entries.append({"id": name, "name": name, "provider": "unknown", "type": "unknown", "label": name,
                                "status": "error", "status_message": problem, "disabled": True,
                                "unavailable": True, "runtime_only": False, "source": "file", "cooldowns": [],
                                "quota": {}, "quota_state": {"active_requests": 0, "total_tokens_used": 0,
                                                             "in_cooldown": False, "cooldown_remaining_seconds": 0,
                                                             "learned_limit": None}})
        entries.sort(key=lambda e: (e["name"].lower(), e["id"]))
        return {"files": entries}

    async def download_auth_file(self, req):
        name = req.query.get("name") or ""
        if not name or "/" in name or "\\" in name or not name.endswith(".json") or name.startswith("."):
            raise bad_request("invalid name")
        try:
            with open(os.path.join(self.gw.cfg.auth_dir, name), "rb") as f:
                data = f.read()
        except OSError:
            raise ManagementError(404, "NOT_FOUND", "file not found")
        self.audit(req, "credential file %s downloaded" % name)
        return Response(200, data, [("Content-Disposition", 'attachment; filename="%s"' % name),
                                    ("Cache-Control", "no-store")], "application/json")

    def _save_upload(self, name, data):
        """One uploaded credential file, checked before it is written: returns None or the problem."""
        name = os.path.basename(name or "")
        if not name.endswith(".json") or name.startswith("."):
            return name, "file must be .json"
        if len(data) > self.MAX_UPLOAD:
            return name, "file larger than 1 MiB"
        try:
            meta = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            return name, "not valid JSON: %s" % e
        if not isinstance(meta, dict) or not isinstance(meta.get("type"), str) or not meta["type"].strip():
            return name, "not a credential file (no \"type\")"
        if PROVIDERS.file_class(meta) is None:
            return name, "unknown credential type %r" % meta["type"]
        self.gw.write_credential(name, meta)
        return name, None

    async def upload_auth_files(self, req):
        ctype = req.headers.get("content-type") or ""
        results = []
        if ctype.lower().startswith("multipart/form-data"):
            try:
                parts = parse_multipart(req.body, ctype)
            except ValueError as e:
                raise bad_request("invalid multipart body: %s" % e)
            files = [p for p in parts if p[0] in ("files", "file[]", "file") and p[1] is not None]
            if not files:
                raise bad_request("no file in the form (field files, file[] or file)")
            for _, filename, _, data in files:
                results.append(self._save_upload(filename, data))
        else:
            name = req.query.get("name") or ""
            if not name or "/" in name or "\\" in name:
                raise bad_request("invalid name")
            results.append(self._save_upload(name, req.body))
        self.audit(req, "credential file(s) uploaded: %s" % ", ".join(
            "%s (%s)" % (n, "ok" if err is None else err) for n, err in results))
        out = [{"name": n, "status": "ok"} if err is None else {"name": n, "status": "error", "message": err}
               for n, err in results]
        if all(err is None for _, err in results):
            return {"status": "ok", "count": len(results), "results": out}
        if len(results) == 1:
            raise bad_request("%s: %s" % results[0])
        return json_response({"status": "partial", "count": len(results), "results": out}, 207)

    async def delete_auth_files(self, req):
        q = req.query
        d = self.gw.cfg.auth_dir
        if (q.get("all") or "").lower() in ("true", "1", "*"):
            names = sorted(n for n in os.listdir(d) if n.endswith(".json") and not n.startswith("."))
        else:
            name = q.get("name") or ""
            if not name or "/" in name or "\\" in name or name.startswith("."):
                raise bad_request("invalid name")
            if not os.path.exists(os.path.join(d, name)):
                raise ManagementError(404, "NOT_FOUND", "file not found")
            names = [name]
        for name in names:
            try:
                os.unlink(os.path.join(d, name))
            except OSError as e:
                raise ManagementError(500, "WRITE_FAILED", "cannot delete %s: %s" % (name, e.strerror or e))
        self.gw.reload_credentials()
        self.audit(req, "credential file(s) deleted: %s" % ", ".join(names))
        return {"status": "ok", "deleted": len(names)}

    async def import_auth_files(self, req):
        """What the official CLIs stored on this machine (Claude Code, Codex, Gemini CLI, Kiro, ...)."""
        body = json_or_none(req.body) if req.body else {}
        only = body.get("tool") if isinstance(body, dict) else None
        out = io.StringIO()
        imported, skipped = await asyncio.get_running_loop().run_in_executor(None, lambda: import_cli_credentials(
            self.gw.cfg.auth_dir, out=out, cfg=self.gw.cfg, only=only))
        self.gw.reload_credentials()
        self.audit(req, "official tools' credentials imported: %d" % len(imported))
        return {"imported": [{"tool": t, "source": s, "name": os.path.basename(p)} for t, s, p in imported],
                "skipped": [{"tool": t, "reason": why} for t, why in skipped]}

    async def refresh_auth_file(self, req):
        found = self._credential(req.query.get("name"))
        provider, cred = found[0]
        if provider.refresh_lead is None:
            raise bad_request("%s credentials have no token to refresh" % provider.name)
        ok = await self.gw.refresher.ensure(cred, provider, force=True)
        self.audit(req, "credential %s refreshed on demand (%s)" % (cred.label, "ok" if ok else "failed"))
        if not ok or cred.refresh_error:
            raise ManagementError(502, "INTERNAL_ERROR", "refresh failed: %s" % (cred.refresh_error or "unknown"))
        return self._health(provider, cred, self.gw.clock.now(), self.gw.clock.wall())

    async def auth_file_status(self, req):
        body = management_json(req, '{"name": file, "disabled": bool}')
        if not isinstance(body, dict) or not isinstance(body.get("disabled"), bool):
            raise bad_request('invalid body: expected {"name": file, "disabled": true or false}')
        found = self._credential(body.get("name"))
        cred = found[0][1]
        meta = dict(cred.meta)
        if body["disabled"]:
            meta["disabled"] = True
        else:
            meta.pop("disabled", None)
        self.gw.write_credential(os.path.basename(cred.path), meta)
        self.audit(req, "credential %s %s" % (cred.label, "disabled" if body["disabled"] else "enabled"))
        return {"status": "ok", "name": body["name"], "disabled": body["disabled"]}

    async def reset_auth_file(self, req):
        """Clear a credential's cooldowns (and a rejection), putting it back in rotation now."""
        found = self._credential(req.query.get("name") or (json_or_none(req.body) or {}).get("name"))
        for _, cred in found:
            cred.states.clear()
            cred.until_all = 0.0
            cred.last_error = None
            cred.refresh_after = 0.0
            if cred.disabled and not cred.meta.get("disabled"):
                cred.disabled = None
            if self.gw.sync is not None:
                self.gw.sync.mark(cred)
        self.gw.save_rejections()
        self.audit(req, "cooldowns of %s cleared" % found[0][1].label)
        return {"status": "ok"}

    async def probe_auth_file(self, req):
        provider, cred = self._credential(req.query.get("name"))[0]
        try:
            windows = await provider.probe_quota(cred, self.gw.client)
        except RefreshError as e:
            raise ManagementError(502, "INTERNAL_ERROR", e.message)
        if windows is None:
            raise bad_request("%s has no quota endpoint; its quota windows show as its answers report them"
                              % provider.name)
        seen = rfc3339(self.gw.clock.wall())
        for w in windows.values():
            w["reported_at"] = seen
        cred.quota.update(windows)
        return {"name": os.path.basename(cred.path), "quota": windows}

    async def vertex_import(self, req):
        """A service-account key (multipart field `file`, or JSON {credentials, project_id?, location?})."""
        ctype = (req.headers.get("content-type") or "").lower()
        location = req.query.get("location") or ""
        if ctype.startswith("multipart/form-data"):
            try:
                parts = parse_multipart(req.body, req.headers.get("content-type"))
            except ValueError as e:
                raise bad_request("invalid multipart body: %s" % e)
            files = [p for p in parts if p[0] == "file"]
            fields = {p[0]: p[3].decode("utf-8", "replace") for p in parts if p[1] is None}
            if not files:
                raise bad_request("file required")
            raw = files[0][3]
            location = fields.get("location") or location
        else:
            body = management_json(req, '{"credentials": service-account JSON, "location"?}')
            if not isinstance(body, dict) or "credentials" not in body:
                raise bad_request("credentials required (the service-account JSON)")
            raw = body["credentials"]
            raw = raw.encode() if isinstance(raw, str) else json.dumps(raw).encode()
            location = body.get("location") or location
        if not isinstance(location, str):
            raise bad_request("location must be a string")
        location = location or "us-central1"
        try:
            sa = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request("the service account is not valid JSON: %s" % e)
        try:
            name, meta = vertex_credential(sa, location)
        except LoginError as e:
            raise bad_request(str(e))
        path = self.gw.write_credential(name, meta)
        self.audit(req, "Vertex service account %s imported" % meta["email"])
        return {"status": "ok", "auth_file": path, "project_id": meta["project_id"], "email": meta["email"],
                "location": location}

    # -- logins -----------------------------------------------------------------------------------------------------
    async def oauth_start(self, req):
        body = management_json(req, '{"provider": name}')
        if not isinstance(body, dict):
            raise bad_request("invalid body: expected {\"provider\": name}")
        view = await self.logins.start(body)
        self.audit(req, "%s login started" % view["provider"])
        return dict(view, status="ok" if view["status"] == "pending" else view["status"], login_status=view["status"])

    async def oauth_status(self, req, state):
        return self.logins.status(state)

    async def oauth_cancel(self, req, state):
        self.logins.cancel(state)
        self.audit(req, "login %s… cancelled" % state[:6])
        return {"status": "ok"}

    async def oauth_callback(self, req):
        body = management_json(req, '{"state": s, "redirect_url" | "code" | "token": ...}')
        if not isinstance(body, dict) or not isinstance(body.get("state"), str):
            raise bad_request("state is required")
        text = body.get("redirect_url") or body.get("code") or body.get("token")
        if not isinstance(text, str) or not text.strip():
            raise bad_request("redirect_url, code or token is required")
        self.logins.paste(body["state"], text.strip())
        return {"status": "ok"}

    # -- views for the dashboard ------------------------------------------------------------------------------------
    async def models(self, req):
        out = []
        for name, routes in sorted(self.gw.registry.routes.items()):
            out.append({"id": name, "providers": sorted({r.provider.name for r in routes}),
                        "upstream": sorted({r.model for r in routes}),
                        "price": list(price_of(name, self.gw.cfg.pricing) or ())})
        return {"models": out}

    async def overview(self, req):
        """What the dashboard's overview shows live: in-flight requests, credentials, models, uptime."""
        creds = [c for p in self.gw.registry.providers for c in p.credentials]
        now = self.gw.clock.now()
        return {"version": __version__, "uptime_seconds": int(time.time() - self.gw.started), "pid": os.getpid(),
                "worker": int(os.environ.get("LLM_MUX_WORKER") or 0),
                "in_flight": sum(c.in_flight for c in creds), "credentials": len(creds),
                "cooling": sum(1 for c in creds if c.until_all > now or any(s.until > now for s in c.states.values())),
                "disabled": sum(1 for c in creds if c.disabled), "models": len(self.gw.registry.routes),
                "providers": len(self.gw.registry.providers), "recording": self.gw.recording,
                "request_log": self.gw.cfg.request_log, "logging_to_file": self.gw.cfg.logging_to_file,
                "config_path": self.gw.config_file.path if self.gw.config_file else None,
                "logins": sorted(PROVIDERS.logins())}

    # -- usage (gateway.md §7.4) ------------------------------------------------------------------------------------
    async def usage(self, req):
        """Usage over a period (from / to / days) with optional provider, model, key and credential filters."""
        q = req.query
        try:
            until = parse_day(q.get("to"), end=True) if q.get("to") else time.time()
            if q.get("days"):
                since = until - 86400 * max(1, int(q["days"]))
            else:
                since = parse_day(q.get("from")) if q.get("from") else \
                    until - 86400 * self.gw.cfg.usage["retention-days"]
        except ValueError as e:
            raise bad_request("bad period: %s" % e)
        filters = {k: q[k] for k in ("provider", "model", "key", "credential") if q.get(k)}
        report = {}
        if self.gw.usage is not None:
            loop = asyncio.get_running_loop()
            try:
                report = await loop.run_in_executor(None, usage_report, self.gw.usage_target, since, until, filters)
            except (PgError, OSError) as e:
                raise ManagementError(503, "usage_unavailable", "the usage database cannot be read now: %s" % e)
        report["period"] = {"from": rfc3339(since), "to": rfc3339(until),
                            "retention_days": self.gw.cfg.usage["retention-days"]}
        return report


# The dashboard (/dashboard): one self-contained page, no CDN, fonts or outside scripts, so it works air-gapped.
# It asks for the management key, keeps it in the tab's sessionStorage and sends it with every call.
DASHBOARD_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>llm-mux dashboard</title><link rel="icon" href="data:,">
<style>
:root{--bg:#f6f7f9;--fg:#1d2330;--mute:#6b7280;--line:#dde1e7;--card:#fff;--acc:#2f6fde;--bad:#c63c3c;--ok:#23854a;--warn:#b7791f}
@media (prefers-color-scheme:dark){:root{--bg:#14171c;--fg:#e6e8eb;--mute:#9aa3ad;--line:#2b3139;--card:#1b1f26;--acc:#6a9cf0}}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;gap:16px;align-items:center;padding:10px 18px;border-bottom:1px solid var(--line);background:var(--card)}
header b{font-size:16px}nav button{background:none;border:0;padding:6px 10px;color:var(--mute);cursor:pointer;font:inherit;border-radius:6px}
nav button.on{color:var(--fg);background:var(--bg);font-weight:600}main{padding:18px;max-width:1200px;margin:auto}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px;margin-bottom:14px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:10px}.stat b{display:block;font-size:22px}
.stat span{color:var(--mute);font-size:12px}table{width:100%;border-collapse:collapse}th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--mute);font-weight:500;font-size:12px}button.a,input,select,textarea{font:inherit;color:inherit;background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:5px 9px}
button.a{cursor:pointer}button.p{background:var(--acc);color:#fff;border-color:var(--acc)}.bad{color:var(--bad)}.ok{color:var(--ok)}.warn{color:var(--warn)}.mute{color:var(--mute)}
#err{display:none;background:#fde8e8;color:#8a1f1f;border:1px solid #f3b4b4;padding:10px 14px;border-radius:8px;margin-bottom:14px}
pre{white-space:pre-wrap;word-break:break-all;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;margin:0}
#logbox{height:60vh;overflow:auto;background:var(--bg);padding:8px;border-radius:6px}textarea{width:100%;height:55vh;font:12px/1.4 ui-monospace,Menlo,monospace}
.diff .add{background:rgba(35,133,74,.15)}.diff .del{background:rgba(198,60,60,.15)}.pill{display:inline-block;padding:1px 7px;border-radius:10px;font-size:12px;border:1px solid var(--line)}
.bar{height:6px;background:var(--line);border-radius:3px;width:120px;display:inline-block;vertical-align:middle}.bar i{display:block;height:6px;border-radius:3px;background:var(--acc)}
.row{display:flex;gap:8px;flex-wrap:wrap;align-items:center}svg text{fill:var(--mute);font-size:10px}.hidden{display:none}
</style></head><body>
<header><b>llm-mux</b><nav id="nav"></nav><span style="flex:1"></span><span id="who" class="mute"></span><button class="a" id="logout">Change key</button></header>
<main><div id="err"></div>
<section id="login" class="card hidden"><h3>Management key</h3><p class="mute">The key printed by <code>llm-mux init</code> (or on the first start).</p>
<form id="keyform" class="row"><input id="keyinput" type="password" autocomplete="current-password" size="40" placeholder="management key"><button class="a p" id="keysubmit">Open</button></form></section>
<section id="page"></section></main>
<script>
"use strict";
const API = "/v1/management";
const PAGES = ["overview", "credentials", "keys", "models", "logs", "config"];
const state = {page: "overview", timers: [], logAfter: 0, days: 7, yaml: ""};
const $ = (s, r) => (r || document).querySelector(s);
const esc = v => String(v === undefined || v === null ? "" : v).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
const num = n => (n || 0).toLocaleString();
const usd = n => "$" + (n || 0).toFixed(2);
function key() { return sessionStorage.getItem("llm-mux-key") || ""; }
function showError(msg) { const e = $("#err"); e.textContent = msg; e.style.display = msg ? "block" : "none"; }
async function api(path, opts) {
  opts = opts || {};
  const headers = Object.assign({"X-Management-Key": key()}, opts.headers || {});
  let body = opts.body;
  if (body !== undefined && typeof body !== "string") { body = JSON.stringify(body); headers["Content-Type"] = "application/json"; }
  let resp;
  try { resp = await fetch(API + path, {method: opts.method || "GET", headers: headers, body: body}); }
  catch (e) { throw new Error("the gateway cannot be reached: " + e.message); }
  const text = await resp.text();
  let data = null;
  try { data = JSON.parse(text); } catch (e) { data = null; }
  if (!resp.ok) {
    const msg = data && (typeof data.error === "string" ? data.error : (data.error && data.error.message) || data.message) || text || resp.statusText;
    const err = new Error(msg); err.status = resp.status; throw err;
  }
  if (opts.raw) return text;
  return data && data.data !== undefined && data.meta !== undefined ? data.data : data;
}
function clearTimers() { state.timers.forEach(clearInterval); state.timers = []; }
function every(ms, fn) { state.timers.push(setInterval(fn, ms)); }
async function guarded(fn) {
  try { showError(""); await fn(); }
  catch (e) {
    if (e.status === 401 || e.status === 403) { showError("Management API refused the key: " + e.message); askKey(); }
    else showError(e.message);
  }
}
function askKey() { clearTimers(); $("#login").classList.remove("hidden"); $("#page").innerHTML = ""; $("#keyinput").focus(); }
function nav() {
  $("#nav").innerHTML = PAGES.map(p => `<button id="nav-${p}" class="${p === state.page ? "on" : ""}">${p[0].toUpperCase() + p.slice(1)}</button>`).join("");
  PAGES.forEach(p => $("#nav-" + p).onclick = () => go(p));
}
function go(page) { state.page = page; location.hash = page; nav(); clearTimers(); guarded(VIEWS[page]); }

function chart(points, field, label, fmt) {
  const w = 520, h = 120, pad = 24;
  if (!points.length) return `<div class="card"><b>${label}</b><p class="mute">no data yet</p></div>`;
  const max = Math.max(1, ...points.map(p => p[field] || 0));
  const bw = (w - pad) / points.length;
  const bars = points.map((p, i) => {
    const v = p[field] || 0, bh = Math.round((h - 20) * v / max);
    return `<rect x="${pad + i * bw + 1}" y="${h - 14 - bh}" width="${Math.max(1, bw - 2)}" height="${bh}" fill="var(--acc)"><title>${esc(p.label)}: ${esc(fmt(v))}</title></rect>`;
  }).join("");
  const first = points[0].label, last = points[points.length - 1].label;
  return `<div class="card"><b>${label}</b><svg role="img" aria-label="${label}" viewBox="0 0 ${w} ${h}" width="100%" height="${h}">
    <text x="0" y="10">${esc(fmt(max))}</text><line x1="${pad}" y1="${h - 14}" x2="${w}" y2="${h - 14}" stroke="var(--line)"/>${bars}
    <text x="${pad}" y="${h - 2}">${esc(first)}</text><text x="${w - 60}" y="${h - 2}">${esc(last)}</text></svg></div>`;
}

const VIEWS = {
  async overview() {
    const [ov, usage] = await Promise.all([api("/overview"), api("/usage?days=" + state.days)]);
    const s = usage.summary || {total_requests: 0, failure_count: 0, tokens: {total: 0}, cost_usd: 0};
    const tl = usage.timeline || {by_day: [], by_hour: []};
    const pts = state.days === 1 ? tl.by_hour.map(p => Object.assign({label: p.hour + ":00"}, p)) : tl.by_day.map(p => Object.assign({label: p.day}, p));
    $("#page").innerHTML = `<div class="card"><div class="row"><b>Overview</b><span style="flex:1"></span>
      <select id="days">${[1, 7, 30].map(d => `<option value="${d}" ${d === state.days ? "selected" : ""}>last ${d === 1 ? "24 hours" : d + " days"}</option>`).join("")}</select></div>
      <div class="grid" style="margin-top:10px">
      <div class="stat"><b id="inflight">${num(ov.in_flight)}</b><span>in flight now</span></div>
      <div class="stat"><b id="total-requests">${num(s.total_requests)}</b><span>requests</span></div>
      <div class="stat"><b class="${s.failure_count ? "bad" : ""}">${num(s.failure_count)}</b><span>errors</span></div>
      <div class="stat"><b>${num(s.tokens && s.tokens.total)}</b><span>tokens</span></div>
      <div class="stat"><b>${usd(s.cost_usd)}</b><span>API cost</span></div>
      <div class="stat"><b>${usd(s.subscription_value_usd)}</b><span>covered by subscriptions</span></div>
      <div class="stat"><b>${num(ov.credentials)}</b><span>credentials (${ov.cooling} cooling, ${ov.disabled} off)</span></div>
      <div class="stat"><b>${num(ov.models)}</b><span>models</span></div></div>
      <p class="mute">llm-mux ${esc(ov.version)} · up ${Math.floor(ov.uptime_seconds / 3600)} h ${Math.floor(ov.uptime_seconds % 3600 / 60)} min · usage recording ${ov.recording ? "on" : "off"}${ov.config_path ? " · " + esc(ov.config_path) : ""}</p></div>
      <div class="grid" style="grid-template-columns:repeat(auto-fit,minmax(420px,1fr))">
      ${chart(pts, "requests", "Requests", num)}${chart(pts, "failures", "Errors", num)}${chart(pts, "tokens", "Tokens", num)}${chart(pts, "cost_usd", "Cost (USD)", usd)}</div>`;
    $("#days").onchange = e => { state.days = +e.target.value; go("overview"); };
    every(3000, () => guarded(async () => { const o = await api("/overview"); const el = $("#inflight"); if (el) el.textContent = num(o.in_flight); }));
  },

  async credentials() {
    const [files, ov] = await Promise.all([api("/auth-files"), api("/overview")]);
    const rows = files.files.map(f => {
      const cds = (f.cooldowns || []).map(c => `<div class="warn">${esc(c.model)}: ${c.seconds_left}s ${esc(c.reason)}</div>`).join("");
      const quota = Object.entries(f.quota || {}).map(([w, q]) => `<div>${esc(w)} <span class="bar"><i style="width:${Math.min(100, q.used_percent || 0)}%"></i></span> ${q.used_percent !== undefined ? q.used_percent + "%" : ""}${q.resets_at ? ` <span class="mute">resets ${esc(q.resets_at)}</span>` : ""}</div>`).join("");
      const cls = {active: "ok", cooling: "warn", disabled: "bad", error: "bad"}[f.status] || "";
      const n = encodeURIComponent(f.name);
      return `<tr data-name="${esc(f.name)}"><td><b>${esc(f.name)}</b><div class="mute">${esc(f.provider)} · ${esc(f.account || f.label)}</div></td>
        <td><span class="pill ${cls}">${esc(f.status)}</span><div class="mute">${esc(f.status_message || "")}</div></td>
        <td>${f.expires_at ? esc(f.expires_at) : "—"}<div class="mute">refreshed ${esc(f.last_refresh || "—")}</div></td>
        <td>${cds || '<span class="mute">none</span>'}</td><td>${quota || '<span class="mute">—</span>'}
        <div class="mute">last ${f.recent ? f.recent.window_seconds : 0}s: ${f.recent ? f.recent.requests : 0} req, ${f.recent ? num(f.recent.tokens) : 0} tok</div></td>
        <td class="row"><button class="a" data-act="refresh" data-n="${n}">Refresh</button>
        <button class="a" data-act="${f.disabled ? "enable" : "disable"}" data-n="${n}">${f.disabled ? "Enable" : "Disable"}</button>
        <button class="a" data-act="reset" data-n="${n}">Clear cooldowns</button>${f.quota_probe ? `<button class="a" data-act="probe" data-n="${n}">Check quota</button>` : ""}
        <button class="a" data-act="delete" data-n="${n}">Delete</button></td></tr>`;
    }).join("");
    $("#page").innerHTML = `<div class="card"><b>Log in to a subscription</b><div class="row" style="margin-top:8px">${ov.logins.map(l => `<button class="a" id="login-${esc(l)}" data-login="${esc(l)}">${esc(l)}</button>`).join("")}</div>
      <div id="flow" class="hidden" style="margin-top:10px"></div></div>
      <div class="card"><b>Credentials</b><table id="creds"><thead><tr><th>File</th><th>Status</th><th>Token</th><th>Cooldowns</th><th>Quota</th><th></th></tr></thead>
      <tbody>${rows || '<tr><td colspan="6" class="mute">No credential files yet: log in above, or upload one.</td></tr>'}</tbody></table>
      <div class="row" style="margin-top:10px"><input type="file" id="upload" accept=".json" multiple><button class="a" id="upload-btn">Upload</button><button class="a" id="import-btn">Import from official CLIs</button></div></div>`;
    document.querySelectorAll("[data-login]").forEach(b => b.onclick = () => guarded(() => startLogin(b.dataset.login)));
    document.querySelectorAll("[data-act]").forEach(b => b.onclick = () => guarded(async () => {
      const n = b.dataset.n, name = decodeURIComponent(n), act = b.dataset.act;
      if (act === "refresh") await api("/auth-files/refresh?name=" + n, {method: "POST"});
      if (act === "enable" || act === "disable") await api("/auth-files/status", {method: "PATCH", body: {name: name, disabled: act === "disable"}});
      if (act === "reset") await api("/auth-files/reset?name=" + n, {method: "POST"});
      if (act === "probe") await api("/auth-files/quota?name=" + n);
      if (act === "delete") { if (!confirm("Delete " + name + "?")) return; await api("/auth-files?name=" + n, {method: "DELETE"}); }
      go("credentials");
    }));
    $("#upload-btn").onclick = () => guarded(async () => {
      const fd = new FormData(); for (const f of $("#upload").files) fd.append("files", f, f.name);
      const r = await fetch(API + "/auth-files", {method: "POST", headers: {"X-Management-Key": key()}, body: fd});
      const d = await r.json(); if (!r.ok && r.status !== 207) throw new Error(d.error || r.statusText);
      go("credentials");
    });
    $("#import-btn").onclick = () => guarded(async () => { const r = await api("/auth-files/import", {method: "POST", body: {}}); showError(r.imported.length ? "" : "Nothing imported: " + r.skipped.map(s => s.tool + ": " + s.reason).join("; ")); if (r.imported.length) go("credentials"); });
    every(5000, () => { if (!$("#flow") || $("#flow").classList.contains("hidden")) guarded(VIEWS.credentials); });
  },

  async keys() {
    const k = await api("/api-keys");
    $("#page").innerHTML = `<div class="card"><b>Client API keys</b><table id="keytable"><thead><tr><th>Name</th><th>Key</th><th>Models</th><th>Limits</th><th>Last minute</th><th>Spent</th><th></th></tr></thead><tbody>
      ${k.keys.map(x => `<tr><td><b>${esc(x.name)}</b>${x.disabled ? ' <span class="pill bad">disabled</span>' : ""}${x.expires ? `<div class="mute">expires ${esc(x.expires)}</div>` : ""}</td><td><code>${esc(x.key)}</code></td>
      <td>${x.models.length ? esc(x.models.join(", ")) : '<span class="mute">all</span>'}</td>
      <td>${x.rpm ? x.rpm + " rpm " : ""}${x.tpm ? x.tpm + " tpm " : ""}${x["max-budget"] !== null ? usd(x["max-budget"]) + " / " + esc(x["budget-duration"]) : ""}</td>
      <td>${x.usage.requests_last_minute} req, ${num(x.usage.tokens_last_minute)} tok</td><td>${usd(x.usage.spent_usd)}</td>
      <td><button class="a" data-revoke="${x.index}" data-name="${esc(x.name)}">Revoke</button></td></tr>`).join("") || '<tr><td colspan="7" class="mute">No keys: the gateway serves this machine only.</td></tr>'}</tbody></table></div>
      <div class="card"><b>New key</b><form id="newkey" class="row" style="margin-top:8px"><input id="nk-name" placeholder="name" required><input id="nk-models" placeholder="models (globs, comma separated)">
      <input id="nk-rpm" type="number" min="1" placeholder="rpm" style="width:90px"><input id="nk-tpm" type="number" min="1" placeholder="tpm" style="width:100px">
      <input id="nk-budget" type="number" min="0" step="0.01" placeholder="budget USD" style="width:120px"><select id="nk-period"><option>30d</option><option>7d</option><option>1d</option></select>
      <button class="a p" id="nk-create">Create</button></form><div id="newkey-out"></div></div>`;
    document.querySelectorAll("[data-revoke]").forEach(b => b.onclick = () => guarded(async () => {
      if (!confirm("Revoke key " + b.dataset.name + "?")) return;
      await api("/api-keys?index=" + b.dataset.revoke, {method: "DELETE"}); go("keys");
    }));
    $("#newkey").onsubmit = e => { e.preventDefault(); guarded(async () => {
      const body = {name: $("#nk-name").value.trim()};
      const models = $("#nk-models").value.split(",").map(s => s.trim()).filter(Boolean);
      if (models.length) body.models = models;
      if ($("#nk-rpm").value) body.rpm = +$("#nk-rpm").value;
      if ($("#nk-tpm").value) body.tpm = +$("#nk-tpm").value;
      if ($("#nk-budget").value) { body["max-budget"] = +$("#nk-budget").value; body["budget-duration"] = $("#nk-period").value; }
      const r = await api("/api-keys", {method: "POST", body: body});
      await VIEWS.keys();
      $("#newkey-out").innerHTML = `<p>Key for <b>${esc(r.name)}</b> (shown once): <code id="newkey-value">${esc(r.key)}</code></p>`;
    }); };
  },

  async models() {
    const m = await api("/models");
    $("#page").innerHTML = `<div class="card"><b>${m.models.length} models</b><table><thead><tr><th>Model</th><th>Providers</th><th>Upstream name</th><th>Price / M tokens (in, out)</th></tr></thead><tbody>
      ${m.models.map(x => `<tr><td><code>${esc(x.id)}</code></td><td>${esc(x.providers.join(", "))}</td><td class="mute">${esc(x.upstream.join(", "))}</td><td>${x.price.length ? "$" + x.price[0] + " / $" + x.price[1] : '<span class="mute">unknown</span>'}</td></tr>`).join("")}</tbody></table></div>`;
  },

  async logs() {
    state.logAfter = 0;
    $("#page").innerHTML = `<div class="card"><div class="row"><b>Log</b><span class="mute" id="logsrc"></span><span style="flex:1"></span><label><input type="checkbox" id="follow" checked> follow</label><button class="a" id="clearlogs">Clear</button></div><pre id="logbox"></pre></div>`;
    const pull = async () => {
      const r = await api("/logs?limit=500&after=" + state.logAfter);
      const box = $("#logbox"); if (!box) return;
      $("#logsrc").textContent = r.source === "file" ? "(log file)" : "(in memory; logging-to-file is off)";
      if (r.lines.length) { box.textContent += r.lines.join("\n") + "\n"; state.logAfter = r.latest_timestamp; }
      if ($("#follow").checked) box.scrollTop = box.scrollHeight;
    };
    await pull();
    $("#clearlogs").onclick = () => guarded(async () => { await api("/logs", {method: "DELETE"}); $("#logbox").textContent = ""; });
    every(2000, () => guarded(pull));
  },

  async config() {
    state.yaml = await api("/config.yaml", {raw: true});
    $("#page").innerHTML = `<div class="card"><div class="row"><b>config.yaml</b><span class="mute">secrets are shown masked; leave them as they are to keep them</span><span style="flex:1"></span>
      <button class="a" id="cfg-review">Review changes</button><button class="a p" id="cfg-save" disabled>Save</button></div>
      <textarea id="cfg-text" spellcheck="false"></textarea><div id="cfg-diff" class="diff"></div><div id="cfg-result"></div></div>`;
    $("#cfg-text").value = state.yaml;
    $("#cfg-text").oninput = () => { $("#cfg-save").disabled = true; $("#cfg-diff").innerHTML = ""; };
    $("#cfg-review").onclick = () => {
      const d = diffLines(state.yaml.split("\n"), $("#cfg-text").value.split("\n"));
      $("#cfg-diff").innerHTML = d.length ? "<pre>" + d.map(l => `<div class="${l[0] === "+" ? "add" : "del"}">${esc(l)}</div>`).join("") + "</pre>" : '<p class="mute">no changes</p>';
      $("#cfg-save").disabled = !d.length;
    };
    $("#cfg-save").onclick = () => guarded(async () => {
      try {
        const r = await api("/config.yaml", {method: "PUT", body: $("#cfg-text").value, headers: {"Content-Type": "application/yaml"}});
        await VIEWS.config();
        $("#cfg-result").innerHTML = `<p class="ok" id="cfg-saved">Saved and applied (${esc(r.changed.join(", ") || "no key changed")}).</p>`;
      } catch (e) { $("#cfg-result").innerHTML = `<p class="bad" id="cfg-error">${esc(e.message)}</p>`; }
    });
  },
};

function diffLines(a, b) {
  const n = a.length, m = b.length, L = Array.from({length: n + 1}, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--) L[i][j] = a[i] === b[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = []; let i = 0, j = 0;
  while (i < n && j < m) { if (a[i] === b[j]) { i++; j++; } else if (L[i + 1][j] >= L[i][j + 1]) out.push("- " + a[i++]); else out.push("+ " + b[j++]); }
  while (i < n) out.push("- " + a[i++]); while (j < m) out.push("+ " + b[j++]);
  return out;
}

async function startLogin(provider) {
  const box = $("#flow"); box.classList.remove("hidden");
  box.innerHTML = `<p class="mute">Starting the ${esc(provider)} login…</p>`;
  const s = await api("/oauth/start", {method: "POST", body: {provider: provider}});
  const st = s.state;
  let how = "";
  if (s.flow_type === "device") how = `<p>Open <a id="flow-url" href="${esc(s.verification_url)}" target="_blank" rel="noopener">${esc(s.verification_url)}</a> and enter the code <b id="flow-code" style="font-size:18px">${esc(s.user_code)}</b></p>`;
  else if (s.flow_type === "token") how = `<p>${esc(s.prompt)}</p><div class="row"><input id="flow-paste" size="60"><button class="a p" id="flow-send">Send</button></div>`;
  else if (s.flow_type === "browser") how = `<p>Open <a id="flow-url" href="${esc(s.auth_url)}" target="_blank" rel="noopener">the ${esc(provider)} sign-in page</a>. <span class="mute">${esc(s.callback || "")}</span></p><div class="row"><input id="flow-paste" size="60" placeholder="or paste the URL you were sent to"><button class="a" id="flow-send">Send</button></div>`;
  box.innerHTML = `<div class="card"><b>${esc(provider)} login</b>${how}<p id="flow-status" class="mute">${esc(s.login_status || s.status)}</p><button class="a" id="flow-cancel">Cancel</button></div>`;
  if ($("#flow-send")) $("#flow-send").onclick = () => guarded(() => api("/oauth/callback", {method: "POST", body: Object.assign({state: st}, s.flow_type === "token" ? {token: $("#flow-paste").value} : {redirect_url: $("#flow-paste").value})}));
  $("#flow-cancel").onclick = () => guarded(async () => { await api("/oauth/cancel/" + encodeURIComponent(st), {method: "POST"}); });
  const poll = setInterval(() => guarded(async () => {
    const r = await api("/oauth/status/" + encodeURIComponent(st));
    const el = $("#flow-status"); if (!el) { clearInterval(poll); return; }
    el.textContent = r.status + (r.error ? ": " + r.error : "") + (r.file ? " — saved " + r.file : "");
    el.className = r.status === "completed" ? "ok" : r.status === "pending" ? "mute" : "bad";
    if (r.status !== "pending") { clearInterval(poll); if (r.status === "completed") setTimeout(() => { box.classList.add("hidden"); go("credentials"); }, 1500); }
  }), 1000);
  state.timers.push(poll);
}

async function connect() {
  if (!key()) { askKey(); return; }
  try {
    await api("/overview");
  } catch (e) {
    showError(e.status === 401 || e.status === 403 ? "Management API refused the key: " + e.message : e.message);
    askKey(); return;
  }
  $("#login").classList.add("hidden");
  $("#who").textContent = "connected";
  const page = (location.hash || "").slice(1);
  go(PAGES.indexOf(page) >= 0 ? page : "overview");
}
$("#keyform").onsubmit = e => { e.preventDefault(); sessionStorage.setItem("llm-mux-key", $("#keyinput").value.trim()); connect(); };
$("#logout").onclick = () => { sessionStorage.removeItem("llm-mux-key"); $("#who").textContent = ""; askKey(); };
nav(); connect();
</script></body></html>
""".encode("utf-8")


def read_log_files(path, after):
    """(epoch, line) of the log file and its rotations (oldest first) newer than `after`, and how many lines were
    read. A line without its own timestamp (a traceback) goes with the line before it."""
    out, scanned, keep, stamp = [], 0, after <= 0, 0.0
    for p in ["%s.%d" % (path, n) for n in range(9, 0, -1)] + [path]:
        try:
            with open(p, "r", encoding="utf-8", errors="replace") as f:
                for line in f:
                    scanned += 1
                    line = line.rstrip("\n")
                    m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]", line)
                    if m:
                        stamp = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
                        keep = stamp > after
                    if keep:
                        out.append((stamp, line))
        except OSError:
            continue
    return out, scanned


# === 15. Client API ===
# Owns: the client-facing endpoints: authentication, request parsing into the IR via the client's codec, the
# hand-off to routing, and writing the answer (JSON or stream) in the client's format. Errors are rendered in the
# format of the endpoint that was called.

AMP_PROXY_PATHS = ("/api/internal", "/api/user", "/api/auth", "/api/meta", "/api/telemetry", "/api/threads",
                   "/api/otel", "/api/tab", "/api/ads", "/threads.rss", "/auth")


def amp_api_key(amp):
    """Amp's own key: ampcode.upstream-api-key, else AMP_API_KEY, else what the Amp CLI stored."""
    if amp["upstream-api-key"]:
        return amp["upstream-api-key"]
    if os.environ.get("AMP_API_KEY"):
        return os.environ["AMP_API_KEY"]
    try:
        _, data = read_json_file(os.path.expanduser("~/.local/share/amp/secrets.json"))
        return data.get("apiKey@https://ampcode.com/") or ""
    except (OSError, ValueError, AttributeError):
        return ""


def amp_restore_model(resp, served, asked):
    """The answer to a mapped Amp call names the model Amp asked for (its TUI keys on it), in JSON and streams."""
    pairs = []
    for name in (b'"model"', b'"modelVersion"'):
        for sep in (b":", b": "):
            pairs.append((name + sep + json_bytes(served), name + sep + json_bytes(asked)))

    def fix(data):
        for old, new in pairs:
            data = data.replace(old, new)
        return data
    if isinstance(resp, StreamResponse):
        resp.filters.append(lambda piece: fix(bytes(piece)))
        return resp
    if isinstance(resp, Response) and resp.body:
        resp.body = fix(resp.body)
    return resp


def _refuse_json_constant(name):
    raise ValueError("%s is not JSON" % name)


STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_json_constant)  # made once: json.loads(..., kw) makes one a call


def format_for_path(path):
    """Which API family an endpoint belongs to, so errors come back in the shape its clients parse."""
    if path.startswith("/api/provider/"):  # Amp: /api/provider/<vendor>/<the vendor's own path>
        rest = path.split("/", 4)[4:]
        return format_for_path("/" + rest[0]) if rest else "openai"
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1beta") or ":" in path.rsplit("/", 1)[-1]:
        return "gemini"
    if path.startswith(("/api/", "/ollama/")):
        return "ollama"
    if path.startswith("/v1/responses"):
        return "responses"
    return "openai"


def http_error_page(status, message, path=None):
    """HTTP-level errors (malformed requests, oversize bodies, handler crashes) in the shape of the API the path
    belongs to."""
    err = GatewayError(status, message, error_type_for_status(status) if status != 413 else "invalid_request")
    return error_response(format_for_path(path or "/v1"), err)


def render_error(fmt, err):
    """An error body in the client's own API format (formats.md §2.10, §3.7, §4.8, §5)."""
    return CODECS.get(fmt, OpenAIChat).error_body(err)


def error_response(fmt, err):
    resp = json_response(render_error(fmt, err), err.status)
    resp.headers.extend(err.headers)
    return resp


def caller_family(req):
    """Who is asking for a shared path such as GET /v1/models: Anthropic clients send anthropic-version (or are
    Claude Code), Gemini SDKs send x-goog-api-key / x-goog-api-client; everyone else is OpenAI."""
    h = req.headers
    if "anthropic-version" in h or (h.get("user-agent") or "").startswith("claude-cli"):
        return "anthropic"
    if "x-goog-api-key" in h or "x-goog-api-client" in h:
        return "gemini"
    return "openai"


class App:
    """The client API as an HTTP app: route tables over a Gateway, each handler parsing with its codec and
    rendering the answer (JSON or stream) in the client's format."""

    def __init__(self, gateway):
        self.gw = gateway
        self.management = Management(gateway)
        self.hinted_ollama = False
        self.routes = {
            ("GET", "/"): self.root,
            ("GET", "/v1/models"): self.list_models,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/responses"): self.responses,
            ("GET", "/v1/responses"): self.responses_websocket,
            ("GET", "/v1/ws"): self.relay_websocket,
            ("POST", "/v1/messages"): self.messages,
            ("POST", "/v1/messages/count_tokens"): self.messages_count_tokens,
            ("POST", "/v1/embeddings"): self.embeddings,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/health"): self.health,
            ("GET", "/ready"): self.ready,
            ("GET", "/v1beta/models"): self.gemini_list_models,
        }
        for prefix in ("/api", "/ollama/api"):
            self.routes[("GET", prefix + "/version")] = self.ollama_version
            self.routes[("GET", prefix + "/tags")] = self.ollama_tags
            self.routes[("GET", prefix + "/ps")] = self.ollama_ps
            self.routes[("POST", prefix + "/show")] = self.ollama_show
            self.routes[("POST", prefix + "/chat")] = self.ollama_chat
            self.routes[("POST", prefix + "/generate")] = self.ollama_generate
            self.routes[("POST", prefix + "/embed")] = self.ollama_embed
            self.routes[("POST", prefix + "/embeddings")] = self.ollama_embed
        self.public = {"/", "/api/version", "/ollama/api/version", "/health", "/ready"}
        self.loopback_public = {"/metrics"}  # free on this machine; the management key from elsewhere

    async def __call__(self, req):
        if self.management.handles(req.path):
            return await self.management(req)
        if not self.gw.cfg.request_log:
            return await self.dispatch(req)
        started = time.time()
        return self.gw.request_log.capture(req, await self.dispatch(req), started)

    async def check_head(self, req):
        """Before the body is read: refuse a client-API request that fails its key check (401/403 in the client's
        own format), so only authenticated callers can make the server hold a body. Management calls, public and
        loopback-only paths are left to dispatch (their bodies are small or their checks need more)."""
        if self.management.handles(req.path) or req.path in self.public or req.path in self.loopback_public or \
                req.path == "/v1/ws" or req.path.startswith(AMP_PROXY_PATHS):
            return None
        try:
            self.authenticate(req)
        except GatewayError as e:
            log.info("%s %s -> %d before its body: %s", req.method, req.path, e.status, e.message)
            return error_response(format_for_path(req.path), e)
        return None

    async def dispatch(self, req):
        fmt = format_for_path(req.path)
        try:
            handler = self.routes.get((req.method if req.method != "HEAD" else "GET", req.path))
            if handler is None:
                handler = self._match_prefix(req)
            if handler is None and req.path.startswith(AMP_PROXY_PATHS):
                return await self.amp_proxy(req)
            if handler is None:
                if any(p == req.path for _, p in self.routes):
                    raise GatewayError(405, "method %s not allowed on %s" % (req.method, req.path))
                raise GatewayError(404, "no route for %s %s" % (req.method, req.path), "not_found")
            if req.path in self.loopback_public:
                mode = self.gw.cfg.metrics_auth  # loopback (free here, the management key elsewhere) | always | none
                if mode == "always" or (mode != "none" and not is_loopback_host(req.peer)):
                    try:
                        self.management.check_key(req, False)
                    except ManagementError as e:
                        raise GatewayError(e.status, e.message, "authentication" if e.status == 401 else "permission")
            elif req.path == "/v1/ws":
                self._relay_auth(req)
            elif req.path not in self.public and req.authenticated is not self.gw.cfg:  # else checked by check_head
                self.authenticate(req)
            return await handler(req)
        except GatewayError as e:
            if e.status >= 500 or e.status == 429:
                log.warning("%s %s -> %d: %s", req.method, req.path, e.status, e.message)
            else:
                log.info("%s %s -> %d: %s", req.method, req.path, e.status, e.message)
            return error_response(fmt, e)

    def _match_prefix(self, req):
        path = req.path
        if path.startswith("/api/provider/"):
            return self.amp_provider
        for prefix in ("/v1beta/models/", "/v1/models/"):
            if path.startswith(prefix):
                rest = path[len(prefix):]
                if ":" in rest.rsplit("/", 1)[-1]:
                    return self.gemini_action if req.method == "POST" else None
                if req.method in ("GET", "HEAD"):
                    return self.gemini_get_model if prefix == "/v1beta/models/" else self.get_model
        return None

    # -- auth -----------------------------------------------------------------------------------------------------
    def authenticate(self, req):
        """API-key check (gateway.md §4.1), constant-time; without keys only loopback peers are served. Passed, the
        request is `authenticated` against this configuration: a reload meanwhile (a key revoked while its body
        arrives) has it checked again."""
        cfg = self.gw.cfg
        if cfg.disable_auth:
            return
        keys = cfg.api_keys
        if not keys:
            if is_loopback_host(req.peer):
                req.authenticated = cfg
                return
            raise GatewayError(401, "API key required: this gateway has no api-keys and serves loopback only",
                               "authentication")
        presented = []
        h = req.headers
        auth = h.get("authorization")
        if auth:
            scheme, _, token = auth.partition(" ")
            presented.append(token.strip() if scheme.lower() == "bearer" else auth.strip())
        for name in ("x-api-key", "x-goog-api-key"):
            v = h.get(name)
            if v:
                presented.append(v.strip())
        if req.query_string:
            q = req.query
            for name in ("key", "auth_token"):
                if q.get(name):
                    presented.append(q[name])
        if not presented:
            if req.path.startswith(("/api/", "/ollama/")) and not self.hinted_ollama:
                self.hinted_ollama = True  # Open WebUI's Ollama connection sends no key unless given one
                log.warning("an Ollama client called %s without an API key and was refused: give it the gateway's "
                            "key (in Open WebUI: the connection's Bearer key), see README 'Pointing tools at it'",
                            req.path)
            raise GatewayError(401, "API key required (send Authorization: Bearer <key>)", "authentication")
        matched = None
        for p in presented:
            pb = p.encode("utf-8", "replace")
            for key in cfg.client_keys:  # every key compared, none short-circuited
                if key.matches(pb):
                    matched = key
        if matched is None:
            raise GatewayError(401, "Invalid API key", "authentication")
        if matched.disabled or (matched.expires is not None and matched.expires <= self.gw.clock.wall()):
            raise GatewayError(401, "API key %s is %s" % (matched.name, "disabled" if matched.disabled else "expired"),
                               "authentication")
        req.principal = matched.name  # a name for usage and metrics, never the key itself
        req.authenticated = cfg

    _SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

    def read_json(self, req):
        """The body as JSON, strictly: NaN and Infinity are not JSON (they would be forwarded as such), nesting is
        bounded (a RecursionError is a 400, not a crash), a lone surrogate escape (\\ud800) cannot become text.
        A large body's bytes are kept as its JsonSource until the upstream body is written, so members passed on
        unchanged are not encoded again; a small one's are let go once parsed (unless the request log wants them)."""
        if not req.body:
            raise BadRequest("the request body is empty; a JSON object is required")
        try:
            data, req.json_source = JsonSource.parse(req.body, STRICT_JSON)
        except RecursionError:
            raise BadRequest("the request body's JSON is nested too deeply")
        except UnicodeDecodeError:
            raise BadRequest("the request body is not UTF-8")
        except ValueError as e:
            raise BadRequest("malformed JSON in the request body: %s" % e)
        if req.body.find(b"\\") >= 0 and self._SURROGATE_ESCAPE.search(req.body):  # memchr first: most bodies skip
            try:
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("the request body has a lone surrogate escape (\\ud800-\\udfff without its pair)")
            except RecursionError:
                raise BadRequest("the request body's JSON is nested too deeply")
        if not self.gw.cfg.request_log:
            req.body = b""
        return data

    # -- model lists ----------------------------------------------------------------------------------------------
    async def root(self, req):
        """Ollama clients probe `/` and expect "Ollama is running"; a browser gets what a person needs instead."""
        if "text/html" not in (req.headers.get("accept") or ""):
            return Response(200, b"Ollama is running", [("X-Served-By", "llm-mux/" + __version__)],
                            "text/plain; charset=utf-8")
        n = len(self.gw.registry.routes)
        base = "%s://%s" % ("https" if req.secure else "http", req.headers.get("host") or "127.0.0.1")
        steps = "" if n else ("<p>No models yet: run <code>%s login &lt;provider&gt;</code> or add a provider to "
                              "the config (<code>%s env</code> shows where it is).</p>" % (program_name(),
                                                                                           program_name()))
        page = ("<!doctype html><meta charset=utf-8><title>llm-mux</title><h1>llm-mux %s</h1><p>%d models.</p>%s"
                "<p>Point tools at: OpenAI-compatible <code>%s/v1</code>, Anthropic, Gemini and Ollama "
                "<code>%s</code>.</p>" % (__version__, n, steps, html_escape(base), html_escape(base)))
        return Response(200, page.encode("utf-8"), [("X-Served-By", "llm-mux/" + __version__)],
                        "text/html; charset=utf-8")

    def _anthropic_model(self, mid):
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.gw.started))
        return {"type": "model", "id": mid, "display_name": mid, "created_at": created}

    def model_entries(self, req):
        """The models the caller's key may use (every served model for a key without an allow-list)."""
        key = next((k for k in self.gw.cfg.client_keys if k.name == req.principal), None)
        entries = self.gw.registry.model_entries()
        return entries if key is None or not key.models else [(m, o) for m, o in entries if key.allows(m)]

    async def list_models(self, req):
        family = caller_family(req)
        ids = [mid for mid, _ in self.model_entries(req)]
        if family == "anthropic":
            data = [self._anthropic_model(mid) for mid in ids]
            return json_response({"data": data, "has_more": False, "first_id": ids[0] if ids else None,
                                  "last_id": ids[-1] if ids else None})
        if family == "gemini":
            return json_response({"models": [Gemini.model_entry(mid) for mid in ids]})
        created = int(self.gw.started)
        data = [{"id": mid, "object": "model", "created": created, "owned_by": owner}
                for mid, owner in self.model_entries(req)]
        return json_response({"object": "list", "data": data})

    def _known_model(self, mid, fmt=None):
        return self.gw.known_routes(mid)

    async def get_model(self, req):
        mid = req.path[len("/v1/models/"):]
        family = caller_family(req)
        routes = self._known_model(mid[len("models/"):] if mid.startswith("models/") else mid, family)
        if family == "anthropic":
            return json_response(self._anthropic_model(mid))
        if family == "gemini":
            return json_response(Gemini.model_entry(mid[len("models/"):] if mid.startswith("models/") else mid))
        return json_response({"id": mid, "object": "model", "created": int(self.gw.started),
                              "owned_by": routes[0].provider.name})

    async def gemini_list_models(self, req):
        return json_response({"models": [Gemini.model_entry(mid) for mid, _ in self.model_entries(req)]})

    async def gemini_get_model(self, req):
        mid = req.path[len("/v1beta/models/"):]
        if mid.startswith("models/"):
            mid = mid[len("models/"):]
        self._known_model(mid, "gemini")
        return json_response(Gemini.model_entry(mid))

    # -- OpenAI ---------------------------------------------------------------------------------------------------
    async def chat_completions(self, req):
        body = self.read_json(req)
        if isinstance(body, dict) and "messages" not in body and ("input" in body or "instructions" in body):
            # Some clients send a Responses-shaped body here (formats.md §1.4): answer it as chat.
            ir = Responses.parse_request(body)
            ir.client_format = OpenAIChat.name
            ir.include_usage = False
        else:
            ir = OpenAIChat.parse_request(body)
        return await self.serve_chat(req, OpenAIChat, ir)

    async def completions(self, req):
        return await self.serve_chat(req, Completions, Completions.parse_request(self.read_json(req)))

    async def responses(self, req):
        return await self.serve_chat(req, Responses, Responses.parse_request(self.read_json(req)))

    async def responses_websocket(self, req):
        """The Responses API over a WebSocket (OpenAI's WebSocket mode): `GET /v1/responses` upgraded; each
        `response.create` message runs like a streamed POST /v1/responses — same routing to any upstream, same
        limits, usage and failover — and its events come back as JSON messages, one per event."""
        if not is_websocket_request(req):
            raise GatewayError(405, "GET /v1/responses is the WebSocket transport: send a WebSocket upgrade, or "
                               "POST /v1/responses")
        return WebSocketResponse(req, lambda ws: self._responses_session(req, ws))

    async def _responses_session(self, req, ws):
        """One socket's turns, one at a time. The socket remembers its last responses (bounded), so a turn may
        send only its new input with `previous_response_id`, as OpenAI's WebSocket mode allows."""
        history = collections.OrderedDict()  # response id -> every input and output item through that response
        while True:
            message = await ws.receive()
            try:
                data = json.loads(message) if isinstance(message, str) else None
            except ValueError:
                data = None
            if not isinstance(data, dict) or data.get("type") != "response.create":
                await self._ws_error(ws, BadRequest("expected a JSON text message {\"type\": \"response.create\", "
                                                    "...the fields of POST /v1/responses}", "type"))
                continue
            body = dict(data.get("response") if isinstance(data.get("response"), dict) else data)
            for transport_only in ("type", "stream", "background", "event_id"):
                body.pop(transport_only, None)
            items = body.get("input", [])
            if isinstance(items, str):
                items = body["input"] = [{"role": "user", "content": items}]
            previous = body.pop("previous_response_id", None)
            if previous:
                if previous not in history:
                    await self._ws_error(ws, GatewayError(
                        400, "previous_response_id %r is not one of this connection's responses" % previous,
                        "invalid_request", "previous_response_id", code="previous_response_not_found"))
                    continue
                body["input"] = history[previous] + (items if isinstance(items, list) else [])
            body["stream"] = True
            try:
                resp = await self.serve_chat(req, Responses, Responses.parse_request(body))
            except GatewayError as e:
                await self._ws_error(ws, e)
                continue
            completed = await self._relay_sse(ws, resp)
            if completed is not None and isinstance(body.get("input"), list):
                history[completed.get("id")] = body["input"] + list(completed.get("output") or [])
                while len(history) > 16:
                    history.popitem(last=False)

    def _relay_auth(self, req):
        """/v1/ws takes a page that will see prompts: with ws-auth the API key (from anywhere), without it this
        machine only (llm-mux let anyone in when ws-auth was off)."""
        if self.gw.cfg.ws_auth:
            if not self.gw.cfg.api_keys:
                raise GatewayError(403, "ws-auth is on but no api-keys are configured", "permission")
            self.authenticate(req)
        elif not is_loopback_host(req.peer):
            raise GatewayError(403, "the relay accepts this machine only unless ws-auth is on (then the API key "
                               "from anywhere)", "permission")

    async def relay_websocket(self, req):
        """GET /v1/ws: a browser page logged into AI Studio becomes an upstream (gateway.md §8)."""
        if not is_websocket_request(req):
            raise GatewayError(400, "GET /v1/ws is a WebSocket endpoint: send an upgrade")
        authenticated = bool(self.gw.cfg.ws_auth)
        return WebSocketResponse(req, lambda ws: self.gw.relay(ws, authenticated))

    @staticmethod
    async def _relay_sse(ws, resp):
        """Each SSE event of `resp` as one WebSocket message; the completed response, if the turn completed."""
        completed, parser = None, SSEParser()  # relayed upstream frames may end in CRLF pairs
        pieces = resp.pieces()
        try:
            async for chunk in pieces:
                for _, data in parser.feed(chunk):
                    if data == "[DONE]":
                        continue
                    await ws.send(data)
                    event = json_or_none(data)
                    if isinstance(event, dict) and event.get("type") == "response.completed":
                        completed = event.get("response") or {}
        finally:
            await pieces.aclose()
        return completed

    @staticmethod
    async def _ws_error(ws, err):
        body = render_error("openai", err)
        await ws.send_json({"type": "error", "status": err.status, "error": body.get("error", body)})

    # -- Amp CLI (gateway.md §9) ------------------------------------------------------------------------------------
    async def amp_provider(self, req):
        """`/api/provider/<vendor>/<path>`: Amp's model calls, in each vendor's own API, served from local
        credentials; a model with none is mapped (ampcode.model-mappings) or, with ampcode.upstream-url, sent to
        Amp's own service (Amp credits). A mapped answer names the model Amp asked for."""
        parts = req.path.split("/", 4)
        vendor, rest = parts[3], "/" + (parts[4] if len(parts) > 4 else "")
        rest = {"/models": "/v1/models", "/chat/completions": "/v1/chat/completions",
                "/completions": "/v1/completions", "/responses": "/v1/responses"}.get(rest, rest)
        if rest.startswith("/v1beta1/") and "/models/" in rest:  # Vertex-style paths of Amp's Google client
            rest = "/v1beta/models/" + rest.split("/models/", 1)[1]
        local = Request(req.method, rest + ("?" + req.query_string if req.query_string else ""), req.version,
                        req.headers, req.peer)
        local.body, local.secure, local.principal = req.body, req.secure, req.principal
        if req.method in ("GET", "HEAD") and rest in ("/v1/models", "/v1beta/models"):
            family = {"anthropic": "anthropic", "google": "gemini"}.get(vendor, "openai")
            return await self._models_for(local, family)
        model, in_body = self._amp_model(local)
        restore = None
        if model and not self.gw.registry.resolve(split_thinking_suffix(model)[0]):
            target = next((to for match, to, _ in self.gw.cfg.amp_mappings
                           if match(model) and self.gw.registry.resolve(split_thinking_suffix(to)[0])), None)
            if target is not None:
                log.info("amp: %s -> %s (model mapping)", model, target)
                self._amp_rewrite(local, model, target, in_body)
                restore = (target, model)
            elif self.gw.cfg.ampcode["upstream-url"]:
                log.warning("amp: no local provider for %s: forwarded to Amp (uses Amp credits; add an "
                            "ampcode.model-mappings entry to serve it locally)", model)
                return await self.amp_proxy(req)
        beta = local.headers.get("anthropic-beta")
        if beta and "context-1m-2025-08-07" in beta:  # a local account may not have the 1M-context beta
            kept = [b.strip() for b in beta.split(",") if b.strip() and b.strip() != "context-1m-2025-08-07"]
            items = [(k, v) for k, v in local.headers.items if k != "anthropic-beta"]
            if kept:
                items.append(("anthropic-beta", ", ".join(kept)))
            local.headers = Headers(items)
        handler = self.routes.get((local.method if local.method != "HEAD" else "GET", local.path)) or \
            self._match_prefix(local)
        if handler is None or handler == self.amp_provider:
            raise GatewayError(404, "no route for %s %s" % (req.method, req.path), "not_found")
        resp = await handler(local)
        return amp_restore_model(resp, *restore) if restore else resp

    @staticmethod
    def _amp_model(req):
        """(model, found in the body) of an Amp call: the JSON `model`, else the path's /models/<model>[:action]."""
        if req.body:
            data = json_or_none(req.body)
            if isinstance(data, dict) and isinstance(data.get("model"), str):
                return data["model"], True
        if "/models/" in req.path:
            return req.path.split("/models/", 1)[1].split(":", 1)[0], False
        return None, False

    @staticmethod
    def _amp_rewrite(req, model, target, in_body):
        if in_body:
            data = json.loads(req.body)
            data["model"] = target
            req.body = json_bytes(data)
            req.json_source = None
        else:
            head, _, tail = req.path.partition("/models/" + model)
            req.path = head + "/models/" + target + tail
            req.target = req.path + ("?" + req.query_string if req.query_string else "")

    async def _models_for(self, req, family):
        ids = [mid for mid, _ in self.model_entries(req)]
        if family == "anthropic":
            return json_response({"data": [self._anthropic_model(mid) for mid in ids], "has_more": False,
                                  "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None})
        if family == "gemini":
            return json_response({"models": [Gemini.model_entry(mid) for mid in ids]})
        return json_response({"object": "list", "data": [{"id": mid, "object": "model", "created": int(
            self.gw.started), "owned_by": owner} for mid, owner in self.model_entries(req)]})

    async def amp_proxy(self, req):
        """Amp's account, thread and telemetry calls (and models no local account serves), reverse-proxied to
        ampcode.upstream-url with Amp's key; loopback callers only unless restrict-management-to-localhost is
        false."""
        amp = self.gw.cfg.ampcode
        if not amp["upstream-url"]:
            return json_response({"error": "amp upstream proxy not available", "message": "set "
                                  "ampcode.upstream-url to reach Amp's own service"}, 503)
        if amp["restrict-management-to-localhost"] and not is_loopback_host(req.peer):
            return json_response({"error": "Access denied: management routes restricted to localhost"}, 403)
        if req.method == "OPTIONS":
            return json_response({"error": "CORS is not offered on Amp routes"}, 403)
        key = amp_api_key(amp)
        hop = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length", "te",
               "trailer", "proxy-authorization", "proxy-connection", "authorization", "x-api-key"}
        headers = [(k, v) for k, v in req.headers.items if k not in hop]
        if key:
            headers += [("X-Api-Key", key), ("Authorization", "Bearer " + key)]
        url = amp["upstream-url"].rstrip("/") + req.target
        try:
            up = await self.gw.client.request(req.method, url, headers, req.body or None, timeout=30,
                                              stream_timeout=self.gw.cfg.stream_timeout)
        except UpstreamError as e:
            log.warning("amp upstream %s: %s", redact_url(url), e.message)
            return json_response({"error": "amp_upstream_proxy_error", "message": "Failed to reach Amp upstream"},
                                 502)
        out = [(k, v) for k, v in up.headers.items if k not in hop and not k.startswith("access-control-")]
        ctype = up.headers.get("content-type") or ""
        if 200 <= up.status < 300 and "text/event-stream" not in ctype:
            body = await up.read()
            if body[:2] == b"\x1f\x8b" and not up.headers.get("content-encoding"):
                try:  # Amp's service sometimes gzips without saying so; its CLI does not expect that
                    body = zlib.decompress(body, 47)
                except zlib.error:
                    pass
            return Response(up.status, body, out, None)
        return StreamResponse(up.iter_bytes(), up.status, out, None)

    # -- Anthropic ------------------------------------------------------------------------------------------------
    async def messages(self, req):
        ir = Anthropic.parse_request(self.read_json(req))
        beta = req.headers.get("anthropic-beta")
        if beta:
            ir.betas = beta
        return await self.serve_chat(req, Anthropic, ir)

    async def messages_count_tokens(self, req):
        ir = Anthropic.parse_request(self.read_json(req), count_only=True)
        return json_response({"input_tokens": await self.gw.count_tokens(ir)})

    # -- Gemini ---------------------------------------------------------------------------------------------------
    async def gemini_action(self, req):
        prefix = "/v1beta/models/" if req.path.startswith("/v1beta/") else "/v1/models/"
        rest = req.path[len(prefix):]
        model, _, action = rest.rpartition(":")
        if model.startswith("models/"):
            model = model[len("models/"):]
        body = self.read_json(req)
        if action == "countTokens":
            ir = Gemini.parse_request(body, model, count_only=True)
            return json_response({"totalTokens": await self.gw.count_tokens(ir)})
        if action in ("embedContent", "batchEmbedContents"):
            ir = Gemini.parse_embeddings(body, model, action == "batchEmbedContents")
            ir.client_key = req.principal
            await self.gw.admit(ir)
            emb = await self.gw.embed(ir)
            return json_response(Gemini.build_embeddings(emb, ir, action == "batchEmbedContents"))
        if action not in ("generateContent", "streamGenerateContent"):
            raise GatewayError(404, "unsupported method %r" % action, "not_found")
        ir = Gemini.parse_request(body, model)
        ir.stream = action == "streamGenerateContent"
        ir.include_usage = True
        sse = req.query.get("alt") == "sse" or req.query.get("$alt") == "sse"
        return await self.serve_chat(req, Gemini, ir, encoder=lambda r: Gemini.StreamEncoder(r, sse),
                                     content_type="text/event-stream" if sse else "application/json", relay=sse)

    async def health(self, req):
        """Alive: the process answers (no key, nothing secret)."""
        return json_response({"status": "ok", "version": __version__})

    async def ready(self, req):
        """Ready: every configured provider has at least one credential that can take a request now; 503 with the
        reasons otherwise (for load balancers and orchestrators; no key, no secrets)."""
        now = self.gw.clock.now()
        problems = []
        for p in self.gw.registry.providers:
            if not p.credentials:
                continue
            if not any(not c.disabled and c.until_all <= now for c in p.credentials):
                problems.append("%s: no usable credential (%d disabled or cooling)" % (p.name, len(p.credentials)))
        body = {"status": "not ready" if problems else "ready", "providers": len(self.gw.registry.providers),
                "models": len(self.gw.registry.routes)}
        if self.gw.sync is not None:
            body["store"] = "in step" if self.gw.sync.healthy else "unreachable (serving with the last credentials)"
        if problems:
            body["reasons"] = problems
        return json_response(body, status=503 if problems else 200)

    async def metrics(self, req):
        """Prometheus metrics (free from this machine, the management key from elsewhere)."""
        return Response(200, self.gw.metrics.render(self.gw).encode("utf-8"), None,
                        "text/plain; version=0.0.4; charset=utf-8")

    async def embeddings(self, req):
        ir = OpenAIChat.parse_embeddings(self.read_json(req))
        ir.client_key = req.principal
        await self.gw.admit(ir)
        return json_response(OpenAIChat.build_embeddings(await self.gw.embed(ir), ir))

    async def ollama_embed(self, req):
        legacy = req.path.endswith("/embeddings")
        ir = Ollama.parse_embeddings(self.read_json(req), legacy)
        ir.model = self.ollama_model(ir.model)
        ir.client_key = req.principal
        await self.gw.admit(ir)
        return json_response(Ollama.build_embeddings(await self.gw.embed(ir), ir, legacy))

    # -- Ollama ---------------------------------------------------------------------------------------------------
    def ollama_name(self, mid):
        return mid if ":" in mid else mid + ":latest"

    def ollama_model(self, name):
        """Open WebUI appends `:latest` to untagged names; accept both spellings."""
        if name.endswith(":latest") and not self.gw.registry.resolve(name):
            return name[:-len(":latest")]
        return name

    async def ollama_version(self, req):
        return json_response({"version": OLLAMA_VERSION})

    def _ollama_entry(self, mid):
        digest = hashlib.sha256(mid.encode()).hexdigest()
        modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.gw.started))
        name = self.ollama_name(mid)
        return {"name": name, "model": name, "modified_at": modified, "size": 0, "digest": digest,
                "details": {"parent_model": "", "format": "gguf", "family": "llm-mux", "families": ["llm-mux"],
                            "parameter_size": "", "quantization_level": ""}}

    async def ollama_tags(self, req):
        return json_response({"models": [self._ollama_entry(mid) for mid, _ in self.model_entries(req)]})

    async def ollama_ps(self, req):
        return json_response({"models": []})

    async def ollama_show(self, req):
        body = self.read_json(req)
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise BadRequest("model is required", "model")
        mid = self.ollama_model(name)
        self._known_model(mid, "ollama")
        entry = self._ollama_entry(mid)
        return json_response({"license": "", "modelfile": "# served by llm-mux\nFROM %s\n" % mid, "parameters": "",
                              "template": "{{ .Prompt }}", "details": entry["details"],
                              "model_info": {"general.architecture": "llm-mux", "llm-mux.context_length": 200000,
                                             "llama.context_length": 200000},
                              "capabilities": ["completion", "tools", "vision", "thinking"],
                              "modified_at": entry["modified_at"]})

    async def ollama_chat(self, req):
        ir = Ollama.parse_request(self.read_json(req))
        ir.model = self.ollama_model(ir.model)
        if not ir.messages:
            return json_response({"model": ir.model, "created_at": rfc3339_now(),
                                  "message": {"role": "assistant", "content": ""}, "done": True,
                                  "done_reason": "load"})
        return await self.serve_chat(req, Ollama, ir, content_type="application/x-ndjson")

    async def ollama_generate(self, req):
        body = self.read_json(req)
        ir = Ollama.parse_generate(body)
        ir.model = self.ollama_model(ir.model)
        if not ir.messages:  # an empty prompt loads (or with keep_alive 0 unloads) the model
            unload = isinstance(body, dict) and body.get("keep_alive") in (0, "0", "0s")
            return json_response({"model": ir.model, "created_at": rfc3339_now(), "response": "", "done": True,
                                  "done_reason": "unload" if unload else "load"})
        started = time.monotonic()
        return await self.serve_chat(req, Ollama, ir, encoder=lambda r: Ollama.StreamEncoder(r, generate=True),
                                     render=lambda resp, r: Ollama.build_response(resp, r, True, started),
                                     content_type="application/x-ndjson")

    async def serve_chat(self, http_req, codec, ir, encoder=None, render=None, content_type=None, relay=True):
        """Answer a chat request in `codec`'s format. A stream whose upstream speaks that format too is relayed
        frame by frame (FrameRelay) unless `relay` is False (a client reading another framing of it)."""
        ir.client_key = http_req.principal
        ir.source, http_req.json_source = http_req.json_source, None  # moved: the request holds it no longer
        await self.gw.admit(ir)
        call = await self.gw.call(ir)
        if not ir.stream:
            answer = await call.answer()
            return json_response(render(answer, ir) if render else codec.build_response(answer, ir))
        relay = codec.relay(ir, call.provider) if relay else None
        call.stream(relay)
        # Decide success or failure before committing to 200: wait for the first real event.
        first = []
        try:
            while True:
                first += call.pull()
                lead = next((ev for ev in first if ev.kind != "start" and not (ev.kind == "raw" and ev.lead)), None)
                if lead is not None or call.outcome is not None:
                    break
                await call.wait()
        except asyncio.CancelledError:
            call.finish("cancelled")
            raise
        except BaseException:
            call.finish("client_gone")
            raise
        if lead is not None and lead.kind == "error":
            raise lead.error()
        enc = relay.encoder if relay else encoder(ir) if encoder else codec.StreamEncoder(ir)
        return StreamResponse(EncodedStream(call, enc, first), 200,
                              content_type=content_type or getattr(codec, "stream_content_type", "text/event-stream"))


class EncodedStream:
    """A chat stream in the client's format, as a StreamResponse source: the IR events of each upstream read
    (Call.pull) encoded in one piece. Closing it before the end (the client went away) finishes the call as
    client_gone."""

    __slots__ = ("call", "encoder", "first", "ended")

    def __init__(self, call, encoder, first):
        self.call, self.encoder, self.first, self.ended = call, encoder, first, False

    def take(self):
        if self.ended:
            return b""
        call = self.call
        if self.first is not None:
            events, self.first = self.first, None
        else:
            events = call.pull()
        encode, pieces = self.encoder.encode, []
        for ev in events:
            out = encode(ev)
            if out:
                pieces.append(out)
            if ev.kind == "error":
                log.warning("stream ended by upstream error: %s", ev.message)
                break
        if call.outcome is not None:
            self.ended = True
            tail = self.encoder.close()  # e.g. the closing `]` of a Gemini JSON-array stream
            if tail:
                pieces.append(tail)
        if not pieces:
            return b""
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def wait(self):
        return self.call.wait()

    def listen(self, callback):
        self.call.listen(callback)

    async def close(self):
        self.call.finish("client_gone")


# === 16. Watcher ===
# Owns: noticing edits to the config file and to the credential files in auth-dir (polling, debounced) and
# applying them without a restart. A broken config edit keeps the running config and logs the error with its line.

class Poller:
    """A background task calling `check()` every `interval` seconds of its clock; a failing check is logged and
    polling goes on. Subclasses debounce: act once what they watch looks the same on two polls in a row."""

    def __init__(self, interval, clock=None):
        self.interval = interval
        self.clock = clock or Clock()
        self.task = None
        self.pending = None

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self.task

    def stop(self):
        if self.task is not None:
            self.task.cancel()

    async def _run(self):
        while True:
            await self.clock.sleep(self.interval)
            try:
                self.check()
            except Exception:  # a watcher must outlive any surprise
                log.exception("%s failed", type(self).__name__)


class ConfigWatcher(Poller):
    """Polls the config file; applies a changed, valid config to the app. LLM_MUX_* overrides are re-applied on
    every reload (the original lost them after the first one)."""

    def __init__(self, path, apply, interval=0.25, environ=None, clock=None, own_digest=None):
        Poller.__init__(self, interval, clock)
        self.path = path
        self.apply = apply  # Config -> None (Gateway.adopt: keeps the keys that need a restart)
        self.own_digest = own_digest or (lambda: None)  # () -> digest of the gateway's own last write
        self.environ = environ
        self.stamp = self._stat()
        self.digest = self._digest()

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _digest(self):
        try:
            with open(self.path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return None

    def check(self):
        stamp = self._stat()
        if stamp is None or stamp == self.stamp:
            self.pending = None
            return False
        # Debounce: editors write in several steps; act once the file looks the same on two polls in a row.
        if stamp != self.pending:
            self.pending = stamp
            return False
        self.stamp = stamp
        digest = self._digest()
        if digest is None or digest == self.digest:
            return False
        self.digest = digest
        if digest == self.own_digest():
            return False  # the gateway wrote this itself and has already applied it
        return self.reload()

    def reload(self):
        try:
            cfg = Config.load(self.path, self.environ)
        except ConfigError as e:
            log.error("config reload failed, keeping the running config: %s", e)
            return False
        self.apply(cfg)
        log.info("config reloaded from %s", self.path)
        return True


class AuthDirWatcher(Poller):
    """Polls auth-dir: a credential file created, modified, deleted or renamed is picked up within a second.
    Unchanged files keep their live credential objects; the gateway's own refresh writes are adopted as edits."""

    def __init__(self, auth_dir, files, apply, interval=0.25, clock=None):
        Poller.__init__(self, interval, clock)
        # () -> the auth dir in use; () -> {id: live Credential}; {id: Credential} -> None
        self.auth_dir, self.files, self.apply = auth_dir, files, apply
        self.listing = self._listing()

    def _listing(self):
        return auth_dir_listing(self.auth_dir())

    def check(self):
        listing = self._listing()
        if listing == self.listing:
            self.pending = None
            return False
        if listing != self.pending:  # debounce: the same picture on two polls in a row
            self.pending = listing
            return False
        live = {}
        for cred in self.files().values():
            live[os.path.basename(cred.path)] = cred
        if set(listing) == set(self.listing) and all(
                stamp == self.listing[n] or (n in live and live[n].stamp == stamp) for n, stamp in listing.items()):
            self.listing = listing  # only our own refresh writes: nothing to reload
            return False
        before = set(self.listing)
        self.listing = listing
        files = reread_credentials(self.auth_dir(), self.files(), listing)
        added = sorted(set(listing) - before)
        removed = sorted(before - set(listing))
        self.apply(files)
        log.info("auth dir changed: %d credential file(s)%s%s", len(listing),
                 "; added " + ", ".join(added) if added else "", "; removed " + ", ".join(removed) if removed else "")
        return True


# === 17. CLI ===
# Owns: the command line (serve, version, env) and the process around the server: logging, signals, TLS
# context, the safe-binding check. It builds on everything above and adds no gateway behaviour of its own.

class CliError(Exception):
    """A failure reported as one line on stderr with a non-zero exit."""


def check_bind_safety(cfg):
    """Refuse to expose a keyless gateway beyond this machine unless disable-auth says so explicitly."""
    if cfg.api_keys or cfg.disable_auth:
        return
    if not is_loopback_host(cfg.host):
        raise CliError("refusing to listen on %s without api-keys: add api-keys to %s (or set LLM_MUX_API_KEYS), "
                       "or set disable-auth: true if something else guards this port"
                       % (cfg.host or "all addresses", cfg.path or "the config"))


def server_ssl_context(cfg):
    if not cfg.tls["enable"]:
        return None
    cert, key = cfg.tls["cert"], cfg.tls["key"]
    if not cert or not key:
        raise CliError("tls.enable is true but tls.cert or tls.key is empty")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        load_tls_pair(ctx, expand_path(cert), expand_path(key))
    except ValueError as e:
        raise CliError(str(e))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def load_tls_pair(ctx, cert, key):
    """Load a certificate chain and its key into `ctx`; ValueError naming the file at fault."""
    for what, path in (("tls.cert", cert), ("tls.key", key)):
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 16)
        except OSError as e:
            raise ValueError("%s %s: %s" % (what, path, e.strerror or e))
        if b"-----BEGIN" not in head:
            raise ValueError("%s %s: not a PEM file" % (what, path))
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        reason = getattr(e, "reason", None) or str(e)
        if "KEY_VALUES_MISMATCH" in str(reason).upper():
            raise ValueError("tls.key %s does not belong to the certificate in tls.cert %s" % (key, cert))
        raise ValueError("tls.cert %s / tls.key %s do not load: %s" % (cert, key, reason))


class TlsReloader(Poller):
    """Polls tls.cert and tls.key: a renewed pair is loaded into the serving context, so new connections get the
    new certificate without a restart (connections already open keep theirs). A pair that does not load — a
    renewal half written — is logged once and the current one stays until the files settle."""

    def __init__(self, ctx, cert, key, interval=5.0, clock=None):
        Poller.__init__(self, interval, clock)
        self.ctx, self.cert, self.key = ctx, cert, key
        self.stamp = self._stamp()
        self.failed = None

    def _stamp(self):
        out = []
        for path in (self.cert, self.key):
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def check(self):
        stamp = self._stamp()
        if stamp == self.stamp:
            return False
        if stamp != self.pending:  # the same picture on two polls in a row: the renewal is done writing
            self.pending = stamp
            return False
        try:
            load_tls_pair(self.ctx, self.cert, self.key)
        except ValueError as e:
            if self.failed != stamp:
                log.warning("TLS certificate changed but does not load (%s); still serving the previous one", e)
                self.failed = stamp
            return False
        self.stamp, self.failed = stamp, None
        log.info("TLS certificate %s reloaded", self.cert)
        return True


def listen_url(cfg):
    host = cfg.host or "0.0.0.0"
    if ":" in host:
        host = "[%s]" % host
    return "%s://%s:%d" % ("https" if cfg.tls["enable"] else "http", host, cfg.port)


async def serve_forever(cfg, ready=None, config_path=None, debug=False, listen=None):
    """Run the gateway until SIGTERM/SIGINT, then drain in-flight responses for up to shutdown-timeout."""
    os.makedirs(cfg.auth_dir, mode=0o700, exist_ok=True)
    recover_auth_dir(cfg.auth_dir)
    gw = Gateway(cfg, debug=debug, config_file=ConfigFile(config_path) if config_path else None)
    app = App(gw)
    watcher = ConfigWatcher(config_path, gw.adopt, clock=gw.clock, own_digest=lambda: gw.config_file.own_digest) \
        if config_path else None
    auth_watcher = AuthDirWatcher(lambda: gw.cfg.auth_dir, lambda: gw.files, gw.apply_files, clock=gw.clock)
    server = HttpServer(app, lambda: gw.limits, error_page=http_error_page)
    server.head_check = app.check_head
    ctx = server_ssl_context(cfg)
    if gw.sync is not None:
        await gw.sync.start()  # serve with the shared credentials from the first request
    try:
        srv = await server.listen(cfg.host or None, cfg.port, ctx, **(listen or {}))
    except OSError as e:
        raise CliError("cannot listen on %s:%d: %s" % (cfg.host, cfg.port, e.strerror or e))
    port = srv.sockets[0].getsockname()[1] if srv.sockets else cfg.port
    n_creds = sum(len(p.credentials) for p in gw.registry.providers)
    log.info("llm-mux %s listening on %s (%d providers, %d credentials, %d models)", __version__,
             listen_url(cfg).rsplit(":", 1)[0] + ":%d" % port, len(gw.registry.providers), n_creds,
             len(gw.registry.routes))
    log_next_steps(cfg, gw, port)
    if ready is not None:
        ready(port)
    release_startup_memory()
    tune_collector()
    if watcher is not None:
        watcher.start()
    auth_watcher.start()
    tls_reloader = TlsReloader(ctx, expand_path(cfg.tls["cert"]), expand_path(cfg.tls["key"]), clock=gw.clock) \
        if ctx is not None else None
    if tls_reloader is not None:
        tls_reloader.start()
    gw.start()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(functools.partial(loop_exception_handler, server, gw))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await stop.wait()
    if watcher is not None:
        watcher.stop()
    auth_watcher.stop()
    if tls_reloader is not None:
        tls_reloader.stop()
    gw.refresher.stop()
    log.info("shutting down: no new connections; waiting up to %ss for %d in-flight requests",
             cfg.server["shutdown-timeout"], len(server.busy))
    await server.shutdown(float(cfg.server["shutdown-timeout"]))
    if gw.sync is not None:
        await gw.sync.close()
    gw.stop_usage()
    gw.client.close_idle()
    log.info("stopped")


def loop_exception_handler(server, gw, loop, context):
    """asyncio reports running out of file descriptors once per failed accept — up to a thousand a second, each
    with a traceback. Here it is one warning per episode, a count in the metrics, and idle keep-alive connections
    closed to give descriptors back (asyncio itself pauses accepting for a second)."""
    if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
        gw.fd_exhaustions += 1
        now = time.monotonic()
        if now - gw.fd_warned > 30:
            gw.fd_warned = now
            log.warning("out of file descriptors (%s): pausing new connections and closing %d idle keep-alive "
                        "ones; raise the open-files limit (LimitNOFILE) if this recurs", context.get("exception"),
                        len(server.idle))
        for task in list(server.idle):
            task.cancel()
        return
    loop.default_exception_handler(context)


NOT_YET_SUPPORTED = ()  # settings accepted but without effect yet: (name, is_set(cfg))


def log_next_steps(cfg, gw, port):
    """What a first run needs to hear: settings that do nothing yet, how to get models, where to point tools."""
    for name, is_set in NOT_YET_SUPPORTED:
        if is_set(cfg):
            log.warning("config: %s is set but not supported yet; it has no effect", name)
    prog = program_name()
    if not gw.registry.routes:
        log.warning("no models to serve yet. Log in to a subscription with `%s login <provider>` (%s), or add a "
                    "provider (API key) to %s; `%s env` shows what is configured",
                    prog, ", ".join(sorted(PROVIDERS.logins())), cfg.path or "the config file", prog)
    host = cfg.host if cfg.host and cfg.host not in ("0.0.0.0", "::") else "127.0.0.1"
    base = "%s://%s:%d" % ("https" if cfg.tls["enable"] else "http", "[%s]" % host if ":" in host else host, port)
    log.info("point tools at: OpenAI-compatible %s/v1 · Anthropic %s · Gemini %s · Ollama %s", base, base, base,
             base)


def new_management_key():
    return binascii.hexlify(os.urandom(16)).decode("ascii")


def set_management_key(path, key):
    """Store `key` hashed as remote-management.secret-key, every other line of the file kept."""
    def change(data):
        rm = data.get("remote-management")
        if not isinstance(rm, dict):
            rm = data["remote-management"] = {}
        rm["secret-key"] = hash_secret(key)
    return ConfigFile(path).update(change)


def hash_plain_management_key(cfg, path):
    """A plain management key typed into the file is replaced by its hash on start."""
    stored = cfg.data["remote-management"]["secret-key"]
    if stored and not is_hashed_secret(stored) and os.path.exists(path):
        try:
            cfg = set_management_key(path, stored)
        except (ConfigError, OSError) as e:
            log.warning("could not hash the management key in %s: %s (it still works)", path, e)
            return cfg
        log.info("management key in %s is now stored hashed", path)
    return cfg


def cmd_init(args):
    """Create the config and auth dir; generate the management key (or a new one with --force)."""
    path, _ = find_config_path(args.config)
    if not os.path.exists(path):
        write_file_atomic(path, DEFAULT_CONFIG_TEXT, 0o600)
        print("Created: %s" % path)
    cfg = Config.load(path)
    os.makedirs(cfg.auth_dir, mode=0o700, exist_ok=True)
    stored = cfg.data["remote-management"]["secret-key"]
    if stored and not args.force:
        if is_hashed_secret(stored):
            print("Management key: set (stored hashed; it cannot be shown again)")
        else:
            print("Management key: %s" % stored)
            set_management_key(path, stored)
        print("Location: %s" % path)
        print("Use `%s init --force` to regenerate" % program_name())
        return 0
    key = new_management_key()
    set_management_key(path, key)
    print("%s management key:" % ("Regenerated" if stored else "Generated"))
    print("  %s" % key)
    print("Location: %s (stored hashed; save the key now, it is not shown again)" % path)
    return 0


def raise_fd_limit():
    """Raise the soft open-files limit to the hard one: every connection, upstream call and file costs one, and a
    soft limit of 1024 is reached long before the machine is busy."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass  # not POSIX, or not allowed: keep what we have


def cmd_serve(args):
    raise_fd_limit()
    cfg, path, created = load_config_for_cli(args.config)
    if created:
        print("First run: created config at %s" % path, file=sys.stderr)
        key = new_management_key()
        cfg = set_management_key(path, key)
        port = getattr(args, "port", None) or cfg.port
        print("Dashboard: http://127.0.0.1:%d/dashboard  management key: %s\n(shown once, stored hashed; `%s "
              "init --force` makes a new one)" % (port, key, program_name()), file=sys.stderr)
    if getattr(args, "host", None):
        cfg.host = args.host
    if getattr(args, "port", None) is not None:
        cfg.port = args.port
    setup_logging(cfg.debug or args.debug)
    for w in cfg.warnings:
        log.warning("config: %s", w)
    host, port = cfg.host, cfg.port
    cfg = hash_plain_management_key(cfg, path)
    cfg.host, cfg.port = host, port
    check_bind_safety(cfg)
    config_path = path if os.path.exists(path) else None
    workers = getattr(args, "workers", None) or 1
    if workers > 1:
        return serve_workers(cfg, workers, config_path, args.debug)
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve_forever(cfg, config_path=config_path, debug=args.debug))
    return 0


def workers_listen(cfg):
    """How the workers listen: each on its own SO_REUSEPORT socket ({"reuse_port": True}, after checking here,
    once, that the port is free), or, without SO_REUSEPORT or for port 0, on one inherited socket ({"sock": s})."""
    if hasattr(socket, "SO_REUSEPORT") and cfg.port != 0:
        probe = socket.socket(socket.AF_INET6 if ":" in (cfg.host or "") else socket.AF_INET, socket.SOCK_STREAM)
        try:  # the probe is closed before the workers bind
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind((cfg.host or "0.0.0.0", cfg.port))
        except OSError as e:
            raise CliError("cannot listen on %s:%d: %s" % (cfg.host, cfg.port, e.strerror or e))
        finally:
            probe.close()
        return {"reuse_port": True}
    try:
        shared = socket.create_server((cfg.host or "", cfg.port), reuse_port=False, backlog=1024)
    except OSError as e:
        raise CliError("cannot listen on %s:%d: %s" % (cfg.host, cfg.port, e.strerror or e))
    shared.set_inheritable(True)
    return {"sock": shared}


def serve_workers(cfg, n, config_path, debug):
    """`serve --workers N`: N worker processes on one port. Each worker binds its own socket with SO_REUSEPORT,
    so the kernel spreads connections over them (where SO_REUSEPORT is missing, or for port 0, the workers share
    one socket bound here). They coordinate through the auth-dir file locks, or the shared store when configured.
    This parent only supervises: a worker that dies is started again (with back-off); SIGTERM or SIGINT is passed
    to every worker, each drains its requests, and the parent exits when all have."""
    if not hasattr(os, "fork"):
        raise CliError("--workers needs a system with fork(); run one process per port instead")
    listen = workers_listen(cfg)
    if any(k.rpm is not None or k.tpm is not None or k.max_budget is not None for k in cfg.client_keys) and \
            not cfg.store["postgres-url"]:
        log.warning("--workers %d without a shared store: each worker counts client-key limits on its own "
                    "(set store.postgres-url for limits that hold across workers)", n)
    children = {}  # pid -> worker number
    stopping = []

    def start(number):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.environ["LLM_MUX_WORKER"] = str(number)
                if uvloop is not None:
                    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
                asyncio.run(serve_forever(cfg, config_path=config_path, debug=debug, listen=listen))
                code = 0
            except CliError as e:
                print("llm-mux worker %d: %s" % (number, e), file=sys.stderr)
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                logging.shutdown()  # os._exit skips it: the worker's last lines would be lost
                os._exit(code)
        children[pid] = number
        log.info("worker %d started (pid %d)", number, pid)

    def forward(signum, frame):
        stopping.append(signum)
        for pid in list(children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for number in range(1, n + 1):
        start(number)
    restarts = {}
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        number = children.pop(pid, None)
        if number is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
        recent = [t for t in restarts.get(number, []) if t > time.monotonic() - 60] + [time.monotonic()]
        restarts[number] = recent
        log.error("worker %d (pid %d) exited with %s; starting it again", number, pid, code)
        time.sleep(min(30.0, 0.5 * 2 ** (len(recent) - 1)))
        if not stopping:
            start(number)
    log.info("all workers stopped")
    return 0


def cmd_version(args):
    print("llm-mux %s" % __version__)
    print("Python: %s" % sys.version.split()[0])
    return 0


def cmd_env(args):
    path, is_default = find_config_path(args.config)
    exists = os.path.exists(path)
    cfg = Config.load(path) if exists else Config.defaults()
    cfg.path = path
    print("llm-mux:     %s" % __version__)
    print("Python:      %s (%s)" % (sys.version.split()[0], sys.executable))
    print("Config:      %s%s" % (path, "" if exists else " (not created yet; defaults shown)"))
    print("Auth dir:    %s%s" % (cfg.auth_dir, "" if os.path.isdir(cfg.auth_dir) else " (missing)"))
    print("Listen:      %s" % listen_url(cfg))
    auth = "disabled" if cfg.disable_auth else ("%d API key(s)" % len(cfg.api_keys) if cfg.api_keys
                                                 else "no keys (loopback only)")
    print("Client auth: %s" % auth)
    if cfg.env_applied:
        print("Env:         %s" % ", ".join(cfg.env_applied))
    print("Providers:   %d" % len(cfg.providers))
    for p in cfg.providers:
        print("  - %s (type %s, %d key(s), %d model(s)) %s" % (p.name, p.type, len(p.keys), len(p.models),
                                                              p.base_url or ""))
    files = []
    if os.path.isdir(cfg.auth_dir):
        files = sorted(f for f in os.listdir(cfg.auth_dir) if f.endswith(".json"))
    print("Credentials: %d file(s) in auth dir" % len(files))
    for f in files:
        print("  - %s" % f)
    try:
        with open(os.path.join(cfg.auth_dir, REJECTED_FILE), encoding="utf-8") as f:
            rejected = json.load(f)
    except (OSError, ValueError):
        rejected = {}
    for entry in rejected.values() if isinstance(rejected, dict) else ():
        print("Rejected:    %s (%s) is out of rotation: %s" % (entry.get("label"), entry.get("provider"),
                                                               entry.get("reason")))
    leads = {t: c.refresh_lead for t, c in sorted(PROVIDERS.files.items()) if c.refresh_lead and t == c.file_type}
    leads.update((PROVIDERS.files[k].file_type, v) for k, v in cfg.refresh_lead.items())
    print("Refresh:     %s" % ", ".join("%s %s%s" % (t, format_seconds(v), "*" if t in {
        PROVIDERS.files[k].file_type for k in cfg.refresh_lead} else "") for t, v in leads.items()) +
        " before expiry (* = refresh-lead)")
    for w in cfg.warnings:
        print("Warning:     %s" % w)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus the exit status 2), like every other failure."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


async def run_flow(cfg, steps, out=None):
    """Drive a login flow: `steps(client)` runs it and returns (file name, credential-file content). An upstream
    that cannot be reached or refuses is a one-line LoginError; the credential file is written atomically (0600)
    only at the very end, so an interrupted login leaves nothing half-written; then one line says who it is."""
    client = HttpClient(lambda: cfg)
    try:
        filename, meta = await steps(client)
    except (RefreshError, UpstreamError) as e:
        raise LoginError(e.message)
    finally:
        client.close_idle()
    path = os.path.join(cfg.auth_dir, filename)
    write_file_atomic(path, json.dumps(meta, indent=2) + "\n", 0o600)
    print("Logged in as %s; credentials saved to %s" % (meta.get("email") or meta.get("username"), path),
          file=out or sys.stdout, flush=True)
    return path


async def run_token_login(cfg, name, out=None, read=None):
    """Logins that start from a pasted token (Cline)."""
    flow = PROVIDERS.logins()[name].login()
    print(flow.prompt, file=out or sys.stdout, flush=True)
    pasted = await asyncio.get_running_loop().run_in_executor(None, read or sys.stdin.readline)
    if not pasted.strip():
        raise CliError("nothing was pasted")
    return await run_flow(cfg, lambda client: flow.finish(client, pasted), out)


async def run_device_login(cfg, name, timeout=900, out=None, sleep=asyncio.sleep):
    """Device-code login: show the page and code with a countdown, poll until the user finishes. Flows provide
    device_start -> {url, code, interval, expires_in, ...}, device_poll -> None (pending) or a result, and
    device_finish(result) -> (file name, credential-file content)."""
    out = out or sys.stdout
    flow = PROVIDERS.logins()[name].login()
    return await run_flow(cfg, lambda client: device_steps(flow, client, timeout, out, sleep), out)


async def device_steps(flow, client, timeout, out, sleep):
    started = await flow.device_start(client)
    print("Open %s and enter the code:\n\n    %s\n" % (started["url"], started["code"]), file=out, flush=True)
    limit = min(timeout, started.get("expires_in") or timeout)
    deadline = time.monotonic() + limit
    interval = started.get("interval") or 5
    last_shown = None
    while True:
        left = int(deadline - time.monotonic())
        if left <= 0:
            raise CliError("the code expired before the login was finished; run the login again")
        if last_shown is None or last_shown - left >= 60:
            print("Waiting for you to enter the code... (%d:%02d left, Ctrl-C to cancel)" % (left // 60, left % 60),
                  file=out, flush=True)
            last_shown = left
        got = await flow.device_poll(client, started)
        if got == "slow_down":
            interval += 5
        elif got is not None:
            break
        await sleep(interval)
    return await flow.device_finish(client, got)


async def wait_for_callback(flow, port, timeout):
    """Serve the provider's redirect on 127.0.0.1:port until the browser arrives; returns the code."""
    got = asyncio.get_running_loop().create_future()
    try:
        server = await listen_for_login_callback(flow, port, got)
    except OSError as e:
        raise CliError("cannot listen on 127.0.0.1:%d for the login callback: %s (another login running? use "
                       "--callback-port or --no-browser)" % (port, e.strerror or e))
    try:
        return await asyncio.wait_for(got, timeout)
    finally:
        await server.shutdown(0.5)


async def run_login(cfg, name, no_browser=False, port=None, timeout=300, out=None, paste=None, project=None):
    """The terminal side of a login: show the URL (open a browser where one exists), wait for the callback or a
    pasted URL, exchange the code, and write the credential file (0600) only at the very end, so an interrupted
    login leaves nothing half-written."""
    out = out or sys.stdout
    flow_class = PROVIDERS.logins()[name].login
    flow = flow_class(project) if project else flow_class()
    url = flow.url()
    print("Open this URL to log in to %s:\n\n  %s\n" % (name, url), file=out, flush=True)
    if not no_browser:
        try:
            import webbrowser
            webbrowser.open(url)
        except Exception:
            pass
    loop = asyncio.get_running_loop()
    waiters = [asyncio.ensure_future(wait_for_callback(flow, port or flow.callback_port, timeout))]
    if no_browser or paste is not None:
        print("Waiting for the browser... or paste the URL you were sent to (or the code) and press Enter:",
              file=out, flush=True)
        read = paste or (lambda: sys.stdin.readline())
        waiters.append(asyncio.ensure_future(loop.run_in_executor(None, read)))
    else:
        print("Waiting for the browser... (Ctrl-C to cancel; %d s)" % timeout, file=out, flush=True)
    try:
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            if not w.done():
                w.cancel()
    first = done.pop()
    try:
        result = first.result()
    except asyncio.TimeoutError:
        raise CliError("no answer from the browser within %d s; run the login again" % timeout)
    code = flow.code_from_paste(result) if first is not waiters[0] else result
    if not code:
        raise CliError("no authorization code received")
    return await run_flow(cfg, lambda client: flow.exchange(client, code), out)


def cmd_login(args):
    cfg, _, _ = load_config_for_cli(args.config, create=False)
    setup_logging(args.debug)
    provider_class = PROVIDERS.logins()[args.provider]
    if provider_class.login is None:  # no login of its own (Kiro): import the official tool's stored tokens
        imported, _ = import_cli_credentials(cfg.auth_dir, cfg=cfg, only=provider_class.official_tool)
        return 0 if imported else 1
    flow = provider_class.login
    try:
        if args.provider == "iflow" and args.cookie:
            asyncio.run(run_flow(cfg, lambda client: flow().cookie_login(client, args.cookie)))
        elif getattr(flow, "kind", "browser") == "token":
            asyncio.run(run_token_login(cfg, args.provider))
        elif getattr(args, "device", False) or getattr(flow, "kind", "browser") == "device":
            if not hasattr(flow, "device_start"):
                raise CliError("%s has no device-code login" % args.provider)
            if args.alias:
                flow.alias = args.alias
            asyncio.run(run_device_login(cfg, args.provider, args.timeout or 900))
        else:
            asyncio.run(run_login(cfg, args.provider, args.no_browser, args.callback_port, args.timeout or 300,
                                  project=args.project))
    except KeyboardInterrupt:
        print("\nlogin cancelled; nothing was written", file=sys.stderr)
        return 130
    return 0


def cmd_import(args):
    cfg, _, _ = load_config_for_cli(args.config, create=False)
    if args.source == "cli":
        imported, _ = import_cli_credentials(cfg.auth_dir, cfg=cfg)
        return 0 if imported else 1
    if args.source == "vertex":
        if not args.file:
            raise CliError("usage: llm-mux import vertex <service-account.json> [--location REGION]")
        path = import_vertex(args.file, cfg.auth_dir, args.location)
        print("Vertex credentials imported: %s" % path)
        return 0
    if args.source == "auth-dir":
        return import_auth_dir_to_store(cfg, expand_path(args.file) if args.file else cfg.auth_dir)
    raise CliError("unknown import source %r (supported: cli, vertex, auth-dir)" % args.source)


def import_auth_dir_to_store(cfg, auth_dir):
    """`llm-mux import auth-dir [DIR]`: every credential file of DIR into the shared store (replacing what the store
    has under the same names; the running replicas pick them up within a second)."""
    if not cfg.store["postgres-url"]:
        raise CliError("no shared store configured: set store.postgres-url (or LLM_MUX_STORE_POSTGRES_URL)")
    files = scan_auth_dir(auth_dir)
    if not files:
        raise CliError("no credential files in %s" % auth_dir)

    async def push():
        store = CredentialStore(cfg.store["postgres-url"], cfg.store["encryption-key"])
        try:
            await store.migrate()
            for name, (meta, _) in sorted(files.items()):
                await store.put_credential(name, meta)
                print("stored %s" % name)
        finally:
            store.close()
    try:
        asyncio.run(push())
    except PgError as e:
        raise CliError("store %s: %s" % (redact_url(cfg.store["postgres-url"]), e))
    print("%d credential file(s) from %s are in the store%s" % (len(files), auth_dir, "" if cfg.store[
        "encryption-key"] else " (unencrypted: set store.encryption-key to encrypt them)"))
    return 0


def installed_file():
    """The file this process runs from: the .pyz archive, or llm_mux.py."""
    here = os.path.abspath(__file__)
    archive = os.path.dirname(here)
    return archive if os.path.isfile(archive) and zipfile_like(archive) else here


def zipfile_like(path):
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return path.endswith(".pyz") or head.startswith(b"PK") or b"\nPK" in head[:200]


def release_source(data, version):
    """The bytes to install from a downloaded release: the .pyz itself, or its llm_mux.py when the installed file is
    a plain llm_mux.py. ReleaseError unless it is a zipapp of llm-mux `version`."""
    import zipfile
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = set(z.namelist())
            if not {"__main__.py", "llm_mux.py"} <= names:
                raise ReleaseError("the download is not an llm-mux zipapp")
            source = z.read("llm_mux.py")
    except (zipfile.BadZipFile, OSError, KeyError) as e:
        raise ReleaseError("the download is not a valid zipapp: %s" % e)
    m = re.search(rb'^__version__ = "([^"]+)"', source, re.M)
    if m is None or m.group(1).decode() != version:
        raise ReleaseError("the download says it is version %s, the manifest %s" % (
            m.group(1).decode() if m else "?", version))
    return source


def replace_file(path, data, mode):
    """Write `data` over `path` atomically: a temp file in the same directory, fsync, rename, fsync the directory."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, ".%s.update-%d" % (os.path.basename(path), os.getpid()))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def download_release(release, cfg):
    """The file a signed release manifest names, downloaded and checked against the manifest's size and SHA-256
    (ReleaseError otherwise)."""
    async def fetch(url, limit):
        client = HttpClient(lambda: cfg)
        try:
            resp = await client.request("GET", url, [("User-Agent", USER_AGENT)], None, timeout=30,
                                        stream_timeout=120)
            if resp.status != 200:
                raise ReleaseError("the download %s answered %d" % (redact_url(url), resp.status))
            return await resp.read(limit)
        finally:
            client.close_idle()
    data = asyncio.run(fetch(release["url"], release["size"] + 1))
    if len(data) != release["size"]:
        raise ReleaseError("the download is %d bytes, the manifest says %d (truncated?): not installing"
                           % (len(data), release["size"]))
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), release["sha256"]):
        raise ReleaseError("the download's SHA-256 does not match the signed manifest: not installing")
    return data


def cmd_update(args):
    """`llm-mux update [--check] [--yes] [--rollback] [--allow-downgrade] [--url URL]`."""
    target = os.path.abspath(args.target) if getattr(args, "target", None) else installed_file()
    previous = target + ".previous"
    if args.rollback:
        return update_rollback(target, previous, args.yes)
    url = args.url or os.environ.get("LLM_MUX_UPDATE_URL") or ""
    if not url:
        try:
            path, _ = find_config_path(args.config)
            url = Config.load(path).update_url if os.path.exists(path) else ""
        except ConfigError:
            url = ""
    url = url or RELEASE_MANIFEST_URL
    cfg = Config.defaults()

    async def manifest():
        client = HttpClient(lambda: cfg)
        try:
            return await fetch_release(client, url)
        finally:
            client.close_idle()

    try:
        release = asyncio.run(manifest())
        current, latest = __version__, release["version"]
        newer = version_tuple(latest) > version_tuple(current)
        if not newer and not (args.allow_downgrade and latest != current):
            if version_tuple(latest) == version_tuple(current):
                print("Already up to date (current: %s, latest: %s)" % (current, latest))
                return 0
            if args.check:
                print("The release channel offers %s, older than this %s" % (latest, current))
                return 0
            raise CliError("the release channel offers %s, older than this %s: not downgrading (use "
                           "--allow-downgrade)" % (latest, current))
        print("Update available: %s -> %s" % (current, latest))
        if args.check:
            return 0
        directory = os.path.dirname(target) or "."
        if not os.access(directory, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
            raise CliError("cannot write to %s: run the update as the user who owns it" % target)
        if not args.yes:
            if not sys.stdin.isatty():
                raise CliError("not a terminal: add --yes to install %s" % latest)
            if input("Install %s over %s? [y/N] " % (latest, target)).strip().lower() not in ("y", "yes"):
                print("Not installed.")
                return 1
        data = download_release(release, cfg)
        new = data if zipfile_like(target) else release_source(data, latest)
        if zipfile_like(target):
            release_source(data, latest)  # check it is the version it claims to be
        mode = os.stat(target).st_mode & 0o777 if os.path.exists(target) else 0o755
        if os.path.exists(target):
            with open(target, "rb") as f:
                replace_file(previous, f.read(), mode)
        replace_file(target, new, mode)
    except (ReleaseError, UpstreamError) as e:
        raise CliError(str(e) if isinstance(e, ReleaseError) else e.message)
    except OSError as e:
        raise CliError("cannot install over %s: %s (the installed file is unchanged)" % (target, e.strerror or e))
    print("Updated %s -> %s at %s" % (current, latest, target))
    print("The previous version is kept at %s (`%s update --rollback` restores it). Restart llm-mux (or its "
          "service) to run %s." % (previous, program_name(), latest))
    return 0


def update_rollback(target, previous, yes):
    if not os.path.exists(previous):
        raise CliError("no previous version at %s to roll back to" % previous)
    with open(previous, "rb") as f:
        old = f.read()
    m = re.search(rb'__version__ = "([^"]+)"', old if not old.startswith(b"PK") else b"")
    label = m.group(1).decode() if m else "the previous version"
    if zipfile_like(previous):
        import zipfile
        with contextlib.suppress(zipfile.BadZipFile, KeyError):
            with zipfile.ZipFile(io.BytesIO(old)) as z:
                m = re.search(rb'^__version__ = "([^"]+)"', z.read("llm_mux.py"), re.M)
                label = m.group(1).decode() if m else label
    if not yes and not sys.stdin.isatty():
        raise CliError("not a terminal: add --yes to roll back to %s" % label)
    if not yes and input("Roll back %s to %s? [y/N] " % (target, label)).strip().lower() not in ("y", "yes"):
        return 1
    mode = os.stat(target).st_mode & 0o777 if os.path.exists(target) else 0o755
    try:
        with open(target, "rb") as f:
            current = f.read()
        replace_file(target, old, mode)
        replace_file(previous, current, mode)  # a second rollback goes forward again
    except OSError as e:
        raise CliError("cannot roll back %s: %s (the installed file is unchanged)" % (target, e.strerror or e))
    print("Rolled back %s to %s (the replaced version is now at %s)" % (target, label, previous))
    return 0


SYSTEMD_HARDENING = """NoNewPrivileges=true
ProtectSystem=strict
PrivateTmp=true
PrivateDevices=true
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
RestrictSUIDSGID=true
RestrictRealtime=true
RestrictNamespaces=true
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
LockPersonality=true
MemoryDenyWriteExecute=true
SystemCallArchitectures=native
SystemCallFilter=@system-service
UMask=0077
"""


def service_paths(cfg, config_path):
    """What a service runs: (interpreter, program file, config path, directories it writes)."""
    program = installed_file()
    writes = sorted({os.path.dirname(config_path), cfg.auth_dir, state_dir(cfg), logs_dir(cfg)})
    return os.path.realpath(sys.executable), program, config_path, writes


def systemd_unit(cfg, config_path, system):
    python, program, config_path, writes = service_paths(cfg, config_path)
    exec_start = " ".join(shlex_quote(a) for a in (python, program, "serve", "--config", config_path))
    lines = ["# written by `llm-mux service install`; `llm-mux service uninstall` removes it", "[Unit]",
             "Description=llm-mux - self-hosted AI gateway", "After=network-online.target",
             "Wants=network-online.target", "StartLimitIntervalSec=60", "StartLimitBurst=5", "", "[Service]",
             "Type=simple", "Environment=PYTHONUNBUFFERED=1", "ExecStart=%s" % exec_start,
             "WorkingDirectory=%s" % os.path.dirname(config_path), "Restart=on-failure", "RestartSec=5",
             "KillSignal=SIGTERM", "TimeoutStopSec=%d" % (int(cfg.server["shutdown-timeout"]) + 15),
             "LimitNOFILE=65536"]
    if system:
        home_paths = any(w.startswith(("/home/", "/root")) for w in writes + [program, python])
        lines += [""] + SYSTEMD_HARDENING.splitlines()
        lines.append("ProtectHome=%s" % ("read-only" if home_paths else "true"))
        lines.append("ReadWritePaths=%s" % " ".join(shlex_quote(w) for w in writes))
        if cfg.port and cfg.port < 1024:
            lines += ["AmbientCapabilities=CAP_NET_BIND_SERVICE", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"]
        else:
            lines += ["CapabilityBoundingSet=", "AmbientCapabilities="]
    lines += ["", "[Install]", "WantedBy=%s" % ("multi-user.target" if system else "default.target"), ""]
    return "\n".join(lines)


def shlex_quote(text):
    import shlex
    return shlex.quote(text)


def launchd_plist(cfg, config_path):
    python, program, config_path, _ = service_paths(cfg, config_path)
    esc = html_escape
    args = "".join("\n        <string>%s</string>" % esc(a) for a in (python, program, "serve", "--config",
                                                                      config_path))
    log_path = os.path.join(logs_dir(cfg), "service.log")
    return ("""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
    <key>Label</key>
    <string>com.llm-mux</string>
    <key>ProgramArguments</key>
    <array>%s
    </array>
    <key>RunAtLoad</key>
    <true/>
    <key>KeepAlive</key>
    <dict>
        <key>SuccessfulExit</key>
        <false/>
    </dict>
    <key>ThrottleInterval</key>
    <integer>5</integer>
    <key>WorkingDirectory</key>
    <string>%s</string>
    <key>StandardOutPath</key>
    <string>%s</string>
    <key>StandardErrorPath</key>
    <string>%s</string>
</dict>
</plist>
""" % (args, esc(os.path.dirname(config_path)), esc(log_path), esc(log_path)))


def service_plan(args, cfg, config_path, platform=None):
    """(file to write, its text, commands per action) for this system; CliError where there is no service
    manager llm-mux knows."""
    platform = platform or sys.platform
    if platform.startswith("linux"):
        system = args.system or (os.geteuid() == 0 and not args.user)
        path = "/etc/systemd/system/llm-mux.service" if system else os.path.join(
            os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "systemd", "user", "llm-mux.service")
        ctl = ["systemctl"] + ([] if system else ["--user"])
        journal = ["journalctl"] + ([] if system else ["--user"])
        actions = {
            "install": [ctl + ["daemon-reload"], ctl + ["enable", "--now", "llm-mux"]] +
                       ([] if system else [["loginctl", "enable-linger", os.environ.get("USER") or ""]]),
            "uninstall": [ctl + ["disable", "--now", "llm-mux"], ["rm", path], ctl + ["daemon-reload"]],
            "start": [ctl + ["start", "llm-mux"]], "stop": [ctl + ["stop", "llm-mux"]],
            "restart": [ctl + ["restart", "llm-mux"]], "status": [ctl + ["status", "--no-pager", "llm-mux"]],
            "logs": [journal + ["-u", "llm-mux", "-f"]]}
        return path, systemd_unit(cfg, config_path, system), actions
    if platform == "darwin":
        path = os.path.expanduser("~/Library/LaunchAgents/com.llm-mux.plist")
        log_path = os.path.join(logs_dir(cfg), "service.log")
        actions = {"install": [["launchctl", "unload", path], ["launchctl", "load", "-w", path]],
                   "uninstall": [["launchctl", "unload", "-w", path], ["rm", path]],
                   "start": [["launchctl", "start", "com.llm-mux"]], "stop": [["launchctl", "stop", "com.llm-mux"]],
                   "restart": [["launchctl", "stop", "com.llm-mux"], ["launchctl", "start", "com.llm-mux"]],
                   "status": [["launchctl", "list", "com.llm-mux"]], "logs": [["tail", "-f", log_path]]}
        return path, launchd_plist(cfg, config_path), actions
    raise CliError("service management needs systemd (Linux) or launchd (macOS); on %s run `%s serve` under your "
                   "system's own service manager" % (platform, program_name()))


def cmd_service(args):
    """`llm-mux service install|uninstall|start|stop|restart|status|logs [--dry-run] [--user|--system]`."""
    if args.dry_run:  # writes nothing, not even a first-run config
        config_path, _ = find_config_path(args.config)
        cfg = Config.load(config_path) if os.path.exists(config_path) else Config.defaults()
    else:
        cfg, config_path, _ = load_config_for_cli(args.config)
    config_path = os.path.abspath(config_path)
    path, text, actions = service_plan(args, cfg, config_path)
    commands = actions[args.action]
    if args.dry_run:
        if args.action == "install":
            print("# would write %s:\n%s" % (path, text))
        for c in commands:
            print("would run: %s" % " ".join(shlex_quote(a) for a in c))
        return 0
    if args.action == "install":
        write_file_atomic(path, text, 0o644)
        print("wrote %s" % path)
    code = 0
    import subprocess
    for c in commands:
        if c[0] == "rm":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(c[1])
            print("removed %s" % c[1])
            continue
        try:
            done = subprocess.run(c)
        except FileNotFoundError:
            raise CliError("%s is not installed here" % c[0])
        if done.returncode and not (args.action in ("install", "uninstall") and c[1:2] in (["unload"], ["disable"])
                                    or c[0] == "loginctl"):
            code = done.returncode
            break
    if args.action == "install" and code == 0:
        print("llm-mux runs as a service now; `%s service status` and `%s service logs` show it"
              % (program_name(), program_name()))
    return code


def global_options(top):
    """--config, --debug and serve's --host / --port. They work before or after the command's name: the copies on
    the subcommands default to SUPPRESS, so they only set what is written after the name."""
    p = argparse.ArgumentParser(add_help=False)
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    p.add_argument("--config", metavar="PATH", default=default(None),
                   help="config file (default: $LLM_MUX_CONFIG or $XDG_CONFIG_HOME/llm-mux/config.yaml)")
    p.add_argument("--debug", action="store_true", default=default(False), help="debug logging")
    return p


LOGIN_OPTIONS = {  # how the options LoginFlow.cli_options names look on the command line
    "no-browser": (("--no-browser",), {"action": "store_true",
                                       "help": "print the URL and take the pasted redirect URL"}),
    "callback-port": (("--callback-port",), {"type": int, "help": "port for the local callback listener"}),
    "timeout": (("--timeout",), {"type": int, "help": "seconds to wait for the login (default 300; device codes 900)"}),
    "device": (("--device",), {"action": "store_true", "help": "device-code login: type a code on any device"}),
    "project": (("--project",), {"help": "the Google Cloud project(s) to use: ID, ID1,ID2 or ALL"}),
    "alias": (("--alias",), {"help": "a name for the account (the provider does not say which account it is)"}),
    "cookie": (("--cookie",), {"help": "log in with a platform.iflow.cn browser cookie (must contain BXAuth=)"}),
}


def build_parser():
    common = global_options(False)
    parser = _Parser(prog="llm-mux", parents=[global_options(True)],
                     description="llm-mux %s: one gateway, every LLM API." % __version__)
    parser.add_argument("--version", action="version", version="llm-mux %s" % __version__)
    parser.add_argument("--host", help="bind address for serve, the default command")
    parser.add_argument("--port", "-p", type=int, help="port for serve, the default command")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    p = sub.add_parser("serve", parents=[common], help="run the gateway (the default command)")
    p.add_argument("--host", default=argparse.SUPPRESS, help="bind address (overrides host in the config)")
    p.add_argument("--port", "-p", type=int, default=argparse.SUPPRESS, help="port (overrides port in the config)")
    p.add_argument("--workers", "-w", type=int, default=1, metavar="N",
                   help="worker processes sharing the port (default 1)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("init", parents=[common], help="create the config and auth dir and the management key")
    p.add_argument("--force", action="store_true", help="generate a new management key")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("version", parents=[common], help="print the version")
    p.set_defaults(func=cmd_version)
    p = sub.add_parser("env", parents=[common], help="show the config, auth dir and listen address it would use")
    p.set_defaults(func=cmd_env)
    p = sub.add_parser("login", parents=[common], help="log in to a subscription provider (%s)"
                       % ", ".join(sorted(PROVIDERS.logins())))
    logins = p.add_subparsers(dest="provider", metavar="provider", parser_class=_Parser, required=True)
    for name, provider_class in sorted(PROVIDERS.logins().items()):
        flow = provider_class.login
        how = {"browser": "browser sign-in", "device": "device code", "token": "paste a token"}.get(
            flow.kind, "") if flow is not None else "import the %s's stored tokens" % provider_class.official_tool
        lp = logins.add_parser(name, parents=[common], help="%s (%s)" % (provider_class.display_name or name, how))
        for option in flow.cli_options if flow is not None else ():
            flags, kw = LOGIN_OPTIONS[option]
            lp.add_argument(*flags, **kw)
        lp.set_defaults(func=cmd_login, no_browser=False, callback_port=None, timeout=None, device=False,
                        project=None, alias=None, cookie=None)
    p = sub.add_parser("import", parents=[common],
                       help="import credentials: 'cli' (what official CLIs stored), 'vertex <key.json>', or "
                       "'auth-dir [DIR]' (into the shared store)")
    p.add_argument("source", nargs="?", default="cli", choices=["cli", "vertex", "auth-dir"],
                   help="what to import (default cli)")
    p.add_argument("file", nargs="?", help="vertex: a service-account JSON key; auth-dir: the directory "
                   "(default: the configured auth-dir)")
    p.add_argument("--location", default="us-central1", help="Vertex region (default us-central1; 'global' allowed)")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("update", parents=[common], help="install the newest signed release over this file")
    p.add_argument("--check", action="store_true", help="only say whether a newer release exists")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask before installing")
    p.add_argument("--rollback", action="store_true", help="go back to the version the last update replaced")
    p.add_argument("--allow-downgrade", action="store_true", help="install an older release the channel offers")
    p.add_argument("--url", help="the release manifest URL (default: update-url, LLM_MUX_UPDATE_URL or the "
                   "project's releases)")
    p.add_argument("--target", help=argparse.SUPPRESS)  # the file to replace (default: the one running)
    p.set_defaults(func=cmd_update)
    p = sub.add_parser("service", parents=[common], help="run llm-mux as a background service (systemd or launchd)")
    p.add_argument("action", choices=["install", "uninstall", "start", "stop", "restart", "status", "logs"])
    p.add_argument("--dry-run", action="store_true", help="print what would be written and run")
    p.add_argument("--user", action="store_true", help="a systemd user unit (the default unless root)")
    p.add_argument("--system", action="store_true", help="a system unit (the default as root)")
    p.set_defaults(func=cmd_service)
    parser.set_defaults(func=cmd_serve)
    return parser


# === 18. main ===
# Owns: the entry point shared by `python llm_mux.py`, the zipapp and `python -m llm_mux`.

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, CliError, LoginError, UpstreamError, RefreshError) as e:
        print("llm-mux: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug or an unforeseen failure: still one line, unless asked for the details
        if getattr(args, "debug", False):
            raise
        print("llm-mux: unexpected %s: %s (run with --debug for the details)" % (type(e).__name__, e),
              file=sys.stderr)
        return 1


def main_as_script():
    """`python llm_mux.py ...`: CPython keeps a script's whole parse tree alive while the script runs (about 15 MB
    for this file), so re-exec the same interpreter importing llm_mux as a module instead. Same PID, same
    arguments; LLM_MUX_NO_REEXEC=1 (or a platform without exec) runs in place."""
    if sys.executable and hasattr(os, "execv") and not os.environ.get("LLM_MUX_NO_REEXEC"):
        here = os.path.dirname(os.path.abspath(__file__))
        boot = "import sys; sys.path.insert(0, %r); import llm_mux; sys.exit(llm_mux.main())" % here
        os.environ.setdefault("LLM_MUX_PROG", sys.argv[0])
        try:
            os.execv(sys.executable, [sys.executable, "-c", boot] + sys.argv[1:])
        except OSError:
            pass
    return main()


if __name__ == "__main__":
    sys.exit(main_as_script())
