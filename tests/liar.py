"""A lying peer, for tests only: a wrapper that makes a running PeerServer return wrong hidden states.

Not a production flag: nothing in peer/ knows about it. `LyingPeer(server, ...).install()` replaces the
server's step runner (or hooks one block of its span) so that its results are perturbed:

    probability   each step lies with this probability (1.0: always)
    honest_steps  the first N steps it serves are honest
    block         lie on this block of its span only (a forward hook on that layer), else on its output
    scale         the perturbation's size, relative to each token's hidden-state norm

The perturbation is Gaussian noise of relative norm `scale` per token, drawn from a seeded generator, so
a test is reproducible. Its KV cache stays honest (only outputs are changed, or one block's output,
which the later blocks of its span then see), like a peer whose device corrupts results.
"""

from __future__ import annotations

import random

import torch


class LyingPeer:
    def __init__(self, server, *, probability: float = 1.0, honest_steps: int = 0, block: int | None = None,
                 scale: float = 0.5, seed: int = 0):
        self.server = server
        self.probability = probability
        self.honest_steps = honest_steps
        self.block = block
        self.scale = scale
        self.rng = random.Random(seed)
        self.noise = torch.Generator().manual_seed(seed)
        self.steps = 0  # steps (or, with `block`, forwards of that block) served since install
        self.lies = 0
        self.first_lie: int | None = None  # the step number of its first lie
        self._original = None
        self._hook = None

    @property
    def peer_id(self) -> str:
        return self.server.peer_id

    def install(self) -> LyingPeer:
        if self.block is not None:
            span = self.server.span
            if not span.start <= self.block < span.end:
                raise ValueError(f"block {self.block} is not in the peer's span {span}")
            layer = self.server.span_model.layers[self.block - span.start]
            self._hook = layer.register_forward_hook(self._perturb_layer)
        else:
            self._original = self.server._run_step

            async def lying_run_step(session, request, cohort_end):
                return self._maybe(await self._original(session, request, cohort_end))

            self.server._run_step = lying_run_step
        return self

    def uninstall(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._original is not None:
            self.server._run_step = self._original
            self._original = None

    def _lies_now(self) -> bool:
        self.steps += 1
        if self.steps <= self.honest_steps or self.rng.random() >= self.probability:
            return False
        self.lies += 1
        if self.first_lie is None:
            self.first_lie = self.steps
        return True

    def _maybe(self, out: torch.Tensor) -> torch.Tensor:
        return self._perturb(out) if self._lies_now() else out

    def _perturb(self, hidden: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(hidden.shape, generator=self.noise).to(hidden.device, torch.float32)
        norm = hidden.float().norm(dim=-1, keepdim=True)
        noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm * self.scale
        return (hidden.float() + noise).to(hidden.dtype)

    def _perturb_layer(self, module, args, output):
        if not self._lies_now():
            return None
        if isinstance(output, tuple):
            return (self._perturb(output[0]), *output[1:])
        return self._perturb(output)
