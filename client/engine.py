"""Engine: text generations through the swarm for many requests at once (what `swarm api` serves).

One `DistributedModelForCausalLM` (its embeddings, head and transport) serves every request; each
generation is an `InferenceSession` of its own (one per choice), driven step by step on a worker thread,
so concurrent requests are concurrent swarm sessions and share the peers' batching.

Exactness: a generation picks its tokens as the client library's `generate` does (HF's own logits
warpers, in HF's order: temperature, then top-p; greedy is argmax of the float32 logits), and samples with
a torch.Generator of its own seeded with the request's seed, so concurrent requests never share random
draws: `torch.manual_seed(seed); model.generate(ids, do_sample=True, temperature=t, top_p=p, top_k=0)`
gives the same tokens. With no seed a random one is drawn. Choice i of a request samples with seed + i.

A generation stops at EOS, at a stop string (the text is cut before it), at max_tokens, or when its
consumer cancels it (`Generation.cancel`, e.g. an HTTP client that went away): the session is closed
after the step in flight, so the peers free it at once.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from client.session import InferenceSession
from client.verify import Rewound
from swarm.errors import SessionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How one generation picks tokens. temperature 0 = greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def warpers(self) -> LogitsProcessorList:
        """What `generate(do_sample=True, temperature, top_p, top_k=0)` applies to the logits (none for greedy)."""
        warpers = LogitsProcessorList()
        if self.temperature == 0:
            return warpers
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


@dataclass
class Piece:
    """What a generation yields: new text (possibly empty) and, on the last piece, why it ended."""

    text: str
    tokens: int  # completion tokens so far (an EOS that ended the generation included)
    finish_reason: str | None = None  # "stop" | "length" | None while running


class Generation:
    """One generation's token loop; iterate it on a worker thread (each step blocks on the swarm)."""

    def __init__(self, model, tokenizer, prompt_ids: Sequence[int], sampling: Sampling, *, stream: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.stream = stream  # False: one piece at the end, after every check (a repair never shows)
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self._cancelled = threading.Event()
        seed = sampling.seed if sampling.seed is not None else random.SystemRandom().randrange(2**63)
        self._seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def cancel(self) -> None:
        """Stop after the step in flight (thread-safe); the iterator then ends without a finish reason."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[Piece]:
        """The pieces of the completion. With checks on (client.verify), a peer caught returning wrong
        results makes the generation run again from the prompt in the same session, with the same random
        draws (the checked positions are answered from the trail, the rest go to an honest route): the
        pieces sent before are not sent again; if text already streamed turns out wrong, the generation ends
        with SessionError (the liar is banned by then: the request can be sent again). Not `stream`: the
        whole completion comes as one piece once checked, so a repair never shows."""
        s, model = self.sampling, self.model
        with torch.inference_mode(), InferenceSession(model, len(self.prompt_ids) + s.max_tokens) as session:
            verifier = session.verifier
            if verifier is None:
                yield from self._attempt(session)
                return
            limit = model.client_config.verify_max_rewinds
            sent = ""  # text already yielded
            verifier.begin_call()
            try:
                for _ in range(limit + 1):
                    self._generator.manual_seed(self._seed)
                    text = ""
                    try:
                        for piece in self._attempt(session, settle=verifier.settle):
                            text += piece.text
                            if not self.stream and piece.finish_reason is None:
                                continue
                            if not (text.startswith(sent) or sent.startswith(text)):
                                raise SessionError(
                                    "a peer was caught returning wrong results after part of this reply was "
                                    "sent; it is banned now: send the request again")
                            if len(text) > len(sent) or piece.finish_reason is not None:
                                yield Piece(text[len(sent):], piece.tokens, piece.finish_reason)
                                sent = max(sent, text, key=len)
                        return
                    except Rewound as e:
                        logger.info("%s; generating again", e)
                raise SessionError(f"peers were caught returning wrong results {limit + 1} times in one "
                                   "generation; giving up")
            finally:
                verifier.end_call()

    def _attempt(self, session: InferenceSession, settle=None) -> Iterator[Piece]:
        """One pass from the prompt; `settle` (the verifier's) runs before the last piece."""
        s, model = self.sampling, self.model
        ids = torch.tensor([self.prompt_ids])
        generated: list[int] = []
        sent = 0  # characters of the completion already yielded
        warpers = s.warpers()
        embeds = model.embed_tokens(ids)
        while not self._cancelled.is_set():
            hidden = session.step(embeds, torch.ones(embeds.shape[:2], dtype=torch.bool))
            logits = model.lm_head(model.norm(hidden)).float()[:, -1, :]  # as the model's forward computes them
            token = self._pick(torch.cat([ids, torch.tensor([generated], dtype=torch.long)], dim=1), logits,
                               warpers)
            finish, cut = None, None
            if token in self._eos:  # counted as generated, as generate() counts it
                finish, count = "stop", len(generated) + 1
            else:
                generated.append(token)
                count = len(generated)
                text = self._text(generated)
                cut = self._stop_at(text, sent)
                if cut is not None:
                    finish = "stop"
                elif len(generated) >= s.max_tokens:
                    finish = "length"
            if finish is not None:
                if settle is not None:
                    settle()
                text = self._text(generated)
                yield Piece(text[sent:cut] if cut is not None else text[sent:], count, finish)
                return
            ready = self._ready(text, sent)
            if ready > sent:
                yield Piece(text[sent:ready], count)
                sent = ready
            embeds = model.embed_tokens(torch.tensor([[token]]))

    def _pick(self, ids: torch.Tensor, logits: torch.Tensor, warpers: LogitsProcessorList) -> int:
        if self.sampling.temperature == 0:
            return int(logits.argmax(-1))
        scores = warpers(ids, logits)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self._generator))

    def _text(self, generated: list[int]) -> str:
        return self.tokenizer.decode(generated, skip_special_tokens=True)

    def _stop_at(self, text: str, sent: int) -> int | None:
        """Where the first stop string begins in `text` (searching only what was not yet sent), or None."""
        hits = [i for stop in self.sampling.stop if (i := text.find(stop, max(0, sent - len(stop) + 1))) >= 0]
        return min(hits) if hits else None

    def _ready(self, text: str, sent: int) -> int:
        """How much of `text` can be sent now: not a partial character (decoded as U+FFFD), and not a tail
        that may still become a stop string."""
        end = len(text.rstrip("\ufffd"))
        hold = 0
        for stop in self.sampling.stop:
            hold = max(hold, next((k for k in range(min(len(stop) - 1, end - sent), 0, -1)
                                   if text.endswith(stop[:k], 0, end)), 0))
        return max(end - hold, sent)
