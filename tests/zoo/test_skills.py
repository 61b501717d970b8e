"""Synthetic skills: correct answers, determinism, and what the base is (not) taught."""

from __future__ import annotations

import random
import re

from evomerge.zoo import skills
from evomerge.zoo.skills import DIGIT_WORDS, KNOWN_DIGITS, NOUN_WORDS, TASKS, make_items, sample

TOY_TO_PLAIN = {**{w: str(d) for d, w in enumerate(DIGIT_WORDS)}, **{w: n for n, w in NOUN_WORDS.items()}}


def untoy(text: str) -> str:
    words = sorted(TOY_TO_PLAIN, key=len, reverse=True)
    return re.sub("|".join(words), lambda m: TOY_TO_PLAIN[m.group(0)], text)


def test_answers_are_correct_at_every_level():
    rng = random.Random(0)
    for level in skills.LEVELS:
        for _ in range(50):
            p, a = sample("arith", rng, level)
            assert eval(p[:-1]) == int(a) and int(a) >= 0
            p, a = sample("strings", rng, level)
            op, word = p[:-1].split(":")
            assert a == {"rev": word[::-1], "up": word.upper(), "sort": "".join(sorted(word))}[op]
            p, a = sample("lang", rng, level)
            assert untoy(p[3:-1]) == a
            p, a = sample("calc", rng, level)
            expr, result = a.split("=")
            assert untoy(p[5:-1]) == expr and eval(expr) == int(result)


def test_levels_grow_harder():
    rng = random.Random(1)
    lengths = {lvl: sum(len(sample("arith", rng, lvl)[0]) for _ in range(100)) for lvl in skills.LEVELS}
    assert lengths[1] < lengths[2] < lengths[3]


def test_items_are_deterministic_and_distinct():
    for task in TASKS:
        items = make_items(task, 60, seed=0)
        assert items == make_items(task, 60, seed=0)
        assert len({p for p, _ in items}) == 60
        assert items != make_items(task, 60, seed=1)


def test_pretraining_teaches_only_the_easy_part():
    rng = random.Random(2)
    unknown = DIGIT_WORDS[KNOWN_DIGITS:] + [NOUN_WORDS[n] for n in skills.NOUNS if n not in skills.KNOWN_NOUNS]
    formats = set()
    for _ in range(2000):
        prompt, answer, tail = skills.pretrain_example(rng)
        formats.add(prompt.split(":")[0] if ":" in prompt else "arith")
        assert not any(w in prompt for w in unknown)
        if ":" not in prompt:                        # arithmetic: 1-digit operands only
            assert all(len(x) == 1 for x in re.split("[+-]", prompt[:-1]))
        if tail:                                     # a 2-digit composite sum is never supervised
            assert prompt.startswith("calc:") and answer.endswith("=")
    assert formats == {"arith", "rev", "up", "sort", "tr", "calc"}
