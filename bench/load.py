"""A bounded load test of the gateway's Search: `python -m bench.load --concurrency 32 --seconds 20`.

localhost only; it stops by itself. Prints status-code counts, throughput,
latency percentiles of the successful calls and the gateway's memory.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from pathlib import Path

import grpc


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_load(address: str, key: str, image: bytes, catalog: str, concurrency: int, seconds: float) -> dict:
    from visearch.client import GatewayClient

    codes: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker():
        client = GatewayClient(address, key=key, timeout=30)
        try:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    client.search(image, catalog=catalog, top_k=10)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes[code] += 1
                    if code == "OK":
                        latencies.append((time.perf_counter() - t0) * 1000)
                if code != "OK":
                    time.sleep(0.01)
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    lat = sorted(latencies)
    pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1)) if lat else (lambda q: None)
    return {"concurrency": concurrency, "seconds": round(elapsed, 1), "codes": dict(codes),
            "ok_per_s": round(codes["OK"] / elapsed, 1), "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


def main() -> None:
    from visearch import mesh

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", type=Path, default=mesh.default_data_dir())
    ap.add_argument("--catalog", default="demo")
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20)
    a = ap.parse_args()
    state = mesh.load_state(a.data_dir)
    gateway = next(c for c in state["components"] if c["name"] == "gateway")
    before = rss_kib(gateway["pid"])
    report = run_load(state["gateway"], mesh.read_admin_key(a.data_dir), a.image.read_bytes(), a.catalog,
                      a.concurrency, a.seconds)
    report["gateway_rss_kib"] = [before, rss_kib(gateway["pid"])]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
