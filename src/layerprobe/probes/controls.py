"""Control tasks tied to input types (Hewitt & Liang 2019), and the MDL block schedule.

Control task. Hewitt & Liang give every word *type* a random label; because types recur
across splits, a probe can score above chance on the control task's test set only by
having memorized, from the representation, which type gets which label. That memorizing
capacity is what selectivity (accuracy - control accuracy) discounts. A sentence-level
task has no word to label, and a random label per sentence says nothing (every sentence
is unique). Our sentence analogue picks ONE content word of each prompt as its type:

    type(prompt) = the content word w of the prompt that minimizes hash(seed, w)

over the prompt's *recurring* content words: lower-cased alphanumeric words, not stop
words, in at least `min_count` prompts of the task and in at most `max_share` of them
(words of the task's template and instruction are in every prompt and drop out). This is
a seeded min-hash: two prompts get the same type with probability equal to the Jaccard
overlap of their word sets, so types recur, and the type is a word, as in H&L. Each type
gets a random label, with the train split's class shares over the examples (see
`control_labels`); prompts without a recurring content word share one type. The choice uses the
prompts only, never the labels or any model, so every model and layer sees the same
control task.

MDL (Voita & Titov 2020, online code): the train split, in a seeded order, is sent in
blocks that end at the fractions `mdl_fractions` of it; the first block costs
log2(num_classes) bits per example, every later block costs its examples' -log2 p(y | x)
under a probe trained on everything sent before it (the best of the weight-decay grid, or
the uniform code, named in log2(G + 1) bits). See docs/probing.md.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter

import numpy as np

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both but by
can could did do does doing down during each few for from further had has have having he her here hers herself him
himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only or other
our ours ourselves out over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which while who whom why will
with would you your yours yourself yourselves
""".split())
WORD = re.compile(r"[a-z0-9]+")
NO_TYPE = "<none>"


def _hash(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest(), "big")


def content_words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOP_WORDS and len(w) > 1}


def control_types(texts: list[str], seed: int, min_count: int = 3, max_share: float = 0.5) -> list[str]:
    """The type of every prompt: its recurring content word of least seeded hash (module doc)."""
    words = [content_words(t) for t in texts]
    df = Counter(w for ws in words for w in ws)
    limit = max_share * len(texts)
    eligible = {w for w, c in df.items() if min_count <= c <= limit}
    types = []
    for ws in words:
        candidates = ws & eligible
        types.append(min(candidates, key=lambda w: (_hash(seed, w), w)) if candidates else NO_TYPE)
    return types


def control_labels(types: list[str], train_labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """One random label per type, with the train split's label shares over the examples.

    Types are put in a seeded random order and laid end to end, each as long as its number
    of examples; a type gets the label whose share of [0, 1) (the train label distribution,
    laid out in class order) holds the type's midpoint. Every type's label is random (it
    depends on the seeded order only) and the control labels have the task's class balance
    up to one type's size (systematic sampling; Hewitt & Liang draw each type's label from
    the same distribution independently). Balance matters: on features that carry nothing
    the probe predicts the majority class of either task, and selectivity is then ~0.
    """
    freq = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    cum = np.cumsum(freq / freq.sum())
    counts = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    order = sorted(counts, key=lambda t: (_hash(seed + 1, t), t))
    label_of, done, total = {}, 0, len(types)
    for t in order:
        mid = (done + counts[t] / 2) / total
        label_of[t] = int(min(np.searchsorted(cum, mid, side="right"), num_classes - 1))
        done += counts[t]
    return np.array([label_of[t] for t in types], dtype=np.int64)


def mdl_block_ends(n: int, fractions: list[float]) -> list[int]:
    """Ends of the online-code blocks over n examples (each >= 1, increasing, the last = n)."""
    ends = sorted({min(n, max(1, math.ceil(f * n - 1e-9))) for f in fractions} | {n})
    return ends


def online_codelength(ends: list[int], num_classes: int, block_bits: np.ndarray) -> np.ndarray:
    """Total online codelength in bits over the blocks ending at `ends`.

    block_bits [..., B-1, G]: bits for block b+1 under the probe with weight decay g trained
    on blocks 0..b. The first block is sent with the uniform code. Every later block is sent
    with the best of G + 1 choices, the G probes or the zero probe (= the uniform code, the
    limit of infinite weight decay), plus log2(G + 1) bits that name the choice: a two-part
    code the receiver can decode, and never much longer than the uniform code.
    """
    sizes = np.diff(np.asarray(ends, dtype=np.float64))  # [B-1]
    per_example = math.log2(num_classes)
    uniform = np.broadcast_to(sizes * per_example, block_bits.shape[:-1])[..., None]
    choices = np.concatenate([block_bits, uniform], axis=-1)
    naming = math.log2(choices.shape[-1])
    return ends[0] * per_example + (choices.min(-1) + naming).sum(-1)
