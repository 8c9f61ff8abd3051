"""The SFT vs SFT+GRPO vs control table of docs/grpo.md, from the runs' eval_samples.jsonl ("after" phase:
the tuned model; every run evaluated on the same prompts, seeds and decoding).

    python scripts/grpo_evidence.py runs/demo runs/demo-rl runs/demo-rl-format [--target ja] [--unseen zh ko] [--base]

Per group of languages (trained by SFT / the RL target / never seen): think share (mean, and the share of
traces >= 0.9), think match (of the judged completions, and of all asked: a cut-off one counts as no),
drift (starts in the target language, a later sentence is not), answer match, parsed / truncated, median
reasoning length (characters of the judged completions) and new tokens; proportions with 95% Wilson
intervals. Language figures are of the completions that finished (cut-off text is not judged).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lowvram_ft.evaluate.scoring import judge_sentences
from lowvram_ft.evaluate.statistics import wilson_interval


def drifts(analysis: str | None, target: str) -> bool | None:
    """True when the first judged sentence is in the target and a later one is not; None with < 2 judged."""
    judged = [language for _, language in judge_sentences(analysis or "") if language is not None]
    if len(judged) < 2:
        return None
    return judged[0] == target and any(language != target for language in judged[1:])


def rate(flags: list[bool]) -> str:
    if not flags:
        return "n/a"
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} {k / n:.0%} ({lo:.0%}–{hi:.0%})"


def row(samples: list[dict], target_of) -> list[str]:
    scored = [s for s in samples if s["scorable"]]
    shares = [s["think_share"] for s in scored if s["think_share"] is not None]
    drift = [d for s in scored if (d := drifts(s["analysis"], target_of(s))) is not None]
    reasoning = [len(s["analysis"]) for s in scored if s["analysis"]]
    return [f"{statistics.mean(shares):.2f}" if shares else "n/a", rate([x >= 0.9 for x in shares]),
            rate([s["think_match"] for s in scored if s["think_match"] is not None]),
            rate([bool(s["scorable"] and s["think_match"]) for s in samples]), rate(drift),
            rate([s["answer_match"] for s in scored if s["answer_match"] is not None]),
            f"{sum(s['parsed_ok'] for s in samples)}/{len(samples)} / {sum(s['truncated'] for s in samples)}",
            f"{statistics.median(reasoning):.0f}" if reasoning else "n/a",
            f"{statistics.median(s['new_tokens'] for s in samples):.0f}" if samples else "n/a"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--target", nargs="+", default=["ja"])
    parser.add_argument("--unseen", nargs="+", default=["zh", "ko"])
    parser.add_argument("--base", action="store_true", help="also the first run's 'before' phase (the base model)")
    args = parser.parse_args()
    header = ["run", "group", "think share", "share ≥ 0.9", "think match", "think match, all asked", "drift",
              "answer match", "parsed / cut", "median reasoning chars", "median tokens"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    groups = {"RL target " + "/".join(args.target): lambda s: s["target_language"] in args.target,
              "never in RL " + "/".join(args.unseen): lambda s: s["target_language"] in args.unseen,
              "SFT languages": lambda s: s["target_language"] not in (*args.target, *args.unseen)}
    for index, run in enumerate(args.runs):
        samples = [json.loads(x) for x in (run / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines()]
        phases = [("after", run.name)] + ([("before", "base (adapter off)")] if index == 0 and args.base else [])
        for phase, label in reversed(phases):
            chosen_phase = [s for s in samples if s["phase"] == phase]
            for name, member in groups.items():
                chosen = [s for s in chosen_phase if member(s)]
                print("| " + " | ".join([label, name, *row(chosen, lambda s: s["target_language"])]) + " |")


if __name__ == "__main__":
    main()
