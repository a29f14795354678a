"""`swarm demo`: a whole swarm on this machine, on a tiny model: a bootstrap node and three peers with
unequal spans (as real `swarm` processes), then a reply generated through them.

Prints the route, the decode speed, and the addresses a second terminal can join with. Shuts
everything down when done (or on Ctrl-C); `--keep-running` leaves the swarm up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from swarm.errors import SwarmError


def default_model_dir(family: str, layers: int) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swarm"
    return cache / f"demo-{family}-{layers}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="llama", help="tiny model architecture (llama, mistral, qwen2, qwen3, mixtral, ...)")
    p.add_argument("--layers", type=int, default=8, help="blocks in the tiny model")
    p.add_argument("--model", help="use this checkpoint folder instead of making a tiny model")
    p.add_argument("--prompt", default="The swarm of volunteers")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--keep-running", action="store_true", help="keep the swarm up after the reply, until Ctrl-C")
    p.add_argument("--spares", type=int, default=1,
                   help="twin peers for the spans (the middle one first), ready to replace a peer that dies")
    p.add_argument("--swarm-key", metavar="FILE",
                   help="make the demo swarm private with this key file (`swarm make-swarm-key FILE` makes one)")
    p.add_argument("--kill-peer-at", type=int, metavar="K",
                   help="kill -9 the route's middle peer after K tokens, to watch the reply finish anyway")
    return p


def unequal_spans(num_blocks: int) -> list[str]:
    """Three contiguous spans of different sizes covering every block (1/4, 3/8, the rest)."""
    if num_blocks < 3:
        raise SwarmError(f"the demo needs a model with at least 3 blocks, this one has {num_blocks}")
    a = max(1, num_blocks // 4)
    b = max(a + 1, a + (3 * num_blocks) // 8)
    b = min(b, num_blocks - 1)
    return [f"0:{a}", f"{a}:{b}", f"{b}:{num_blocks}"]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_demo(args)
    except KeyboardInterrupt:
        print("\ninterrupted: swarm stopped", flush=True)
    except SwarmError as e:
        print(f"swarm demo: {e}", file=sys.stderr)
        return 1
    return 0


def run_demo(args: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoTokenizer, TextStreamer

    from client import ClientConfig, DistributedModelForCausalLM
    from client.launcher import LocalSwarm
    from swarm.swarmkey import load_optional

    key = load_optional(args.swarm_key)  # a bad key file fails before any process starts

    if args.model:
        model_path = Path(args.model)
    else:
        from swarm.tiny import make_tiny_model

        model_path = make_tiny_model(args.family, default_model_dir(args.family, args.layers), num_layers=args.layers)
    num_blocks = AutoConfig.from_pretrained(model_path).num_hidden_layers
    spans = unequal_spans(num_blocks)
    print(f"model: {model_path} ({num_blocks} blocks)", flush=True)
    started = time.monotonic()
    with LocalSwarm(str(model_path), swarm_key_path=key.path if key else None) as swarm:
        print(f"bootstrap: {swarm.initial_peers[0]}" + (f" (private swarm, key id {key.key_id})" if key else ""),
              flush=True)
        print(f"starting 3 peers ({', '.join(spans)}) and {args.spares} spare(s) ...", flush=True)
        spares = [spans[(1 + i) % 3] for i in range(args.spares)]  # twins: the middle span first
        peers = swarm.start_peers(spans + spares)
        print(f"swarm ready in {time.monotonic() - started:.1f} s", flush=True)
        for proc in peers:
            print(f"  {proc.ready_line.strip()}", flush=True)
        _generate(args, model_path, swarm, peers, ClientConfig(initial_peers=tuple(swarm.initial_peers),
                                                               step_timeout_s=5, swarm_key=key),
                  DistributedModelForCausalLM, AutoTokenizer, TextStreamer)
        _print_join_help(model_path, swarm.initial_peers[0], key.path if key else None)
        if args.keep_running:
            print("swarm is running; Ctrl-C stops it", flush=True)
            while all(p.popen.poll() is None for p in swarm.procs):
                time.sleep(1)
            print("a swarm process exited; stopping", flush=True)
    print("swarm stopped", flush=True)


def _generate(args, model_path, swarm, peers, client_config, DistributedModelForCausalLM, AutoTokenizer,
              TextStreamer):
    import signal

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = DistributedModelForCausalLM.from_pretrained(model_path, client_config=client_config)

    def kill_a_route_peer():
        hop = model.active_session.route[len(model.active_session.route) // 2]
        proc = next(p for p in peers if hop.peer_id in p.ready_line)
        proc.kill(signal.SIGKILL)
        print(f" [kill -9 peer {hop.peer_id[:8]}.. serving {hop.span}] ", end="", flush=True)

    try:
        inputs = tokenizer(args.prompt, return_tensors="pt")
        with model.inference_session(max_length=inputs.input_ids.shape[1] + args.max_new_tokens) as session:
            print(f"\nprompt: {args.prompt}\nreply:  ", end="", flush=True)
            streamer = _TimedStreamer(TextStreamer, tokenizer, args.kill_peer_at, kill_a_route_peer)
            out = model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id, streamer=streamer,
            )
            route = " -> ".join(f"{hop.peer_id[:8]}..{hop.peer_id[-4:]} [{hop.span}]" for hop in session.route)
        new_tokens = out.shape[1] - inputs.input_ids.shape[1]
        first, last = streamer.times[1], streamer.times[-1]  # times[0] is the prompt itself
        print(f"route: {route}" + (f" (after {session.recoveries} recovery)" if session.recoveries else ""))
        print(f"{new_tokens} tokens: first after {first - streamer.times[0]:.2f} s (route setup and prefill), "
              f"then {(new_tokens - 1) / max(last - first, 1e-9):.1f} tokens/s")
    finally:
        model.shutdown()


def _TimedStreamer(TextStreamer, tokenizer, act_after: int | None, action):
    """A TextStreamer that also records when each chunk of tokens arrived, and can act after token K."""

    class TimedStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True)
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())
            super().put(value)
            if act_after is not None and len(self.times) == act_after + 1:  # times[0] is the prompt
                action()

    return TimedStreamer()


def _print_join_help(model_path: Path, bootstrap: str, key_path: str | None) -> None:
    key = f" --swarm-key {key_path}" if key_path else ""
    print("\njoin from a second terminal (while --keep-running):")
    print(f"  swarm peer --model {model_path} --blocks 0:2 --initial-peers {bootstrap}{key}")
    print(f"  swarm generate --model {model_path} --initial-peers {bootstrap}{key} --prompt 'Hello'", flush=True)
