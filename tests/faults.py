"""A randomized fault campaign against a real multi-process swarm (used by tests/test_faults.py and
benchmarks/fault_campaign.py).

Each trial generates greedily through a swarm with spare peers for every block while one peer of the
route is hit by a fault: kill -9, SIGSTOP (resumed after the trial) or SIGTERM (drain), at a random
moment: at a step boundary (from the streamer, before the next step is sent) or from a timer thread
while steps are in flight (prefill included). The output must equal local transformers' output.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import ClientConfig, DistributedModelForCausalLM
from client.launcher import LocalSwarm

SPANS = ["0:3", "3:6", "0:6", "0:2", "2:6"]  # every block served by three peers
FAULTS = ("kill", "stop", "term")
SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}


@dataclass
class Trial:
    family: str
    fault: str
    moment: str  # "step k" or "timer t s"
    target_span: str = ""
    equal: bool = False
    recoveries: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass
class Campaign:
    trials: list[Trial] = field(default_factory=list)

    @property
    def failures(self) -> list[Trial]:
        return [t for t in self.trials if not t.equal]


class FamilySwarm:
    """A LocalSwarm for one tiny model, with the peer processes indexed by span and peer id."""

    def __init__(self, model_path, step_timeout_s: float = 2.0, drain_grace_s: float = 20.0):
        self.model_path = str(model_path)
        self.swarm = LocalSwarm(self.model_path)
        self.extra = ["--drain-grace-s", str(drain_grace_s)]
        self.by_span = {}
        self.pending = []  # (span, process) restarts not yet waited for
        for span, proc in zip(SPANS, self.swarm.start_peers(SPANS, extra=self.extra), strict=True):
            self.by_span[span] = proc
            proc.fault = None
        self.client = DistributedModelForCausalLM.from_pretrained(
            self.model_path,
            client_config=ClientConfig(initial_peers=tuple(self.swarm.initial_peers), step_timeout_s=step_timeout_s,
                                       wait_for_route_s=60, min_precision="full"),  # compared with local
        )
        self.local = AutoModelForCausalLM.from_pretrained(self.model_path).eval()

    def _all(self):
        return list(self.by_span.items()) + self.pending

    def proc_of(self, peer_id: str):
        return next((p for _, p in self._all() if peer_id in (getattr(p, "ready_line", "") or "")), None)

    def span_of(self, proc) -> str:
        return next(s for s, p in self._all() if p is proc)

    def wait_restarts(self) -> None:
        """Before a trial: drained peers are gone and replaced, every restarted peer is ready, so each
        block has its three peers again."""
        for span, proc in list(self.by_span.items()):
            if proc.fault == "term" and proc.popen.poll() is None:
                try:
                    proc.popen.wait(60)  # it leaves once no session is left on it
                except subprocess.TimeoutExpired:
                    proc.kill(signal.SIGKILL)
                    proc.popen.wait()
                self.pending.append((span, self.swarm.start_peer(span, extra=self.extra, wait=False)))
        for span, proc in self.pending:
            self.swarm.wait_ready(proc)
            proc.fault = None
            self.by_span[span] = proc
        self.pending = []

    def heal(self) -> None:
        """After a trial: resume stopped peers, start replacements for exited ones (waited for by the
        next trial, so their start-up overlaps the bookkeeping in between)."""
        for span, proc in list(self.by_span.items()):
            proc.kill(signal.SIGCONT)
            if proc.popen.poll() is not None:  # killed, or drained and gone; a draining one is taken next time
                self.pending.append((span, self.swarm.start_peer(span, extra=self.extra, wait=False)))
            elif proc.fault != "term":
                proc.fault = None

    def close(self) -> None:
        try:
            self.client.shutdown()
        finally:
            self.swarm.close()


class _FaultAtStep(BaseStreamer):
    def __init__(self, hit, step: int):
        self.hit, self.step, self.calls = hit, step, 0

    def put(self, value):
        self.calls += 1  # call 1 is the prompt; call k + 1 is new token k
        if self.calls == self.step + 1:
            self.hit()

    def end(self):
        pass


def run_trial(fs: FamilySwarm, family: str, rng: random.Random, prompt, new_tokens: int = 16) -> Trial:
    fault = rng.choice(FAULTS)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = fs.local.generate(prompt, **kwargs)
    trial = Trial(family, fault, "")
    client = fs.client
    fs.wait_restarts()

    choice = rng.random()

    def hit():
        deadline = time.monotonic() + 5
        route = []
        while not route and time.monotonic() < deadline:  # a timer may fire before the route is open
            session = client.active_session
            route = session.route if session is not None else []
            time.sleep(0.001)
        if not route:
            return
        hop = route[int(choice * len(route))]
        proc = fs.proc_of(hop.peer_id)
        if proc is None:  # a restarted peer not yet waited for; leave this trial without a fault
            return
        trial.target_span = fs.span_of(proc)
        proc.fault = fault
        proc.kill(SIGNALS[fault])

    streamer = None
    timer = None
    if rng.random() < 0.5:
        step = rng.randrange(1, new_tokens)
        trial.moment = f"step {step}"
        streamer = _FaultAtStep(hit, step)
    else:
        delay = rng.uniform(0.0, 0.15)
        trial.moment = f"timer {delay:.3f} s"
        timer = threading.Timer(delay, hit)
    started = time.monotonic()
    try:
        with client.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
            if timer is not None:
                timer.start()
            out = client.generate(prompt, streamer=streamer, **kwargs)
            trial.recoveries = session.recoveries
        trial.equal = bool(torch.equal(out, expected))
    except Exception as e:  # a trial's failure is data for the campaign, not a crash of it
        trial.error = f"{type(e).__name__}: {e}"
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()
        trial.seconds = time.monotonic() - started
    fs.heal()
    return trial


def run_campaign(model_paths: dict, trials_per_family: int, seed: int, log=print) -> Campaign:
    rng = random.Random(seed)
    campaign = Campaign()
    prompts = [torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7]]), torch.tensor([[1, 5, 9, 300, 41]])]
    for family, path in model_paths.items():
        fs = FamilySwarm(path)
        try:
            for _ in range(trials_per_family):
                trial = run_trial(fs, family, rng, rng.choice(prompts))
                campaign.trials.append(trial)
                log(f"{family:10s} {trial.fault:4s} at {trial.moment:14s} on {trial.target_span or '-':4s} "
                    f"-> {'equal' if trial.equal else 'DIFFERENT'} ({trial.recoveries} recoveries, "
                    f"{trial.seconds:.1f} s) {trial.error}")
        finally:
            fs.close()
    return campaign
