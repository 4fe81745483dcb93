"""Datasets: raw downloads -> processed records -> prompts -> model batches."""
