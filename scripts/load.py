#!/usr/bin/env python3
"""A small load generator for OpenAI-compatible servers (amusd serve, llama-server): C concurrent
clients each send streamed chat requests from a prompt list, greedy, and the run reports requests/s,
completion tokens/s, and p50/p99 time to first token and total latency. Standard library only.

  scripts/load.py URL PROMPTS.jsonl --clients 1,4,16 --requests 16 --max-tokens 64 [--label NAME]

PROMPTS.jsonl: one {"conversation": [{"role": "user", "content": ...}]} per line (as
scripts/bench-peers.sh writes them). Prints one markdown table row per concurrency level.
"""

import argparse
import http.client
import json
import threading
import time
import urllib.parse


def one_request(url, messages, max_tokens):
    """(ttft seconds, total seconds, completion tokens, status)"""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({
        "model": "any", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    })
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        resp.read()
        return None, time.perf_counter() - t0, 0, resp.status
    ttft, tokens, pieces = None, None, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        for c in chunk.get("choices") or []:
            if (c.get("delta") or {}).get("content"):
                pieces += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk.get("timings") and tokens is None:
            tokens = chunk["timings"].get("predicted_n")
    total = time.perf_counter() - t0
    conn.close()
    return ttft, total, tokens if tokens is not None else pieces, 200


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def run_level(url, prompts, clients, requests, max_tokens):
    results, lock = [], threading.Lock()
    next_i = [0]

    def client():
        while True:
            with lock:
                i = next_i[0]
                if i >= requests:
                    return
                next_i[0] += 1
            r = one_request(url, prompts[i % len(prompts)], max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[3] == 200]
    return {
        "clients": clients, "requests": len(results), "ok": len(ok), "wall_s": wall,
        "req_per_s": len(ok) / wall, "tok_per_s": sum(r[2] for r in ok) / wall,
        "ttft_p50": pct([r[0] for r in ok if r[0] is not None], 50),
        "ttft_p99": pct([r[0] for r in ok if r[0] is not None], 99),
        "lat_p50": pct([r[1] for r in ok], 50), "lat_p99": pct([r[1] for r in ok], 99),
        "statuses": sorted({r[3] for r in results}),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("prompts")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--label", default="server")
    ap.add_argument("--json", help="append each level's result to this JSON-lines file")
    a = ap.parse_args()
    prompts = [json.loads(l)["conversation"] for l in open(a.prompts) if l.strip()]
    # One warm-up request, not counted.
    one_request(a.url, prompts[0], 8)
    for c in [int(x) for x in a.clients.split(",")]:
        r = run_level(a.url, prompts, c, max(a.requests, c), a.max_tokens)
        r["label"] = a.label
        print(f"| {a.label} | {c} | {r['ok']}/{r['requests']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
              f"{r['ttft_p50']*1e3:.0f} | {r['ttft_p99']*1e3:.0f} | {r['lat_p50']*1e3:.0f} | {r['lat_p99']*1e3:.0f} |",
              flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
