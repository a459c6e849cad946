"""The Flan 2021 suite (Wei et al., 2021): its datasets in 12 clusters, as probe tasks.

Data comes through `datasets` in the public Flan 2021 layout: one row per prompt with
`inputs` (the instruction-templated prompt), `targets` (the answer) and `task` (the
dataset). The default source is the hub dataset `Muennighoff/flan` (split `validation`);
`task.data_files=PATH` reads local json/jsonl/parquet files in the same layout, offline.
Task names in the data are mapped onto the suite's names (`glue/sst2:2.0.0`,
`sst2_10templates`, `wmt16_translate/de-en` ... -> `sst2`, `wmt16_deen`).

Probe targets (`task.target`; `default` takes each task's own, listed in docs/tasks.md):
- `label`: classification tasks get the answer's class among their answer options. With a
  fixed option set (sst2: negative / positive) the class is the option text; with options
  that change per example (copa's two alternatives) it is the answer's position.
- `answer_token`: the first word of the answer, over the `task.answer_top_k` most frequent
  first words plus `<other>`. Words, not model tokens, so every role shares the labels.
- `task_id`: which suite task a prompt belongs to: the task's examples plus as many drawn
  evenly from the other suite tasks in the data, labelled by task.
- `cluster_id`: the same contrast set, labelled by cluster.

Caps (`task.max_examples` per task, `task.max_per_cluster` shared by a cluster's selected
tasks) sample with the fixed `task.data_seed`; each task's sample depends only on its own
rows, the seed and its cap.
"""
from __future__ import annotations

import difflib
import logging
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import TaskData, TaskError, finalize_task
from .files import FILE_BUILDERS, template_fields

log = logging.getLogger(__name__)

DEFAULT_PATH = "Muennighoff/flan"
TARGETS = ("label", "answer_token", "task_id", "cluster_id")
MAX_LABEL_CLASSES = 50
OTHER = "<other>"


@dataclass(frozen=True)
class FlanTask:
    name: str
    cluster: str
    kind: str  # classification (fixed options) | choice (options per example) | generative
    target: str  # the default probe target
    title: str  # the dataset as the FLAN paper names it


def _tasks(cluster: str, kind: str, target: str, entries: str) -> list[FlanTask]:
    return [FlanTask(name, cluster, kind, target, title) for name, title in
            (e.split("=") for e in entries.split(";"))]


CLUSTERS = ["nli", "reading_comprehension", "closed_book_qa", "commonsense", "coreference",
            "reading_comprehension_commonsense", "sentiment", "paraphrase", "misc", "struct_to_text",
            "translation", "summarization"]

FLAN_TASKS: dict[str, FlanTask] = {t.name: t for t in [
    *_tasks("nli", "classification", "label",
            "anli_r1=ANLI R1;anli_r2=ANLI R2;anli_r3=ANLI R3;cb=CB;mnli_matched=MNLI (matched);"
            "mnli_mismatched=MNLI (mismatched);qnli=QNLI;rte=RTE;snli=SNLI;wnli=WNLI"),
    *_tasks("reading_comprehension", "classification", "label", "boolq=BoolQ;multirc=MultiRC"),
    *_tasks("reading_comprehension", "choice", "label", "openbookqa=OpenBookQA"),
    *_tasks("reading_comprehension", "generative", "answer_token", "drop=DROP;squad_v1=SQuAD v1;squad_v2=SQuAD v2"),
    *_tasks("closed_book_qa", "choice", "label", "arc_challenge=ARC (challenge);arc_easy=ARC (easy)"),
    *_tasks("closed_book_qa", "generative", "answer_token", "natural_questions=Natural Questions;trivia_qa=TriviaQA"),
    *_tasks("commonsense", "choice", "label", "copa=COPA;hellaswag=HellaSwag;piqa=PiQA;story_cloze=StoryCloze"),
    *_tasks("coreference", "choice", "label",
            "definite_pronoun_resolution=DPR;winogrande=Winogrande;wsc273=WSC273"),
    *_tasks("reading_comprehension_commonsense", "choice", "label", "cosmos_qa=CosmosQA"),
    *_tasks("reading_comprehension_commonsense", "generative", "answer_token", "record=ReCoRD"),
    *_tasks("sentiment", "classification", "label",
            "imdb=IMDB;sentiment140=Sent140;sst2=SST-2;yelp_polarity=Yelp"),
    *_tasks("paraphrase", "classification", "label", "mrpc=MRPC;qqp=QQP;paws=PAWS;stsb=STS-B"),
    *_tasks("misc", "classification", "label", "trec=TREC;cola=CoLA;wic=WiC"),
    *_tasks("misc", "generative", "answer_token", "coqa=CoQA;quac=QuAC;math_dataset=Math"),
    *_tasks("misc", "generative", "task_id", "fix_punct=Fix Punctuation (NLG)"),
    *_tasks("struct_to_text", "generative", "task_id", "common_gen=CommonGen;dart=DART;e2e_nlg=E2ENLG;web_nlg=WEBNLG"),
    *_tasks("translation", "generative", "answer_token",
            "paracrawl_ende=ParaCrawl EN/DE;paracrawl_enes=ParaCrawl EN/ES;paracrawl_enfr=ParaCrawl EN/FR;"
            "wmt14_enfr=WMT-14 EN/FR;wmt16_csen=WMT-16 EN/CS;wmt16_deen=WMT-16 EN/DE;wmt16_fien=WMT-16 EN/FI;"
            "wmt16_roen=WMT-16 EN/RO;wmt16_ruen=WMT-16 EN/RU;wmt16_tren=WMT-16 EN/TR"),
    *_tasks("summarization", "classification", "label", "ag_news=AG News"),
    *_tasks("summarization", "generative", "task_id",
            "aeslc=AESLC;cnn_dailymail=CNN-DM;gigaword=Gigaword;multi_news=Multi-News;newsroom=Newsroom;"
            "opinion_abstracts_idebate=Opin-Abs: iDebate;opinion_abstracts_rotten_tomatoes=Opin-Abs: Movie;"
            "samsum=SamSum;wiki_lingua_en=Wiki Lingua EN;xsum=XSum"),
]}

# Spellings of the suite's tasks in public Flan data (FLAN repo, Flan Collection), after normalisation.
ALIASES = {
    "imdb_reviews": "imdb", "sent140": "sentiment140", "yelp_polarity_reviews": "yelp_polarity", "yelp": "yelp_polarity",
    "sst_2": "sst2", "paws_wiki": "paws", "bool_q": "boolq", "super_glue_boolq": "boolq", "web_nlg_en": "web_nlg",
    "wiki_lingua_english_en": "wiki_lingua_en", "ag_news_subset": "ag_news", "e2enlg": "e2e_nlg", "dpr": "definite_pronoun_resolution",
    "wsc": "wsc273", "nq": "natural_questions", "squad": "squad_v1", "squad_v1_1": "squad_v1", "anli_1": "anli_r1",
    "anli_2": "anli_r2", "anli_3": "anli_r3", "mnli": "mnli_matched", "opinion_abstracts_movie": "opinion_abstracts_rotten_tomatoes",
    "cnn_dm": "cnn_dailymail", "math": "math_dataset", "obqa": "openbookqa", "openbook_qa": "openbookqa",
    "cosmosqa": "cosmos_qa", "triviaqa": "trivia_qa", "storycloze": "story_cloze", "arc_challenge_set": "arc_challenge",
}


def canonical_name(raw: str) -> str:
    """A task name as public Flan data spells it -> the suite's spelling (unknown names pass through)."""
    s = str(raw).strip().lower()
    s = re.sub(r":[\d.]+$", "", s)  # tfds version, e.g. glue/sst2:2.0.0
    s = re.sub(r"_(train|validation|valid|test)$", "", s)
    s = re.sub(r"_\d+templates$", "", s)  # FLAN repo task ids, e.g. anli_r1_10templates
    s = re.sub(r"^(super_glue|glue)[/_]", "", s)
    s = re.sub(r"[/\s]+", "_", s).replace("-", "")
    s = re.sub(r"^wmt(\d\d)_translate_", r"wmt\1_", s).replace("para_crawl", "paracrawl")
    return ALIASES.get(s, s)


def check_task_names(names: list[str]) -> list[str]:
    """Suite names for the requested tasks; unknown ones fail with the closest suite names."""
    out, unknown = [], []
    for name in names:
        canon = canonical_name(name)
        (out if canon in FLAN_TASKS else unknown).append(canon if canon in FLAN_TASKS else name)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(canonical_name(name), list(FLAN_TASKS), n=3, cutoff=0.6)
            hints.append(f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise TaskError(f"not in the Flan 2021 suite: {'; '.join(hints)}; docs/tasks.md lists all {len(FLAN_TASKS)} tasks")
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- answers and options

_OPTION_LINE = re.compile(r"^\s*(?:[-*\u2022]|\(?[A-Za-z0-9]{1,2}[).\]]|\[[A-Za-z0-9]{1,4}\])\s+(.+?)\s*$")
_WORD = re.compile(r"\w+|[^\w\s]")


def parse_options(text: str) -> list[str] | None:
    """The answer options listed in a prompt (the last run of >= 2 `- option` style lines), or None."""
    best, run = None, []
    for line in str(text).splitlines() + [""]:
        m = _OPTION_LINE.match(line)
        if m:
            run.append(m.group(1))
            continue
        if len(run) >= 2:
            best = run
        run = []
    return best


def normalize_answer(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().rstrip(".").strip().lower()


def first_word(text: str) -> str:
    m = _WORD.search(str(text))
    return m.group(0).lower() if m else ""


def class_labels(name: str, inputs: list[str], answers: list[str]) -> tuple[list[str], list[int | None]]:
    """Fixed option set: class = the answer's option text, classes ordered as the options list them."""
    norm = [normalize_answer(a) for a in answers]
    answered = set(norm)
    order: list[str] = []
    for text in inputs:
        for option in parse_options(text) or []:
            option = normalize_answer(option)
            if option in answered and option not in order:
                order.append(option)
    names = order + sorted(answered - set(order))
    if len(names) > MAX_LABEL_CLASSES:
        raise TaskError(f"Flan task '{name}' has {len(names)} distinct answers, too many classes for target=label; "
                        f"use task.target_overrides.{name}=answer_token")
    return names, [names.index(a) for a in norm]


def choice_labels(inputs: list[str], answers: list[str]) -> tuple[list[str], list[int | None]]:
    """Options per example: class = the answer's position among that example's options."""
    labels: list[int | None] = []
    for text, answer in zip(inputs, answers):
        options = [normalize_answer(o) for o in parse_options(text) or []]
        a = normalize_answer(answer)
        labels.append(options.index(a) if a in options else None)
    k = max((y for y in labels if y is not None), default=-1) + 1
    return [f"option_{i + 1}" for i in range(k)], labels


def answer_token_labels(answers: list[str], top_k: int) -> tuple[list[str], list[int]]:
    words = [first_word(a) for a in answers]
    top = [w for w, _ in sorted(Counter(words).items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]
    names = top + ([OTHER] if any(w not in top for w in words) else [])
    return names, [names.index(w) if w in top else len(top) for w in words]


# ---------------------------------------------------------------- loading

def load_flan_rows(cfg):
    """The `datasets.Dataset` the config names: local data_files, or task.path through the hub."""
    import datasets

    if cfg.data_files:
        files = []
        for pattern in cfg.data_files:
            path = Path(str(pattern)).expanduser()
            matches = sorted(path.parent.glob(path.name)) if any(c in path.name for c in "*?[") else [path]
            missing = [str(p) for p in matches if not p.exists()]
            if missing or not matches:
                raise TaskError(f"data file not found: {missing[0] if missing else pattern}; fix task.data_files")
            files += matches
        builders = {FILE_BUILDERS.get(p.suffix.lower()) for p in files}
        if None in builders or len(builders) > 1:
            raise TaskError(f"task.data_files must all be one of {sorted(FILE_BUILDERS)} files; got {[p.name for p in files]}")
        return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train"), "task.data_files"
    path = cfg.path or DEFAULT_PATH
    try:
        return datasets.load_dataset(path, cfg.data_name, split=cfg.data_split), f"'{path}'"
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TaskError(f"could not load the Flan data '{path}' (split {cfg.data_split}): {first}; "
                        "point task.data_files at local json/jsonl/parquet files in the inputs/targets/task layout") from err


def _caps(selected: list[str], cfg) -> dict[str, int | None]:
    """Per-task caps: task.max_examples, and each cluster's task.max_per_cluster shared by its selected tasks."""
    caps: dict[str, int | None] = {name: cfg.max_examples for name in selected}
    if cfg.max_per_cluster:
        by_cluster: dict[str, list[str]] = {}
        for name in selected:
            by_cluster.setdefault(FLAN_TASKS[name].cluster, []).append(name)
        for names in by_cluster.values():
            share, extra = divmod(cfg.max_per_cluster, len(names))
            for i, name in enumerate(names):
                n = share + (i < extra)
                caps[name] = n if caps[name] is None else min(caps[name], n)
    return caps


def _sample(n: int, cap: int | None, seed: int, *key: str) -> list[int]:
    """A seeded, order-preserving sample of range(n); depends only on (seed, key, n, cap)."""
    if cap is None or n <= cap:
        return list(range(n))
    rng = np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in key)])
    return sorted(rng.choice(n, cap, replace=False).tolist())


def load_flan_tasks(cfg, fractions, split_seed) -> list[TaskData]:
    requested = check_task_names(list(cfg.tasks)) if cfg.tasks else None
    ds, source = load_flan_rows(cfg)
    fields = [f for f in template_fields(cfg.template) if f != "instruction"]
    task_column = cfg.task_column or "task"
    needed = list(dict.fromkeys(fields + [cfg.label_column, task_column] + ([cfg.id_column] if cfg.id_column else [])))
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise TaskError(f"the Flan data ({source}) has no column(s) {missing}; it has {ds.column_names} — the Flan layout is "
                        "inputs / targets / task; map other names with task.template / task.label_column / task.task_column")
    table = ds.select_columns(needed).to_dict()

    groups: dict[str, list[int]] = {}
    names_seen: dict[str, str] = {}
    for i, raw in enumerate(table[task_column]):
        canon = names_seen.setdefault(raw, canonical_name(raw))
        groups.setdefault(canon, []).append(i)
    present = [t for t in FLAN_TASKS if t in groups]
    if requested is None:
        if not present:
            raise TaskError(f"no Flan 2021 suite task in {source}; its task column '{task_column}' holds "
                            f"{', '.join(sorted(map(str, names_seen))[:20])}")
        selected = present
    else:
        absent = [t for t in requested if t not in groups]
        if absent:
            raise TaskError(f"Flan task(s) {absent} have no rows in {source}; it holds: {', '.join(present[:30]) or 'no suite task'}")
        selected = requested

    def prompt(i: int) -> str:
        return cfg.template.format(instruction=cfg.instruction, **{f: table[f][i] for f in fields})

    def example_id(name: str, k: int, i: int) -> str:
        return f"{name}:{table[cfg.id_column][i] if cfg.id_column else k}"

    caps = _caps(selected, cfg)
    tasks = []
    for name in selected:
        spec = FLAN_TASKS[name]
        target = (cfg.target_overrides or {}).get(name, cfg.target)
        target = spec.target if target == "default" else target
        keep = _sample(len(groups[name]), caps[name], cfg.data_seed, name)
        rows_idx = [groups[name][k] for k in keep]
        ids = [example_id(name, k, i) for k, i in zip(keep, rows_idx)]
        answers = [table[cfg.label_column][i] for i in rows_idx]
        # the answer text per own example: a control (or the SFT run) trains on the Flan targets
        # themselves, not on label names; contrast rows added below belong to other tasks
        meta = {"target": target, "kind": spec.kind, "answers": {ex_id: str(a) for ex_id, a in zip(ids, answers)}}
        if target in ("task_id", "cluster_id"):
            contrast = _contrast(name, len(rows_idx), groups, cfg.data_seed)
            if not contrast:
                raise TaskError(f"target={target} for Flan task '{name}' needs other suite tasks in the data; "
                                f"{source} holds only '{name}' — add tasks to the data or choose another target")
            key = (lambda t: t) if target == "task_id" else (lambda t: FLAN_TASKS[t].cluster)
            label_of = [key(name)] * len(rows_idx) + [key(t) for t, _, _ in contrast]
            names = [key(name)] + sorted(set(label_of) - {key(name)})
            labels = [names.index(v) for v in label_of]
            ids += [example_id(t, k, i) for t, k, i in contrast]
            rows_idx = rows_idx + [i for _, _, i in contrast]
            meta["contrast"] = len(contrast)
        elif target == "answer_token":
            names, labels = answer_token_labels(answers, cfg.answer_top_k)
        elif spec.kind == "choice":
            names, labels = choice_labels([prompt(i) for i in rows_idx], answers)
        else:
            names, labels = class_labels(name, [prompt(i) for i in rows_idx], answers)
        rows = [(ex_id, prompt(i), y) for ex_id, i, y in zip(ids, rows_idx, labels) if y is not None]
        dropped = len(rows_idx) - len(rows)
        if dropped:
            log.warning("Flan task '%s': %d of %d examples have an answer that is not among their listed options; left out",
                        name, dropped, len(rows_idx))
            meta["dropped"] = dropped
        tasks.append(finalize_task(name, spec.cluster, "", names, rows, fractions, split_seed, cfg.seen, "flan", meta=meta))
    return tasks


def _contrast(name: str, n: int, groups: dict[str, list[int]], seed: int) -> list[tuple[str, int, int]]:
    """n examples (task, index within task, row) drawn evenly from the other suite tasks in the data."""
    others = [t for t in FLAN_TASKS if t in groups and t != name]
    if not others:
        return []
    quota = -(-n // len(others))
    pool = [(t, k, groups[t][k]) for t in others for k in _sample(len(groups[t]), quota, seed, name, "contrast", t)]
    keep = _sample(len(pool), n, seed, name, "contrast")
    return [pool[j] for j in keep]


def markdown_table() -> str:
    """The suite as the Markdown table in docs/tasks.md (regenerate it from here)."""
    lines = ["| task | dataset | cluster | kind | default target |", "|---|---|---|---|---|"]
    for cluster in CLUSTERS:
        for t in (t for t in FLAN_TASKS.values() if t.cluster == cluster):
            lines.append(f"| `{t.name}` | {t.title} | {t.cluster} | {t.kind} | `{t.target}` |")
    return "\n".join(lines)
