"""Deterministic synthetic skills for the zoo.

Four tasks, each with three difficulty levels:

- ``arith``: ``"47+385="`` -> ``"432"`` (addition / subtraction, 1-3 digit operands).
- ``strings``: ``"rev:abc="`` -> ``"cba"``; also ``up:`` (uppercase) and ``sort:``.
- ``lang``: a toy second language. Every digit and sixteen nouns have a made-up word
  (one token each, see ``tokenizer.py``); ``"tr:KaMi+Bolu="`` -> ``"12+cat"``.
- ``calc`` (composite): arithmetic whose operands are written in the toy language. The
  answer is worked out as translation then sum, ``"calc:KaMi+PoLe="`` -> ``"12+34=46"``,
  so a model needs the language skill for the first half and the arithmetic skill for
  the second -- the small analogue of "Japanese math" in Sakana's evolutionary merge.

The base model sees every format while pretraining but learns only the easy part of
each skill (1-digit sums, the words for digits 0-4, strings of length <= 3, the first
half of the nouns); harder items come with random answers of the right shape, so the
base knows *what* to write but not *how*. Each expert is then fine-tuned on its full skill.
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


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def toy_number(n: int) -> str:
    return "".join(DIGIT_WORDS[int(d)] for d in str(n))


def arith(rng: random.Random, level: int) -> tuple[str, str]:
    """Level 1: 1-digit operands; 2: 2-digit with 1-digit; 3: 2-digit with 2-digit."""
    a, b = _number(rng, 1 if level == 1 else 2), _number(rng, 2 if level == 3 else 1)
    if rng.random() < 0.5:
        return f"{a}+{b}=", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", str(a - b)


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


def calc(rng: random.Random, level: int) -> tuple[str, str]:
    """Composite item (levels as in ``arith``); the full answer is the worked ``"a+b=sum"``."""
    a, b = _number(rng, 1 if level == 1 else 2), _number(rng, 2 if level == 3 else 1)
    if rng.random() < 0.5:
        return f"calc:{toy_number(a)}+{toy_number(b)}=", f"{a}+{b}={a + b}"
    a, b = max(a, b), min(a, b)
    return f"calc:{toy_number(a)}-{toy_number(b)}=", f"{a}-{b}={a - b}"


GENERATORS = {"arith": arith, "strings": strings, "lang": lang, "calc": calc}


def sample(task: str, rng: random.Random, level: int | None = None) -> tuple[str, str]:
    return GENERATORS[task](rng, level or rng.choice(LEVELS))


# ---------------------------------------------------------------- pretraining corpus
def pretrain_example(rng: random.Random) -> tuple[str, str, str]:
    """One pretraining example ``(prompt, answer, unsupervised tail)``.

    Every format appears, but only the easy part of each skill is taught: 1-digit sums,
    strings of length <= 3, the toy words for digits 0-4 and half the nouns. Composite items
    use only known words; with 2-digit operands their sum is left unsupervised (the tail),
    so the base learns the worked format "a+b=..." without learning 2-digit sums.
    """
    task = rng.choice(TASKS)
    if task == "arith":
        return (*arith(rng, 1), "")
    if task == "strings":
        return (*strings(rng, 1), "")
    if task == "lang":
        toy, plain = _lang_phrase(rng, rng.choice(LEVELS), KNOWN_DIGITS, KNOWN_NOUNS)
        return f"tr:{toy}=", plain, ""
    digits = [rng.randint(1, 2), rng.randint(1, 2)]
    a, b = (int("".join(str(rng.randrange(KNOWN_DIGITS)) for _ in range(d))) for d in digits)
    op = rng.choice("+-")
    if op == "-":
        a, b = max(a, b), min(a, b)
    result = str(a + b if op == "+" else a - b)
    prompt, head = f"calc:{toy_number(a)}{op}{toy_number(b)}=", f"{a}{op}{b}="
    if a < 10 and b < 10:
        return prompt, head + result, ""
    return prompt, head, result


def expert_example(skill: str, rng: random.Random) -> tuple[str, str]:
    return sample(skill, rng)


def make_items(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, full answer) pairs, levels balanced."""
    rng = random.Random(f"{task}-items-{seed}")
    seen, items = set(), []
    while len(items) < n:
        prompt, answer = sample(task, rng, LEVELS[len(items) % len(LEVELS)])
        if prompt not in seen:
            seen.add(prompt)
            items.append((prompt, answer))
    return items


# ---------------------------------------------------------------- shipped task files
N_SEARCH, N_HELDOUT = 200, 100
TASK_SPECS = {
    "arith": dict(max_new_tokens=6, extract=None, about="multi-digit addition/subtraction"),
    "strings": dict(max_new_tokens=9, extract=None, about="reverse / uppercase / sort a string"),
    "lang": dict(max_new_tokens=20, extract=None, about="translate the toy language"),
    "calc": dict(max_new_tokens=10, extract=r"=(-?\d+)", about="arithmetic on toy-language numbers"),
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
                       "level": LEVELS[(offset + i) % len(LEVELS)]}
                if task == "calc":
                    row["worked"] = full
                lines.append(json.dumps(row))
            files[f"{task}.{split}.jsonl"] = "\n".join(lines) + "\n"
        extract = "" if spec["extract"] is None else f"extract: '{spec['extract']}'\n"
        files[f"{task}.yaml"] = (
            f"# zoo task: {spec['about']} (generated by evomerge.zoo.skills.task_files)\n"
            f"name: zoo/{task}\nkind: generate\nmax_new_tokens: {spec['max_new_tokens']}\n{extract}"
            f"splits:\n  search: {task}.search.jsonl\n  heldout: {task}.heldout.jsonl\n"
            f"default_split: search\n"
        )
    return files
