"""HFBackend: batched scoring matches unbatched references; weights swap in place."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.backends import ItemResult, make_backend
from evomerge.errors import CheckpointError, EvomergeError
from evomerge.tasks.task import Item, Task
from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer


def tiny_model(seed: int, layers: int = 2) -> LlamaForCausalLM:
    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.3,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def save(model: LlamaForCausalLM, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    save_tokenizer(path)
    return str(path)


PROMPTS = ["12+7=", "rev:abc=", "tr:KaMi=", "9-3=", "up:hello world=", "calc:Le+Sa=", "x", "sort:zyx="]


def greedy_reference(model, tokenizer, prompt: str, max_new: int) -> str:
    """One prompt at a time, no padding: what batched scoring must reproduce."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save(tiny_model(0), tmp_path_factory.mktemp("tiny") / "m")


def test_generation_scores_against_unbatched_greedy(model_dir):
    backend = make_backend("hf", model_dir, batch_size=3)
    model = tiny_model(0)
    refs = [greedy_reference(model, backend.tokenizer, p, 6) for p in PROMPTS]
    # even items: the answer is the model's own output (correct); odd items: a wrong answer
    items = [Item(str(i), p, refs[i].strip() if i % 2 == 0 else refs[i] + "#") for i, p in enumerate(PROMPTS)]
    task = Task("t", "generate", items, max_new_tokens=6)
    results = backend.score(task, [7, 0, 3, 2, 5, 4, 1, 6])
    assert [r.index for r in results] == [7, 0, 3, 2, 5, 4, 1, 6]
    for r in results:
        assert isinstance(r, ItemResult)
        assert r.output == refs[r.index]
        assert r.score == (1.0 if r.index % 2 == 0 else 0.0)


def test_multiple_choice_picks_highest_loglikelihood(model_dir):
    backend = make_backend("hf", model_dir, batch_size=4)
    model, tok = tiny_model(0), backend.tokenizer
    choices = ["12", "ab", "Bolu", "zzz"]

    def loglik(prompt, choice):
        ctx = tok(prompt).input_ids
        ids = torch.tensor([ctx + tok(choice, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        return sum(float(logp[t - 1, ids[0, t]]) for t in range(len(ctx), ids.shape[1]))

    items = []
    for i, p in enumerate(PROMPTS):
        best = max(choices, key=lambda c: loglik(p, c))
        answer = best if i < 5 else next(c for c in choices if c != best)
        items.append(Item(str(i), p, answer, choices))
    results = make_backend("hf", model_dir, batch_size=4).score(Task("mc", "multiple_choice", items), range(8))
    assert [r.score for r in results] == [1.0] * 5 + [0.0] * 3
    assert all(r.output in choices for r in results)


def sequence_probability(model, tok, prompt: str, target_ids: list[int]) -> float:
    """Teacher-forced probability of ``target_ids`` after the prompt, one sequence at a time."""
    ctx = tok(prompt).input_ids
    ids = torch.tensor([ctx + target_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(torch.exp(sum(logp[t - 1, ids[0, t]] for t in range(len(ctx), ids.shape[1]))))


def test_likelihood_is_the_teacher_forced_probability_of_the_reference(model_dir):
    backend = make_backend("hf", model_dir, batch_size=3)
    model, tok = tiny_model(0), backend.tokenizer
    refs = [greedy_reference(model, tok, p, 4) for p in PROMPTS]
    items = [Item(str(i), p, "0", meta={"worked": refs[i] or "a"}) for i, p in enumerate(PROMPTS)]
    task = Task("t", "generate", items, max_new_tokens=4, target="worked", target_eos=True)
    results = backend.likelihood(task, [5, 0, 7, 2, 1, 3, 4, 6])
    assert [r.index for r in results] == [5, 0, 7, 2, 1, 3, 4, 6]
    for r in results:
        target = tok(items[r.index].meta["worked"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        expected = sequence_probability(model, tok, PROMPTS[r.index], target)
        assert 0.0 < r.score <= 1.0
        assert r.score == pytest.approx(expected, rel=1e-4, abs=1e-9)
    # Without target_eos the reference is the answer alone, not followed by end-of-sequence.
    plain = backend.likelihood(Task("t", "generate", items, max_new_tokens=4), [0])[0]
    assert plain.score == pytest.approx(sequence_probability(model, tok, PROMPTS[0], tok("0", add_special_tokens=False).input_ids), rel=1e-4)


def test_likelihood_prefers_the_models_own_greedy_output(model_dir):
    """Greedy decoding's output is the most probable continuation token by token, so its
    probability beats a reference that differs from it (the graded score ranks like accuracy)."""
    backend = make_backend("hf", model_dir)
    refs = [greedy_reference(tiny_model(0), backend.tokenizer, p, 4) for p in PROMPTS]
    own = [Item(str(i), p, refs[i]) for i, p in enumerate(PROMPTS) if refs[i]]
    wrong = [Item(it.id, it.prompt, "Q" + it.answer[1:]) for it in own if it.answer[0] != "Q"]
    own = [it for it in own if it.answer[0] != "Q"]
    assert own
    p_own = backend.likelihood(Task("t", "generate", own), range(len(own)))
    p_wrong = backend.likelihood(Task("t", "generate", wrong), range(len(wrong)))
    assert all(a.score > b.score for a, b in zip(p_own, p_wrong))


def test_likelihood_of_multiple_choice_is_the_correct_choices_share(model_dir):
    backend = make_backend("hf", model_dir)
    choices = ["12", "ab", "Bolu"]
    items = [Item(str(c), "rev:abc=", choice, choices) for c, choice in enumerate(choices)]
    shares = [r.score for r in backend.likelihood(Task("mc", "multiple_choice", items), range(3))]
    assert sum(shares) == pytest.approx(1.0)
    picked = backend.score(Task("mc", "multiple_choice", items), range(3))
    assert [r.score for r in picked] == [float(s == max(shares)) for s in shares]


def test_weights_swapped_in_place_match_fresh_model(tmp_path, model_dir):
    other = tiny_model(1)
    other_dir = save(other, tmp_path / "other")
    items = [Item(str(i), p, "7") for i, p in enumerate(PROMPTS)]
    task = Task("t", "generate", items, max_new_tokens=5)
    backend = make_backend("hf", model_dir)
    before = [r.output for r in backend.score(task, range(8))]
    param_ids = {n: id(p) for n, p in backend.model.named_parameters()}
    backend.load_weights(other.state_dict(), other.config.to_dict())
    swapped = backend.score(task, range(8))
    fresh = make_backend("hf", other_dir).score(task, range(8))
    assert [(r.output, r.score) for r in swapped] == [(r.output, r.score) for r in fresh]
    assert [r.output for r in swapped] != before          # the swap really changed the model
    assert {n: id(p) for n, p in backend.model.named_parameters()} == param_ids   # no rebuild
    assert backend.rebuilds == 0


def test_layer_count_change_rebuilds(tmp_path, model_dir):
    deeper = tiny_model(2, layers=3)
    deeper_dir = save(deeper, tmp_path / "deeper")
    task = Task("t", "generate", [Item(str(i), p, "1") for i, p in enumerate(PROMPTS)], max_new_tokens=4)
    backend = make_backend("hf", model_dir)
    backend.load_weights(deeper.state_dict(), deeper.config.to_dict())
    assert backend.rebuilds == 1 and backend.model.config.num_hidden_layers == 3
    assert [r.output for r in backend.score(task, range(8))] == \
        [r.output for r in make_backend("hf", deeper_dir).score(task, range(8))]


def test_bad_weights_name_the_tensor(model_dir):
    backend = make_backend("hf", model_dir)
    state = tiny_model(0).state_dict()
    config = backend.model.config.to_dict()
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        backend.load_weights({k: v for k, v in state.items() if k != "model.norm.weight"}, config)
    bad = dict(state)
    bad["model.norm.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        backend.load_weights(bad, config)


def test_missing_tokenizer_is_a_one_line_error(tmp_path):
    tiny_model(0).save_pretrained(tmp_path / "m", safe_serialization=True)
    with pytest.raises(CheckpointError, match="no tokenizer") as err:
        make_backend("hf", tmp_path / "m")
    assert str(tmp_path / "m") in str(err.value) and "\n" not in str(err.value)


def test_not_a_model_dir_and_unknown_backend(tmp_path, model_dir):
    with pytest.raises(CheckpointError, match="config.json"):
        make_backend("hf", tmp_path)
    with pytest.raises(EvomergeError, match="unknown backend 'onnx'"):
        make_backend("onnx", model_dir)


def test_item_index_out_of_range(model_dir):
    task = Task("t", "generate", [Item("0", "1+1=", "2")])
    with pytest.raises(EvomergeError, match="index 3"):
        make_backend("hf", model_dir).score(task, [3])
