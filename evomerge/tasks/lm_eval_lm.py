"""An lm-eval ``LM`` whose answers come from an evomerge backend's resident model.

lm-eval asks an ``LM`` three things: ``loglikelihood`` (context, continuation) pairs,
``loglikelihood_rolling`` whole texts, and ``generate_until`` (context, generation kwargs).
``BackendLM`` answers them with whatever weights the backend holds right now, so a
candidate swapped in place (``Backend.load_weights``) is what lm-eval scores, with no model
reload and nothing on disk.

It subclasses lm-eval's own ``TemplateLM``, so lm-eval does the string-level work exactly as
it does for ``--model hf``: the context/continuation split (trailing spaces of the context move
to the continuation, the pair is tokenized whole and split at the context's length), the
empty-context prefix token, the rolling windows, the stop strings (EOS included) cut out of
generations. What is left for evomerge is what ``HFLM`` does with tokens, reproduced with the
same conventions: special tokens as the tokenizer adds them unless the text already starts
with BOS, left truncation to the model's maximum length (``lm_eval.models.utils.
resolve_max_length``, the value ``HFLM`` uses), greedy decoding of at most ``max_gen_toks``
tokens (256 when the task does not say), generations decoded without special tokens.

The backend supplies two token-level methods (both ``HFBackend`` and ``VLLMBackend`` have them):

    token_loglikelihoods(rows: list[(context_ids, continuation_ids)]) -> list[(logprob, is_greedy)]
    greedy_generate(prompts: list[list[int]], max_new_tokens: int, stop: list[str]) -> list[str]

and ``tokenizer`` / ``config``. Sampling (``do_sample: true`` or a temperature > 0) is
refused: a fitness must be a function of the weights.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text, resolve_max_length)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from evomerge.errors import EvomergeError

DEFAULT_MAX_GEN_TOKS = 256                 # HFLM.max_gen_toks
# generation kwargs that change nothing about greedy decoding
GREEDY_NEUTRAL = {"do_sample", "temperature", "top_p", "top_k"}


def check_generation_kwargs(task_name: str | None, gen_kwargs: dict) -> dict:
    """lm-eval's normalized generation kwargs, when they ask for greedy decoding; else an error
    naming the task (a fitness must be a function of the weights, not of a sampler's luck)."""
    kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
        raise EvomergeError(f"lm-eval task {task_name}: generation_kwargs ask for sampling; evomerge scores "
                            "greedy decoding only (do_sample: false)")
    other = sorted(set(kwargs) - GREEDY_NEUTRAL - {"until", "max_gen_toks"})
    if other:
        raise EvomergeError(f"lm-eval task {task_name}: generation_kwargs {', '.join(other)} are not supported "
                            "(greedy decoding with until and max_gen_toks)")
    return kwargs


class BackendLM(TemplateLM):
    """lm-eval's view of an evomerge backend (``HFBackend`` or ``VLLMBackend``)."""

    backend = "causal"                      # lm-eval's name for decoder-only tokenization

    def __init__(self, model_backend: Any) -> None:
        super().__init__()
        for method in ("token_loglikelihoods", "greedy_generate"):
            if not hasattr(model_backend, method):
                raise EvomergeError(f"backend {type(model_backend).__name__} cannot answer lm-eval requests "
                                    f"(it has no {method})")
        self.model_backend = model_backend
        self.tokenizer = model_backend.tokenizer
        # a search asks for the same requests candidate after candidate: tokenize each once
        self._pairs: dict[tuple[str, str], tuple] = {}
        self._prompts: dict[tuple[str, int], list[int]] = {}
        self._recording = False

    # ------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length()

    def _max_length(self) -> int:
        from transformers import PretrainedConfig

        # read per batch of requests: an architecture change (a rebuilt model) may change it
        config = self.model_backend.config
        config = PretrainedConfig(**config) if isinstance(config, dict) else config
        return resolve_max_length(config, self.tokenizer)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        if not getattr(self.tokenizer, "chat_template", None):
            raise EvomergeError(f"{self.tokenizer_name or 'the model'}: its tokenizer has no chat template "
                                "(apply_chat_template needs one)")
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        import jinja2

        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:
            # as HFLM: templates that refuse a system turn get the history without it
            return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kwargs)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False          # a chat template already wrote BOS
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # ------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        new = [req for req in requests if req.args not in self._pairs]
        if new:
            # lm-eval's own TemplateLM.loglikelihood tokenizes them; _loglikelihood_tokens
            # only records its encodings while _recording is set
            self._recording = True
            try:
                super().loglikelihood(new, disable_tqdm=True)
            finally:
                self._recording = False
        return self._loglikelihood_tokens([self._pairs[req.args] for req in requests])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        if self._recording:
            for encoded in requests:
                self._pairs[encoded[0]] = encoded
            return [(0.0, False)] * len(requests)
        limit = self._max_length() + 1
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise EvomergeError("lm-eval request with an empty context or continuation after tokenization")
            # too long: drop tokens from the left, as HFLM does (the continuation is always kept)
            whole = (context + continuation)[-limit:]
            rows.append((whole[: len(whole) - len(continuation)], continuation))
        return self.model_backend.token_loglikelihoods(rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[r] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for r, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=str)), []).append(r)
        outputs: list[str] = [""] * len(requests)
        for members in groups.values():
            kwargs = check_generation_kwargs(requests[members[0]].task_name, requests[members[0]].args[1])
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_context = self.max_length - max_gen
            if max_context <= 0:
                raise EvomergeError(f"lm-eval task {requests[members[0]].task_name}: max_gen_toks {max_gen} "
                                    f"leaves no room for a prompt (the model's maximum length is {self.max_length})")
            prompts = [self._generation_prompt(requests[r].args[0], max_context) for r in members]
            # the EOS string needs no watching: the EOS token already ends a generation and the
            # decoded text never shows it (and without stop strings nothing is decoded per step)
            texts = self.model_backend.greedy_generate(prompts, max_gen, [s for s in until if s != eos])
            for r, text in zip(members, texts):
                outputs[r] = postprocess_generated_text(text, until, None)
        return outputs

    def _generation_prompt(self, context: str, max_context: int) -> list[int]:
        # HFLM's tok_batch_encode: special tokens unless the text starts with BOS, left truncation
        key = (context, max_context)
        if key not in self._prompts:
            bos = getattr(self.tokenizer, "bos_token", None)
            kw = {"add_special_tokens": False} if has_bos_prefix(context, bos) else {}
            self._prompts[key] = self.tokenizer(context, **kw)["input_ids"][-max_context:]
        return self._prompts[key]
