"""Single-session decode speed through 1, 2 and 4 peers, against local transformers `generate` in the same run.

Each peer is a real `swarm peer` process (client.launcher.LocalSwarm) on loopback, so every figure includes the
process boundaries and both p2pd hops of each span. Prints one JSON object on stdout; progress on stderr.

Method (README.md beside this file says more):
  * the same checkpoint, dtype, device and prompt for the local model and every swarm; greedy decoding,
    EOS disabled, so every run produces exactly --new-tokens tokens;
  * a warm-up generation first (per model: it also opens the client's transport and route);
  * decode only: a streamer stamps each new token; decode rate = (N - 1) / (t_token_N - t_token_1),
    which leaves out prefill and route opening; repeated --repeats times, the median is reported;
  * per-hop overhead: least-squares slope of decode step time over the number of peers (the total
    compute is the same for every split), and the 1-peer step time minus the local one;
  * one more generation per swarm with timing probes (benchmarks/probe.py) on both sides of each hop:
    where a decode step's time goes (client-side generate/head, sync facade, serialization, wire, compute).

    python benchmarks/bench_decode.py --peers 1,2,4 --new-tokens 32               # CPU, tiny Llama
    python benchmarks/bench_decode.py --device cuda --dtype bfloat16 --llama8b   # GPU, Llama-3-8B shape
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import probe  # benchmarks/probe.py, beside this file
from client.launcher import LocalSwarm, Proc

HERE = Path(__file__).resolve().parent

# Llama-3-8B's architecture (meta-llama/Meta-Llama-3-8B config.json), random weights.
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)


def log(message: str) -> None:
    print(f"[bench_decode {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default=None, help="comma-separated peer counts (default 1,2,4; 1,2 with --llama8b)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (N)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-layers", type=int, default=8, help="tiny model: blocks")
    p.add_argument("--hidden-size", type=int, default=64, help="tiny model: hidden size")
    p.add_argument("--family", default="llama", help="tiny model family (swarm.tiny)")
    p.add_argument("--model", help="use this checkpoint folder instead of building one")
    p.add_argument("--llama8b", action="store_true", help="build a random Llama-3-8B-shaped checkpoint (~16 GB)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N: local model, client head and every peer")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on CPU, else bfloat16")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads of this process (local model, client) and of each peer (--num-threads)")
    p.add_argument("--work-dir", help="where to build the checkpoint (default: a temporary folder)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the probed generation per swarm")
    p.add_argument("--startup-timeout-s", type=float, default=300.0)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.peers = [int(n) for n in (args.peers or ("1,2" if args.llama8b else "1,2,4")).split(",")]
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode rate needs two decode stamps)")
    return args


# ---------------------------------------------------------------- model


def build_llama8b(out_dir: Path, device: str, dtype: torch.dtype):
    """A random Llama-3-8B-shaped model, built on `device` (fast init there), saved sharded; returns it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA3_8B)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_theta", getattr(config, "rope_theta", None)) != LLAMA3_8B["rope_theta"]:
        raise RuntimeError(f"rope_theta did not reach the config: {rope}")
    start = time.monotonic()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    log(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params on {device} "
        f"in {time.monotonic() - start:.1f} s; saving to {out_dir}")
    start = time.monotonic()
    model.save_pretrained(out_dir, max_shard_size="5GB")
    log(f"saved in {time.monotonic() - start:.1f} s: {sorted(p.name for p in out_dir.iterdir())}")
    return model


def prepare_model(args, work: Path):
    """(checkpoint folder, local reference model on the device in the dtype)."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.llama8b:
        path = work / "llama3-8b-random"
        path.mkdir()
        return path, build_llama8b(path, args.device, dtype)
    if args.model:
        path = Path(args.model)
    else:
        from swarm.tiny import make_tiny_model

        path = make_tiny_model(args.family, work / f"tiny-{args.family}", num_layers=args.num_layers,
                               hidden_size=args.hidden_size)
    local = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(args.device).eval()
    return path, local


def model_info(config, path: Path) -> dict:
    return {
        "path": str(path), "model_type": config.model_type, "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "checkpoint_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
    }


def machine_info(device: str) -> dict:
    import transformers

    info = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_num_threads": torch.get_num_threads(), "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# ---------------------------------------------------------------- timing


class StepClock:
    """A generate streamer that notes the time of each `put`: the prompt first, then every new token."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(probe.now())

    def end(self) -> None:
        pass


def generate_timed(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[float], float]:
    """(generated tokens [new_tokens], token stamps [1 + new_tokens], start time); greedy, no EOS."""
    clock = StepClock()
    start = probe.now()
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0, streamer=clock,
    )
    tokens = out[0, prompt.shape[1]:].cpu()
    if tokens.numel() != new_tokens or len(clock.stamps) != new_tokens + 1:
        raise RuntimeError(f"generated {tokens.numel()} tokens ({len(clock.stamps)} stamps), not {new_tokens}")
    return tokens, clock.stamps, start


def measure(model, prompt: torch.Tensor, args, what: str) -> dict:
    """Warm-up, then --repeats timed generations; decode figures are medians over the repeats."""
    log(f"{what}: warm-up")
    tokens, _, _ = generate_timed(model, prompt, args.new_tokens)
    runs, steps_ms = [], []
    for i in range(args.repeats):
        _, stamps, start = generate_timed(model, prompt, args.new_tokens)
        decode_s = stamps[-1] - stamps[1]
        steps_ms += [1e3 * (b - a) for a, b in zip(stamps[1:], stamps[2:])]
        runs.append({"decode_tokens_s": (args.new_tokens - 1) / decode_s,
                     "step_ms": 1e3 * decode_s / (args.new_tokens - 1),
                     "first_token_s": stamps[1] - start})
        log(f"{what}: run {i + 1}: {runs[-1]['decode_tokens_s']:.1f} tokens/s "
            f"({runs[-1]['step_ms']:.2f} ms/step), first token after {runs[-1]['first_token_s']:.3f} s")
    return {
        "decode_tokens_s": statistics.median(r["decode_tokens_s"] for r in runs),
        "step_ms": statistics.median(r["step_ms"] for r in runs),
        "step_ms_p50_all_steps": statistics.median(steps_ms),
        "step_ms_p90_all_steps": quantile(steps_ms, 0.9),
        "first_token_s": statistics.median(r["first_token_s"] for r in runs),
        "runs": runs,
        "tokens": tokens.tolist(),
    }


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def local_forward_ms(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Local decode step split into the model's forward and the rest of generate (medians, ms)."""
    durations: list[float] = []
    original = model.forward

    def forward(*a, **kw):
        start = probe.now()
        try:
            return original(*a, **kw)
        finally:
            durations.append(probe.now() - start)

    model.forward = forward  # instance attribute: nn.Module.__call__ finds it first
    try:
        _, stamps, _ = generate_timed(model, prompt, new_tokens)
    finally:
        del model.forward
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    fwd = durations[1:]  # [0] is the prefill
    return {"step_ms": ms_median(steps), "forward_ms": ms_median(fwd),
            "generate_rest_ms": ms_median([s - f for s, f in zip(steps, fwd)])}


def ms_median(seconds: list[float]) -> float:
    return round(1e3 * statistics.median(seconds), 4)


# ---------------------------------------------------------------- swarm


def even_spans(num_layers: int, n: int) -> list[str]:
    bounds = [round(i * num_layers / n) for i in range(n + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


class ProbedSwarm(LocalSwarm):
    """LocalSwarm whose peers run `swarm peer` through benchmarks/probe.py (the same CLI, plus step probes)."""

    def __init__(self, model_path, probe_dir: Path, peer_flags: list[str], **kwargs):
        super().__init__(str(model_path), **kwargs)
        self.probe_dir = probe_dir
        self.peer_flags = peer_flags

    def start_peers_for(self, spans: list[str]) -> list[tuple[Proc, str, Path]]:
        """Start peers for `spans` concurrently; return (process, peer id, probe file) once all are ready."""
        started = []
        for span in spans:
            name = f"peer{len(self.peers)}[{span}]"
            probe_file = self.probe_dir / f"probe-{len(self.peers)}.jsonl"
            args = ["peer", "--model", self.model_path, "--blocks", span, "--initial-peers", *self.initial_peers,
                    *self.peer_args, *self.peer_flags]
            proc = _spawn_probed(name, args, probe_file)
            self.procs.append(proc)
            self.peers[name] = proc
            started.append((proc, probe_file))
        return [(proc, _peer_id(self.wait_ready(proc)), f) for proc, f in started]


def _spawn_probed(name: str, args: list[str], probe_file: Path) -> Proc:
    """client.launcher.spawn, with benchmarks/probe.py in front of the `swarm` CLI."""
    popen = subprocess.Popen(
        [sys.executable, str(HERE / "probe.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1", "SWARM_PROBE_FILE": str(probe_file)},
    )
    proc = Proc(name, popen)
    threading.Thread(target=proc._pump, daemon=True).start()
    return proc


def _peer_id(ready_line: str) -> str:
    fields = dict(part.split("=", 1) for part in ready_line.split()[1:] if "=" in part)
    return fields["peer_id"]


def run_swarm(swarm: ProbedSwarm, model_path: Path, n: int, prompt, local: dict, blocked: list[str], args) -> dict:
    """Start n peers over an even split, measure a client through them, stop them."""
    from client import ClientConfig, DistributedModelForCausalLM

    spans = even_spans(swarm.num_layers, n)
    log(f"{n} peer(s): starting {spans}")
    start = time.monotonic()
    peers = swarm.start_peers_for(spans)
    log(f"{n} peer(s): ready in {time.monotonic() - start:.1f} s")
    ids = [peer_id for _, peer_id, _ in peers]
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers), blocked_peers=tuple(blocked), wait_for_route_s=60)
    model = DistributedModelForCausalLM.from_pretrained(
        model_path, client_config=config, dtype=getattr(torch, args.dtype), device=args.device
    )
    try:
        result = {"spans": spans, **measure(model, prompt, args, f"swarm[{n}]")}
        result["tokens_equal_local"] = result.pop("tokens") == local["tokens"]
        if not args.no_breakdown:
            result["breakdown"] = probed_generation(model, prompt, args, [f for _, _, f in peers], ids)
    finally:
        model.shutdown()
        for proc, _, _ in peers:
            proc.stop()
    blocked.extend(ids)
    return result


# ---------------------------------------------------------------- breakdown


def probed_generation(model, prompt, args, probe_files: list[Path], peer_ids: list[str]) -> dict:
    """One generation with probes on both sides; medians over decode steps, in ms."""
    with model.inference_session(max_length=prompt.shape[1] + args.new_tokens) as session:
        with probe.ClientProbe() as cp:
            _, stamps, start = generate_timed(model, prompt, args.new_tokens)
        route = [(h.peer_id, str(h.span)) for h in session.route]
    if [peer_id for peer_id, _ in route] != peer_ids:
        raise RuntimeError(f"the client routed through {route}, not the peers just started {peer_ids}")
    expected = len(route) * args.new_tokens
    deadline = time.monotonic() + 10
    while True:  # a peer writes its record just after sending the reply: the last one may lag a little
        records = probe.read_peer_records(probe_files, start, probe.now() + 1)
        if len(records) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return summarize_breakdown(cp, records, stamps, prompt.shape[1], route)


def _hop_parts(hop: dict, peer: dict) -> dict:
    """One hop of one step, split (seconds); the parts sum to the client's SpanStream.step round trip.

    "wire" parts run from a message serialized on one side (about to be written to its socket) to the
    same message arrived and about to be unpacked on the other: socket write, both p2pd daemons, TCP
    over loopback, the receiver's event loop waking up and reading it.
    """
    arrived_at_peer = peer["t_read"] - peer["unpack_s"]
    arrived_at_client = hop["t_read"] - hop.get("msgpack_unpack_s", 0)
    parse_end = peer["t_read"] + peer["parse_s"]
    pack_tensor_s = peer.get("pack_tensor_s", 0)
    parts = {
        "client_encode": hop["t_packed"] - hop["t0"],  # pack_tensor x3 + msgpack
        "wire_to_peer": arrived_at_peer - hop["t_packed"],
        "peer_decode_validate": peer["unpack_s"] + peer["parse_s"],  # msgpack + parse_step
        "peer_thread_handoff": (peer["t_compute0"] - parse_end) + (peer["t_write0"] - pack_tensor_s - peer["t_compute1"]),
        "peer_compute": peer["t_compute1"] - peer["t_compute0"],  # SpanModel forward + copy to CPU
        "peer_encode": pack_tensor_s + (peer["t_packed"] - peer["t_write0"]),  # pack_tensor + msgpack
        "wire_to_client": arrived_at_client - peer["t_packed"],
        "client_decode_check": hop.get("msgpack_unpack_s", 0) + (hop["t1"] - hop["t_read"]),  # + shape, isfinite
    }
    parts["round_trip"] = hop["t1"] - hop["t0"]
    parts["round_trip_minus_compute"] = parts["round_trip"] - parts["peer_compute"]
    return parts


def _median_ms(rows: list[dict]) -> dict:
    return {key: ms_median([r[key] for r in rows]) for key in rows[0]}


def summarize_breakdown(cp: probe.ClientProbe, peer_records: list[dict], stamps, prompt_len: int, route) -> dict:
    peers = {(r["span"], r["position"]): r for r in peer_records}
    hops = {(h["span"], h["position"]): h for h in cp.hops}
    steps, per_hop = [], [[] for _ in route]
    # forward k (k >= 1) is decode step k: it runs between stamps[k] and stamps[k + 1] at position prompt_len + k - 1
    for k in range(1, len(cp.forwards)):
        position = prompt_len + k - 1
        fwd, sess, loop_step = cp.forwards[k], cp.session_steps[k], cp.loop_steps[k]
        hop_parts = [_hop_parts(hops[(span, position)], peers[(span, position)]) for _, span in route]
        for i, parts in enumerate(hop_parts):
            per_hop[i].append(parts)
        round_trips = sum(p["round_trip"] for p in hop_parts)
        steps.append({
            "step_total": stamps[k + 1] - stamps[k],
            "client_generate_loop": (stamps[k + 1] - stamps[k]) - (fwd["t1"] - fwd["t0"]),
            "client_embed_norm_head": (fwd["t1"] - fwd["t0"]) - (sess["t1"] - sess["t0"]),
            "client_sync_facade": (sess["t1"] - sess["t0"]) - (loop_step["t1"] - loop_step["t0"]),
            "client_between_hops": (loop_step["t1"] - loop_step["t0"]) - round_trips,
            "hops_round_trips": round_trips,
            "hops_compute": sum(p["peer_compute"] for p in hop_parts),
            "hops_non_compute": sum(p["round_trip_minus_compute"] for p in hop_parts),
        })
    return {
        "decode_steps": len(steps),
        "route": [span for _, span in route],
        "step_ms": _median_ms(steps),
        "per_hop_ms": [{"span": span, **_median_ms(rows)} for (_, span), rows in zip(route, per_hop)],
        "note": "medians over decode steps of each part; medians need not sum exactly to the median total",
    }


# ---------------------------------------------------------------- summary


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the points."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    return slope, my - slope * mx


def summarize(local: dict, swarms: dict[int, dict]) -> dict:
    out = {
        "local_decode_tokens_s": round(local["decode_tokens_s"], 2),
        "local_step_ms": round(local["step_ms"], 3),
        "swarm_decode_tokens_s": {str(n): round(r["decode_tokens_s"], 2) for n, r in swarms.items()},
        "swarm_step_ms": {str(n): round(r["step_ms"], 3) for n, r in swarms.items()},
        "swarm_over_local_tokens_s": {str(n): round(r["decode_tokens_s"] / local["decode_tokens_s"], 4)
                                      for n, r in swarms.items()},
    }
    if 1 in swarms:
        out["one_peer_overhead_ms"] = round(swarms[1]["step_ms"] - local["step_ms"], 3)
    if len(swarms) >= 2:
        slope, intercept = least_squares(list(swarms), [r["step_ms"] for r in swarms.values()])
        out["per_extra_peer_ms"] = round(slope, 3)
        out["fit_intercept_ms"] = round(intercept, 3)
    return out


# ---------------------------------------------------------------- main


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_decode."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_path, local_model = prepare_model(args, work)
        config = local_model.config
        for n in args.peers:
            if not 1 <= n <= config.num_hidden_layers:
                raise SystemExit(f"--peers: {n} peers cannot split {config.num_hidden_layers} blocks")
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(4, config.vocab_size, (1, args.prompt_tokens), generator=gen).to(args.device)
        result = {"benchmark": "decode", "machine": machine_info(args.device), "model": model_info(config, model_path),
                  "settings": {"dtype": args.dtype, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                               "repeats": args.repeats, "peers": args.peers, "greedy": True, "batch_size": 1}}
        local = measure(local_model, prompt, args, "local")
        local["split"] = local_forward_ms(local_model, prompt, args.new_tokens)
        swarms = {}
        peer_flags = ["--device", args.device, "--dtype", args.dtype]
        with ProbedSwarm(model_path, work, peer_flags, startup_timeout_s=args.startup_timeout_s,
                         peer_threads=args.threads) as swarm:
            swarm.num_layers = config.num_hidden_layers
            blocked: list[str] = []
            for n in args.peers:
                swarms[n] = run_swarm(swarm, model_path, n, prompt, local, blocked, args)
        again = measure(local_model, prompt, args, "local (again, after the swarms)")
        local["step_ms_before_after"] = [round(local["step_ms"], 4), round(again["step_ms"], 4)]
        local["runs"] += again["runs"]
        local["decode_tokens_s"] = statistics.median(r["decode_tokens_s"] for r in local["runs"])
        local["step_ms"] = statistics.median(r["step_ms"] for r in local["runs"])
        local.pop("tokens")
        result.update(local=local, swarm={str(n): r for n, r in swarms.items()}, summary=summarize(local, swarms))
        return result
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    result = run(args)
    result["wall_s"] = round(time.monotonic() - start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
