"""What exists for the tests: faults injected into a real training run (faults.py). Nothing here runs
unless a test asks for it through the environment."""
