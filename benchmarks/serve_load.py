"""Load on `pneumoscan serve`: a real server on 127.0.0.1, K concurrent clients, real 224 px JPEGs.

    python benchmarks/serve_load.py [--model BUNDLE] [--clients 8] [--requests 2000] [--max-seconds 120]

Bounded in count and time; loopback only. Prints requests/s, latency percentiles, errors and
the server's RSS before and after, next to a GET /healthz baseline (the HTTP stack alone)
measured against the same server in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from harness import process_memory_mb, table

from pneumoscan.io.dataset import list_images, shared_data_root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, clients: int, requests: int, max_seconds: float, payloads: list[tuple[str, bytes]] | None):
    """``requests`` requests from ``clients`` concurrent clients; POST /v1/predict, or GET when no payloads."""
    import httpx

    latencies, errors = [], 0
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    async def client(http: httpx.AsyncClient):
        nonlocal errors
        for i in counter:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            try:
                if payloads is None:
                    r = await http.get(f"{url}/healthz")
                else:
                    name, data = payloads[i % len(payloads)]
                    r = await http.post(f"{url}/v1/predict", files={"file": (name, data, "image/jpeg")})
                if r.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            latencies.append(1000 * (time.perf_counter() - start))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, np.percentile(latencies, [50, 95, 99]), errors, len(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="bundle to serve (default: the bundled model)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    parser.add_argument("--requests", type=int, default=2000, help="predict requests in all (2000)")
    parser.add_argument("--max-seconds", type=float, default=120, help="stop sending after this long (120)")
    args = parser.parse_args()

    files = list_images(shared_data_root() / "chest_xray_224" / "test")
    payloads = [(f.name, f.read_bytes()) for f in files]
    port = free_port()
    cmd = [sys.executable, "-m", "pneumoscan.cli", "serve", "--port", str(port)] + (
        ["--model", args.model] if args.model else []
    )
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit(f"server did not start: {server.stderr.read().decode()[-500:]}")
        asyncio.run(load(url, args.clients, 64, 30, payloads))  # warm up
        before = process_memory_mb(server.pid)["rss"]
        base = asyncio.run(load(url, args.clients, args.requests, args.max_seconds, None))
        result = asyncio.run(load(url, args.clients, args.requests, args.max_seconds, payloads))
        after = process_memory_mb(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)

    print(f"pneumoscan serve on 127.0.0.1, {args.clients} concurrent clients, {os.cpu_count()} cores")
    rows = [
        [name, sent, f"{rate:.0f}", f"{rate / base[0]:.3f}", f"{p50:.1f}", f"{p95:.1f}", f"{p99:.1f}", errors]
        for name, (rate, (p50, p95, p99), errors, sent) in (
            ("GET /healthz (baseline)", base),
            ("POST /v1/predict (224 px JPEG)", result),
        )
    ]
    print(table(["requests", "sent", "requests/s", "ratio to baseline", "p50 ms", "p95 ms", "p99 ms", "errors"], rows))
    print(
        f"server RSS: {before:.0f} MB before the measured requests, {after['rss']:.0f} MB after "
        f"({100 * (after['rss'] - before) / before:+.1f}%), peak {after['peak']:.0f} MB (VmHWM)"
    )


if __name__ == "__main__":
    main()
