"""Benchmark harness: subprocesses, free ports, readiness, CPU accounting, Redis, /metrics, wrk, percentiles.

What any script in bench/ needs and no single benchmark owns: nothing here knows a case, a rule file or a
table (the results file is runinfo.py). Imported by overhead.py and its case modules (and meant for
routing.py and ui.py); importing it has no side effects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The harness cannot produce valid numbers (a process died, a sanity request failed, ...)."""


# ---------------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 15, scan_bytes: int = 512 * 1024) -> str:
    """The last lines of a process log that are not access-log lines (errors, tracebacks), then its last line.

    The proxy writes one JSON access-log line per request, so a plain tail would show only those.
    """
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - scan_bytes))
            data = f.read()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    all_lines = data.decode("utf-8", "replace").splitlines()
    if size > scan_bytes:
        all_lines = all_lines[1:]  # probably cut in the middle
    other = [ln for ln in all_lines if not ln.startswith('{"request_id"')][-lines:]
    if all_lines and (not other or other[-1] != all_lines[-1]):
        other.append(all_lines[-1])
    return "\n".join(ln if len(ln) <= 2000 else ln[:2000] + " ..." for ln in other) or "<empty>"


class Proc:
    """One subprocess with stdout+stderr redirected to a file (never a pipe nobody reads)."""

    def __init__(self, name: str, args: list[str], tmp: Path, env: Mapping[str, str] | None = None) -> None:
        """`env`: variables added to this process's environment for the child (None: inherit it as is)."""
        self.name = name
        self.log = tmp / f"{name}.log"
        self._file = self.log.open("wb")
        self.popen = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._file,
                                      stderr=subprocess.STDOUT, env=None if env is None else {**os.environ, **env})
        self.pid = self.popen.pid

    def check(self) -> None:
        rc = self.popen.poll()
        if rc is not None:
            raise BenchError(f"{self.name} (pid {self.pid}) exited with status {rc}; last output:\n"
                             f"{tail(self.log)}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} (pid {self.pid}) ignored SIGTERM for 10 s: killing it", file=sys.stderr)
                self.popen.kill()
                self.popen.wait()
        self._file.close()

    def cpu_ticks(self) -> int:
        """utime + stime (fields 14 and 15 of /proc/<pid>/stat), in clock ticks."""
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()  # fields[0] is field 3 (state)
        return int(fields[11]) + int(fields[12])

    def status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
        return 0


def wait_ready(proc: Proc, url: str, timeout: float = 20.0, context: ssl.SSLContext | None = None) -> None:
    """Poll `url` until it answers 200 (`context`: how an https URL is verified)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        proc.check()
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(f"{proc.name} not ready at {url} after {timeout:.0f} s ({last}); last output:\n"
                     f"{tail(proc.log)}")


def raise_nofile(need: int) -> None:
    """2,000 streams need ~4,000 descriptors in the proxy and 2,000 in the client; children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def self_cpu_ticks() -> int:
    """This process's own utime + stime (the load client's CPU), in clock ticks."""
    t = os.times()
    return round((t.user + t.system) * CLK_TCK)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot (/proc/stat): a span's busy share is Δbusy / Δtotal."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(fields) - fields[3] - fields[4], sum(fields)


def client_cpu_ticks() -> int:
    """This process's CPU and that of its finished, waited-for children (wrk runs), in clock ticks."""
    t = os.times()
    return round((t.user + t.system + t.children_user + t.children_system) * CLK_TCK)


def with_cpu(run: Callable[[], dict[str, Any]], watched: Mapping[str, Proc], count_key: str = "requests",
             suffix: str = "cpu_ms_per_req", ours: Iterable[Proc] = ()) -> dict[str, Any]:
    """run() with each watched process's CPU time per counted item added as `<prefix><suffix>`.

    `watched` maps a key prefix to a process: {"": proxy, "redis_": redis} gives cpu_ms_per_req and
    redis_cpu_ms_per_req. With `ours` (every process the benchmark started), also `other_cores`: the CPU the
    rest of the machine used meanwhile, in cores (machine busy time minus ours, this process and wrk); on a
    shared 2-core machine a round where it is high measured the neighbours too.
    """
    ours = list(ours)
    before = {prefix: proc.cpu_ticks() for prefix, proc in watched.items()}
    mine0 = sum(p.cpu_ticks() for p in ours) + client_cpu_ticks()
    busy0, t0 = machine_ticks()[0], time.monotonic()
    res = run()
    busy1, t1 = machine_ticks()[0], time.monotonic()
    mine1 = sum(p.cpu_ticks() for p in ours) + client_cpu_ticks()
    n = max(res[count_key], 1)
    for prefix, proc in watched.items():
        res[prefix + suffix] = (proc.cpu_ticks() - before[prefix]) * 1e3 / CLK_TCK / n
    if ours:
        res["other_cores"] = max(0.0, ((busy1 - busy0) - (mine1 - mine0)) / CLK_TCK / (t1 - t0))
    return res


# ---------------------------------------------------------------------------------------------------
# Redis and Prometheus text


def start_redis(tmp: Path, needed_by: str) -> tuple[Proc, int]:
    """A throwaway redis-server (no persistence) on a free port, answering PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError(f"{needed_by} needs redis-server (apt-get install redis-server)")
    port = free_port()
    proc = Proc("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(tmp)], tmp)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        proc.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            pass
        time.sleep(0.02)
    raise BenchError(f"redis-server not answering on {port}; last output:\n{tail(proc.log)}")


def redis_dbsize(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"DBSIZE\r\n")
        return int(sock.recv(64)[1:].strip())


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_samples(port: int, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `name` in the Prometheus text at http://127.0.0.1:<port>/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            out.append((dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def metric_by(port: int, name: str, label: str) -> dict[str, float]:
    """The samples of `name` summed by the value of one label ({} when the metric has no samples yet)."""
    sums: dict[str, float] = {}
    for labels, value in metric_samples(port, name):
        key = labels.get(label, "")
        sums[key] = sums.get(key, 0.0) + value
    return sums


def metric_total(port: int, name: str) -> float:
    return sum(value for _, value in metric_samples(port, name))


# ---------------------------------------------------------------------------------------------------
# statistics


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of unsorted values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def med(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def rotated(targets: tuple[str, ...], r: int) -> tuple[str, ...]:
    """The order of round r: who goes first rotates (for two targets: A,B then B,A, ...)."""
    k = r % len(targets)
    return targets[k:] + targets[:k]


# ---------------------------------------------------------------------------------------------------
# wrk and asyncio

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else float("nan")
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out)
    res["requests"] = int(m.group(1)) if m else 0
    res["elapsed_s"] = float(m.group(2)) * _UNITS[m.group(3)] / 1e3 if m else float("nan")
    for p, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M):
        res[f"p{p}_ms"] = float(value) * _UNITS[unit]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    if "p50_ms" not in res or res["requests"] == 0:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    return res


def run_wrk(url: str, conns: int, duration: float, script: Path) -> dict[str, Any]:
    """One `wrk -t1` run with a Lua script (method, body, headers), parsed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk not found")
    args = [wrk, "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "5s",
            "-s", str(script), url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode}: {proc.stderr or proc.stdout}")
    return parse_wrk(proc.stdout)


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


OTHER_CORES_LIMIT = 0.3  # CPU of processes not ours, in cores, above which a round is suspect


def note_neighbours(case: str, rounds: list[dict[str, Any]], problems: list[str]) -> None:
    """A problem naming the rounds during which other processes used more than OTHER_CORES_LIMIT cores."""
    busy = [x for x in rounds if x.get("other_cores", 0.0) > OTHER_CORES_LIMIT]
    if busy:
        problems.append(f"{case}: other processes used more than {OTHER_CORES_LIMIT:g} cores in {len(busy)} of "
                        f"{len(rounds)} rounds (up to {max(x['other_cores'] for x in busy):.2f}): those rounds "
                        "measured the neighbours too")


def check_errors(label: str, res: dict[str, Any], problems: list[str]) -> None:
    """Note a round's failed requests; more than 1% makes its numbers meaningless (BenchError)."""
    bad = res.get("non_2xx", 0) + res.get("socket_errors", 0) + res.get("errors", 0)
    total = res.get("requests", res.get("streams", 0)) + res.get("errors", 0)
    if bad:
        problems.append(f"{label}: {bad} failed of {total} ({res.get('error_kinds') or res})")
        if bad > 0.01 * max(total, 1):
            raise BenchError(f"{label}: {bad} of {total} requests failed, the numbers are meaningless: {res}")


class Session:
    """Outcome of one benchmark run: 0 ok, 1 a measurement failed, 130 interrupted."""

    def __init__(self) -> None:
        self.status = 0


@contextlib.contextmanager
def reported_session(tmp: Path, keep_logs: bool, problems: list[str]) -> Iterator[Session]:
    """Run a benchmark body: a BenchError or Ctrl-C ends it with a status instead of a traceback, and the
    temp dir (process logs) is kept when asked or when something failed, removed otherwise."""
    session = Session()
    try:
        yield session
    except BenchError as exc:
        sys.stdout.flush()
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        problems.append(f"aborted: {str(exc).splitlines()[0]}")
        session.status = 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        session.status = 130
    finally:
        if keep_logs or session.status:
            print(f"process logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def print_aligned(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A titled text table: the first two columns left-aligned (load, policy), the numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


class ProcGroup:
    """Named processes listening on 127.0.0.1 ports (simulated runtimes, llama-servers): one health check,
    one CPU count and one stop for all of them."""

    def __init__(self) -> None:
        self.procs: dict[str, Proc] = {}
        self.ports: dict[str, int] = {}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def check(self) -> None:
        for p in self.procs.values():
            p.check()

    def cpu_ticks(self) -> int:
        return sum(p.cpu_ticks() for p in self.procs.values())

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()
