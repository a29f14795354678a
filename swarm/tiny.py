"""Tiny models of real architectures, built locally: the project's embedded default for demos and tests.

This machine reaches no model hub, so tests and demos need checkpoints made on the spot. A tiny
model here is the real transformers architecture of its family (its own config class and modeling
code), with small dimensions and seeded random weights, saved in the standard hub layout:

    config.json  generation_config.json
    model.safetensors.index.json  model-0000k-of-0000n.safetensors   (several shards on purpose,
                                                                       so span loading is exercised)
    tokenizer.json  tokenizer_config.json                             (a byte-level BPE, trained here)
    swarm_tiny.json                                                   (the recipe, for reuse)

Real checkpoints load through exactly the same code; nothing downstream may depend on this module.

Contracts:
  * Deterministic: the same recipe gives bit-identical tensors (CPU generator). Each tensor is drawn
    from its own generator seeded by (family, seed, parameter name), so it does not depend on the
    order of initialisation nor on transformers' own init functions (which differ between versions).
  * Not degenerate: greedy decoding from random weights yields varied tokens (INIT_STD is chosen for
    that), and norms and biases are random too, so a loader that forgets one of them changes outputs.
  * MoE experts are held fused in memory (transformers 5) and written per expert by save_pretrained,
    like hub checkpoints (e.g. `model.layers.1.block_sparse_moe.experts.0.w1.weight` for Mixtral).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from swarm.errors import ConfigError
from swarm.runtime.loading import quiet_progress_bars

# Families whose tiny model we can build, by transformers `model_type`.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe")

# Special tokens: ids 0, 1, 2, 3 in this order; pad/bos/eos ids are also in the model config.
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Std of the random weights. Hidden size 64 makes 1/sqrt(64) = 0.125 "unit variance"; 0.2 is a little
# above it so logits spread to about +-7: greedy decoding then wanders over many tokens (0.02, the
# configs' default, loops over 2-5 tokens) and top-1/top-2 margins (typically 1e-2, smallest seen
# 1e-4) stay far above float32 noise (1e-6), so greedy exactness tests do not flip on ties.
INIT_STD = 0.2
NORM_STD = 0.1  # norm weights are 1 + N(0, NORM_STD): not all-ones, so a missing norm is visible

MAX_POSITIONS = 2048
DEFAULT_VOCAB_SIZE = 512  # embeddings and head stay small; the tokenizer is trained to exactly this size
MAX_VOCAB_SIZE = 1024  # what the embedded training text can fill with BPE merges (it gives 1125)
RECIPE_FILE = "swarm_tiny.json"
RECIPE_VERSION = 1  # bump when the recipe changes what gets built, so old folders are not reused


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Everything that determines a tiny model; equal specs give bit-identical checkpoints."""

    family: str
    num_layers: int = 6
    seed: int = 0
    hidden_size: int = 64
    vocab_size: int = DEFAULT_VOCAB_SIZE
    num_shards: int = 3
    version: int = RECIPE_VERSION

    def validate(self) -> None:
        """Raise ConfigError naming the bad field."""
        if self.family not in FAMILIES:
            known = ", ".join(FAMILIES)
            raise ConfigError(f"unknown tiny-model family {self.family!r}; choose one of {known}")
        if self.num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.hidden_size < 16 or self.hidden_size % 16:
            raise ConfigError(f"hidden_size must be a positive multiple of 16, got {self.hidden_size}")
        if not 260 <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise ConfigError(f"vocab_size must be in [260, {MAX_VOCAB_SIZE}], got {self.vocab_size}")
        if self.num_shards < 1:
            raise ConfigError(f"num_shards must be >= 1, got {self.num_shards}")


# ---------------------------------------------------------------------------------------------- model


def _family_fields(family: str, hidden: int) -> dict:
    """Config fields specific to one family (beyond the shared small dims)."""
    head_dim = hidden // 4
    moe = {"num_experts_per_tok": 2}
    if family in ("qwen3_moe", "qwen2_moe"):
        # decoder_sparse_step=2: layers 1, 3, 5.. are sparse, 0, 2, 4.. dense. Real Qwen MoE releases
        # are sparse everywhere; mixing both kinds catches a runtime that builds a layer with its
        # index inside the span instead of its global index (it would pick the wrong MLP kind).
        moe |= {"num_experts": 4, "moe_intermediate_size": hidden // 2, "decoder_sparse_step": 2}
    return {
        "llama": {"head_dim": head_dim},
        "mistral": {"head_dim": head_dim},  # sliding_window stays the default 4096 > MAX_POSITIONS
        "qwen2": {},  # head_dim derived; q/k/v have biases
        "qwen3": {"head_dim": head_dim},  # its default head_dim is 128, not hidden / heads
        "mixtral": moe | {"num_local_experts": 4, "intermediate_size": hidden},  # per-expert width
        "qwen3_moe": moe | {"head_dim": head_dim, "norm_topk_prob": True},  # as Qwen3-30B-A3B
        "qwen2_moe": moe | {"shared_expert_intermediate_size": hidden},
    }[family]


def build_config(spec: TinySpec):
    """The family's own transformers config class, filled with the spec's small dims."""
    from transformers import CONFIG_MAPPING

    spec.validate()
    fields = {
        "hidden_size": spec.hidden_size,
        "intermediate_size": 2 * spec.hidden_size,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA, so kv-head repetition is exercised
        "num_hidden_layers": spec.num_layers,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INIT_STD,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "dtype": "float32",
    } | _family_fields(spec.family, spec.hidden_size)
    return CONFIG_MAPPING[spec.family](**fields)


def _tensor_seed(spec: TinySpec, name: str) -> int:
    # crc32 is stable across processes and Python versions (hash() is salted per process).
    return zlib.crc32(f"{spec.family}/{spec.seed}/{name}".encode())


@torch.no_grad()
def _randomize_(model: torch.nn.Module, spec: TinySpec) -> None:
    """Overwrite every parameter in place: norms ~ 1 + N(0, NORM_STD), the rest ~ N(0, INIT_STD)."""
    for name, param in model.named_parameters():
        gen = torch.Generator().manual_seed(_tensor_seed(spec, name))
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:  # RMSNorm scales (input/post-attention/final, and Qwen3's q/k norms)
            param.copy_(1.0 + NORM_STD * noise)
        else:  # projections, embeddings, routers, biases
            param.copy_(INIT_STD * noise)


def build_model(spec: TinySpec):
    """The tiny model in memory, float32, eval mode, weights fixed by the spec alone."""
    from transformers import AutoModelForCausalLM

    config = build_config(spec)
    # transformers initialises from the global RNG; fork it so building never disturbs the caller's.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_(model, spec)
    return model.eval()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _saved_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors as save_pretrained writes them: MoE experts split back to per-expert hub names."""
    state = model.state_dict()
    try:  # the function save_pretrained itself applies (transformers 5 internals, hence the fallback)
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return revert_weight_conversion(model, state)


def _shard_size_bytes(model, num_shards: int) -> int:
    """The smallest max_shard_size for which save_pretrained writes at most `num_shards` files.

    save_pretrained packs the tensors in order, next-fit (huggingface_hub's splitter), so the file
    count only falls as the size grows: a bisection finds the size.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    state = _saved_state_dict(model)

    def files_at(size_bytes: int) -> int:
        return len(split_torch_state_dict_into_shards(state, max_shard_size=size_bytes).filename_to_tensors)

    low, high = 1, 4 * count_params(model)  # float32: everything fits one file at `high`
    while low < high:
        mid = (low + high) // 2
        if files_at(mid) <= num_shards:
            high = mid
        else:
            low = mid + 1
    return low


# ------------------------------------------------------------------------------------------ tokenizer

# Original English prose to train the byte-level BPE on; its content does not matter, only that it
# has enough distinct words for the merges a 512-entry vocabulary needs.
_CORPUS = """\
The river ran past the old mill and under the stone bridge, where the children of the town used to
stand in the evening and count the boats. Some were small and painted blue, some were long and
heavy with grain, and once in a while a white boat with a tall mast came down from the mountains.
Nobody knew who owned it. The baker said it belonged to a man who lived alone above the lake; the
teacher said it was a story, and that stories were worth more than answers.

In the morning the market opened early. There were apples and pears, bread and cheese, fish from
the coast, honey, wool, lamps, rope, and books with torn covers. People talked about the weather,
the price of salt, the new road that was going to be built next year, and the strange lights that
had been seen on the hill. A clock in the square told the hour, but it was always a little late,
so everyone added five minutes in their heads and nobody thought it was strange.

A network is a group of machines that work together. Each machine holds a part of the work and
passes its result to the next one. If one of them stops, the others must notice quickly, find
another way, and carry on as if nothing had happened. This is harder than it sounds, because a
machine that is slow looks, from far away, very much like a machine that is gone. Good systems
measure, wait for a while, try again, and keep enough state to repeat what was lost.

She opened the window and looked at the sky. Clouds were moving in from the west, grey at the
edges and bright in the middle, and the wind smelled of rain. Her brother was still asleep. She
made tea, wrote a short letter to her friend in the city, and put on her boots. The path to the
forest was wet and narrow; birds called to each other from the trees, and a fox crossed in front
of her, stopped, looked back, and disappeared between the ferns.

Numbers tell a simple story: one, two, three, four, five, six, seven, eight, nine, ten. Twenty
people came to the meeting, thirty chairs were ready, and the first question took an hour to
answer. What should the town do with the empty school? Some wanted a library, some a workshop,
some a place where old people could play cards and young people could learn to build things.
In the end they voted, and the result was a surprise to everyone, including the people who won.

The engine started with a cough and then a steady hum. He checked the oil, the water, the lights,
and the brakes, then drove slowly out of the yard. The road climbed through fields of wheat and
barley, past a farm with red doors, over a small hill, and down into the valley where the river
turned to the south. He had made this trip many times, but every time he noticed something new:
a fence that had been painted, a tree that had fallen, a sign with a word he did not understand.

Learning is slow at first and then suddenly fast. You read a page and understand nothing; you read
it again and understand one sentence; a week later the whole chapter seems obvious, and you cannot
remember why it was ever hard. Teachers know this, and good teachers are patient. They ask short
questions, listen to the answers, and explain the same idea in three different ways until one of
them works. Then they smile, write something on the board, and move on to the next problem.

At night the town was quiet. A dog barked once, a door closed, and the last bus went past the
station without stopping. In the houses people read, talked, cooked, and slept. The river kept
running under the bridge, carrying leaves and light and the reflection of the moon, as it had done
for a thousand years, and as it would do long after everyone who lived there had forgotten the
names of the streets, the shops, the boats, and the children who used to count them.
"""


# transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX, copied rather than imported from a private module;
# tests check that AutoTokenizer (which uses that class for qwen2) tokenizes exactly like tokenizer.json.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE of exactly `vocab_size` entries, as a PreTrainedTokenizerFast.

    Ids 0..3 are <pad>, <s>, </s>, <unk>. Encoding adds no special tokens (as Qwen's and GPT-2's
    tokenizers); decoding with skip_special_tokens=True gives back the input text exactly for any
    NFC-normalised text, ASCII included. Padding is on the left, which batched generation needs.
    A plain-text chat template (CHAT_TEMPLATE: each turn as "<|role|>" and its text on lines of their own),
    so the chat API has one to apply.

    The pipeline (NFC, Qwen2's pre-tokenizer regex, byte-level without prefix space) is the one
    transformers' Qwen2Tokenizer rebuilds from vocab and merges: AutoTokenizer forces that class for
    model_type "qwen2" whatever tokenizer_config.json says, so only this pipeline makes every family
    tokenize alike. <unk> is never produced (byte-level covers every byte); it exists so that
    Qwen2Tokenizer does not add its own default <|endoftext|> and grow the vocabulary past the model's.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ConfigError(
            f"the embedded corpus yields a {tok.get_vocab_size()}-entry vocabulary, not {vocab_size}; "
            f"choose vocab_size <= {tok.get_vocab_size()}"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,  # would rewrite " ." to "." and break the round trip
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )


# ------------------------------------------------------------------------------------------- on disk


def read_spec(out_dir: str | Path) -> TinySpec | None:
    """The recipe of the tiny model saved in `out_dir`, or None if there is none (or it is unreadable)."""
    path = Path(out_dir) / RECIPE_FILE
    try:
        return TinySpec(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _check_replaceable(out_dir: Path) -> None:
    """Raise ConfigError unless `out_dir` is absent, empty or an earlier tiny model: never clobber others."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a folder; choose another output path")
    if any(out_dir.iterdir()) and read_spec(out_dir) is None:
        raise ConfigError(f"{out_dir} exists and is not a tiny model made by swarm; choose an empty folder")


def _write(model, tokenizer, spec: TinySpec, out_dir: Path) -> None:
    with quiet_progress_bars():
        model.save_pretrained(out_dir, max_shard_size=_shard_size_bytes(model, spec.num_shards))
    tokenizer.save_pretrained(out_dir)
    (out_dir / RECIPE_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")


def save_tiny_model(spec: TinySpec, out_dir: str | Path):
    """Build the model and tokenizer of `spec`, write them to `out_dir`; return the in-memory model.

    The files are written to a hidden sibling folder that then replaces `out_dir` whole, so a reader
    never sees a half-written checkpoint, a failed build leaves `out_dir` as it was, and no stale
    shard or index of an earlier build survives. Raises ConfigError if `out_dir` holds anything else.
    """
    out_dir = Path(out_dir)
    spec.validate()
    _check_replaceable(out_dir)
    model = build_model(spec)
    tokenizer = build_tokenizer(spec.vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        _write(model, tokenizer, spec, staging)
        _check_replaceable(out_dir)  # again: something may have appeared while we built
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # nothing left there after a successful rename
    return model


def make_tiny_model(
    family: str,
    out_dir: str | Path,
    *,
    num_layers: int = 6,
    seed: int = 0,
    hidden_size: int = 64,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    num_shards: int = 3,
) -> Path:
    """Build a tiny `family` model and its tokenizer in `out_dir` (see the module docstring); return it.

    Replaces an earlier tiny model in `out_dir`; raises ConfigError for bad arguments or a
    non-empty folder that is not a tiny model. The checkpoint has at most `num_shards` shard files,
    exactly that many unless the model has fewer tensors to split (never the case with the defaults).
    """
    save_tiny_model(TinySpec(family, num_layers, seed, hidden_size, vocab_size, num_shards), out_dir)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    defaults = TinySpec(family="llama")
    p = argparse.ArgumentParser(
        prog="swarm make-model",
        description="Build a tiny random model of a real architecture, with a tokenizer, in a local folder.",
    )
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--out", required=True, type=Path, help="output folder (created; reused if same recipe)")
    p.add_argument("--layers", type=int, default=defaults.num_layers, help="number of transformer blocks")
    p.add_argument("--seed", type=int, default=defaults.seed)
    return p


def _summary(spec: TinySpec, out_dir: Path) -> str:
    """One line about the checkpoint as it is on disk (so it also describes a reused folder)."""
    from safetensors import safe_open

    shards = sorted(out_dir.glob("*.safetensors"))
    params = 0
    for shard in shards:  # headers only: no tensor is read
        with safe_open(shard, framework="pt") as f:
            params += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    layers = f"{spec.num_layers} layers"
    return f"{spec.family}: {layers}, {params:,} params, {len(shards)} shards, seed {spec.seed}"


def main(argv: list[str] | None = None) -> int:
    """`swarm make-model --family F --out DIR [--layers N] [--seed S]`: print the path and a summary."""
    args = _parser().parse_args(argv)
    spec = TinySpec(family=args.family, num_layers=args.layers, seed=args.seed)
    try:
        spec.validate()
        if read_spec(args.out) == spec:
            verb = "reused"
        else:
            start_s = time.monotonic()
            save_tiny_model(spec, args.out)
            verb = f"built in {time.monotonic() - start_s:.1f} s"
    except ConfigError as exc:
        print(f"swarm make-model: {exc}", file=sys.stderr)
        return 2
    print(args.out.resolve())
    print(f"{_summary(spec, args.out)} ({verb})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
