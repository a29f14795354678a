"""Speculative decoding over the swarm: draft tokens here, verify them through the route in one step.

Why: over home connections each step pays the route's round trip, however few tokens it carries. A
draft (n-gram prompt lookup, which needs no second model, or a small draft model on the client)
proposes k tokens; one step feeds the tokens not yet fed plus the k drafts (k + 1 positions per span),
and the logits at those positions decide how many drafts stand. Every span then rolls back to the
accepted prefix (the "rollback" message, swarm.protocol), and the next round starts from there.

One round picks tokens exactly as plain decoding does (HF's `_sample`): the same logits processors and
stopping criteria, applied in order to one position's logits at a time; greedy takes the argmax, sampling
draws once per token with `torch.multinomial` from the global RNG. Position j's token is picked from the
logits after draft j; while it equals draft j + 1 the next position's logits are those plain decoding
would have computed (the same prefix), so the round goes on; at the first difference (or after the last
draft) the picked token stands and the round ends. So:

  * greedy output is the greedy output, token for token;
  * sampling consumes one draw per token from the same distributions in the same order, so with the same
    seed it gives the same tokens as plain sampling, a fortiori the same distribution. This is standard
    speculative sampling with a deterministic draft (q = one-hot on the draft token): accepting the draft
    with probability p(draft) and else sampling from p without it is the same as sampling y ~ p and
    keeping the draft iff y == draft;
  * failover needs nothing new: the session's kept inputs are cut at each rollback, so a replacement
    peer replays exactly the accepted prefix.

k adapts (`DraftLength`): the acceptance rate per drafted token, smoothed over recent rounds, gives the
expected tokens of a round with k drafts, (1 - a^(k+1)) / (1 - a); k maximises that per unit of a round's
cost, 1 + extra_token_cost * k, between min and max. Rounds where the draft source has nothing (no
earlier occurrence of the n-gram) are plain steps.

Batches: rows share the session, so a round goes on only while every row picked its draft. A row that
finished under an EOS criterion gets padding (as in `_sample`), so its drafts are padding and always
stand; a row that a criterion without EOS finished goes on picking tokens in `_sample`, so it drafts and
is checked like any other row. The session thus holds, row by row, the tokens plain decoding would have
fed, and every row's tokens and scores stay exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from swarm.errors import ConfigError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- draft sources


def ngram_draft(tokens: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: up to `k` tokens that followed the latest earlier occurrence of the sequence's last n
    tokens (the longest n in [min_ngram, max_ngram] that occurred before), extended by looking up again
    from the drafted tokens (a repeating cycle drafts whole periods). [] if nothing matches."""
    seq = list(tokens)
    start = len(seq)
    while len(seq) - start < k:
        found = _lookup(seq, max_ngram, min_ngram)
        if not found:
            break
        seq.extend(found[: k - (len(seq) - start)])
    return seq[start:]


def _lookup(seq: list[int], max_ngram: int, min_ngram: int) -> list[int]:
    for n in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
        suffix = seq[-n:]
        for i in range(len(seq) - n - 1, -1, -1):  # the latest occurrence before the suffix itself
            if seq[i : i + n] == suffix:
                return seq[i + n :]
    return []


class NgramDrafter:
    """Drafts by prompt lookup (`ngram_draft`) over the row's own tokens; no model, no state."""

    def __init__(self, max_ngram: int, min_ngram: int):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def draft(self, tokens: list[int], k: int) -> list[int]:
        return ngram_draft(tokens, k, self.max_ngram, self.min_ngram) if k > 0 else []


class ModelDrafter:
    """Drafts greedily with a small local causal LM of the same vocabulary. Its KV cache lives across rounds:
    each call crops it to the prefix it shares with the row's tokens and feeds only the rest."""

    def __init__(self, model):
        self.model = model
        self.cache = self._new_cache()
        self.seen: list[int] = []  # the tokens whose K/V the cache holds

    @staticmethod
    def _new_cache():
        from transformers import DynamicCache

        return DynamicCache()  # no config: full-attention layers, which crop exactly

    @torch.inference_mode()
    def draft(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        common = 0
        for a, b in zip(self.seen, tokens, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # at least one token goes in, for the logits after it
        remove = self.cache.get_seq_length() - common
        if remove > 0:
            try:
                if not self.cache.is_croppable:
                    raise ValueError("this cache cannot be cropped exactly")
                self.cache.crop(-remove)  # transformers 5: a negative count of tokens to drop
            except (RuntimeError, ValueError):  # start over: a draft costs time, never exactness
                self.cache, common = self._new_cache(), 0
        device = self.model.device
        feed = torch.tensor([tokens[common:]], device=device)
        out: list[int] = []
        for _ in range(k):
            logits = self.model(input_ids=feed, cache=self.cache, use_cache=True).logits[0, -1]
            out.append(int(logits.argmax()))
            feed = torch.tensor([[out[-1]]], device=device)
        self.seen = list(tokens) + out[:-1]
        return out


# ---------------------------------------------------------------- how many to draft


@dataclass
class DraftLength:
    """The adaptive draft length: k maximising expected tokens per unit of cost, from the smoothed
    acceptance rate. Mutated by `update`; `k` is read before each round."""

    max_tokens: int = 8
    min_tokens: int = 1
    extra_token_cost: float = 0.05  # one more verified token, relative to a round's fixed cost (round trips)
    decay: float = 0.7  # weight of the past in the smoothed counts
    accepted: float = 1.0  # smoothed drafts accepted (prior: one of two)
    trials: float = 2.0  # smoothed accept-or-reject decisions seen
    k: int = field(init=False)

    def __post_init__(self) -> None:
        self.k = self._best()

    @property
    def rate(self) -> float:
        """Estimated probability that a draft token is accepted, given the ones before it were."""
        return self.accepted / self.trials

    def update(self, drafted: int, accepted: int) -> None:
        """One round's outcome: `accepted` of `drafted` drafts stood (a rejection ends a round)."""
        if drafted <= 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.trials = self.decay * self.trials + accepted + (accepted < drafted)
        self.k = self._best()

    def _best(self) -> int:
        a = min(self.rate, 1 - 1e-9)

        def value(k: int) -> float:
            return (1 - a ** (k + 1)) / (1 - a) / (1 + self.extra_token_cost * k)

        return max(range(self.min_tokens, self.max_tokens + 1), key=value)


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True, eq=False)
class Speculative:
    """How `generate(..., speculative=...)` drafts. `draft_model`: a small local causal LM with the same
    vocabulary (drafts greedily); None: n-gram prompt lookup over the row's own tokens."""

    draft_model: object | None = None
    max_draft_tokens: int = 8
    min_draft_tokens: int = 1
    max_ngram: int = 3
    min_ngram: int = 1
    extra_token_cost: float = 0.05

    def __post_init__(self) -> None:
        if type(self.max_draft_tokens) is not int or not 1 <= self.max_draft_tokens <= 64:
            raise ConfigError(f"max_draft_tokens must be an int in [1, 64], got {self.max_draft_tokens!r}")
        if type(self.min_draft_tokens) is not int or not 1 <= self.min_draft_tokens <= self.max_draft_tokens:
            raise ConfigError(f"min_draft_tokens must be in [1, max_draft_tokens], "
                              f"got {self.min_draft_tokens!r}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ConfigError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got "
                              f"{self.min_ngram}, {self.max_ngram}")
        if not (math.isfinite(self.extra_token_cost) and self.extra_token_cost >= 0):
            raise ConfigError(f"extra_token_cost must be >= 0, got {self.extra_token_cost!r}")

    @classmethod
    def of(cls, speculative=None, prompt_lookup_num_tokens=None, assistant_model=None) -> Speculative | None:
        """From `generate`'s arguments: speculative=True | "ngram" | k (n-gram drafts of up to k tokens) |
        Speculative; HF's `prompt_lookup_num_tokens=k` (n-gram drafts of up to k) and `assistant_model=m`
        (m drafts) map here."""
        if isinstance(speculative, Speculative):
            spec = speculative
        elif speculative is True or (isinstance(speculative, str) and speculative == "ngram"):
            spec = cls()
        elif speculative is None or speculative is False:
            spec = None
        elif type(speculative) is int:
            spec = cls(max_draft_tokens=speculative)
        else:
            raise ConfigError(f"speculative={speculative!r}: pass True, 'ngram', a draft length or a "
                              "Speculative(...)")
        if prompt_lookup_num_tokens is not None:
            spec = cls(max_draft_tokens=prompt_lookup_num_tokens,
                       min_draft_tokens=min(spec.min_draft_tokens if spec else 1, prompt_lookup_num_tokens))
        if assistant_model is not None:
            base = spec or cls()
            spec = cls(assistant_model, base.max_draft_tokens, base.min_draft_tokens, base.max_ngram,
                       base.min_ngram, base.extra_token_cost)
        return spec

    def drafter(self):
        return ModelDrafter(self.draft_model) if self.draft_model is not None else NgramDrafter(
            self.max_ngram, self.min_ngram)

    def draft_length(self) -> DraftLength:
        return DraftLength(self.max_draft_tokens, self.min_draft_tokens, self.extra_token_cost)

    def check(self, model) -> None:
        """Refuse a draft model that cannot draft for `model` (another vocabulary)."""
        if self.draft_model is None:
            return
        theirs = getattr(getattr(self.draft_model, "config", None), "vocab_size", None)
        if theirs != model.config.vocab_size:
            raise ConfigError(f"the draft model's vocabulary ({theirs} tokens) is not the model's "
                              f"({model.config.vocab_size}); a draft model must share the tokenizer")


@dataclass
class SpeculationStats:
    """What one speculative generation did (model.last_speculation), for benchmarks and tests."""

    rounds: int = 0  # steps through the swarm
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of those, the ones that stood
    tokens: int = 0  # tokens generated
    draft_lengths: list[int] = field(default_factory=list)  # k of each round

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0


# ---------------------------------------------------------------- the decoding loop


def speculative_decode(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria,
                       generation_config, *, speculative: Speculative, streamer=None, **model_kwargs):
    """HF's `custom_generate` for the swarm model: `_sample`'s contract (same arguments, same outputs),
    each step verifying drafts. Runs inside an active inference session (DistributedModelForCausalLM
    ._generate_in); leaves it holding every token but the last one returned, as plain generate does."""
    config = generation_config
    if config.output_attentions or config.output_hidden_states:
        raise ConfigError("speculative decoding returns no attentions or hidden states; leave those off")
    session = model.active_session
    keep = config.return_dict_in_generate
    scores = () if keep and config.output_scores else None
    raw_logits = () if keep and config.output_logits else None
    pad = config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    batch = input_ids.shape[0]
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    mask = model_kwargs.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    drafters = [speculative.drafter() for _ in range(batch)]
    length = speculative.draft_length()
    stats = model.last_speculation = SpeculationStats()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    fed = 0  # tokens of input_ids the session holds
    while True:
        todo = input_ids[:, fed:]  # [batch, n] not fed yet: the prompt, then the last picked token
        room = min(config.max_length - input_ids.shape[1],  # tokens left to pick; cache slots left (+ 1)
                   session.max_length - session.position - todo.shape[1] + 1)
        # rows finished under an EOS criterion pick padding from now on, so they draft padding
        forced = (unfinished == 0) if has_eos else torch.zeros_like(unfinished, dtype=torch.bool)
        drafts = _drafts(drafters, input_ids, valid, forced, min(length.k, room - 1), pad)  # [batch, k]
        k = drafts.shape[1]
        step_valid = torch.cat([valid[:, fed:], torch.ones(batch, k, dtype=torch.bool)], dim=1)
        hidden = session.step(model.embed_tokens(torch.cat([todo, drafts], dim=1)), step_valid)
        logits = model.lm_head(model.norm(hidden[:, todo.shape[1] - 1 :])).float()  # [batch, k + 1, vocab]
        picked, done = 0, False
        for j in range(k + 1):
            next_logits = logits[:, j].to(copy=True, dtype=torch.float32, device=input_ids.device)
            next_scores = logits_processor(input_ids, next_logits)
            if scores is not None:
                scores += (next_scores,)
            if raw_logits is not None:
                raw_logits += (next_logits,)
            if config.do_sample:
                tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(next_scores, dim=-1)
            if has_eos:
                tokens = tokens * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            valid = torch.cat([valid, torch.ones(batch, 1, dtype=torch.bool)], dim=1)
            if streamer is not None:
                streamer.put(tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, scores)
            picked += 1
            done = bool(unfinished.max() == 0)
            if done or (j < k and not bool((tokens == drafts[:, j]).all())):
                break
        accepted = picked - 1  # drafts that stood: the session holds them, and the token before them
        if accepted < k:
            session.rollback(session.position - (k - accepted))
        fed = input_ids.shape[1] - 1
        length.update(k, accepted)
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += accepted
        stats.tokens += picked
        stats.draft_lengths.append(k)
        if done:
            break
    if streamer is not None:
        streamer.end()
    logger.debug("speculative: %d tokens in %d rounds (%d of %d drafts accepted)", stats.tokens, stats.rounds,
                 stats.accepted, stats.drafted)
    if keep:
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits)
    return input_ids


def _drafts(drafters, input_ids, valid, forced, k: int, pad) -> torch.Tensor:
    """[batch, k'] draft tokens, k' <= k the fewest any drafting row has; rows `forced` to padding (finished
    under an EOS criterion) draft padding, which is what they will pick."""
    if k <= 0:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    rows: list[list[int] | None] = []
    for row, drafter in enumerate(drafters):
        rows.append(None if forced[row] else drafter.draft(input_ids[row][valid[row]].tolist(), k))
    k = min((len(r) for r in rows if r is not None), default=0)
    filler = [int(pad)] * k if pad is not None else [0] * k
    return torch.tensor([r[:k] if r is not None else filler for r in rows], dtype=input_ids.dtype,
                        device=input_ids.device).reshape(len(rows), k)
