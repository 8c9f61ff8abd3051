"""The before/after reasoning-language evaluation, in the order its modules import each other:
languages (codes, names, neighbours) → statistics (Wilson intervals, per-language rows, before vs
after) → scoring (Harmony / <think> parsing, per-sentence language identification, per-sample scores,
the offline `score` command) → rewards (the GRPO rewards on top of the scorer) → report (terminal tables, eval.md, eval.png) → generation (the prompt as
trained, seeded sampling, reasoning split from answer; shared with chat) → run (the suite, base vs
tuned on the same prompts, perplexity, the `eval` / `smoke` commands)."""
from .languages import training_languages
from .run import EvalError, evaluate_model, run_config, run_eval

__all__ = ["EvalError", "evaluate_model", "run_config", "run_eval", "training_languages"]
