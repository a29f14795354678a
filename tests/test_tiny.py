"""swarm.tiny: tiny checkpoints are complete, load exactly, tokenize losslessly and generate varied text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import tiny
from swarm.errors import ConfigError

ALL = tiny.FAMILIES
MOE = ("mixtral", "qwen3_moe", "qwen2_moe")
TEXT = "The river ran past the old mill, under 3 bridges; nobody knew why!  Tabs\tand\nnewlines too."


def _weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def _in_memory(path: Path):
    spec = tiny.read_spec(path)
    assert spec is not None
    return tiny.build_model(spec)


def _prompt_ids(path: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer(["The river ran past the old mill"], return_tensors="pt").input_ids  # [1, tokens]


@pytest.mark.parametrize("family", ALL)
def test_checkpoint_files_present(tiny_model_path, family):
    path = tiny_model_path(family)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    shards = set(_weight_map(path).values())
    assert len(shards) == 3  # the default num_shards, exactly
    assert shards == {p.name for p in path.glob("model-*.safetensors")}  # no stray or missing shard
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family and config["num_hidden_layers"] == 6
    assert config["tie_word_embeddings"] is False


@pytest.mark.parametrize("family", ALL)
def test_from_pretrained_matches_in_memory_model(tiny_model_path, family):
    path = tiny_model_path(family)
    loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = _in_memory(path)
    expected = reference.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    ids = torch.randint(3, tiny.DEFAULT_VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded.eval()(ids).logits, reference(ids).logits  # [2, 9, vocab]
    # Equal weights need not give bit-equal logits on CPU: a tensor memory-mapped from safetensors
    # may sit at an address with another alignment, and BLAS then rounds differently (qwen2_moe's
    # [1, 64] shared_expert_gate shows 1e-7). Hence a tolerance far below the 1e-4 of the contract.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ALL)
def test_tokenizer_round_trip_and_ids_match_config(tiny_model_path, family):
    path = tiny_model_path(family)
    tok = AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    assert len(tok) == config["vocab_size"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        config["pad_token_id"],
        config["bos_token_id"],
        config["eos_token_id"],
    )
    ids = tok(TEXT).input_ids
    assert len(ids) < len(TEXT)  # merges actually merge
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    # AutoTokenizer picks a class by model_type (Qwen2Tokenizer for qwen2, rebuilding the pipeline
    # from vocab and merges): whatever it picks must tokenize exactly as the saved tokenizer.json.
    assert ids == Tokenizer.from_file(str(path / "tokenizer.json")).encode(TEXT).ids
    batch = tok(["a", "a longer line"], padding=True).input_ids
    assert batch[0][0] == tok.pad_token_id  # left padding, for batched generation


@pytest.mark.parametrize("family", ALL)
def test_greedy_generation_is_not_degenerate(tiny_model_path, family):
    path = tiny_model_path(family)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = _prompt_ids(path)
    # eos disabled: a random model may emit it early, and we want 20 tokens to judge variety.
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None)
    new_tokens = out[0, prompt.shape[1] :].tolist()
    assert len(new_tokens) == 20
    assert len(set(new_tokens)) >= 8, new_tokens


@pytest.mark.parametrize("family", MOE)
def test_moe_checkpoint_is_per_expert_like_the_hub(tiny_model_path, family):
    keys = _weight_map(tiny_model_path(family))
    expert_keys = [k for k in keys if re.search(r"\.experts\.\d+\.", k)]
    assert expert_keys, "expected per-expert keys"
    assert not [k for k in keys if "gate_up_proj" in k], "fused keys in the checkpoint"
    if family == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys


@pytest.mark.parametrize("family", ("qwen3_moe", "qwen2_moe"))
def test_qwen_moe_alternates_dense_and_sparse_layers(tiny_model_path, family):
    keys = _weight_map(tiny_model_path(family))
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # dense
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys  # sparse
    assert "model.layers.1.mlp.gate_proj.weight" not in keys


@pytest.mark.parametrize("family", ("llama", "mixtral"))
def test_same_recipe_gives_identical_bytes(tmp_path, family):
    first = tiny.make_tiny_model(family, tmp_path / "a", num_layers=2)
    second = tiny.make_tiny_model(family, tmp_path / "b", num_layers=2)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_seed_and_family_change_weights_and_global_rng_is_untouched():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    base = tiny.build_model(tiny.TinySpec("llama", num_layers=1)).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    other_seed = tiny.build_model(tiny.TinySpec("llama", num_layers=1, seed=1)).state_dict()
    other_family = tiny.build_model(tiny.TinySpec("mistral", num_layers=1)).state_dict()
    for name, tensor in base.items():
        assert not torch.equal(tensor, other_seed[name]), name
        assert not torch.equal(tensor, other_family[name]), name


def test_spec_validation_names_the_problem():
    with pytest.raises(ConfigError, match="family"):
        tiny.TinySpec("gpt5").validate()
    with pytest.raises(ConfigError, match="num_layers"):
        tiny.TinySpec("llama", num_layers=0).validate()


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a tiny model"):
        tiny.make_tiny_model("llama", tmp_path, num_layers=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_builds_then_reuses(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["--family", "qwen2", "--out", str(out), "--layers", "2", "--seed", "7"]
    assert tiny.main(argv) == 0
    path_line, summary = capsys.readouterr().out.splitlines()
    assert Path(path_line) == out.resolve()
    assert summary.startswith("qwen2: 2 layers,") and "shards" in summary and "built" in summary
    assert tiny.read_spec(out) == tiny.TinySpec("qwen2", num_layers=2, seed=7)

    assert tiny.main(argv) == 0
    assert "reused" in capsys.readouterr().out

    assert tiny.main(["--family", "qwen2", "--out", str(out), "--layers", "3"]) == 0  # new recipe: rebuilt
    assert "qwen2: 3 layers" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left behind


def test_one_shard_replaces_an_index_of_an_earlier_build(tmp_path):
    tiny.make_tiny_model("mixtral", tmp_path, num_layers=1, num_shards=2)
    tiny.make_tiny_model("mixtral", tmp_path, num_layers=1, num_shards=1)
    assert not (tmp_path / "model.safetensors.index.json").exists()  # a stale index would mislead loaders
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    AutoModelForCausalLM.from_pretrained(tmp_path)
