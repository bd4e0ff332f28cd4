"""Recipes (YAML experiments whose header states the result they must reach), the checker that runs
them against that promise (`python -m experiments list | reproduce | check`), the scaling study
(`python -m experiments scaling`) and the quickstart notebook (`experiments/notebooks/`)."""
