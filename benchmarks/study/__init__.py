"""The CMKD study's parts: setup (models, data, gin), runs (the grid and the budget probe),
stats (pure numbers), results (tables, results.md), plot (results.png). Entry: benchmarks/cmkd_study.py."""
