"""Quality against full precision: metrics, budgets and verdicts (metrics.py), the eval set and
teacher-forced scoring through the generation loop (see the modules)."""
