"""The offline demo suite: small classification tasks over a tiny vocabulary.

Built so the study's questions can be asked of a model trained on a laptop in a minute:
- 10 tasks in 5 clusters, each with its own instruction;
- `first_color` and `last_color` read the same inputs and differ only by instruction,
  so their label depends on the task, not on the text alone;
- `mixed_review` and `number_parity` are held out of the demo tuning mix (seen=False),
  like the study's unseen tasks.
Everything is a pure function of the seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .base import TaskData, finalize_task

COLORS = ["red", "blue", "green", "yellow", "purple"]
OBJECTS = ["cup", "box", "hat", "ball", "kite", "shoe"]
POSITIVE = ["great", "good", "fun", "lovely", "nice"]
NEGATIVE = ["bad", "awful", "boring", "sad", "dull"]
TOPICS = {
    "sports": ["game", "team", "goal", "coach", "match"],
    "food": ["bread", "soup", "cake", "salad", "pie"],
    "music": ["song", "band", "drum", "guitar", "choir"],
    "travel": ["train", "beach", "hotel", "map", "ferry"],
}
ANIMALS = {
    "mammal": ["cat", "dog", "horse", "cow", "fox"],
    "bird": ["owl", "duck", "crow", "hawk", "swan"],
    "fish": ["trout", "shark", "tuna", "cod", "eel"],
}
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PLACES = ["park", "lake", "farm", "forest", "river"]

PROMPT_TEMPLATE = "{instruction}\nInput: {text}\nAnswer:"


def _review(rng: random.Random) -> tuple[str, list[str]]:
    topic = rng.choice(sorted(TOPICS))
    noun = rng.choice(TOPICS[topic])
    adjectives = [rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE) for _ in range(3)]
    return f"the {noun} was {adjectives[0]} and {adjectives[1]} but {adjectives[2]}", adjectives


def _sentiment(rng):
    text, adjs = _review(rng)
    pos = sum(a in POSITIVE for a in adjs)
    return text, "positive" if pos >= 2 else "negative"


def _mixed_review(rng):
    text, adjs = _review(rng)
    pos = sum(a in POSITIVE for a in adjs)
    return text, "mixed" if 0 < pos < 3 else "uniform"


def _topic(rng):
    topic = rng.choice(sorted(TOPICS))
    noun = rng.choice(TOPICS[topic])
    adj = rng.choice(POSITIVE + NEGATIVE)
    place = rng.choice(PLACES)
    return f"we saw the {adj} {noun} near the {place}", topic


def _colors_pair(rng):
    a, b = rng.sample(COLORS, 2)
    oa, ob = rng.choice(OBJECTS), rng.choice(OBJECTS)
    return f"a {a} {oa} and a {b} {ob}", (a, b)


def _first_color(rng):
    text, (a, _) = _colors_pair(rng)
    return text, a


def _last_color(rng):
    text, (_, b) = _colors_pair(rng)
    return text, b


def _animal(rng):
    kind = rng.choice(sorted(ANIMALS))
    animal = rng.choice(ANIMALS[kind])
    place = rng.choice(PLACES)
    return f"the {animal} was near the {place}", kind


def _animal_place(rng):
    kind = rng.choice(sorted(ANIMALS))
    animal = rng.choice(ANIMALS[kind])
    place = rng.choice(PLACES)
    return f"the {animal} was near the {place}", place


def _two_numbers(rng):
    a, b = rng.sample(range(1, 10), 2)
    return f"{NUMBERS[a - 1]} or {NUMBERS[b - 1]}", (a, b)


def _bigger_number(rng):
    text, (a, b) = _two_numbers(rng)
    return text, "first" if a > b else "second"


def _number_parity(rng):
    text, (a, _) = _two_numbers(rng)
    return text, "even" if a % 2 == 0 else "odd"


def _count_objects(rng):
    k = rng.randint(1, 4)
    objs = [rng.choice(OBJECTS) for _ in range(k)]
    return "i have " + " and ".join(f"a {o}" for o in objs), ["one", "two", "three", "four"][k - 1]


@dataclass(frozen=True)
class DemoTask:
    name: str
    cluster: str
    instruction: str
    labels: tuple[str, ...]
    make: Callable[[random.Random], tuple[str, str]]
    seen: bool = True


DEMO_TASKS: dict[str, DemoTask] = {
    t.name: t
    for t in [
        DemoTask("sentiment", "sentiment", "Is this review positive or negative?", ("positive", "negative"), _sentiment),
        DemoTask("mixed_review", "sentiment", "Does this review mix praise and complaints?", ("mixed", "uniform"), _mixed_review, seen=False),
        DemoTask("topic", "topic", "What is this sentence about?", tuple(sorted(TOPICS)), _topic),
        DemoTask("first_color", "order", "Name the color that comes first.", tuple(COLORS), _first_color),
        DemoTask("last_color", "order", "Name the color that comes last.", tuple(COLORS), _last_color),
        DemoTask("animal_class", "animals", "What kind of animal is mentioned?", tuple(sorted(ANIMALS)), _animal),
        DemoTask("animal_place", "animals", "Where was the animal?", tuple(PLACES), _animal_place),
        DemoTask("bigger_number", "numbers", "Which number is bigger, the first or the second?", ("first", "second"), _bigger_number),
        DemoTask("number_parity", "numbers", "Is the first number even or odd?", ("even", "odd"), _number_parity, seen=False),
        DemoTask("count_objects", "numbers", "How many things do I have?", ("one", "two", "three", "four"), _count_objects),
    ]
}


def knowledge_texts(n: int, seed: int) -> list[str]:
    """n short statements of the lexicon's facts (word categories, polarity, number order and
    parity), for the base's pre-training corpus.

    A real pre-trained model already knows that a hawk is a bird or that awful is negative;
    instruction tuning teaches it to answer a question with what it knows. Without these
    statements the tiny demo base would have no notion of a category at all, and tuning
    would have to teach the lexicon instead of the tasks.
    """
    rng = random.Random(f"{seed}:knowledge")
    facts = []
    for topic, nouns in TOPICS.items():
        facts += [f"a {noun} is about {topic}" for noun in nouns]
    for kind, animals in ANIMALS.items():
        facts += [f"the {animal} is a {kind}" for animal in animals]
    facts += [f"{adj} is a positive word" for adj in POSITIVE] + [f"{adj} is a negative word" for adj in NEGATIVE]
    for a in range(1, 10):
        facts.append(f"{NUMBERS[a - 1]} is {'even' if a % 2 == 0 else 'odd'}")
        facts += [f"{NUMBERS[a - 1]} is bigger than {NUMBERS[b - 1]}" for b in range(1, a)]
    return [rng.choice(facts) for _ in range(n)]


def demo_examples(task: DemoTask, n: int, seed: int) -> list[tuple[str, str]]:
    """n (input text, answer) pairs; the same (task, n, seed) always gives the same list.

    first_color and last_color draw from one shared stream so their inputs coincide.
    """
    stream = "colors" if task.make in (_first_color, _last_color) else task.name
    rng = random.Random(f"{seed}:{stream}")
    return [task.make(rng) for _ in range(n)]


def render(task: DemoTask, text: str) -> str:
    return PROMPT_TEMPLATE.format(instruction=task.instruction, text=text)


def load_demo_suite(
    names: list[str] | None, n_per_task: int, seed: int, fractions: tuple[float, float, float], split_seed: int
) -> list[TaskData]:
    selected = list(DEMO_TASKS) if not names else names
    unknown = [t for t in selected if t not in DEMO_TASKS]
    if unknown:
        from .base import TaskError

        raise TaskError(
            f"unknown demo task(s) {unknown}; valid: {', '.join(DEMO_TASKS)} (e.g. 'task.tasks=[sentiment,topic]')"
        )
    tasks = []
    for name in selected:
        spec = DEMO_TASKS[name]
        rows = []
        for i, (text, answer) in enumerate(demo_examples(spec, n_per_task, seed)):
            rows.append((f"{name}:{i}", render(spec, text), spec.labels.index(answer)))
        tasks.append(
            finalize_task(name, spec.cluster, spec.instruction, list(spec.labels), rows, fractions, split_seed, spec.seen, "demo")
        )
    return tasks
