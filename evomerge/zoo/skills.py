"""Deterministic synthetic skills for the zoo.

Four tasks, each with three difficulty levels:

- ``arith``: ``"47+85="`` -> ``"132"`` (multi-digit addition; 1+1, 2+1 and 2+2 digits).
- ``strings``: ``"rev:abc="`` -> ``"cba"``; also ``up:`` (uppercase) and ``sort:``.
- ``lang``: a toy second language. Every digit and sixteen nouns have a made-up word
  (one token each, see ``tokenizer.py``); ``"tr:KaMi+Bolu="`` -> ``"12+cat"``.
- ``calc`` (composite): a sum whose operands are written in the toy language. The answer
  is worked out as translation then sum, ``"calc:KaMi+PoLe="`` -> ``"12+34=46"``, so a model
  needs the language skill for the first half and the arithmetic skill for the second --
  the small analogue of "Japanese math" in Sakana's evolutionary merge.

What each model is taught (the recipe that makes merging matter, ``docs/zoo-notes.md``):

- the **base** sees every format in a short pretraining run, so it half-knows arithmetic
  and strings, but it only ever sees the toy words for digits 0-4 and half the nouns. In
  composite items with an unknown word the translation is given in the prompt and only the
  sum is taught, so the base learns the composite's sum step on every digit;
- the **arith expert** continues on sums, both plain and inside composite items whose
  translation is given (a math corpus);
- the **lang expert** continues on the whole toy language, translating plain phrases and
  the operands of composite items, whose sums stay untaught (a toy-language corpus);
- the **strings expert** continues on string operations.

So no single model solves ``calc`` on items with the digits 5-9: the lang expert translates
but sums like the base, the arith expert sums but cannot read the new words. A merge that
keeps both skills can.
"""

from __future__ import annotations

import random
import string

DIGIT_WORDS = ["Zu", "Ka", "Mi", "Po", "Le", "Ta", "Ni", "Ro", "Sa", "Ve"]
NOUN_WORDS = {
    "cat": "Bolu", "dog": "Fen", "sun": "Gasi", "tree": "Hork", "fish": "Jeb", "bird": "Kwal",
    "moon": "Lurn", "rock": "Modi", "star": "Nusk", "rain": "Orv", "fire": "Pim", "wind": "Quon",
    "leaf": "Rask", "milk": "Sude", "bread": "Tavo", "road": "Ulm",
}
TOY_WORDS = DIGIT_WORDS + list(NOUN_WORDS.values())
NOUNS = list(NOUN_WORDS)
KNOWN_DIGITS = 5                       # the base knows the words for digits 0..4
KNOWN_NOUNS = NOUNS[: len(NOUNS) // 2]  # ... and for the first half of the nouns

SKILLS = ("arith", "strings", "lang")
TASKS = ("arith", "strings", "lang", "calc")
LEVELS = (1, 2, 3)
Example = tuple[str, str, str]          # (prompt, taught answer, untaught tail)


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def toy_number(n: int) -> str:
    return "".join(DIGIT_WORDS[int(d)] for d in str(n))


def _operands(rng: random.Random, level: int) -> tuple[int, int]:
    """Level 1: 1-digit operands; 2: 2-digit with 1-digit; 3: 2-digit with 2-digit."""
    return _number(rng, 1 if level == 1 else 2), _number(rng, 2 if level == 3 else 1)


def arith(rng: random.Random, level: int) -> tuple[str, str]:
    a, b = _operands(rng, level)
    return f"{a}+{b}=", str(a + b)


def strings(rng: random.Random, level: int) -> tuple[str, str]:
    length = rng.randint(2 * level, 2 * level + 1)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
    op = rng.choice(["rev", "up", "sort"])
    answer = {"rev": word[::-1], "up": word.upper(), "sort": "".join(sorted(word))}[op]
    return f"{op}:{word}=", answer


def _lang_phrase(rng: random.Random, level: int, digits: int, nouns: list[str]) -> tuple[str, str]:
    toy, plain = [], []
    for _ in range(level):
        if rng.random() < 0.5:
            n = int("".join(str(rng.randrange(digits)) for _ in range(rng.randint(1, 2))))
            toy.append(toy_number(n))
            plain.append(str(n))
        else:
            noun = rng.choice(nouns)
            toy.append(NOUN_WORDS[noun])
            plain.append(noun)
    sep = rng.choice(["+", " "])
    return sep.join(toy), sep.join(plain)


def lang(rng: random.Random, level: int) -> tuple[str, str]:
    toy, plain = _lang_phrase(rng, level, 10, NOUNS)
    return f"tr:{toy}=", plain


def calc_prompt(a: int, b: int) -> str:
    return f"calc:{toy_number(a)}+{toy_number(b)}="


def calc(rng: random.Random, level: int) -> tuple[str, str]:
    """Composite item (levels as in ``arith``); the full answer is the worked ``"a+b=sum"``."""
    a, b = _operands(rng, level)
    return calc_prompt(a, b), f"{a}+{b}={a + b}"


GENERATORS = {"arith": arith, "strings": strings, "lang": lang, "calc": calc}


def sample(task: str, rng: random.Random, level: int | None = None) -> tuple[str, str]:
    return GENERATORS[task](rng, level or rng.choice(LEVELS))


def item_key(prompt: str) -> str:
    """The evaluation prompt a training example belongs to (composite examples may carry
    their translation in the prompt), so shipped items can be kept out of training."""
    return prompt[: prompt.index("=") + 1] if prompt.startswith("calc:") else prompt


# ---------------------------------------------------------------- training corpora
def _composite_with_translation(a: int, b: int) -> Example:
    """A composite item whose translation is given; only the sum is taught."""
    return f"{calc_prompt(a, b)}{a}+{b}=", str(a + b), ""


def _composite_translation_only(a: int, b: int) -> Example:
    """A composite item whose translation is taught and whose sum follows untaught."""
    return calc_prompt(a, b), f"{a}+{b}=", str(a + b)


def pretrain_example(rng: random.Random) -> Example:
    """One pretraining example ``(prompt, answer, untaught tail)``.

    Every format at every level, but only the toy words for digits 0-4 and half the nouns
    are ever taught: a composite item with an unknown word comes with its translation in
    the prompt, so the base learns the composite's sum step without learning the word.
    """
    task = rng.choice(TASKS)
    level = rng.choice(LEVELS)
    if task == "lang":
        toy, plain = _lang_phrase(rng, level, KNOWN_DIGITS, KNOWN_NOUNS)
        return f"tr:{toy}=", plain, ""
    if task == "calc":
        a, b = _operands(rng, level)
        if max(f"{a}{b}") < str(KNOWN_DIGITS):
            return calc_prompt(a, b), f"{a}+{b}={a + b}", ""
        return _composite_with_translation(a, b)
    return (*sample(task, rng, level), "")


def expert_example(skill: str, rng: random.Random) -> Example:
    """One example of an expert's corpus: its skill, in its own format and (arith, lang)
    inside composite items, where only the expert's half of the composite is taught."""
    if skill == "arith" and rng.random() < 0.5:
        return _composite_with_translation(*_operands(rng, rng.choice(LEVELS)))
    if skill == "lang" and rng.random() < 0.5:
        return _composite_translation_only(*_operands(rng, rng.choice(LEVELS)))
    return (*sample(skill, rng), "")


# Only 100 distinct 1-digit sums exist, and every shipped item is kept out of training:
# sums ship fewer level-1 items so that most 1-digit sums stay in the training corpora.
LEVEL_CYCLES = {"arith": (1, 2, 3, 2, 3), "calc": (1, 2, 3, 2, 3)}


def item_level(task: str, index: int) -> int:
    cycle = LEVEL_CYCLES.get(task, LEVELS)
    return cycle[index % len(cycle)]


def make_items(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, full answer) pairs, levels in the task's fixed cycle."""
    rng = random.Random(f"{task}-items-{seed}")
    seen, items = set(), []
    while len(items) < n:
        prompt, answer = sample(task, rng, item_level(task, len(items)))
        if prompt not in seen:
            seen.add(prompt)
            items.append((prompt, answer))
    return items


# ---------------------------------------------------------------- shipped task files
N_SEARCH, N_HELDOUT = 200, 100
TASK_SPECS = {
    "arith": dict(max_new_tokens=6, extract=None, about="multi-digit addition"),
    "strings": dict(max_new_tokens=9, extract=None, about="reverse / uppercase / sort a string"),
    "lang": dict(max_new_tokens=20, extract=None, about="translate the toy language"),
    "calc": dict(max_new_tokens=10, extract=r"=(-?\d+)", about="sums of toy-language numbers"),
}


def task_files() -> dict[str, str]:
    """File name -> content of every zoo task (YAML + JSONL splits), deterministically."""
    import json

    files = {}
    for task, spec in TASK_SPECS.items():
        items = make_items(task, N_SEARCH + N_HELDOUT, seed=0)
        for split, chunk in (("search", items[:N_SEARCH]), ("heldout", items[N_SEARCH:])):
            offset = 0 if split == "search" else N_SEARCH
            lines = []
            for i, (prompt, full) in enumerate(chunk):
                row = {"id": f"{task}-{offset + i:03d}", "prompt": prompt,
                       "answer": full.rpartition("=")[2] if task == "calc" else full,
                       "level": item_level(task, offset + i)}
                if task == "calc":
                    row["worked"] = full
                lines.append(json.dumps(row))
            files[f"{task}.{split}.jsonl"] = "\n".join(lines) + "\n"
        extract = "" if spec["extract"] is None else f"extract: '{spec['extract']}'\n"
        # The zoo is trained on prompt + output + </s>: that is the reference likelihood scoring reads.
        target = "target: worked\n" if task == "calc" else ""
        files[f"{task}.yaml"] = (
            f"# zoo task: {spec['about']} (generated by evomerge.zoo.skills.task_files)\n"
            f"name: zoo/{task}\nkind: generate\nmax_new_tokens: {spec['max_new_tokens']}\n{extract}"
            f"{target}target_eos: true\n"
            f"splits:\n  search: {task}.search.jsonl\n  heldout: {task}.heldout.jsonl\n"
            f"default_split: search\n"
        )
    return files
