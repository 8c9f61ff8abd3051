"""GPU tier (`gpu`): needs a CUDA GPU, skipped without one (`make gpu-check` runs it)."""
