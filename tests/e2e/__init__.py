"""End-to-end tier (`slow`): training and loading on the embedded model, on the CPU (minutes)."""
