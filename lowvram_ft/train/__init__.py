"""Training: the story (`pipeline.train`), the Trainer built from our config (trainer.py), checkpoints
(checkpoints.py), what makes a run survive a signal, a full disk or out of memory (run_state.py), and
more than one process (distributed.py). Modules import downward in that order: distributed and
checkpoints at the bottom, then run_state and trainer, then pipeline."""
from .pipeline import dry_run, train

__all__ = ["dry_run", "train"]
