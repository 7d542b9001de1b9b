"""One training loop per model family, and the training of the evaluation models (class probe, domain CLIP, downstream classifier)."""
