"""Accuracy diffs: reference vs every artifact, per graph (Polygraphy), per layer, end to end."""
