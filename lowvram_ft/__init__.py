"""lowvram_ft: single-GPU fine-tuning of gpt-oss and other open models on Unsloth."""
__version__ = "0.1.0"
