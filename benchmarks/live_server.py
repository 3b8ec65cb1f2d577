"""`oculo serve` in a subprocess on a loopback port, for benchmarks: a context manager."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

KEY = "sk-bench"


@contextmanager
def live_server(*serve_args: str) -> Iterator[str]:
    """Start `oculo serve SERVE_ARGS` with the key `KEY`; yield its base URL once it is ready.
    Its accounts database (the usage ledger) is a throwaway one, not the user's."""
    port = 18000 + os.getpid() % 1000
    data = tempfile.mkdtemp(prefix="oculo-bench-")
    env = {**os.environ, "OCULO_API_KEYS": KEY, "OCULO_DATA_DIR": data}
    cmd = [sys.executable, "-m", "oculo.cli", "serve", *serve_args, "--port", str(port),
           "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("oculo serve did not become ready")
        yield base
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)
