"""Champion and challenger: the paired statistics and the policy that decide whether a newly
evaluated model replaces the served one. Pure: predictions in, figures and a decision out
(imgclf.champion scores the champion, records the decision in MLflow and moves the alias).

Both models are scored on the same images, so the comparison is paired: what matters is the
images one model gets right and the other wrong (the discordant pairs). The exact McNemar test
is the two-sided binomial test of those counts against an even split; the interval of the
accuracy difference is the Clopper-Pearson interval of the challenger's share of the
discordant images, scaled to the whole test set (conditional on their number). The two agree
by construction: the interval's lower bound is above zero exactly when the challenger is ahead
and the test's p-value is below alpha (tests/test_promotion.py checks this on a grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from imgclf.config import PromotionConfig

# The outcome of a comparison, as recorded on the model version (tag promotion.outcome).
Outcome = Literal["first", "promoted", "kept", "manual", "same"]


def describe_policy(policy: PromotionConfig) -> str:
    """The policy in words, as recorded with every decision."""
    rule = ("significantly better" if policy.margin == 0 else
            f"not worse by more than {100 * policy.margin:.2f} points")
    return (f"{rule} (exact McNemar, alpha {policy.alpha:g}; {100 * (1 - policy.alpha):g}% interval), "
            f"no shared class down more than {100 * policy.max_class_drop:.2f} points")


@dataclass(frozen=True)
class Paired:
    """Counts of the same images scored by both models."""

    both: int  # right by both
    challenger_only: int  # right by the challenger, wrong by the champion
    champion_only: int  # right by the champion, wrong by the challenger
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.challenger_only + self.champion_only + self.neither

    @property
    def discordant(self) -> int:
        return self.challenger_only + self.champion_only


def pair_counts(challenger_right: np.ndarray, champion_right: np.ndarray) -> Paired:
    a, b = np.asarray(challenger_right, dtype=bool), np.asarray(champion_right, dtype=bool)
    return Paired(both=int(np.sum(a & b)), challenger_only=int(np.sum(a & ~b)),
                  champion_only=int(np.sum(~a & b)), neither=int(np.sum(~a & ~b)))


def mcnemar_p(pairs: Paired) -> float:
    """Two-sided p-value of the exact McNemar test (1.0 when no image is discordant)."""
    from scipy.stats import binomtest

    if pairs.discordant == 0:
        return 1.0
    return float(binomtest(pairs.challenger_only, pairs.discordant, 0.5).pvalue)


def exact_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a proportion, `successes` of `n` (n > 0), at
    `confidence`: an accuracy's, or a share of discordant images'."""
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def difference_interval(pairs: Paired, confidence: float) -> tuple[float, float]:
    """Interval of challenger accuracy minus champion accuracy at `confidence`: the exact
    (Clopper-Pearson) interval of the challenger's share of the discordant images, mapped to
    the difference (2 * share - 1) * discordant / n. (0, 0) when the models agree on every image."""
    m, n = pairs.discordant, pairs.n
    if m == 0:
        return 0.0, 0.0
    low, high = exact_interval(pairs.challenger_only, m, confidence)
    return (2 * low - 1) * m / n, (2 * high - 1) * m / n


@dataclass(frozen=True)
class ClassFigures:
    images: int
    challenger: float
    champion: float | None  # None: a class the champion does not know

    @property
    def drop(self) -> float | None:
        return None if self.champion is None else self.champion - self.challenger


@dataclass(frozen=True)
class Comparison:
    """Both models on the same test images (those of shared classes, none overlapping the
    champion's training images)."""

    images: int  # today's test images
    compared: int  # the images both accuracies are measured on
    overlap: int  # test images the champion trained on: left out
    pairs: Paired
    challenger_accuracy: float
    champion_accuracy: float
    difference: float
    interval: tuple[float, float]
    confidence: float
    p_value: float
    per_class: dict[str, ClassFigures]
    new_classes: list[str] = field(default_factory=list)  # the challenger's, unknown to the champion
    dropped_classes: list[str] = field(default_factory=list)  # the champion's, absent today

    @property
    def worst_class(self) -> tuple[str, float] | None:
        """The shared class whose accuracy drops most (the largest champion - challenger), or None."""
        drops = [(f.drop, c) for c, f in self.per_class.items() if f.drop is not None]
        if not drops:
            return None
        drop, name = min(drops, key=lambda d: (-d[0], d[1]))  # ties: the first name, so records repeat
        return name, drop

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["interval"] = list(self.interval)
        out["per_class"] = {c: {**asdict(f), "drop": f.drop} for c, f in self.per_class.items()}
        worst = self.worst_class
        out["worst_class"] = {"class": worst[0], "drop": worst[1]} if worst else None
        return out


def _accuracy(right: np.ndarray) -> float:
    return float(np.mean(right)) if len(right) else 0.0


def compare(actual: Sequence[str], challenger: Sequence[str], champion: Sequence[str],
            challenger_classes: Sequence[str], champion_classes: Sequence[str],
            exclude: np.ndarray | None = None, confidence: float = 0.95) -> Comparison:
    """Compare two models' predicted class names on the same images (true class names `actual`).

    Only images of classes both models know, and not excluded (`exclude`: the champion trained
    on them), count towards the paired figures; a class only the challenger knows gets its own
    accuracy, with no champion figure.
    """
    actual_a, chall_a, champ_a = (np.asarray(list(x), dtype=object) for x in (actual, challenger, champion))
    if not (len(actual_a) == len(chall_a) == len(champ_a)):
        raise ValueError(f"{len(actual_a)} labels, {len(chall_a)} and {len(champ_a)} predictions: not the same images")
    keep = np.ones(len(actual_a), dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    shared = set(challenger_classes) & set(champion_classes)
    known = np.array([a in shared for a in actual_a], dtype=bool)
    used = keep & known
    chall_right = chall_a == actual_a
    champ_right = champ_a == actual_a
    pairs = pair_counts(chall_right[used], champ_right[used])
    per_class = {}
    for cls in challenger_classes:
        mask = keep & (actual_a == cls)
        if not mask.any():
            continue
        per_class[cls] = ClassFigures(int(mask.sum()), _accuracy(chall_right[mask]),
                                      _accuracy(champ_right[mask]) if cls in shared else None)
    low, high = difference_interval(pairs, confidence)
    chall_acc, champ_acc = _accuracy(chall_right[used]), _accuracy(champ_right[used])
    return Comparison(
        images=len(actual_a), compared=int(used.sum()), overlap=int((~keep).sum()), pairs=pairs,
        challenger_accuracy=chall_acc, champion_accuracy=champ_acc, difference=chall_acc - champ_acc,
        interval=(low, high), confidence=confidence, p_value=mcnemar_p(pairs), per_class=per_class,
        new_classes=sorted(set(challenger_classes) - shared), dropped_classes=sorted(set(champion_classes) - shared),
    )


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str  # one clause, completing "version N ..."

    @property
    def promote(self) -> bool:
        return self.outcome in ("first", "promoted")


def _points(x: float) -> str:
    return f"{100 * x + 0.0:+.2f}"  # + 0.0: no "-0.00"


def decide(c: Comparison, policy: PromotionConfig, overlap_unknown: bool = False) -> Decision:
    """What the policy says about a comparison. Classes that differ, or training images that
    cannot be checked against today's test images, leave the decision to a person."""
    if c.new_classes or c.dropped_classes:
        parts = []
        if c.new_classes:
            parts.append(f"the challenger adds {', '.join(c.new_classes)}")
        if c.dropped_classes:
            parts.append(f"the champion's {', '.join(c.dropped_classes)} {'is' if len(c.dropped_classes) == 1 else 'are'}"
                         " not in today's data")
        return Decision("manual", f"classes differ ({'; '.join(parts)}): compared on the "
                                  f"{len(c.per_class) - len(c.new_classes)} shared classes only; "
                                  "promote by hand (imgclf-champion promote) if it should serve")
    if overlap_unknown:
        return Decision("manual", "the champion records no training manifest, so whether it trained on "
                                  "today's test images cannot be checked; promote by hand if it should serve")
    if c.compared == 0:
        return Decision("manual", "no test image is left to compare on; promote by hand if it should serve")
    worst = c.worst_class
    # Rounded: 0.90 - 0.85 is 0.05000000000000004 in floating point, and a drop of exactly the
    # allowed points is allowed.
    if worst is not None and round(worst[1], 9) > policy.max_class_drop:
        return Decision("kept", f"class {worst[0]!r} drops {100 * worst[1]:.2f} points "
                                f"(the policy allows {100 * policy.max_class_drop:.2f})")
    low = c.interval[0]
    if policy.margin == 0:
        if c.difference > 0 and c.p_value < policy.alpha:
            return Decision("promoted", f"significantly better (p={c.p_value:.3g} < {policy.alpha:g})")
        if c.difference > 0:
            return Decision("kept", f"better by {_points(c.difference)} points, but not significantly "
                                    f"(p={c.p_value:.3g}, alpha {policy.alpha:g})")
        return Decision("kept", f"not better ({_points(c.difference)} points, p={c.p_value:.3g})")
    if low > -policy.margin:
        return Decision("promoted", f"not worse by more than {100 * policy.margin:.2f} points "
                                    f"(interval from {_points(low)})")
    return Decision("kept", f"may be worse by more than {100 * policy.margin:.2f} points "
                            f"(interval from {_points(low)})")


# --- the record ---------------------------------------------------------------------------------

TAG_PREFIX = "promotion."


def summary(model_key: str, version: str, champion: str, c: Comparison, d: Decision) -> str:
    """The one log line of a comparison."""
    low, high = c.interval
    worst = c.worst_class
    worst_text = f"worst class {worst[0]} {_points(-worst[1])} points" if worst else "no shared class"
    overlap = f", {c.overlap} overlapping images left out" if c.overlap else ""
    return (f"{model_key} version {version} vs champion version {champion} on the same {c.compared} test images"
            f"{overlap}: {100 * c.challenger_accuracy:.2f}% vs {100 * c.champion_accuracy:.2f}%, difference "
            f"{_points(c.difference)} points ({100 * c.confidence:g}% interval {_points(low)} to {_points(high)}), "
            f"McNemar p={c.p_value:.3g}, {worst_text}: {d.outcome}, {d.reason}")


def tags(champion: str, c: Comparison, d: Decision, policy: PromotionConfig, test_data: str) -> dict[str, str]:
    """The decision as model version tags: text that reads the same on every evaluation of the pair."""
    worst = c.worst_class
    return {f"{TAG_PREFIX}{k}": v for k, v in {
        "outcome": d.outcome,
        "reason": d.reason,
        "compared_against": champion,
        "difference": f"{c.difference:.6f}",
        "interval": f"[{c.interval[0]:.6f}, {c.interval[1]:.6f}]",
        "p_value": f"{c.p_value:.6g}",
        "worst_class_drop": f"{worst[0]}: {worst[1]:.6f}" if worst else "none",
        "images": str(c.compared),
        "policy": describe_policy(policy),
        "test_data": test_data,
    }.items()}


def record(model_key: str, version: str, champion: str, c: Comparison, d: Decision, policy: PromotionConfig,
           test_data: str, notes: Sequence[str] = ()) -> dict[str, Any]:
    """The comparison artifact (comparison.json): everything a reader needs, and no timestamp,
    so evaluating the same pair again writes the same bytes."""
    return {"model": model_key, "version": version, "champion": champion, "outcome": d.outcome,
            "reason": d.reason, "policy": policy.model_dump(), "test_data": test_data, "notes": list(notes),
            "comparison": c.to_dict()}


def markdown(rec: dict[str, Any]) -> str:
    """A short table of the record: overall and per class, side by side, and the decision."""
    c = rec["comparison"]
    low, high = c["interval"]
    lines = [f"Version {rec['version']} (challenger) vs version {rec['champion']} (champion) on the same "
             f"{c['compared']} test images: **{rec['outcome']}**, {rec['reason']}.", ""]
    lines += [*(f"- {note}" for note in rec["notes"]), ""] if rec["notes"] else []
    lines += ["| | challenger | champion | difference |", "|---|---:|---:|---:|",
              f"| overall | {100 * c['challenger_accuracy']:.2f}% | {100 * c['champion_accuracy']:.2f}% | "
              f"{_points(c['difference'])} ({100 * c['confidence']:g}% interval {_points(low)} to {_points(high)}; "
              f"McNemar p={c['p_value']:.3g}) |"]
    for cls, f in c["per_class"].items():
        if f["champion"] is None:
            lines.append(f"| {cls} (new, {f['images']} images) | {100 * f['challenger']:.2f}% | n/a | n/a |")
        else:
            lines.append(f"| {cls} ({f['images']} images) | {100 * f['challenger']:.2f}% | "
                         f"{100 * f['champion']:.2f}% | {_points(-f['drop'])} |")
    return "\n".join(lines) + "\n"
