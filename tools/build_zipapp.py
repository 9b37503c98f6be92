#!/usr/bin/env python3
"""Build dist/llm_mux.pyz: a single-file, byte-for-byte reproducible zipapp of llm_mux.py.

Reproducible: entries are written in a fixed order with a fixed timestamp and permissions, so the same source
always gives the same bytes (and the same SHA-256). Run it as `python3 dist/llm_mux.pyz [command]`.
"""
import argparse
import hashlib
import io
import os
import re
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
MAIN = """# llm-mux zipapp entry point: plain ASCII and old syntax, so any Python can at least say what it needs
import sys
if sys.version_info < (3, 9):
    sys.stderr.write("llm-mux needs Python 3.9 or newer; this is Python %d.%d (%s)\\n"
                     % (sys.version_info[0], sys.version_info[1], sys.executable))
    sys.exit(1)
import llm_mux
sys.exit(llm_mux.main())
"""


def read_version(source):
    m = re.search(r'^__version__ = "([^"]+)"', source, re.M)
    if not m:
        raise SystemExit("build_zipapp: no __version__ in llm_mux.py")
    return m.group(1)


def build(output, interpreter="/usr/bin/env python3", source_path=None):
    with open(source_path or os.path.join(ROOT, "llm_mux.py"), "rb") as f:
        source = f.read()
    version = read_version(source.decode("utf-8"))
    entries = [
        ("__main__.py", MAIN.encode("utf-8")),
        ("llm_mux.py", source),
        ("VERSION", (version + "\n").encode("ascii")),
    ]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, data, compresslevel=9)
        zf.comment = ("llm-mux " + version).encode("ascii")
    payload = ("#!%s\n" % interpreter).encode("utf-8") + buf.getvalue()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.chmod(tmp, 0o755)
    os.replace(tmp, output)
    return version, hashlib.sha256(payload).hexdigest()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default=os.path.join(ROOT, "dist", "llm_mux.pyz"))
    p.add_argument("--python", default="/usr/bin/env python3", help="interpreter for the #! line")
    p.add_argument("--source", help="the llm_mux.py to pack (default: the one in this checkout)")
    args = p.parse_args(argv)
    version, digest = build(args.output, args.python, args.source)
    print("built %s (llm-mux %s, sha256 %s)" % (args.output, version, digest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
