"""Does the thinking pay? Accuracy against spend, for one direct call and each service profile.

    .venv/bin/python -m bench.quality --n 30 --seed 0

See bench/quality/README.md.
"""
