"""`replicate serve` under a bounded load over loopback, beside `predict` on the same photos and
models, in one run.

    .venv/bin/python benchmarks/serve_bench.py [MODEL]   # default: the demo's run (make demo)

It starts `replicate serve MODEL` on 127.0.0.1 (a free port) and sends the 321 Houses `rooms`
validation photos from one asyncio client (httpx): 400 requests at each of concurrency 1, 8 and
32 (p50, p95 and p99 latency, photos/s), a 20-photo listing (10 times), then 2,000 mixed requests
(one in ten a text file, a truncated JPEG or an oversized header) with the server's resident
memory read before and after. Beside it, in this process: `predict`'s engine on the same photos
(engine.onnx_models.tag_onnx, decoding on all cores, batches of 64), a batch of one (decoded and run,
the floor of a request's latency) and a full batch of 32. Client and server share the 2 cores
here, so the client's own work is inside every number. Rows go to benchmarks/results.csv
(bench=serve).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import results  # benchmarks/results.py, beside this script

from replicate import photos
from replicate.engine import onnx_models

DEMO = Path("exports/rooms/tf_efficientnet_lite0-frozen-cached3-freezebn")
ROOMS = Path("data/rooms/valid")
REQUESTS, LEVELS, MIXED = 400, (1, 8, 32), 2000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(client: httpx.AsyncClient, bodies: list[bytes], n: int, concurrency: int):
    """(latencies in s, statuses, seconds) of `n` POST /v1/photos, `concurrency` at a time."""
    latencies, statuses, next_index = [], [], iter(range(n))

    async def worker():
        for i in next_index:
            start = time.perf_counter()
            r = await client.post("/v1/photos", content=bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - start)
            statuses.append(r.status_code)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return np.array(latencies), statuses, time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) process `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(base: str, bodies: list[bytes], pid: int) -> dict:
    out = {}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        await load(client, bodies, 32, 4)  # warm the connections
        for c in LEVELS:
            client_cpu, server_cpu = time.process_time(), cpu_seconds(pid)
            lat, statuses, seconds = await load(client, bodies, REQUESTS, c)
            client_cpu, server_cpu = time.process_time() - client_cpu, cpu_seconds(pid) - server_cpu
            assert set(statuses) == {200}, set(statuses)
            out[c] = {"p50_ms": np.percentile(lat, 50) * 1000, "p95_ms": np.percentile(lat, 95) * 1000,
                      "p99_ms": np.percentile(lat, 99) * 1000, "photos_per_s": REQUESTS / seconds,
                      "client_cores": client_cpu / seconds, "server_cores": server_cpu / seconds}  # fmt: skip
        listing = [("photos", (f"{i}.jpg", bodies[i])) for i in range(20)]
        times = []
        for _ in range(10):
            start = time.perf_counter()
            r = await client.post("/v1/listings/1", files=listing)
            times.append(time.perf_counter() - start)
            assert r.status_code == 200
        out["listing_ms"] = float(np.median(times) * 1000)
        bad = [b"this is not a photo", bodies[0][: len(bodies[0]) // 2], _claims_huge()]
        mixed = [bad[i // 10 % 3] if i % 10 == 9 else bodies[i % len(bodies)] for i in range(MIXED)]
        before = rss_mb(pid)
        lat, statuses, _ = await load(client, mixed, MIXED, 8)
        out["rss_before_mb"], out["rss_after_mb"] = before, rss_mb(pid)
        out["mixed_statuses"] = sorted(set(statuses))
        assert max(statuses) < 500, statuses
    return out


def _claims_huge() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"\0" * 1000)
        + chunk(b"IEND", b"")
    )


def in_process(model: Path, files: list[Path]) -> dict:
    """predict's photos/s on the files; a batch of one and of 32, decoded and run, in seconds."""
    models = onnx_models.load(model)
    onnx_models.tag_onnx(models, files[:64], progress=False)
    start = time.perf_counter()
    onnx_models.tag_onnx(models, files, bs=64, progress=False)
    predict_rate = len(files) / (time.perf_counter() - start)
    groups, geometries = onnx_models.sharing(models), [m.prep.geometry for m in models]

    def batch_seconds(n: int, repeats: int) -> float:
        best = float("inf")
        for r in range(repeats):
            start = time.perf_counter()
            decoded = [photos.decode(f, geometries)[0] for f in files[r * n : (r + 1) * n]]
            for group in groups:
                pixels = np.stack([d[group[0].prep.geometry] for d in decoded])
                onnx_models.group_probabilities(group, pixels)
            best = min(best, time.perf_counter() - start)
        return best

    return {"predict_photos_per_s": predict_rate, "batch1_ms": batch_seconds(1, 50) * 1000,
            "batch32_ms": batch_seconds(32, 5) * 1000}  # fmt: skip


def main() -> None:
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO
    if not model.exists() or not ROOMS.is_dir():
        raise SystemExit(f"needs {model} and {ROOMS}: run `make demo` first")
    files = sorted(ROOMS.rglob("*.jpg"))
    bodies = [f.read_bytes() for f in files]
    local = in_process(model, files)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "replicate", "serve", str(model), "--port", str(port)],
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        served = asyncio.run(bench(base, bodies, server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    common = {"bench": "serve", "date": now, "machine": platform.node(),
              "processor": platform.machine(), "run": str(model), "photos": len(files)}  # fmt: skip
    rows = [
        {**common, "concurrency": c, "requests": REQUESTS, **{k: round(v, 1) for k, v in served[c].items()},
         "predict_photos_per_s": round(local["predict_photos_per_s"], 1),
         "of_predict": round(served[c]["photos_per_s"] / local["predict_photos_per_s"], 2),
         "batch1_ms": round(local["batch1_ms"], 1), "batch32_ms": round(local["batch32_ms"], 1)}
        for c in LEVELS
    ]  # fmt: skip
    rows.append(
        {
            **common,
            "requests": 10,
            "listing_photos": 20,
            "listing_ms": round(served["listing_ms"], 1),
        }
    )
    rows.append({**common, "requests": MIXED, "concurrency": 8, "rss_before_mb": round(served["rss_before_mb"], 1),
                 "rss_after_mb": round(served["rss_after_mb"], 1),
                 "rss_growth": round(served["rss_after_mb"] / served["rss_before_mb"] - 1, 3),
                 "statuses": " ".join(map(str, served["mixed_statuses"]))})  # fmt: skip
    for row in rows:
        print({k: v for k, v in row.items() if k not in common or k == "run"})
    print(f"written: {results.append(rows)}")


if __name__ == "__main__":
    main()
