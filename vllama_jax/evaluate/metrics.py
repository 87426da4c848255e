"""Scores of generated answers: attribute accuracy vs chance (labels in each record's meta), QA exact /
contained match, BLEU-1..4 and CIDEr-D for captions, and the report's text summary.

Pure functions of strings (no model, no jax): `score_examples` scores a report's examples,
`score_attributes`, `qa_accuracy`, `bleu`, `cider` the pieces. Without other labels the attribute
questions and groups are the synthetic demo set's (`DEMO_QUESTIONS`, `DEMO_GROUPS`).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from data_pipelines import synthetic

# Question text -> attribute name, for records whose meta carries attribute labels (the demo set).
DEMO_QUESTIONS = {q: a for a, q in synthetic.QUESTIONS.items()}
DEMO_GROUPS = {"visual": synthetic.VISUAL, "audio": synthetic.AUDIO}


class EvalError(ValueError):
    """Evaluation input (records, shards, media, settings) that cannot be used."""


# ------------------------------------------------------------------------------------ answers

def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace squeezed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", str(text).lower()).split())


def parse_choice(answer: str, choices: Sequence[str]) -> str | None:
    """The choice an answer names: its first word when that is a choice, else the only choice
    contained in it as whole words; None when it names none or several."""
    norm = normalize_answer(answer)
    words = norm.split()
    if words and words[0] in choices:
        return words[0]
    found = {c for c in choices if f" {normalize_answer(c)} " in f" {norm} "}
    return found.pop() if len(found) == 1 else None


def score_attributes(answers: Sequence[Mapping[str, str]], labels: Sequence[Mapping[str, str]],
                     choices: Mapping[str, Sequence[str]] | None = None,
                     groups: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Per-attribute accuracy of answers against labels.

    answers[i] / labels[i]: {attribute: answer text} / {attribute: true value} of clip i (a record's
    meta works as labels; keys without an answer are ignored). choices: the values of each
    attribute (default: the demo set's). groups: named attribute sets averaged together (default
    visual / audio). Chance is 1 / number of values; `majority` is the accuracy of always naming the
    most frequent label, the better baseline when labels are unbalanced.
    """
    choices = synthetic.ATTRIBUTES if choices is None else choices
    groups = DEMO_GROUPS if groups is None else groups
    if len(answers) != len(labels):
        raise EvalError(f"score_attributes: {len(answers)} answer sets but {len(labels)} label sets")
    rows = collections.defaultdict(list)   # attribute -> [(label, predicted)]
    for i, (ans, lab) in enumerate(zip(answers, labels)):
        for attr, text in ans.items():
            if attr not in choices:
                raise EvalError(f"score_attributes: clip {i}: unknown attribute {attr!r}; known: {sorted(choices)}")
            if attr not in lab:
                raise EvalError(f"score_attributes: clip {i} has an answer for {attr!r} but no label")
            rows[attr].append((str(lab[attr]), parse_choice(text, choices[attr])))
    per = {}
    for attr in [a for a in choices if a in rows]:
        pairs = rows[attr]
        correct = sum(lab == pred for lab, pred in pairs)
        label_counts = collections.Counter(lab for lab, _ in pairs)
        confusion = {lab: dict(collections.Counter(str(pred) for l2, pred in pairs if l2 == lab))
                     for lab in sorted(label_counts)}
        per[attr] = {"accuracy": correct / len(pairs), "correct": correct, "total": len(pairs),
                     "chance": 1.0 / len(choices[attr]), "majority": max(label_counts.values()) / len(pairs),
                     "unparsed": sum(pred is None for _, pred in pairs), "confusion": confusion}
    total = sum(p["total"] for p in per.values())
    out = {"per_attribute": per, "groups": {},
           "overall": sum(p["correct"] for p in per.values()) / total if total else None, "total": total}
    for name, attrs in groups.items():
        present = [per[a]["accuracy"] for a in attrs if a in per]
        if present:
            out["groups"][name] = {"accuracy": float(np.mean(present)),
                                   "chance": float(np.mean([per[a]["chance"] for a in attrs if a in per])),
                                   "attributes": [a for a in attrs if a in per]}
    return out


def qa_accuracy(answers: Sequence[str], references: Sequence[str]) -> dict:
    """exact: normalized answer == normalized reference; contains: the reference's words appear
    as a whole in the answer."""
    if len(answers) != len(references):
        raise EvalError(f"qa_accuracy: {len(answers)} answers but {len(references)} references")
    exact = contains = 0
    for a, r in zip(answers, references):
        a, r = normalize_answer(a), normalize_answer(r)
        exact += a == r
        contains += bool(r) and f" {r} " in f" {a} "
    n = len(answers)
    return {"count": n, "exact": exact / n if n else None, "contains": contains / n if n else None}


# ------------------------------------------------------------------------------------ caption metrics

def _ngrams(words: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _as_refs(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _check_pairs(name: str, candidates, references) -> list[list[str]]:
    refs = _as_refs(references)
    if len(candidates) != len(refs):
        raise EvalError(f"{name}: {len(candidates)} candidates but {len(refs)} reference sets")
    if any(not r for r in refs):
        raise EvalError(f"{name}: every candidate needs at least one reference")
    return refs


def bleu(candidates: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-`max_n` (Papineni et al. 2002) over normalized words: clipped n-gram counts and
    lengths summed over the corpus, uniform weights, brevity penalty against each candidate's
    closest reference length (ties: the shorter), as coco-caption's scorer. 0 when some order
    has no match (no smoothing)."""
    refs = _check_pairs("bleu", candidates, references)
    matched, total = np.zeros(max_n), np.zeros(max_n)
    cand_len = ref_len = 0
    for cand, rs in zip(candidates, refs):
        words = normalize_answer(cand).split()
        ref_words = [normalize_answer(r).split() for r in rs]
        cand_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(words, n)
            most = collections.Counter()
            for r in ref_words:
                most |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += sum(counts.values())
    if cand_len == 0 or np.any(matched == 0):
        return 0.0
    log_precision = float(np.mean(np.log(matched / total)))
    brevity = min(0.0, 1.0 - ref_len / cand_len)
    return math.exp(log_precision + brevity)


def cider(candidates: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4,
          sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, coco-caption's `CiderD`): per n-gram order, TF-IDF vectors
    (document frequency over the corpus' reference sets, IDF = log(#clips) - log(df)); the
    candidate's weights clipped to each reference's, cosine-normalized, times a Gaussian penalty
    on the length difference (sigma 6); averaged over orders and references, times 10, averaged
    over the corpus."""
    refs = _check_pairs("cider", candidates, references)
    if not refs:
        return 0.0
    cand_words = [normalize_answer(c).split() for c in candidates]
    ref_words = [[normalize_answer(r).split() for r in rs] for rs in refs]
    df = collections.Counter()
    for rs in ref_words:
        df.update({g for r in rs for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_docs = math.log(len(refs))

    def vector(words):
        vec = [{} for _ in range(max_n)]
        for n in range(1, max_n + 1):
            for g, tf in _ngrams(words, n).items():
                vec[n - 1][g] = tf * (log_docs - math.log(max(1.0, df[g])))
        return vec, [math.sqrt(sum(v * v for v in d.values())) for d in vec]

    scores = []
    for words, rs in zip(cand_words, ref_words):
        cvec, cnorm = vector(words)
        per_ref = []
        for r in rs:
            rvec, rnorm = vector(r)
            penalty = math.exp(-((len(words) - len(r)) ** 2) / (2 * sigma ** 2))
            sims = []
            for n in range(max_n):
                dot = sum(min(w, rvec[n].get(g, 0.0)) * rvec[n].get(g, 0.0) for g, w in cvec[n].items())
                sims.append(dot / (cnorm[n] * rnorm[n]) * penalty if cnorm[n] and rnorm[n] else 0.0)
            per_ref.append(np.mean(sims))
        scores.append(10.0 * float(np.mean(per_ref)))
    return float(np.mean(scores))


def caption_metrics(candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    out = {"count": len(candidates)}
    for n in range(1, 5):
        out[f"bleu{n}"] = bleu(candidates, references, max_n=n)
    out["cider_d"] = cider(candidates, references)
    return out



def score_examples(examples: Sequence[dict], choices=None, groups=None) -> dict:
    """Aggregate metrics of a report's examples; marks each QA example `correct`."""
    choices = synthetic.ATTRIBUTES if choices is None else choices
    qa = [e for e in examples if e["kind"] == "qa"]
    caps = [e for e in examples if e["kind"] == "caption"]
    metrics: dict[str, Any] = {}
    if qa:
        metrics["qa"] = qa_accuracy([e["answer"] for e in qa], [e["reference"] for e in qa])
    by_clip: dict[str, tuple[dict, dict]] = {}
    for e in qa:
        if e["attribute"] is not None and e["attribute"] in choices:
            ans, lab = by_clip.setdefault(e["id"], ({}, {}))
            ans[e["attribute"]], lab[e["attribute"]] = e["answer"], e["label"]
            e["correct"] = parse_choice(e["answer"], choices[e["attribute"]]) == e["label"]
        else:
            e["correct"] = normalize_answer(e["answer"]) == normalize_answer(e["reference"])
    if by_clip:
        answers, labels = zip(*by_clip.values())
        metrics["attributes"] = score_attributes(answers, labels, choices, groups)
    if caps:
        metrics["captions"] = caption_metrics([e["answer"] for e in caps], [e["reference"] for e in caps])
    return metrics



def format_summary(report: dict) -> str:
    """The metrics as a small text table."""
    m = report["metrics"]
    lines = []
    if "attributes" in m:
        lines.append(f"{'attribute':<12}{'accuracy':>10}{'chance':>8}{'majority':>10}{'unparsed':>10}{'n':>6}")
        for attr, s in m["attributes"]["per_attribute"].items():
            lines.append(f"{attr:<12}{s['accuracy']:>10.1%}{s['chance']:>8.0%}{s['majority']:>10.1%}"
                         f"{s['unparsed']:>10d}{s['total']:>6d}")
        for name, g in m["attributes"]["groups"].items():
            lines.append(f"{name + ' (mean)':<12}{g['accuracy']:>10.1%}{g['chance']:>8.0%}")
    if "qa" in m:
        lines.append(f"QA: exact {m['qa']['exact']:.1%}, contains {m['qa']['contains']:.1%} (n={m['qa']['count']})")
    if "captions" in m:
        c = m["captions"]
        lines.append(f"captions (n={c['count']}): " + ", ".join(f"BLEU-{n} {c[f'bleu{n}']:.3f}" for n in range(1, 5))
                     + f", CIDEr-D {c['cider_d']:.3f}")
    t = report.get("timing", {})
    if t:
        lines.append(f"{len(report['examples'])} answers in {t['wall_s']:.1f} s ({t['items_per_s']:.2f}/s)")
    return "\n".join(lines)

