"""hf-obliviate."""
