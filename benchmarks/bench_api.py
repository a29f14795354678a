"""The OpenAI-compatible API against calling the client library directly, same swarm, same run.

A swarm of `swarm peer` processes (an even split of a tiny Llama over --peers) and one `swarm api`
process in front of it. For each C in --concurrency, C chats at once, greedy, --new-tokens each:
  * library: C threads, each its own DistributedModelForCausalLM (a library user's way to run C
    generations at once; each warmed by a short generation before the clock, as the API's client is by
    an unmeasured request), `generate` on the chat template's ids;
  * api: C threads, each streaming `client.chat.completions.create` through the official `openai`
    package (one API process: C swarm sessions over its one client).
Reported per side and C: time to first token (call to the first token, median and max over the C),
aggregate tokens/s (tokens of all C / wall from the common start to the last token), and their ratio
api / library. Every API text is checked against the library's text for the same messages.

    python benchmarks/bench_api.py                       # C = 1, 8, 32 through 2 peers
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch
from bench_decode import even_spans, machine_info  # benchmarks/bench_decode.py, beside this file
from transformers import AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from client import ClientConfig, DistributedModelForCausalLM, loop
from client.api import chat_prompt
from client.launcher import LocalSwarm, spawn
from swarm.tiny import make_tiny_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    return p.parse_args(argv)


def messages(k: int) -> list[dict]:
    return [{"role": "user", "content": f"Chat number {k}: tell me about swarms of bees and peers."}]


class FirstToken(BaseStreamer):
    def __init__(self):
        self.at, self._prompt = None, True

    def put(self, value) -> None:
        if not self._prompt and self.at is None:
            self.at = time.monotonic()
        self._prompt = False

    def end(self) -> None:
        pass


def crowd(c: int, work) -> tuple[float, list[float], list]:
    """Run work(k, start_gate) in c threads; (wall s, ttfts, results)."""
    gate = threading.Barrier(c + 1)
    out: list = [None] * c

    def run(k):
        gate.wait()
        out[k] = work(k)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(c)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.monotonic()
    for t in threads:
        t.join(900)
    ends = [r[2] for r in out]
    return max(ends) - start, [r[0] - start for r in out], out


def library_side(path, peers, tokenizer, c: int, n: int) -> dict:
    config = ClientConfig(initial_peers=tuple(peers))
    models = [DistributedModelForCausalLM.from_pretrained(path, client_config=config) for _ in range(c)]
    try:
        for k, m in enumerate(models):  # warm, as the API's one client is: transport, snapshot, latencies
            loop.run(m.transport(), 120)
            m.generate(torch.tensor([chat_prompt(tokenizer, messages(k))]), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)

        def work(k):
            ids = torch.tensor([chat_prompt(tokenizer, messages(k))])
            first = FirstToken()
            out = models[k].generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, streamer=first)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            return first.at, (out.shape[1] - ids.shape[1], text), time.monotonic()

        return summarize(*crowd(c, work))
    finally:
        for m in models:
            m.shutdown()


def api_side(base_url: str, model: str, c: int, n: int) -> dict:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    def work(k):
        first, tokens, text = None, 0, []
        stream = client.chat.completions.create(model=model, messages=messages(k), max_tokens=n, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
                first = first or time.monotonic()
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return first, (tokens, "".join(text)), time.monotonic()

    return summarize(*crowd(c, work))


def summarize(wall_s: float, ttfts: list[float], results: list) -> dict:
    tokens = sum(r[1][0] for r in results)
    return {"ttft_ms_median": round(1e3 * statistics.median(ttfts), 1), "ttft_ms_max": round(1e3 * max(ttfts), 1),
            "tokens": tokens, "tokens_per_s": round(tokens / wall_s, 1), "texts": [r[1][1] for r in results]}


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as work:
        path = make_tiny_model("llama", Path(work) / "tiny-llama", num_layers=args.num_layers)
        tokenizer = AutoTokenizer.from_pretrained(path)
        with LocalSwarm(str(path)) as swarm:
            swarm.start_peers(even_spans(args.num_layers, args.peers))
            api = spawn("api", ["api", "--model", str(path), "--initial-peers", *swarm.initial_peers, "--port", "0"])
            swarm.procs.append(api)
            base_url = api.wait_line(lambda l: l.startswith("api at "), 120).split()[2]
            api_side(base_url, "tiny-llama", 1, 4)  # warm-up: the API's route and streams
            for c in (int(x) for x in args.concurrency.split(",")):
                print(f"C = {c}", file=sys.stderr, flush=True)
                lib = library_side(path, swarm.initial_peers, tokenizer, c, args.new_tokens)
                via_api = api_side(base_url, "tiny-llama", c, args.new_tokens)
                equal = lib.pop("texts") == via_api.pop("texts")
                results[str(c)] = {
                    "library": lib, "api": via_api, "texts_equal": equal,
                    "api_over_library_tokens_per_s": round(via_api["tokens_per_s"] / lib["tokens_per_s"], 3),
                    "api_over_library_ttft_median": round(via_api["ttft_ms_median"] / lib["ttft_ms_median"], 3),
                }
    print(json.dumps({"machine": machine_info("cpu"), "peers": args.peers, "num_layers": args.num_layers,
                      "new_tokens": args.new_tokens, "concurrency": results}, indent=2))
    return 0 if all(r["texts_equal"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
