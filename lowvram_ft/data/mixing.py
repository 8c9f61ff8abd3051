"""Mixing: every data set's valid rows, mixed by data.weights, capped by data.max_rows and split into
train and held-out rows (`load_data`, the first step of a run).

Mixing with data.weights: the largest total such that no data set is over-sampled (each is sampled
without replacement), capped by data.max_rows; rows per data set are the weights' shares of that total
(largest remainder), drawn with data.seed. Without weights every valid row of every data set is used
(a seeded random subset of data.max_rows when set). The held-out split is a seeded draw from the result.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from ..config import Config
from ..conversation import Conversation
from .problems import DataError
from .rows import Example
from .sources import empty_data_problem, read_all, shipped_heldout


@dataclass(frozen=True)
class LoadedData:
    train: list[Example]
    heldout: list[Example]
    stats: dict  # train_rows, heldout_rows, sources, shapes, reasoning_languages, skipped, mixing
    # reasoning_languages: train rows per reasoning language, counting only rows whose closing assistant turn
    # has reasoning (rows without reasoning under "none"): the evaluation labels these languages "trained".


def load_data(cfg: Config) -> LoadedData:
    """Every valid row of every data set, mixed, capped and split; DataError when the data is unusable
    (or has invalid rows and data.on_invalid=error). Skipped rows are counted by reason in the stats."""
    results, problems = read_all(cfg)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise DataError(fatal)
    if problems and cfg.data.on_invalid == "error":
        raise DataError(problems, "fix these rows, or set data.on_invalid=skip to drop them (they are counted)")
    pools = [r.examples for r in results]
    mixed, used = mix_sources(pools, cfg.data.weights, cfg.data.seed, cfg.data.max_rows)
    if not mixed:
        raise DataError([empty_data_problem(results, problems)])
    train, heldout = split_heldout(mixed, cfg.data.eval_fraction, cfg.data.seed)
    if not heldout and list(cfg.data.dataset) == ["sample"]:
        heldout = shipped_heldout(cfg)
    return LoadedData(train, heldout, row_stats(results, problems, used, train, heldout, cfg))


def mix_sources(pools: list[list], weights: list[float], seed: int, max_rows: int | None) -> tuple[list, list[int]]:
    """Rows drawn from each pool (see the module docstring for the rule), shuffled; also rows used per pool."""
    rng = random.Random(seed)
    if not weights:
        mixed = [row for pool in pools for row in pool]
        rng.shuffle(mixed)
        mixed = mixed[:max_rows] if max_rows else mixed
        ids = {id(row) for row in mixed}
        return mixed, [sum(id(row) in ids for row in pool) for pool in pools]
    counts = mixture_counts([len(pool) for pool in pools], weights, max_rows)
    mixed = [row for pool, count in zip(pools, counts) for row in rng.sample(pool, count)]
    rng.shuffle(mixed)
    return mixed, counts


def mixture_counts(sizes: list[int], weights: list[float], max_rows: int | None) -> list[int]:
    """Rows per pool: the largest total with no pool over-sampled, capped by max_rows, split by weight."""
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    total = min(int(size / share + 1e-9) for size, share in zip(sizes, shares) if share > 0)
    if max_rows:
        total = min(total, max_rows)
    quotas = [share * total for share in shares]
    counts = [min(int(q), size) for q, size in zip(quotas, sizes)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (quotas[i] - int(quotas[i])), reverse=True)
    for i in by_remainder:
        if sum(counts) >= total:
            break
        if counts[i] < sizes[i] and shares[i] > 0:
            counts[i] += 1
    return counts


def split_heldout(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded draw of round(fraction × rows) held-out rows (at least one when the
    fraction is positive, never all of them); the two lists are disjoint."""
    if fraction <= 0 or len(rows) < 2:
        return list(rows), []
    count = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    order = list(range(len(rows)))
    random.Random(seed + 1).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def row_stats(results, problems, used, train, heldout, cfg: Config) -> dict:
    skipped: Counter = Counter()
    first_reason: dict[str, str] = {}
    for p in problems:
        first_reason.setdefault(p.where, p.reason)
    skipped.update(first_reason.values())
    return {
        "train_rows": len(train),
        "heldout_rows": len(heldout),
        "sources": {r.entry: {"file": r.label, "shape": r.shape, "rows": r.rows_read, "valid": len(r.examples),
                              "used": n} for r, n in zip(results, used)},
        "shapes": dict(Counter(e.shape for e in train + heldout)),
        "reasoning_languages": dict(Counter(language_of(e) for e in train)),
        "skipped_rows": sum(skipped.values()),
        "skipped": dict(skipped),
        "mixing": mixing_note(cfg, results, used),
    }


def language_of(example: Example) -> str:
    """The row's reasoning language when it trains reasoning (its closing assistant turn has non-empty
    thinking), else "none": a row with a reasoning_language but no reasoning trains no language."""
    item = example.item
    if not isinstance(item, Conversation) or not item.reasoning_language:
        return "none"
    closing = next((m for m in reversed(item.messages) if m.role == "assistant"), None)
    return item.reasoning_language if closing is not None and (closing.thinking or "").strip() else "none"


def mixing_note(cfg: Config, results, used) -> str:
    if not cfg.data.weights:
        return "all valid rows" + (f", seeded subset of {cfg.data.max_rows}" if cfg.data.max_rows else "")
    parts = [f"{r.entry} {n}/{len(r.examples)}" for r, n in zip(results, used)]
    return (f"weights {cfg.data.weights}: largest total with no data set over-sampled"
            + (f" (capped at {cfg.data.max_rows})" if cfg.data.max_rows else "") + "; " + ", ".join(parts))
