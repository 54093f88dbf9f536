#!/usr/bin/python3
"""Regenerates the fuzz seeds that come from the repository's own bytes.

Two sources, nothing typed in by hand:

- the captured Asterisk transcripts in fixtures/asterisk/*.jsonl (AMI streams, FastAGI
  sessions, res_config_curl requests), cut the way each fuzz target reads its input;
- the string literals of the Rust tests that hold whole SIP messages (balancer) and
  XML-RPC bodies (control plane).

Run from anywhere:  /usr/bin/python3 fuzz/seeds/extract.py
It rewrites the files it owns (names starting with "fixture." or "test.") in
fuzz/seeds/<target>/ and leaves every other file there alone (regression seeds taken
from crashes are named "regression.*").
"""

import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "fuzz" / "seeds"
FIXTURES = ROOT / "fixtures" / "asterisk"
GENERATED = ("fixture.", "test.")

# An AMI seed holds the greeting and then messages up to about this many bytes: small
# inputs run fast, and a cut-down stream still starts the way the client reads it.
AMI_PART = 4096


def jsonl(name):
    with open(FIXTURES / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- Rust string literals -------------------------------------------------------------

ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", "0": "\0", "'": "'", '"': '"'}


def unescape(body):
    """The value of a (byte) string literal's body: Rust's escapes, and a backslash at
    the end of a line skipping the newline and the next line's leading whitespace."""
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        if e == "\n":
            i += 2
            while i < len(body) and body[i] in " \t\n\r":
                i += 1
        elif e == "x":
            out.append(chr(int(body[i + 2 : i + 4], 16)))
            i += 4
        elif e == "u":
            end = body.index("}", i)
            out.append(chr(int(body[i + 3 : end], 16)))
            i = end + 1
        else:
            out.append(ESCAPES[e])
            i += 2
    return "".join(out)


LITERAL = re.compile(
    r'//[^\n]*'  # a line comment (skipped)
    r"|'(?:\\(?:x..|u\{[^}]*\}|.)|[^\\'\n])'"  # a char literal (skipped)
    r'|b?r(?P<hashes>#*)"(?P<raw>.*?)"(?P=hashes)'  # a raw string
    r'|b?"(?P<cooked>(?:\\.|[^"\\])*)"',  # a string with escapes
    re.S,
)
NAMED = re.compile(r"(?:const|static|let(?: mut)?)\s+(\w+)\b[^;=]*=\s*$")


def rust_literals(path):
    """(name, text, is_bytes) of every string literal in a Rust file; the name is the
    constant or variable it is bound to when it is bound directly, else its line number.
    A byte string's text holds one character per byte."""
    text = path.read_text(encoding="utf-8")
    for m in LITERAL.finditer(text):
        if m.group("raw") is not None:
            value = m.group("raw")
        elif m.group("cooked") is not None:
            value = unescape(m.group("cooked"))
        else:
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[text.rfind("\n", 0, text.rfind("\n", 0, m.start())) + 1 : m.start()]
        bound = NAMED.search(before)
        yield (bound.group(1) if bound else f"L{line}"), value, m.group(0).startswith("b")


def as_bytes(text, is_bytes):
    return text.encode("latin-1" if is_bytes else "utf-8")


def seed_name(path, name):
    """`balancer/src/sip/tests.rs`, `SIPP_INVITE` -> `sip-tests.SIPP_INVITE`."""
    parts = path.relative_to(ROOT).with_suffix("").parts[1:]
    return "-".join(p for p in parts if p != "src") + "." + name


# format!() templates in the tests: the placeholders they use, filled with plain values.
PLACEHOLDERS = {
    "method": "INVITE", "branch": "a1", "call": "1", "id": "1", "n": "1",
    "port": "5060", "PBX": "127.0.0.1:5080", "local": "127.0.0.1:5099",
    "sender": "127.0.0.1:5080", "ours": "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKcf1",
    "name": "x", "extra": "", "route": "", "via": "Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKp1",
}


def fill(template):
    """A format string with its `{name}` placeholders filled, or None when one is unknown."""
    if "{" not in template:
        return template
    def one(m):
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        if m.group(1) not in PLACEHOLDERS:
            raise KeyError(m.group(1))
        return PLACEHOLDERS[m.group(1)]
    try:
        return re.sub(r"\{\{|\}\}|\{(\w*)(?::[^}]*)?\}", one, template)
    except KeyError:
        return None


SIP_START = re.compile(r"^(?:[A-Z]+ (?:sips?|tel):\S* SIP/2\.0|SIP/2\.0 \d{3} )")


def sip_messages():
    files = sorted(ROOT.glob("balancer/src/**/*.rs")) + sorted(ROOT.glob("balancer/benches/*.rs"))
    for path in files:
        for name, value, is_bytes in rust_literals(path):
            value = fill(value)
            if value and SIP_START.match(value) and "\r\n" in value:
                yield seed_name(path, name), as_bytes(value, is_bytes)


def xmlrpc_bodies():
    files = sorted(ROOT.glob("control-plane/src/*.rs")) + sorted(ROOT.glob("control-plane/tests/*.rs"))
    for path in files:
        for name, value, is_bytes in rust_literals(path):
            if value.lstrip().startswith("<") and "<methodCall" in value and fill(value) == value:
                yield seed_name(path, name), as_bytes(value, is_bytes)


# ---- the seeds of each target ----------------------------------------------------------


def ami_seeds():
    for fixture in sorted(FIXTURES.glob("ami-*.jsonl")):
        streams = {}
        for ex in jsonl(fixture.name):
            if ex["dir"] == "<<<":
                streams.setdefault(ex["conn"], []).append(ex["data"])
        for conn, chunks in streams.items():
            greeting, messages = chunks[0], chunks[1:]
            base = f"{fixture.stem}.{conn}"
            yield f"{base}.whole", (greeting + "".join(messages)).encode()
            part, parts = "", 0
            for message in messages:
                if part and len(part) + len(message) > AMI_PART:
                    parts += 1
                    yield f"{base}.part{parts:02}", (greeting + part).encode()
                    part = ""
                part += message
            if part and parts:
                yield f"{base}.part{parts + 1:02}", (greeting + part).encode()


def agi_seeds():
    """Each FastAGI session as Asterisk sent it (environment, replies, HANGUP), and the
    words of each command the server sent, cut at 0xFF the way the target prints them."""
    sessions = []
    for ex in jsonl("fastagi-session.jsonl"):
        if ex["dir"] == "#####":
            sessions.append({"script": None, "read": "", "commands": []})
        elif ex["dir"] == "---" and ex["data"].startswith("script="):
            sessions[-1]["script"] = ex["data"][len("script='") : -1]
        elif ex["dir"] == "<<<":
            sessions[-1]["read"] += ex["data"]
        elif ex["dir"] == ">>>":
            sessions[-1]["commands"].append(ex["data"].rstrip("\n"))
    seen = set()
    for n, s in enumerate(sessions, 1):
        script = re.sub(r"[^\w-]+", "-", s["script"] or "unknown").strip("-")
        yield f"session{n:02}-{script}", s["read"].encode()
        for command in s["commands"]:
            words = command.split(" ")
            args = words[2:] if command.startswith(("SET ", "GET ")) else words[1:]
            if command not in seen and args:
                seen.add(command)
                verb = "-".join(words[:2] if command.startswith(("SET ", "GET ")) else words[:1])
                yield f"command{len(seen):02}-{verb}", b"\xff".join(a.encode() for a in args)


def realtime_seeds():
    """Each request res_config_curl sent: the request target, a newline, the body."""
    for ex in jsonl("http-exchanges-all.jsonl"):
        if "request" not in ex:
            continue
        head, _, body = ex["request"].partition("\r\n\r\n")
        target = head.split(" ")[1]
        operation = re.sub(r"\W+", "-", target.split("?")[0].strip("/"))
        yield f"{ex['n']:02}-{operation}", (target + "\n" + body).encode()


def sip_framer_seeds(messages):
    """The framer's input is two bytes choosing the limit, one the cut, then the stream:
    each message twice with a keep-alive between, under the largest limit (2063 bytes)
    and under a small one (200 bytes) that makes most of them too large."""
    for i, (name, message) in enumerate(messages):
        stream = message + b"\r\n\r\n" + message
        cut = bytes([1 + i % 64])
        yield f"{name}.limit2063", b"\xff\x07" + cut + stream
        yield f"{name}.limit200", b"\xb8\x00" + cut + stream


def write(target, prefix, seeds):
    """Writes each seed once (the same bytes under two names are kept under the first);
    a name used twice gets -2, -3, ... after it."""
    folder = SEEDS / target
    seen, names = set(), set()
    for name, data in seeds:
        digest = hashlib.sha1(data).digest()
        if digest in seen:
            continue
        seen.add(digest)
        unique, n = name, 1
        while unique in names:
            n += 1
            unique = f"{name}-{n}"
        names.add(unique)
        (folder / f"{prefix}.{unique}").write_bytes(data)
    return len(seen)


def main():
    for target in ["sip_message", "sip_framer", "ami_message", "agi_session",
                   "realtime_request", "xmlrpc_call"]:
        folder = SEEDS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if old.name.startswith(GENERATED):
                old.unlink()
    sip = list(sip_messages())
    counts = {
        "sip_message": write("sip_message", "test", sip),
        "sip_framer": write("sip_framer", "test", sip_framer_seeds(sip)),
        "ami_message": write("ami_message", "fixture", ami_seeds()),
        "agi_session": write("agi_session", "fixture.fastagi", agi_seeds()),
        "realtime_request": write("realtime_request", "fixture.res-config-curl", realtime_seeds()),
        "xmlrpc_call": write("xmlrpc_call", "test", xmlrpc_bodies()),
    }
    for target, n in counts.items():
        print(f"{target}: {n} seeds")


if __name__ == "__main__":
    main()
