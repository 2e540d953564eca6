"""Serving throughput and latency of `tokenmill serve`: batched vs one request at a time. Prints a table; not a test.

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py [--run runs/demo] [--clients 1 8 32] [--max-tokens 64]

The server is the real `tokenmill serve` in a subprocess (`--max-batch 32` for "batched", `--max-batch 1` for
"one-at-a-time"), on a demo-sized model: the run given by --run, or else the `demo` preset's shape (4 layers,
d=256, vocab 4096) with random weights and the byte tokenizer, saved to a temporary folder. C client threads
each send streaming /v1/completions requests back to back over loopback (temperature 1, a seed per request,
distinct prompts) and read the raw SSE events. Per request: latency = send to [DONE], TTFT = send to the
first chunk with text; throughput = completion tokens (from the usage chunk) / wall time of the whole load.
Goal: at 8 clients, batched >= 3x the aggregate tokens/s of one-at-a-time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

START_TIMEOUT_S = 180.0


def demo_shaped_run(folder: Path) -> Path:
    """A run folder holding the demo preset's model shape with random weights and the byte tokenizer."""
    import torch

    import tokenmill
    from tokenmill.checkpoint.manager import Checkpointer
    from tokenmill.config import load_config

    cfg = load_config(["demo"], overrides=["model.vocab_size=4096", "data.tokenizer=byte", "model.dropout=0.0"])
    torch.manual_seed(0)
    Checkpointer(folder, cfg.checkpoint, config=cfg).save(1, {}, tokenmill.create_model(cfg))
    return folder


def start_server(run: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenmill",
            "serve",
            str(run),
            "--port",
            "0",
            "--max-batch",
            str(max_batch),
            "--max-queue",
            "256",
            "--model-name",
            "bench",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    for line in process.stderr:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if found:
            port = int(found.group(1))
            threading.Thread(target=process.stderr.read, daemon=True).start()  # drain the log so it never blocks
            while time.monotonic() < deadline:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        return process, port
                except OSError:
                    time.sleep(0.2)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError("the server did not start")


def one_request(port: int, prompt: str, max_tokens: int, seed: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed completion."""
    body = json.dumps(
        {
            "model": "bench",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "seed": seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if first is None and event["choices"] and event["choices"][0]["text"]:
            first = time.perf_counter() - start
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    conn.close()
    return latency, first if first is not None else latency, tokens


def run_load(port: int, clients: int, requests_each: int, max_tokens: int) -> dict[str, float]:
    def client(k: int) -> list[tuple[float, float, int]]:
        return [
            one_request(port, f"# request {k}.{j}\ndef f(x):", max_tokens, seed=1000 * k + j)
            for j in range(requests_each)
        ]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    ttfts = sorted(r[1] for r in results)
    return {
        "requests": len(results),
        "tokens": sum(r[2] for r in results),
        "wall": wall,
        "tok_s": sum(r[2] for r in results) / wall,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "ttft50": percentile(ttfts, 50),
        "ttft95": percentile(ttfts, 95),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    return (
        statistics.quantiles(sorted_values, n=100, method="inclusive")[q - 1]
        if len(sorted_values) > 1
        else (sorted_values[0])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="run or checkpoint folder (default: demo-shaped)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16, help="requests per load level (at least 2 per client)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or demo_shaped_run(Path(tmp) / "demo-shaped")
        rows = []
        for mode, max_batch in (("one-at-a-time", 1), ("batched", 32)):
            process, port = start_server(run, max_batch, args.threads)
            try:
                one_request(port, "warm up", 4, seed=0)
                for clients in args.clients:
                    each = max(2, -(-args.requests // clients))
                    rows.append((mode, clients, run_load(port, clients, each, args.max_tokens)))
            finally:
                process.terminate()
                process.wait(timeout=60)

    print(
        f"\nserve load: {run if args.run else 'demo-shaped random model (4L d=256 vocab 4096, byte tokenizer)'}, "
        f"max_tokens={args.max_tokens}, server threads={args.threads}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores\n"
    )
    print("| server | clients | requests | tokens | wall s | tokens/s | latency p50 / p95 s | TTFT p50 / p95 s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, clients, r in rows:
        print(
            f"| {mode} | {clients} | {r['requests']} | {r['tokens']} | {r['wall']:.1f} | {r['tok_s']:.0f} | "
            f"{r['p50']:.2f} / {r['p95']:.2f} | {r['ttft50']:.2f} / {r['ttft95']:.2f} |"
        )
    by_key = {(mode, clients): r["tok_s"] for mode, clients, r in rows}
    for clients in args.clients:
        if ("batched", clients) in by_key and by_key[("one-at-a-time", clients)] > 0:
            print(
                f"\nbatched / one-at-a-time at {clients} clients: "
                f"{by_key[('batched', clients)] / by_key[('one-at-a-time', clients)]:.1f}x",
                end="",
            )
    print()


if __name__ == "__main__":
    main()
