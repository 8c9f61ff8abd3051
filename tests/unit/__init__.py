"""Unit tier: no model is trained or loaded; seconds (`make test-fast`)."""
