"""Per-language rates over scored samples: Wilson intervals, the per-group and pooled rows of a phase,
and the before/after comparison. Pure logic over the dicts `scoring.score_sample` returns."""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from .languages import normalize_language


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval for successes/n, clamped to [0, 1].
    n = 0 carries no information and gives (0.0, 1.0)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # At 0/n and n/n the bound is exactly 0 or 1; rounding must not move it off.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def aggregate(
    samples: Iterable[Mapping],
    group_key: str = "target_language",
    trained: Sequence[str] | None = None,
    zero_shot: Sequence[str] | None = None,
) -> list[dict]:
    """One row per value of `group_key` (sorted), then pooled rows "trained" / "zero-shot" for the
    languages given (names or codes; a pooled row with no sample is left out), then "overall".
    Each row: n, scorable, unparsed, truncated, think_n / think_match / think_rate / think_ci (Wilson
    95%), think_missing (scorable but no judged reasoning), think_share_mean, and answer_n /
    answer_match / answer_rate / answer_ci. Rates are None when their denominator is 0."""
    samples = list(samples)
    groups: dict[str, list[Mapping]] = {}
    for s in samples:
        groups.setdefault(str(s.get(group_key)), []).append(s)
    rows = [_summarize(name, groups[name]) for name in sorted(groups)]
    for name, languages in (("trained", trained), ("zero-shot", zero_shot)):
        if languages is not None:
            codes = {normalize_language(c) for c in languages}
            pooled = [s for s in samples if s.get(group_key) in codes]
            if pooled:
                rows.append(_summarize(name, pooled))
    rows.append(_summarize("overall", samples))
    return rows


def _summarize(group: str, samples: list[Mapping]) -> dict:
    scorable = [s for s in samples if s.get("scorable")]
    row = {
        "group": group,
        "n": len(samples),
        "scorable": len(scorable),
        "unparsed": sum(1 for s in samples if not s.get("parsed_ok")),
        "truncated": sum(1 for s in samples if s.get("parsed_ok") and s.get("truncated")),
        "think_missing": sum(1 for s in scorable if s.get("think_match") is None),
    }
    for metric in ("think", "answer"):
        judged = [s[f"{metric}_match"] for s in scorable if s.get(f"{metric}_match") is not None]
        k, n = sum(1 for m in judged if m), len(judged)
        row.update({
            f"{metric}_n": n,
            f"{metric}_match": k,
            f"{metric}_rate": k / n if n else None,
            f"{metric}_ci": wilson_interval(k, n),
        })
    shares = [s["think_share"] for s in scorable if s.get("think_share") is not None]
    row["think_share_mean"] = sum(shares) / len(shares) if shares else None
    # Over every sample asked, unparsed and cut-off ones included: the share of all requests that were
    # answered with reasoning in the target language. Defined even when nothing parsed (a base model
    # that never produces Harmony channels scores 0 here, and "—" in think_rate).
    row["think_all_rate"] = row["think_match"] / row["n"] if row["n"] else None
    row["think_all_ci"] = wilson_interval(row["think_match"], row["n"])
    return row


def compare(before_rows: Sequence[Mapping], after_rows: Sequence[Mapping]) -> list[dict]:
    """Before vs after, per group (in before's order, then groups only after has): for think and
    answer, the two rates, diff = after - before (None if either is None), and whether the two
    Wilson intervals overlap (overlap: the change is not clearly beyond sampling noise)."""
    before = {r["group"]: r for r in before_rows}
    after = {r["group"]: r for r in after_rows}
    rows = []
    for group in list(before) + [g for g in after if g not in before]:
        b, a = before.get(group, {}), after.get(group, {})
        row: dict = {"group": group, "n_before": b.get("n", 0), "n_after": a.get("n", 0),
                     "think_all_before": b.get("think_all_rate"), "think_all_after": a.get("think_all_rate")}
        for metric in ("think", "answer"):
            rb, ra = b.get(f"{metric}_rate"), a.get(f"{metric}_rate")
            cb, ca = b.get(f"{metric}_ci"), a.get(f"{metric}_ci")
            both = rb is not None and ra is not None
            row.update({
                f"{metric}_before": rb,
                f"{metric}_after": ra,
                f"{metric}_diff": (ra - rb) if both else None,
                f"{metric}_ci_before": cb,
                f"{metric}_ci_after": ca,
                f"{metric}_overlap": (cb[0] <= ca[1] and ca[0] <= cb[1]) if both else None,
            })
        rows.append(row)
    return rows
