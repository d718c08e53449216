"""Runs and checkpoints: atomic checkpoints, elastic resume, export and model card, the run folder, monitoring."""
