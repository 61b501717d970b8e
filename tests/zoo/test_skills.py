"""Synthetic skills: correct answers, determinism, and what the base is (not) taught."""

from __future__ import annotations

import random
import re

from evomerge.zoo import build, skills
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


def test_pretraining_never_teaches_the_unknown_words():
    rng = random.Random(2)
    unknown = DIGIT_WORDS[KNOWN_DIGITS:] + [NOUN_WORDS[n] for n in skills.NOUNS if n not in skills.KNOWN_NOUNS]
    formats, given = set(), 0
    for _ in range(3000):
        prompt, answer, tail = skills.pretrain_example(rng)
        formats.add(prompt.split(":")[0] if ":" in prompt else "arith")
        assert not tail
        if any(w in prompt for w in unknown):
            # only a composite item may show an unknown word, and then with its translation
            # in the prompt: the sum is taught, the word is not
            assert prompt.startswith("calc:")
            expr = prompt.split("=")[1]
            assert untoy(prompt[5:prompt.index("=")]) == expr and int(answer) == eval(expr)
            given += 1
        assert not any(w in answer for w in unknown)
    assert formats == {"arith", "rev", "up", "sort", "tr", "calc"}
    assert given > 100                               # sums on every digit are taught


def test_expert_corpora_teach_only_their_half_of_the_composite():
    rng = random.Random(3)
    seen = {"arith": set(), "lang": set()}
    for _ in range(400):
        prompt, answer, tail = skills.expert_example("arith", rng)
        if prompt.startswith("calc:"):            # translation given, sum taught
            assert prompt.count("=") == 2 and not tail
            assert eval(prompt.split("=")[1]) == int(answer)
            seen["arith"].add("calc")
        prompt, answer, tail = skills.expert_example("lang", rng)
        if prompt.startswith("calc:"):            # translation taught, sum untaught
            assert untoy(prompt[5:-1]) + "=" == answer and int(tail) == eval(answer[:-1])
            seen["lang"].add("calc")
        prompt, answer, tail = skills.expert_example("strings", rng)
        assert prompt.split(":")[0] in ("rev", "up", "sort") and not tail
    assert seen == {"arith": {"calc"}, "lang": {"calc"}}


def test_training_never_sees_a_shipped_item():
    from evomerge.tasks.task import load_task

    shipped = build.eval_prompts()
    assert shipped == {item.prompt for t in TASKS for split in ("search", "heldout")
                       for item in load_task(f"zoo/{t}:{split}").items}
    sampler = build._excluding(shipped, skills.pretrain_example)
    rng = random.Random(4)
    for _ in range(2000):
        assert skills.item_key(sampler(rng)[0]) not in shipped
    assert skills.item_key("calc:KaMi+Po=12+3=") == "calc:KaMi+Po="
