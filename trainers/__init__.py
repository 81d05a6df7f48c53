"""Trainers: one file per model family, each runnable as `python -m trainers.<name> --config config.json --out DIR`."""
