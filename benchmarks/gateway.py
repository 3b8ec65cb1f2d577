"""The front door, measured: what oculo adds in front of an upstream, beside LiteLLM's proxy.

One run starts a fast stub upstream (`oculo.testing.stub_upstream`, its own process), oculo
(`oculo serve` with one remote model on the stub) and LiteLLM's proxy (`litellm`, from its own
virtualenv, one model on the stub), and sends each the same chat request: two JPEGs as base64
data URIs (about 700 KB of base64), a whole answer of 8 pieces. For 1, 8 and 32 concurrent
clients (keep-alive connections of a small asyncio HTTP/1.1 client in this process) it measures
  - latency p50 / p99 and throughput of (a) the stub alone, (b) oculo -> stub, with the usage
    ledger's default `ledger_sync = "full"` (each answer waits for its row's disk flush) and with
    "deferred" (rows committed before the answer, flushed within a second), (c) LiteLLM -> stub;
    the gateways' added latency is theirs minus the stub's;
  - each gateway's CPU per request (user + system time of its processes, from /proc);
  - the floor: the least any gateway must do with such a body, in-process: parse the JSON
    (orjson), decode the base64 (pybase64) and probe the image headers.

    make install-bench
    .venv/bin/python -m benchmarks.gateway --requests 300 --plot benchmarks/gateway.svg

Speed is never asserted: the numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import orjson
import pybase64

from benchmarks import request_path
from oculo.media import probe, sniff_format

KEY = "sk-bench"
MODEL = "bench"
ROOT = Path(__file__).resolve().parents[1]
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
CONCURRENCY = (1, 8, 32)


def make_body() -> bytes:
    return request_path.make_body(MODEL)


# --------------------------------------------------------------------------- the processes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@contextmanager
def process(cmd: list[str], ready: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """Run `cmd` until the block ends; yields its pid once `ready` answers 200."""
    log = tempfile.NamedTemporaryFile(prefix="bench-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        try:
            wait_for(ready, proc)
        except RuntimeError:
            print(Path(log.name).read_text()[-3000:], file=sys.stderr)
            raise
        yield proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_stub(stack: ExitStack, port: int) -> int:
    cmd = [sys.executable, "-m", "oculo.testing.stub_upstream", "--port", str(port)]
    return stack.enter_context(process(cmd, f"http://127.0.0.1:{port}/health"))


def start_oculo(stack: ExitStack, port: int, upstream: str, work: Path, sync: str = "full") -> int:
    config = work / "oculo.toml"
    config.write_text(
        "[[models]]\n"
        f'id = "{MODEL}"\nengine = "remote"\nupstreams = ["{upstream}"]\n'
        'upstream_model = "stub-model"\nupstream_key = "sk-stub"\ncontext_length = 32768\n'
    )
    cmd = [sys.executable, "-m", "oculo.cli", "serve", "--config", str(config),
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    env = {"OCULO_API_KEYS": KEY, "OCULO_DATA_DIR": str(work / f"data-{sync}"),
           "OCULO_LEDGER_SYNC": sync}  # fmt: skip
    return stack.enter_context(process(cmd, f"http://127.0.0.1:{port}/ready", env))


def start_bare(stack: ExitStack, port: int) -> int:
    cmd = [sys.executable, "-m", "uvicorn", "benchmarks.bare_server:app", "--port", str(port),
           "--log-level", "warning", "--no-access-log"]  # fmt: skip
    return stack.enter_context(process(cmd, f"http://127.0.0.1:{port}/", {"PYTHONPATH": str(ROOT)}))


def start_litellm(stack: ExitStack, port: int, upstream: str, work: Path) -> int:
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        "      model: openai/stub-model\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: sk-stub\n"
        "general_settings:\n"
        f"  master_key: {KEY}\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
    )
    cmd = [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
           "--num_workers", "1"]  # fmt: skip
    env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"}
    return stack.enter_context(process(cmd, f"http://127.0.0.1:{port}/health/liveliness", env))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and every process below it."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        pids.extend(int(c) for c in children)
    return total


# --------------------------------------------------------------------------- the client


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            name, value = line.split(b":", 1)
            headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"]))
    body = b""
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body
        body += chunk[:-2]


async def _client(port: int, request: bytes, remaining: list[int], out: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        while remaining[0] > 0:
            remaining[0] -= 1
            started = time.perf_counter()
            writer.write(request)
            status, body = await _response(reader)
            out.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
    finally:
        writer.close()


async def _load(port: int, body: bytes, clients: int, requests: int) -> tuple[list[float], float]:
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    remaining = [requests]
    started = time.perf_counter()
    await asyncio.gather(*(_client(port, request, remaining, latencies) for _ in range(clients)))
    return latencies, time.perf_counter() - started


@dataclass
class Result:
    target: str
    clients: int
    requests: int
    p50_ms: float
    p99_ms: float
    throughput: float  # requests per second
    cpu_ms: float | None  # the gateway's CPU per request (None for the stub)


def measure(
    target: str, port: int, pid: int | None, body: bytes, clients: int, requests: int
) -> Result:
    asyncio.run(_load(port, body, clients, max(clients * 2, 20)))  # warm-up
    before = cpu_seconds(pid) if pid else 0.0
    latencies, wall = asyncio.run(_load(port, body, clients, requests))
    cpu = (cpu_seconds(pid) - before) / requests * 1000 if pid else None
    latencies.sort()
    return Result(
        target=target,
        clients=clients,
        requests=requests,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        throughput=requests / wall,
        cpu_ms=cpu,
    )


# --------------------------------------------------------------------------- the floor


def floor_ms(body: bytes, rounds: int = 300) -> float:
    def once() -> None:
        payload = orjson.loads(body)
        for part in payload["messages"][1]["content"]:
            if part["type"] == "image_url":
                data = pybase64.b64decode(part["image_url"]["url"].split(",", 1)[1], validate=True)
                fmt = sniff_format(data)
                assert fmt is not None
                probe(data, fmt, param=None)

    return _median_ms(once, rounds)


def commit_ms(rounds: int = 60, sync: str = "full") -> float:
    """The median wall time of one usage-ledger row committed alone (SQLite in WAL mode; "full":
    flushed to disk, oculo's default; "deferred": written, flushed later): what the ledger adds
    to a lone request's latency."""
    from datetime import UTC, datetime

    from oculo.accounts.ledger import Ledger, UsageRecord
    from oculo.accounts.store import open_store

    async def run(folder: str) -> list[float]:
        engine = await open_store(None, folder)
        ledger = Ledger(engine, sync="full" if sync == "full" else "deferred")
        times = []
        for i in range(rounds):
            row = UsageRecord(
                request_id=f"bench-{i}", key_id="k", model=MODEL, text_tokens=20,
                image_tokens=3202, image_positions=None, completion_tokens=8, status=200,
                error_code=None, latency_ms=1.0, stream=False, created_at=datetime.now(UTC),
            )  # fmt: skip
            started = time.perf_counter()
            await ledger.record(row)
            times.append(time.perf_counter() - started)
        ledger.close()
        await engine.dispose()
        return times

    with tempfile.TemporaryDirectory(prefix="oculo-commit-") as folder:
        return statistics.median(asyncio.run(run(folder))[5:]) * 1000


def _median_ms(fn: Callable[[], None], rounds: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(rounds):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return statistics.median(times) * 1000


# --------------------------------------------------------------------------- the report


GATEWAYS = ("oculo", "oculo-deferred")


def report(results: list[Result], floor: float, commit: dict[str, float] | None = None) -> str:
    by = {(r.target, r.clients): r for r in results}
    lines = [
        "| clients | target | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s | CPU ms/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clients in CONCURRENCY:
        stub = by.get(("stub", clients))
        for target in ("stub", "bare", *GATEWAYS, "litellm"):
            r = by.get((target, clients))
            if r is None or stub is None:
                continue
            added = (
                ("-", "-")
                if target in ("stub", "bare")
                else (f"{r.p50_ms - stub.p50_ms:.2f}", f"{r.p99_ms - stub.p99_ms:.2f}")
            )
            cpu = f"{r.cpu_ms:.2f}" if r.cpu_ms is not None else "-"
            lines.append(
                f"| {clients} | {target} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {added[0]} | "
                f"{added[1]} | {r.throughput:.0f} | {cpu} |"
            )
    lines.append("")
    lines.append(f"Floor (orjson + pybase64 + header probes, in-process): {floor:.3f} ms CPU/req.")
    bare = [r for r in results if r.target == "bare" and r.cpu_ms is not None]
    if bare:
        cpu = ", ".join(f"{r.cpu_ms:.2f} ({r.clients})" for r in bare)
        lines.append(
            "A bare ASGI app under uvicorn that only reads the body (`benchmarks/bare_server.py`): "
            f"{cpu} ms CPU/req (clients): receiving the body over HTTP, before any work."
        )
    if commit is not None:
        lines.append(
            "One usage-ledger row committed alone on this disk (SQLite, WAL), median wall: "
            f"{commit['full']:.2f} ms flushed to disk (`full`), {commit['deferred']:.2f} ms "
            "written only (`deferred`): the ledger's part of oculo's latency at 1 client."
        )
    lines.append("")
    lines.append("| clients | oculo | added p50 / LiteLLM's | req/s / LiteLLM's | "
                 "CPU / floor | LiteLLM CPU / floor | CPU / bare server |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|")
    for clients in CONCURRENCY:
        stub, ll = by.get(("stub", clients)), by.get(("litellm", clients))
        for gateway in GATEWAYS:
            oc = by.get((gateway, clients))
            if not (stub and oc and ll and oc.cpu_ms and ll.cpu_ms):
                continue
            ratio = (oc.p50_ms - stub.p50_ms) / max(ll.p50_ms - stub.p50_ms, 1e-9)
            bare_run = by.get(("bare", clients))
            over_bare = (
                f"x{oc.cpu_ms / bare_run.cpu_ms:.1f}" if bare_run and bare_run.cpu_ms else "-"
            )
            sync = "deferred" if gateway.endswith("deferred") else "full"
            lines.append(
                f"| {clients} | {sync} | {ratio:.2f} | x{oc.throughput / ll.throughput:.2f} | "
                f"x{oc.cpu_ms / floor:.1f} | x{ll.cpu_ms / floor:.1f} | {over_bare} |"
            )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.target, r.clients): r for r in results}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colours = (("stub", "grey"), ("oculo", "tab:blue"), ("oculo-deferred", "tab:green"),
               ("litellm", "tab:orange"))  # fmt: skip
    for target, colour in colours:
        xs = [c for c in CONCURRENCY if (target, c) in by]
        left.plot(
            xs, [by[(target, c)].p50_ms for c in xs], "o-", color=colour, label=f"{target} p50"
        )
        left.plot(xs, [by[(target, c)].p99_ms for c in xs], "x--", color=colour,
                  label=f"{target} p99")  # fmt: skip
        right.plot(xs, [by[(target, c)].throughput for c in xs], "o-", color=colour, label=target)
    for ax, title, unit in ((left, "latency", "ms"), (right, "throughput", "requests / s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_yscale("log")
    fig.suptitle("Two-image (700 KB) chat requests: stub upstream alone, via oculo, via LiteLLM")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="measured per target and level")
    parser.add_argument("--plot", type=Path, help="write an SVG plot here")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--skip-litellm", action="store_true")
    args = parser.parse_args()
    body = make_body()
    print(f"body: {len(body):,} bytes; {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")  # fmt: skip
    floor = floor_ms(body)
    commit = {sync: commit_ms(sync=sync) for sync in ("full", "deferred")}
    results: list[Result] = []
    work = Path(tempfile.mkdtemp(prefix="oculo-gateway-"))
    with ExitStack() as stack:
        stub_port, oculo_port, litellm_port = free_port(), free_port(), free_port()
        bare_port = free_port()
        start_stub(stack, stub_port)
        stub_url = f"http://127.0.0.1:{stub_port}"
        targets: list[tuple[str, int, int | None]] = [("stub", stub_port, None)]
        targets.append(("bare", bare_port, start_bare(stack, bare_port)))
        targets.append(("oculo", oculo_port, start_oculo(stack, oculo_port, stub_url, work)))
        deferred_port = free_port()
        pid = start_oculo(stack, deferred_port, stub_url, work, "deferred")
        targets.append(("oculo-deferred", deferred_port, pid))
        if not args.skip_litellm:
            if not LITELLM.exists():
                raise SystemExit(f"{LITELLM} is missing: run `make install-bench` first")
            pid = start_litellm(stack, litellm_port, stub_url, work)
            targets.append(("litellm", litellm_port, pid))
        for clients in CONCURRENCY:
            for target, port, pid in targets:
                result = measure(target, port, pid, body, clients, args.requests)
                print(f"{target:8} {clients:3} clients: p50 {result.p50_ms:7.2f} ms  "
                      f"p99 {result.p99_ms:7.2f} ms  {result.throughput:6.0f} req/s  "
                      f"CPU {result.cpu_ms or 0:.2f} ms/req", flush=True)  # fmt: skip
                results.append(result)
    shutil.rmtree(work, ignore_errors=True)
    print()
    print(report(results, floor, commit))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
