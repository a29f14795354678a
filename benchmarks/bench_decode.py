"""Single-session decode speed through 1, 2 and 4 peers, against local transformers `generate`, same run.

Each peer is a real `swarm peer` process (client.launcher.LocalSwarm) on loopback, so every figure
includes the process boundaries and both p2pd hops of each span. Prints one JSON object on stdout;
progress goes to stderr. README.md beside this file explains every figure.

Method:
  * one checkpoint, dtype, device and prompt for the local model and every swarm; greedy decoding with
    EOS disabled, so every run produces exactly --new-tokens (N) tokens;
  * a warm-up generation first (for a swarm it also starts the client's transport);
  * decode only: a streamer stamps every new token; decode rate = (N - 1) / (t_token_N - t_token_1),
    which leaves prefill and route opening out; --repeats runs, medians reported;
  * per-hop overhead: least-squares slope of the decode step time over the number of peers (the
    compute is the same for every split), and the 1-peer step time minus the local one; measured with
    server-to-server steps (the default: n + 1 hops a step) and again on the client path (2n hops);
  * one more generation per swarm with timing probes on both sides of each hop (benchmarks/probe.py):
    where a decode step's time goes (generate loop, head, sync facade, codec, wire, compute).

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
from itertools import pairwise
from pathlib import Path

import probe  # benchmarks/probe.py, beside this file
import torch

from client.launcher import LocalSwarm, Proc

HERE = Path(__file__).resolve().parent

# Llama-3-8B's architecture (meta-llama/Meta-Llama-3-8B config.json), random weights.
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},  # transformers 5 spelling of rope_theta
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)


def log(message: str) -> None:
    print(f"[bench_decode {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def add_model_args(p: argparse.ArgumentParser, threads_help: str) -> None:
    """The model and machine flags of every benchmark here (what `prepare_model` reads)."""
    p.add_argument("--num-layers", type=int, default=8, help="tiny model: blocks")
    p.add_argument("--hidden-size", type=int, default=64, help="tiny model: hidden size")
    p.add_argument("--family", default="llama", help="tiny model family (swarm.tiny.FAMILIES)")
    p.add_argument("--model", help="an existing checkpoint folder instead of a built one")
    p.add_argument("--llama8b", action="store_true", help="build a random Llama-3-8B-shaped model, 16 GB")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: local model, client head, peers")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 otherwise")
    p.add_argument("--threads", type=int, default=1, help=threads_help)
    p.add_argument("--work-dir", help="where checkpoints go (kept; an 8B one there is reused); default: temp")


def finish_model_args(args: argparse.Namespace) -> None:
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", help="comma-separated peer counts (default 1,2,4; 1,2 with --llama8b)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (N)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    add_model_args(p, threads_help="torch CPU threads here (local model, client) and in each peer (--num-threads)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the probed generation per swarm")
    p.add_argument("--peer-flags", default="", help="more `swarm peer` flags, e.g. --peer-flags=--no-cuda-graphs")
    p.add_argument("--startup-timeout-s", type=float, default=300.0)
    args = p.parse_args(argv)
    finish_model_args(args)
    args.peers = [int(n) for n in (args.peers or ("1,2" if args.llama8b else "1,2,4")).split(",")]
    if args.new_tokens < 3:
        p.error("--new-tokens must be >= 3 (a decode rate needs two decode steps)")
    return args


# ---------------------------------------------------------------- model


def build_llama8b(out_dir: Path, device: str, dtype: torch.dtype):
    """A random Llama-3-8B-shaped model, initialised on `device` (fast there), saved sharded; returns it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA3_8B)
    if (config.rope_parameters or {}).get("rope_theta") != 500000.0:
        raise RuntimeError(f"rope_theta did not reach the config: {config.rope_parameters}")
    start = time.monotonic()
    torch.manual_seed(0)
    with torch.device(device):  # parameters are created, and randomly initialised, on the device
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    log(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters on {device} "
        f"in {time.monotonic() - start:.1f} s; saving to {out_dir}")
    start = time.monotonic()
    model.save_pretrained(out_dir, max_shard_size="5GB")  # model-0000k-of-0000n.safetensors + index
    log(f"saved in {time.monotonic() - start:.1f} s: {sorted(p.name for p in out_dir.iterdir())}")
    return model


def prepare_model(args, work: Path):
    """(checkpoint folder, local reference model on the device, in the dtype)."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.llama8b:
        path = work / "llama3-8b-random"
        if not (path / "model.safetensors.index.json").is_file():  # written last: the build completed
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            return path, build_llama8b(path, args.device, dtype)
        log(f"reusing {path}")
    elif args.model:
        path = Path(args.model)
    else:
        from swarm.tiny import make_tiny_model

        path = make_tiny_model(args.family, work / f"tiny-{args.family}", num_layers=args.num_layers,
                               hidden_size=args.hidden_size)
    return path, AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(args.device).eval()


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
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU figures
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


def generate_timed(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], list[float], float]:
    """(new token ids, stamps [1 + new_tokens], start time) of one greedy generation without EOS."""
    clock = StepClock()
    start = probe.now()
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0, streamer=clock,
    )
    tokens = out[0, prompt.shape[1]:].tolist()
    if len(tokens) != new_tokens or len(clock.stamps) != new_tokens + 1:
        raise RuntimeError(f"generated {len(tokens)} tokens ({len(clock.stamps)} stamps), not {new_tokens}")
    return tokens, clock.stamps, start


def timed_runs(model, prompt: torch.Tensor, args, what: str) -> tuple[list[dict], list[float], list[int]]:
    """Warm-up, then --repeats timed generations: (per-run figures, every step in ms, warm-up tokens)."""
    log(f"{what}: warm-up")
    tokens, _, _ = generate_timed(model, prompt, args.new_tokens)
    runs, steps_ms = [], []
    for _ in range(args.repeats):
        _, stamps, start = generate_timed(model, prompt, args.new_tokens)
        decode_s = stamps[-1] - stamps[1]
        steps_ms += [1e3 * (b - a) for a, b in pairwise(stamps[1:])]
        runs.append({"decode_tokens_s": (args.new_tokens - 1) / decode_s,
                     "step_ms": 1e3 * decode_s / (args.new_tokens - 1), "first_token_s": stamps[1] - start})
        log(f"{what}: {runs[-1]['decode_tokens_s']:.1f} tokens/s ({runs[-1]['step_ms']:.2f} ms/step), "
            f"first token after {runs[-1]['first_token_s']:.3f} s")
    return runs, steps_ms, tokens


def figures(runs: list[dict], steps_ms: list[float]) -> dict:
    """Medians over runs (and over single steps, with a p90, to show the spread)."""
    return {
        "decode_tokens_s": statistics.median(r["decode_tokens_s"] for r in runs),
        "step_ms": statistics.median(r["step_ms"] for r in runs),
        "step_ms_p50_all_steps": statistics.median(steps_ms),
        "step_ms_p90_all_steps": quantile(steps_ms, 0.9),
        "first_token_s": statistics.median(r["first_token_s"] for r in runs),
        "runs": runs,
    }


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms_median(seconds: list[float]) -> float:
    return round(1e3 * statistics.median(seconds), 4)


def local_split(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    """A local decode step split into the model's forward and the rest of generate (medians, ms).

    On CUDA the forward is timed up to a synchronize, so it holds the GPU's time (one extra wait a step).
    """
    durations: list[float] = []
    original = model.forward
    cuda = prompt.device.type == "cuda"

    def forward(*a, **kw):
        start = probe.now()
        try:
            return original(*a, **kw)
        finally:
            if cuda:
                torch.cuda.synchronize()
            durations.append(probe.now() - start)

    model.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        _, stamps, _ = generate_timed(model, prompt, new_tokens)
    finally:
        del model.forward
    steps = [b - a for a, b in pairwise(stamps[1:])]
    fwd = durations[1:]  # [0] is the prefill
    return {"step_ms": ms_median(steps), "forward_ms": ms_median(fwd),
            "generate_rest_ms": ms_median([s - f for s, f in zip(steps, fwd, strict=True)])}


# ---------------------------------------------------------------- swarm


def even_spans(num_layers: int, n: int) -> list[str]:
    bounds = [round(i * num_layers / n) for i in range(n + 1)]
    return [f"{a}:{b}" for a, b in pairwise(bounds)]


class ProbedSwarm(LocalSwarm):
    """LocalSwarm whose peers run `swarm peer` through benchmarks/probe.py: the same CLI, plus step probes."""

    def __init__(self, model_path, probe_dir: Path, peer_flags: list[str], **kwargs):
        super().__init__(str(model_path), **kwargs)
        self.probe_dir = probe_dir
        self.peer_flags = peer_flags

    def start_probed_peers(self, spans: list[str]) -> list[tuple[Proc, str, Path]]:
        """Start one peer per span, concurrently; (process, peer id, probe file) each, when all are ready."""
        started = []
        for span in spans:
            index = len(self.peers)
            probe_file = self.probe_dir / f"probe-{index}.jsonl"
            args = ["peer", "--model", self.model_path, "--blocks", span, "--initial-peers",
                    *self.initial_peers, *self.peer_args, *self.peer_flags]
            proc = _spawn_probed(f"peer{index}[{span}]", args, probe_file)
            self.procs.append(proc)
            self.peers[proc.name] = proc
            started.append((proc, probe_file))
        return [(proc, _peer_id(self.wait_ready(proc)), file) for proc, file in started]


def _spawn_probed(name: str, args: list[str], probe_file: Path) -> Proc:
    """client.launcher.spawn, with benchmarks/probe.py in front of the `swarm` CLI."""
    popen = subprocess.Popen(
        [sys.executable, str(HERE / "probe.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "SWARM_PROBE_FILE": str(probe_file)},
    )
    proc = Proc(name, popen)
    threading.Thread(target=proc._pump, daemon=True).start()
    return proc


def _peer_id(ready_line: str) -> str:
    fields = dict(part.split("=", 1) for part in ready_line.split()[1:] if "=" in part)
    return fields["peer_id"]


def measure_swarm(swarm: ProbedSwarm, model_path: Path, spans: list[str], prompt, local_tokens: list[int],
                  blocked: list[str], args) -> dict:
    """Start one peer per span, measure a client through them (never through `blocked`), stop them."""
    from client import ClientConfig, DistributedModelForCausalLM

    what = f"swarm[{len(spans)}]"
    log(f"{what}: starting peers {spans}")
    start = time.monotonic()
    peers = swarm.start_probed_peers(spans)
    log(f"{what}: peers ready in {time.monotonic() - start:.1f} s")
    ids = [peer_id for _, peer_id, _ in peers]
    result = {"spans": spans}
    try:
        # server-to-server steps (the default), then the client path (every hop sent by the client) for
        # comparison; the probed breakdown follows the client path, whose hops the client probes see
        for server_to_server in (True, False):
            config = ClientConfig(initial_peers=tuple(swarm.initial_peers), blocked_peers=tuple(blocked),
                                  wait_for_route_s=60, server_to_server=server_to_server)
            model = DistributedModelForCausalLM.from_pretrained(
                model_path, client_config=config, dtype=getattr(torch, args.dtype), device=args.device
            )
            try:
                name = what if server_to_server else f"{what} client path"
                runs, steps_ms, tokens = timed_runs(model, prompt, args, name)
                figs = {**figures(runs, steps_ms), "tokens_equal_local": tokens == local_tokens}
                if server_to_server:
                    result.update(figs)
                else:
                    result["client_path"] = figs
                    if not args.no_breakdown:
                        result["breakdown"] = probed_generation(model, prompt, args, [f for _, _, f in peers], ids)
            finally:
                model.shutdown()
    finally:
        for proc, _, _ in peers:
            proc.stop()
        blocked.extend(ids)
    return result


# ---------------------------------------------------------------- breakdown


def probed_generation(model, prompt, args, probe_files: list[Path], peer_ids: list[str]) -> dict:
    """One generation with probes on both sides of every hop; medians over its decode steps, in ms."""
    try:
        with model.inference_session(max_length=prompt.shape[1] + args.new_tokens) as session:
            with probe.ClientProbe(cuda_sync=args.device.startswith("cuda")) as cp:
                _, stamps, start = generate_timed(model, prompt, args.new_tokens)
            route = [(hop.peer_id, str(hop.span)) for hop in session.route]
        if [peer_id for peer_id, _ in route] != peer_ids:
            raise RuntimeError(f"the client routed through {route}, not the peers just started {peer_ids}")
        records = _wait_peer_records(probe_files, start, len(route) * args.new_tokens)
        return summarize_breakdown(cp, records, stamps, prompt.shape[1], route)
    except (AttributeError, KeyError, IndexError, RuntimeError) as e:  # probes out of step with the code
        log(f"breakdown failed: {e!r}")
        return {"error": repr(e)}


def _wait_peer_records(probe_files: list[Path], start: float, expected: int) -> list[dict]:
    """A peer writes a step's record just after sending its reply, so the last one may lag a little."""
    deadline = time.monotonic() + 10
    while True:
        records = probe.read_peer_records(probe_files, start, probe.now() + 1)
        if len(records) >= expected or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def hop_parts(hop: dict, peer: dict) -> dict:
    """One hop of one step, split (seconds); the parts add up to the client's SpanStream.step round trip.

    A "wire" part runs from a message serialized on one side (about to be written to its socket) to the
    same message read on the other, just before it is unpacked: the socket write, TLS (a direct stream)
    or both p2pd daemons, TCP over loopback, and the receiver's event loop waking up and reading it.
    """
    arrived_at_peer = peer["t_read"] - peer["unpack_s"]
    arrived_at_client = hop["t_read"] - hop.get("msgpack_unpack_s", 0)
    peer_pack = peer.get("pack_tensor_s", 0)
    to_thread = peer["t_compute0"] - (peer["t_read"] + peer["parse_s"])
    from_thread = peer["t_write0"] - peer_pack - peer["t_compute1"]
    parts = {
        "client_encode": hop["t_packed"] - hop["t0"],  # .to(dtype), pack_tensor x3, msgpack
        "wire_to_peer": arrived_at_peer - hop["t_packed"],
        "peer_decode_validate": peer["unpack_s"] + peer["parse_s"],  # msgpack, parse_step
        "peer_thread_handoff": to_thread + from_thread,  # inbox, scheduler (compute thread or inline), back
        "peer_compute": peer["t_compute1"] - peer["t_compute0"],  # SpanModel forward, copy to CPU
        "peer_encode": peer_pack + (peer["t_packed"] - peer["t_write0"]),  # pack_tensor, msgpack
        "wire_to_client": arrived_at_client - peer["t_packed"],
        "client_decode_check": hop.get("msgpack_unpack_s", 0) + (hop["t1"] - hop["t_read"]),  # isfinite
    }
    parts["round_trip"] = hop["t1"] - hop["t0"]
    parts["round_trip_minus_compute"] = parts["round_trip"] - parts["peer_compute"]
    return parts


def step_parts(stamps, k: int, fwd: dict, sess: dict, loop_step: dict, hops: list[dict]) -> dict:
    """Decode step k (stamps k to k + 1), split (seconds); client_* parts and round trips add up to it."""
    total = stamps[k + 1] - stamps[k]
    round_trips = sum(p["round_trip"] for p in hops)
    return {
        "step_total": total,
        "client_generate_loop": total - (fwd["t1"] - fwd["t0"]),  # HF processors, stopping, streamer
        "client_embed_norm_head": (fwd["t1"] - fwd["t0"]) - (sess["t1"] - sess["t0"]),
        "client_sync_facade": (sess["t1"] - sess["t0"]) - (loop_step["t1"] - loop_step["t0"]),
        "client_sync_facade_to_loop": loop_step["t0"] - sess["t0"],  # with session.step's tensor prep
        "client_sync_facade_from_loop": sess["t1"] - loop_step["t1"],
        "client_between_hops": (loop_step["t1"] - loop_step["t0"]) - round_trips,
        "hops_round_trips": round_trips,
        "hops_compute": sum(p["peer_compute"] for p in hops),
        "hops_non_compute": sum(p["round_trip_minus_compute"] for p in hops),
    }


def summarize_breakdown(cp: probe.ClientProbe, peer_records: list[dict], stamps, prompt_len: int,
                        route) -> dict:
    peers = {(r["span"], r["position"]): r for r in peer_records}
    hops = {(h["span"], h["position"]): h for h in cp.hops}
    steps, per_hop = [], [[] for _ in route]
    for k in range(1, len(cp.forwards)):  # forward 0 is the prefill; forward k feeds position P + k - 1
        position = prompt_len + k - 1
        parts = [hop_parts(hops[(span, position)], peers[(span, position)]) for _, span in route]
        for rows, hop in zip(per_hop, parts, strict=True):
            rows.append(hop)
        steps.append(step_parts(stamps, k, cp.forwards[k], cp.session_steps[k], cp.loop_steps[k], parts))
    return {
        "decode_steps": len(steps),
        "route": [span for _, span in route],
        "step_ms": _median_ms(steps),
        "step_ms_p90": {key: round(1e3 * quantile([r[key] for r in steps], 0.9), 4) for key in steps[0]},
        "per_hop_ms": [{"span": span, **_median_ms(rows)}
                       for (_, span), rows in zip(route, per_hop, strict=True)],
        "note": "medians over the decode steps of each part; medians need not add up to the median total",
    }


def _median_ms(rows: list[dict]) -> dict:
    return {key: ms_median([r[key] for r in rows]) for key in rows[0]}


# ---------------------------------------------------------------- summary


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the points."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else float("nan")
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
        paths = [r["client_path"]["step_ms"] for r in swarms.values()]
        out["per_extra_peer_ms_client_path"] = round(least_squares(list(swarms), paths)[0], 3)
    out["client_path_step_ms"] = {str(n): round(r["client_path"]["step_ms"], 3) for n, r in swarms.items()}
    per_hop = {str(n): round(statistics.median(h["round_trip_minus_compute"] for h in hops), 3)
               for n, r in swarms.items() if (hops := r.get("breakdown", {}).get("per_hop_ms"))}
    if per_hop:
        out["probed_non_compute_ms_per_hop"] = per_hop
    return out


# ---------------------------------------------------------------- main


def run(args, work: Path) -> dict:
    torch.set_num_threads(args.threads)
    model_path, local_model = prepare_model(args, work)
    config = local_model.config
    for n in args.peers:
        if not 1 <= n <= config.num_hidden_layers:
            raise SystemExit(f"--peers: {n} peers cannot split {config.num_hidden_layers} blocks")
    seeded = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, config.vocab_size, (1, args.prompt_tokens), generator=seeded).to(args.device)
    result = {
        "benchmark": "decode", "machine": machine_info(args.device), "model": model_info(config, model_path),
        "settings": {"dtype": args.dtype, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                     "repeats": args.repeats, "peers": args.peers, "greedy": True, "batch_size": 1,
                     "peer_flags": args.peer_flags},
    }
    runs, steps_ms, local_tokens = timed_runs(local_model, prompt, args, "local")
    split = local_split(local_model, prompt, args.new_tokens)
    swarms = {}
    with ProbedSwarm(model_path, work, ["--device", args.device, "--dtype", args.dtype, *args.peer_flags.split()],
                     startup_timeout_s=args.startup_timeout_s, peer_threads=args.threads) as swarm:
        blocked: list[str] = []  # the peers of earlier splits: stopped, and never routed through
        for n in args.peers:
            spans = even_spans(config.num_hidden_layers, n)
            swarms[n] = measure_swarm(swarm, model_path, spans, prompt, local_tokens, blocked, args)
    # local again, after the swarms: the local figure is the median over both sets of runs
    runs_after, steps_after, _ = timed_runs(local_model, prompt, args, "local (again)")
    local = figures(runs + runs_after, steps_ms + steps_after)
    local["step_ms_before_after"] = [round(statistics.median(r["step_ms"] for r in rs), 4)
                                     for rs in (runs, runs_after)]
    local["split"] = split
    result.update(local=local, swarm={str(n): r for n, r in swarms.items()}, summary=summarize(local, swarms))
    return result


def run_benchmark(args, run, prefix: str) -> int:
    """Run `run(args, work_dir)` in a work folder (temporary unless --work-dir) and print its JSON result."""
    start = time.monotonic()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - start, 1)
    result["machine"]["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))
    return 0


def main(argv=None) -> int:
    return run_benchmark(parse_args(argv), run, "bench_decode.")


if __name__ == "__main__":
    sys.exit(main())
