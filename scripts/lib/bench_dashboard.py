"""The body of scripts/bench-dashboard (read its header); Python's standard library only."""

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIN = os.environ["CALLFLEET_BIN"]
PAGES = int(os.environ["PAGES"])
AGENTS = int(os.environ["AGENTS"])
SECONDS = int(os.environ["SECONDS_PER_RUN"])
REPEAT = int(os.environ["REPEAT"])
SCRAPES = int(os.environ["SCRAPES"])
# Pages whose events are parsed for the change-to-event delay; every page gets the same
# events at the same time from the server's one feed.
OBSERVERS = 10
TOKEN = "bench-dashboard-admin-token-0123456789"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def api(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    all_headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    all_headers.update(headers or {})
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=all_headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data, response


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Page(threading.Thread):
    """One open page: a session and its event stream. An observer also notes when each
    pause shows; the others only read (parsing every snapshot on 200 threads would make
    this client, not the server, what is measured)."""

    def __init__(self, port, changes, observer):
        super().__init__(daemon=True)
        status, data, response = api(port, "POST", "/ui/login", {"token": TOKEN})
        assert status == 200, data
        self.cookie = response.getheader("Set-Cookie").split(";")[0]
        self.port = port
        self.changes = changes
        self.seen = {}
        self.bytes = 0
        self.events = 0
        self.stop = False
        self.observer = observer

    def run(self):
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(f"GET /ui/events HTTP/1.1\r\nHost: cp\r\nCookie: {self.cookie}\r\n\r\n".encode())
        buffer = b""
        while not self.stop:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            now = time.monotonic()
            self.bytes += len(chunk)
            if not self.observer:
                continue
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                data = [line[6:] for line in event.split(b"\n") if line.startswith(b"data: ")]
                if not data:
                    continue
                self.events += 1
                snapshot = json.loads(b"".join(data))
                paused = {a["id"] for a in snapshot["agents"] if a["state"] == "paused"}
                for number, (agent, pause) in list(self.changes.items()):
                    if number not in self.seen and (agent in paused) == pause:
                        self.seen[number] = now


def one_run(run):
    folder = tempfile.mkdtemp(prefix="bench-dashboard.")
    port = free_port()
    env = dict(os.environ)
    env.update({
        "CALLFLEET_STORE__URL": f"sqlite://{folder}/fleet.db",
        "CALLFLEET_CONTROL_PLANE__LISTEN": f"127.0.0.1:{port}",
        "CALLFLEET_CONTROL_PLANE__LOCK_SERVICE": "",
        "CALLFLEET_CONTROL_PLANE__TOKENS": f'[{{name="ops",token="{TOKEN}",role="admin"}}]',
    })
    with open(os.path.join(folder, "control.log"), "w") as log:
        server = subprocess.Popen([BIN, "control-plane"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        for _ in range(200):
            try:
                if api(port, "GET", "/api/v1/queues")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        api(port, "PUT", "/api/v1/queues/sales", {"name": "Sales"})
        for n in range(AGENTS):
            agent = str(1000 + n)
            api(port, "PUT", f"/api/v1/agents/{agent}", {"name": f"Agent {agent}", "tags": ["vip"] if n % 10 == 0 else []})
            api(port, "PUT", f"/api/v1/queues/sales/members/{agent}", {"priority": n % 5})
        changes = {}
        pages = [Page(port, changes, observer=n < OBSERVERS) for n in range(PAGES)]
        for page in pages:
            page.start()
        time.sleep(3)
        cpu_before, started = cpu_seconds(server.pid), time.monotonic()
        bytes_before = sum(p.bytes for p in pages)
        answered = {}
        for number in range(SECONDS):
            tick = started + number + 1
            time.sleep(max(0.0, tick - time.monotonic()))
            agent = str(1000 + (number * 7) % AGENTS)
            # A different agent each second (7 is prime to AGENTS' usual sizes): each
            # change is a pause the pages have not seen before.
            pause = True
            status = api(port, "POST", f"/api/v1/agents/{agent}/pause", {"reason": "bench"})[0]
            assert status == 204, status
            answered[number] = time.monotonic()
            changes[number] = (agent, pause)
        time.sleep(2)
        elapsed = time.monotonic() - started
        cpu = (cpu_seconds(server.pid) - cpu_before) / elapsed * 100
        sent = (sum(p.bytes for p in pages) - bytes_before) / elapsed / PAGES
        delays, unseen = [], 0
        for page in pages[:OBSERVERS]:
            for number, at in answered.items():
                if number in page.seen:
                    delays.append(max(0.0, page.seen[number] - at) * 1000)
                else:
                    unseen += 1
        scrapes = []
        for _ in range(SCRAPES):
            begin = time.monotonic()
            status = api(port, "GET", "/metrics")[0]
            assert status == 200
            scrapes.append((time.monotonic() - begin) * 1000)
        for page in pages:
            page.stop = True
        figures = {
            "cpu_pct": cpu,
            "p50_ms": percentile(delays, 50) if delays else float("nan"),
            "p99_ms": percentile(delays, 99) if delays else float("nan"),
            "max_ms": max(delays) if delays else float("nan"),
            "unseen": unseen,
            "kb_per_page_s": sent / 1024,
            "scrape_p50_ms": percentile(scrapes, 50),
            "scrape_p99_ms": percentile(scrapes, 99),
        }
        print(f"| {run} | {cpu:.1f} | {figures['p50_ms']:.0f} | {figures['p99_ms']:.0f} | {figures['max_ms']:.0f} | "
              f"{unseen} of {len(answered) * min(OBSERVERS, PAGES)} | {figures['kb_per_page_s']:.1f} | "
              f"{figures['scrape_p50_ms']:.2f} | {figures['scrape_p99_ms']:.2f} |", flush=True)
        return figures
    finally:
        server.terminate()
        server.wait(10)


def main():
    print(f"Supervisors' page: {PAGES} pages open, {AGENTS} agents, one change a second for {SECONDS} s, {REPEAT} runs")
    print("| run | control plane CPU % of a core | change→event p50 ms | p99 ms | max ms | changes not seen | KiB/s per page | /metrics p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [one_run(n + 1) for n in range(REPEAT)]
    def spread(key, digits):
        values = [r[key] for r in runs]
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"
    print()
    print(f"median of {REPEAT} runs (lowest–highest):")
    print("| CPU % of a core | change→event p50 ms | p99 ms | max ms | KiB/s per page | /metrics p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {spread('cpu_pct', 1)} | {spread('p50_ms', 0)} | {spread('p99_ms', 0)} | {spread('max_ms', 0)} | "
          f"{spread('kb_per_page_s', 1)} | {spread('scrape_p50_ms', 2)} | {spread('scrape_p99_ms', 2)} |")
    print("goals: <= 5 % of a core, change-to-screen p99 <= 1 s, /metrics scrape <= 5 ms (issue 11)")


main()
