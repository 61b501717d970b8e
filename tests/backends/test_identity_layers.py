"""Identity layers: a candidate with fewer layers than the engine fills the spare slots with
layers that add nothing to the residual stream, so it loads in place and scores exactly as a
model of its own depth. Also the engine-option plumbing that needs no vLLM installed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.backends.base import layer_template, longest_request, pad_with_identity_layers, same_but_depth
from evomerge.backends.hf import SHAPE_KEYS, HFBackend
from evomerge.backends.vllm_backend import check_engine_options, kv_cache_bytes
from evomerge.errors import ConfigError, EvomergeError
from evomerge.tasks.command import parse_engine_options
from evomerge.tasks.task import Item, Task, load_task
from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

PROMPTS = ["12+7=", "rev:abc=", "tr:KaMi=", "9-3=", "up:hello world=", "calc:Le+Sa=", "x", "sort:zyx="]


def tiny_model(seed: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=build_tokenizer().get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.3,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def weights_of(model: LlamaForCausalLM) -> tuple[dict[str, torch.Tensor], dict]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"},
            model.config.to_dict())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("identity") / "m"
    tiny_model(0, 2).save_pretrained(path, safe_serialization=True)
    save_tokenizer(path)
    return path


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPTS[4], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_a_padded_model_computes_exactly_what_the_shallower_model_computes(model_dir):
    """Two real layers + three identity layers: the logits equal the 2-layer model's bit for bit."""
    shallow = tiny_model(1, 2)
    weights, config = weights_of(shallow)
    deep = tiny_model(2, 5)
    template = layer_template({k: tuple(v.shape) for k, v in deep.state_dict().items()},
                              {k: v.dtype for k, v in deep.state_dict().items()})
    padded, padded_config = pad_with_identity_layers(weights, config, 5, template)
    assert padded_config["num_hidden_layers"] == 5 and config["num_hidden_layers"] == 2
    assert sorted(padded) == sorted(k for k in deep.state_dict() if k != "lm_head.weight")
    assert all(padded[f"model.layers.4.{s}"].abs().sum() == 0 for s in ("self_attn.o_proj.weight", "mlp.down_proj.weight"))
    deep.load_state_dict({**padded, "lm_head.weight": padded["model.embed_tokens.weight"]})
    tokenizer = HFBackend(model_dir).tokenizer
    assert torch.equal(logits(deep, tokenizer), logits(shallow, tokenizer))


def test_padding_refuses_a_candidate_deeper_than_the_engine():
    weights, config = weights_of(tiny_model(0, 3))
    with pytest.raises(EvomergeError, match="3 layers, more than the engine's 2"):
        pad_with_identity_layers(weights, config, 2, {})


def test_only_the_layer_count_may_differ_for_an_in_place_load():
    engine = {"num_hidden_layers": 6, "hidden_size": 64, "layer_types": ["sliding", "full"] * 3}
    assert same_but_depth({**engine, "num_hidden_layers": 4, "layer_types": ["sliding", "full"] * 2}, engine, SHAPE_KEYS)
    assert not same_but_depth({**engine, "num_hidden_layers": 2, "layer_types": ["full", "full"]}, engine, SHAPE_KEYS)
    assert not same_but_depth({**engine, "num_hidden_layers": 4, "hidden_size": 32}, engine, SHAPE_KEYS)


def test_hf_backend_built_to_capacity_loads_every_depth_in_place_and_scores_as_a_fresh_model(model_dir, tmp_path):
    backend = HFBackend(model_dir, layer_capacity=5)
    assert backend.config["num_hidden_layers"] == 5 and backend.rebuilds == 0
    task = Task("gen", "generate", [Item(str(i), p, "7") for i, p in enumerate(PROMPTS)], max_new_tokens=5)
    for seed, layers in ((3, 1), (4, 5), (5, 3)):
        model = tiny_model(seed, layers)
        backend.load_weights(*weights_of(model))
        assert backend.model.config.num_hidden_layers == layers      # the spare layers are not run
        model.save_pretrained(tmp_path / f"m{seed}", safe_serialization=True)
        save_tokenizer(tmp_path / f"m{seed}")
        fresh = HFBackend(tmp_path / f"m{seed}")
        got, want = backend.score(task, range(len(PROMPTS))), fresh.score(task, range(len(PROMPTS)))
        assert [r.output for r in got] == [r.output for r in want], layers
        assert [r.score for r in backend.likelihood(task, range(len(PROMPTS)))] == \
            pytest.approx([r.score for r in fresh.likelihood(task, range(len(PROMPTS)))], abs=1e-6)
    assert backend.rebuilds == 0


def test_hf_backend_without_capacity_rebuilds_once_then_pads_shallower_candidates(model_dir):
    backend = HFBackend(model_dir)
    backend.load_weights(*weights_of(tiny_model(3, 4)))
    assert backend.rebuilds == 1 and backend.config["num_hidden_layers"] == 4
    backend.load_weights(*weights_of(tiny_model(4, 1)))
    backend.load_weights(*weights_of(tiny_model(5, 3)))
    assert backend.rebuilds == 1


def test_longest_request_covers_generation_choices_and_references(model_dir):
    tokenizer = HFBackend(model_dir).tokenizer

    def encode(text, special=True):
        return tokenizer(text, add_special_tokens=special)["input_ids"]

    gen = Task("g", "generate", [Item("0", "12+7=", "19"), Item("1", "up:hello world=", "HELLO WORLD")],
               max_new_tokens=9)
    assert longest_request(gen, encode, tokenizer.eos_token_id) == max(
        len(encode("up:hello world=")) + 9, len(encode("up:hello world=HELLO WORLD")))
    mc = Task("m", "multiple_choice", [Item("0", "x", "a very long choice", ["b", "a very long choice"])])
    assert longest_request(mc, encode, tokenizer.eos_token_id) == len(encode("xa very long choice"))
    zoo = load_task("zoo/arith")
    assert longest_request(zoo, encode, tokenizer.eos_token_id) >= max(len(encode(i.prompt)) for i in zoo.items)


def test_kv_cache_is_sized_to_requests_of_the_context_length():
    config = {"num_attention_heads": 2, "num_key_value_heads": 2, "hidden_size": 64, "head_dim": 32}
    # 2 (K, V) x 4 layers x 2 heads x 32 x 4 bytes per token; 100 tokens take one 128-token block
    one_block = 2 * 4 * 2 * 32 * 4 * 128
    assert kv_cache_bytes(config, 4, 100, "float32") == one_block * 64
    assert kv_cache_bytes(config, 4, 129, "float32") == 2 * one_block * 64
    assert kv_cache_bytes(config, 8, 100, "bfloat16") == one_block * 64


def test_engine_options_from_the_command_line_are_typed_and_merged():
    assert parse_engine_options(["max_model_len=512", "enforce_eager=false", "dtype=bfloat16"]) == \
        {"max_model_len": 512, "enforce_eager": False, "dtype": "bfloat16"}
    assert parse_engine_options(['{"max_model_len": 256, "kv_cache_memory_bytes": 1000}', "max_model_len=128"]) == \
        {"max_model_len": 128, "kv_cache_memory_bytes": 1000}
    assert parse_engine_options(["{hf_overrides: {rope_theta: 5.0}}"]) == {"hf_overrides": {"rope_theta": 5.0}}
    for bad in ("max_model_len", "=3", "{max_model_len: [1, 2}", "[1, 2]"):
        with pytest.raises(ConfigError, match="--engine"):
            parse_engine_options([bad])


def test_engine_options_evomerge_sets_itself_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"^evaluator.engine.model: set by evomerge"):
        check_engine_options({"model": "/elsewhere"})
    with pytest.raises(ConfigError, match=r"^--engine.tokenizer: set by evomerge"):
        check_engine_options({"tokenizer": "x"}, "--engine")
    with pytest.raises(ConfigError, match="mapping"):
        check_engine_options(["max_model_len"])


def test_engine_options_with_the_hf_backend_are_a_config_error(tmp_path):
    from evomerge.search.config import parse_config

    data = {"sources": {"a": str(tmp_path)}, "genome": {"kind": "parameter", "method": "linear"},
            "objectives": [{"name": "x", "task": "zoo/arith"}],
            "evaluator": {"backend": "hf", "engine": {"max_model_len": 64}}}
    with pytest.raises(ConfigError, match=r"^cfg.yaml: evaluator.engine.max_model_len: engine options are for "
                                          r"backend vllm"):
        parse_config(data, "cfg.yaml", tmp_path)


def test_the_evaluator_spec_carries_engine_options_and_the_data_flow_depth(tmp_path):
    from evomerge.search.config import build_genome_space, parse_config
    from evomerge.workers.evaluator import EvaluatorSpec
    from evomerge.zoo.build import ensure_zoo

    zoo = ensure_zoo()
    data = {"sources": {k: str(v) for k, v in zoo.models.items()}, "base": "base", "genome": {"kind": "data_flow", "max_layers": 11},
            "objectives": [{"name": "x", "task": "zoo/arith:search"}],
            "evaluator": {"backend": "vllm", "engine": {"max_num_seqs": 8}}}
    cfg = parse_config(data, "cfg.yaml", tmp_path)
    spec = EvaluatorSpec.from_config(cfg, build_genome_space(cfg))
    assert spec.layer_capacity == 11 and spec.engine == {"max_num_seqs": 8}
    assert spec.context_tasks == ["zoo/arith:heldout"]
    data["genome"] = {"kind": "parameter", "method": "linear"}
    cfg = parse_config(data, "cfg.yaml", tmp_path)
    assert EvaluatorSpec.from_config(cfg, build_genome_space(cfg)).layer_capacity is None
