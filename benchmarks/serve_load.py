"""Load test of `illada serve`: N concurrent clients against a real server, dynamic batching on vs off.

Each client sends --requests completions one after another (non-streaming, temperature 0, a different prompt
each) over its own keep-alive connection; the server runs in this process on a free loopback port. Reported per
setting: requests/s and generated tokens/s over the whole run (wall clock), p50/p99 request latency, the mean
batch size and the forward passes (NFE) the worker ran. "off" is --max-batch 1 (one request per forward pass).

    python benchmarks/serve_load.py                                  # bundled demo model, CPU
    python benchmarks/serve_load.py --model random --preset small    # a random model of a preset's shape
    python benchmarks/serve_load.py --model PATH --device cuda --clients 32 --max-tokens 128
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlparse

import torch

PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "To be, or not", "Now is the winter", "KING HENRY:",
           "O, what a rogue", "Friends, Romans,", "What light through", "All the world's", "HAMLET:", "MACBETH:"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory or bundled name (default: the demo model); "
                   "'random' builds a random model from --preset")
    p.add_argument("--preset", default="tiny", help="shape of the random model")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=3, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--block-length", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: one token per step)")
    p.add_argument("--batch-sizes", default="8,1", help="--max-batch values to compare (1 = batching off)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def load_handle(args: argparse.Namespace):
    import illada

    if args.model != "random":
        return illada.load(args.model, device=args.device, dtype=args.dtype)
    from illada.api import DiffusionLM
    from illada.config import preset
    from illada.model import build_model
    from illada.runtime import resolve_device
    from illada.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    config = preset(args.preset, name=f"random-{args.preset}", vocab_size=tok.vocab_size,
                    mask_token_id=tok.mask_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    model = build_model(config, device=resolve_device(args.device), seed=0).eval()
    return DiffusionLM(model=model, tokenizer=tok, config=config, name=config.name, is_random=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def run_load(url: str, args: argparse.Namespace) -> tuple[list[float], int, float]:
    """(latencies in s, generated tokens, wall seconds) of the whole load."""
    target = urlparse(url)
    latencies: list[float] = []
    tokens = [0]
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(args.clients + 1)

    def client(index: int) -> None:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
        start.wait()
        for r in range(args.requests):
            body = {"prompt": PROMPTS[(index * args.requests + r) % len(PROMPTS)], "max_tokens": args.max_tokens,
                    "temperature": 0, "block_length": args.block_length, "forbid_eos": True}
            if args.steps:
                body["steps"] = args.steps
            began = time.perf_counter()
            conn.request("POST", "/v1/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = json.loads(response.read())
            elapsed = time.perf_counter() - began
            with lock:
                if response.status != 200:
                    failures.append(payload["error"]["message"])
                    continue
                latencies.append(elapsed)
                tokens[0] += payload["usage"]["completion_tokens"]
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g.: {failures[0]}")
    return latencies, tokens[0], wall


def main(argv=None) -> int:
    from illada.serving import ServerSettings, create_app, serve_in_thread

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_handle(args)
    total = args.clients * args.requests
    print(f"model {lm.name} on {lm.device} · {args.clients} clients × {args.requests} requests · "
          f"max_tokens {args.max_tokens} · block {args.block_length} · torch threads {torch.get_num_threads()}",
          file=sys.stderr)
    results = []
    for max_batch in (int(b) for b in args.batch_sizes.split(",")):
        app = create_app(lm, ServerSettings(max_batch=max_batch, queue_size=max(total, 1)))
        with serve_in_thread(app) as url:
            run_load(url, argparse.Namespace(**{**vars(args), "clients": 1, "requests": 1}))  # warm-up
            before = app.state.metrics.snapshot()
            latencies, tokens, wall = run_load(url, args)
            after = app.state.metrics.snapshot()
        batches = after["batches_total"] - before["batches_total"]
        rows = after["batch_rows_total"] - before["batch_rows_total"]
        results.append({
            "max_batch": max_batch, "requests": len(latencies), "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "p50_latency_s": statistics.median(latencies), "p99_latency_s": percentile(latencies, 99),
            "mean_batch": rows / max(batches, 1), "nfe": after["nfe_total"] - before["nfe_total"],
        })

    header = f"{'batching':<14}{'req/s':>8}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}{'mean batch':>12}{'NFE':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        label = "off (1)" if r["max_batch"] == 1 else f"on ({r['max_batch']})"
        print(f"{label:<14}{r['requests_per_s']:>8.2f}{r['tokens_per_s']:>10.1f}{r['p50_latency_s']:>8.2f}"
              f"{r['p99_latency_s']:>8.2f}{r['mean_batch']:>12.2f}{r['nfe']:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
