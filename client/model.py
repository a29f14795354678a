"""DistributedModelForCausalLM: a transformers model whose decoder blocks live in the swarm.

Locally it holds embeddings, final norm and LM head; `forward` sends the new tokens' embeddings
through the route and applies norm + head to what comes back. Transformers' own `generate` does the
rest (greedy, sampling, processors, stopping, streamers, scores), as on a local model.

Generation uses no local cache object: `generate` hands `forward` the whole sequence each step and
`forward` sends only the tokens the session has not seen, so positions stay consistent across several
`generate` calls in one `inference_session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from client import loop
from client.config import ClientConfig
from client.policies import BanList
from client.session import InferenceSession
from client.speculative import Speculative, SpeculationStats, speculative_decode
from client.swarmview import LatencyTable, SnapshotCache
from client.transport import Transport, make_transport
from client.verifier import run_verified
from client.verify import ReportLimiter, Trust, VerifyStats
from swarm.errors import ConfigError, SessionError
from swarm.runtime import SpanModel, load_client_head, load_span
from swarm.runtime.loading import quiet_progress_bars
from swarm.spans import Span, check_model_id, default_model_id
from swarm.swarmkey import SwarmKey, load_optional

logger = logging.getLogger(__name__)


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config, head=None, client_config: ClientConfig | None = None, model_id: str = ""):
        super().__init__(config)
        self.embed_tokens: nn.Module = head.embed_tokens
        self.norm: nn.Module = head.norm
        self.lm_head: nn.Module = head.lm_head
        self.client_config = client_config or ClientConfig()
        self.model_id = model_id
        self.num_blocks = config.num_hidden_layers
        self._transport: Transport | None = None
        self._transport_lock: asyncio.Lock | None = None  # made on the client loop, where it is used
        self._session: InferenceSession | None = None
        # blocks run here instead of on peers (from_pretrained's local_blocks): the first and the last span
        self.local_spans: tuple[SpanModel | None, SpanModel | None] = (None, None)
        self.remote = Span(0, self.num_blocks)  # the blocks peers serve for this client
        self.latencies = LatencyTable()
        self.snapshots = SnapshotCache(self.client_config.snapshot_max_age_s)
        self.bans = BanList(self.client_config.ban_policy)
        # checks of peers' results (client.verify): what this client learned, its draws, counters, reports
        self.trust = Trust()
        self.verify_rng = random.Random(self.client_config.verify_seed)
        self.verify_stats = VerifyStats()
        self.report_limiter = ReportLimiter(self.client_config.max_reports_per_hour)
        self.last_speculation: SpeculationStats | None = None  # what the last speculative generate did

    def _check_and_adjust_experts_implementation(self, experts_implementation):
        return experts_implementation  # no experts run here: MoE blocks live on the peers

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the KV cache lives on the peers

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        initial_peers=(),
        model_id: str | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        client_config: ClientConfig | None = None,
        local_blocks: tuple[int, int] = (0, 0),
        swarm_key: str | Path | SwarmKey | None = None,
    ) -> DistributedModelForCausalLM:
        """Load the local parts of the checkpoint at `path` and attach to the swarm through `initial_peers`.

        `local_blocks=(k_first, k_last)`: run the model's first k_first and last k_last blocks here, so no peer
        sees the embeddings' output (the tokens) or the last hidden states (what the head turns into the
        next token); peers serve only the blocks between. Exact: the same block code as the peers'.

        `swarm_key`: a private swarm's key file (or a loaded SwarmKey); without it a private swarm refuses
        this client (NotAdmitted) when it first reaches the swarm."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path}: no such model folder (the client needs config.json and the checkpoint)")
        if isinstance(initial_peers, str):
            initial_peers = [initial_peers]
        key = load_optional(swarm_key)
        client_config = client_config or ClientConfig(initial_peers=tuple(initial_peers), model_id=model_id,
                                                      swarm_key=key)
        if initial_peers and not client_config.initial_peers:
            raise ConfigError("pass initial_peers either directly or in client_config, not both")
        if key is not None and client_config.swarm_key != key:
            raise ConfigError("pass swarm_key either directly or in client_config, not both")
        with quiet_progress_bars():  # a client loads three small tensors; no bar needed
            head = load_client_head(path, dtype=dtype, device=device)
        mid = check_model_id(model_id or client_config.model_id or default_model_id(str(path)))
        model = cls(head.config, head, client_config, mid)
        model._load_local_blocks(path, local_blocks, dtype, device)
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        else:
            model.generation_config = GenerationConfig.from_model_config(head.config)
        model.eval()
        return model

    def _load_local_blocks(self, path: Path, local_blocks: tuple[int, int], dtype, device) -> None:
        first, last = local_blocks
        if type(first) is not int or type(last) is not int or first < 0 or last < 0:
            raise ConfigError(f"local_blocks={local_blocks!r}: expected two block counts >= 0")
        if first + last >= self.num_blocks:
            raise ConfigError(f"local_blocks={local_blocks!r} leaves no block of the {self.num_blocks} to the swarm; "
                              "run the model with transformers locally instead")
        bounds = ((0, first), (self.num_blocks - last, self.num_blocks))
        with quiet_progress_bars():
            self.local_spans = tuple(SpanModel(load_span(path, Span(a, b), dtype=dtype, device=device)) if b > a
                                     else None for a, b in bounds)
        self.remote = Span(first, self.num_blocks - last)

    # ------------------------------------------------------------ network

    async def transport(self) -> Transport:
        """This model's transport, started on first use (once, however many sessions ask at a time)."""
        if self._transport_lock is None:
            self._transport_lock = asyncio.Lock()
        async with self._transport_lock:
            if self._transport is None:
                self._transport = await make_transport(
                    self.client_config.transport, self.client_config.initial_peers,
                    self.client_config.connect_timeout_s, direct=self.client_config.direct,
                    swarm_key=self.client_config.swarm_key,
                )
        return self._transport

    def shutdown(self) -> None:
        """Close the active session and leave the swarm (stops this client's p2pd)."""
        if self._session is not None:
            self._session.close()
        if self._transport is not None:
            loop.run(self._transport.shutdown(), timeout_s=10)
            self._transport = None

    # ------------------------------------------------------------ sessions

    def inference_session(self, max_length: int) -> InferenceSession:
        """A conversation whose `generate` calls continue from one another; max_length bounds the whole."""
        if self._session is not None:
            raise SessionError("an inference session is already active on this model; close it first")
        if max_length < 1:
            raise SessionError("max_length must be >= 1")
        self._session = InferenceSession(self, max_length)
        return self._session

    def _session_closed(self, session: InferenceSession) -> None:
        if self._session is session:
            self._session = None

    @property
    def active_session(self) -> InferenceSession | None:
        return self._session

    # ------------------------------------------------------------ generate / forward

    @torch.inference_mode()
    def generate(self, inputs: torch.Tensor | None = None, speculative=None, **kwargs):
        """transformers' `generate`, through the swarm. `speculative` (True / "ngram" / a Speculative):
        draft tokens locally and verify them through the route in one step each (client.speculative), the
        same tokens as without; HF's `prompt_lookup_num_tokens=k` and `assistant_model=m` map to it."""
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise SessionError("generate needs input_ids (prompts as token ids)")
        num_beams = kwargs.get("num_beams") or self.generation_config.num_beams or 1
        if num_beams > 1:
            raise ConfigError("beam search is not supported over the swarm; use greedy or sampling")
        spec = Speculative.of(speculative, kwargs.pop("prompt_lookup_num_tokens", None),
                              kwargs.pop("assistant_model", None))
        if spec is not None:
            spec.check(self)
            kwargs["custom_generate"] = functools.partial(speculative_decode, speculative=spec,
                                                          streamer=kwargs.pop("streamer", None))
        if self._session is not None:
            return self._generate_in(self._session, input_ids, kwargs)
        with self.inference_session(max_length=self._worst_length(input_ids, kwargs)) as session:
            return self._generate_in(session, input_ids, kwargs)

    def _worst_length(self, input_ids: torch.Tensor, kwargs: dict) -> int:
        max_new = kwargs.get("max_new_tokens") or self.generation_config.max_new_tokens
        if max_new is not None:
            return input_ids.shape[1] + max_new
        return kwargs.get("max_length") or self.generation_config.max_length or input_ids.shape[1] + 20

    def _generate_in(self, session: InferenceSession, input_ids: torch.Tensor, kwargs: dict):
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if session.pending is not None:  # the previous call's last token was returned but never fed
            pending = session.pending.to(input_ids.device)
            input_ids = torch.cat([pending, input_ids], dim=1)
            attention_mask = torch.cat([torch.ones_like(pending), attention_mask], dim=1)
            session.pending = None
        session.call_start = session.position
        # checked: a peer caught returning wrong results makes the call run again (client.verifier)
        attempt = functools.partial(super().generate, input_ids, attention_mask=attention_mask, **kwargs)
        out = run_verified(session, attempt)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        fed = session.position - session.call_start
        session.pending = sequences[:, fed:] if sequences.shape[1] > fed else None
        return out

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for the tokens the session has not seen yet ([batch, new, vocab]); with `logits_to_keep`
        = k > 0 for the last k of them only (what `generate` asks for: a 2048-token prompt's full logits
        would be 2048 x vocab floats, over 1 GB for Llama 3, for the one row it reads)."""
        with contextlib.ExitStack() as stack:
            session = self._session
            one_shot = session is None
            if one_shot:  # a plain forward call: a one-shot session
                session = stack.enter_context(self.inference_session(max_length=self._length_of(input_ids, inputs_embeds)))
            # generate may hand us the whole sequence or only its unseen tail (transformers versions differ);
            # the attention mask always spans the whole sequence, so it tells how many tokens are new
            fed = session.position - session.call_start
            given = input_ids if input_ids is not None else inputs_embeds
            total = attention_mask.shape[1] if attention_mask is not None else max(given.shape[1], fed + 1)
            new = min(total - fed, given.shape[1])
            if new <= 0:
                raise SessionError("no new tokens to process in this forward call")
            if inputs_embeds is None:
                inputs_embeds = self.embed_tokens(input_ids[:, -new:])
            else:
                inputs_embeds = inputs_embeds[:, -new:]
            if attention_mask is None:
                valid = torch.ones(inputs_embeds.shape[:2], dtype=torch.bool)
            else:
                valid = attention_mask[:, -new:].bool()
            if one_shot:  # its result is checked before it returns
                hidden = run_verified(session, functools.partial(session.step, inputs_embeds, valid))
            else:
                hidden = session.step(inputs_embeds, valid)
            if logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:]
            logits = self.lm_head(self.norm(hidden)).float()
        return CausalLMOutputWithPast(logits=logits)

    @staticmethod
    def _length_of(input_ids, inputs_embeds) -> int:
        return (input_ids if input_ids is not None else inputs_embeds).shape[1]
