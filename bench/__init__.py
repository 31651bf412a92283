"""benchmark.py's research parts, imported by benchmark.py (and its tests) only: peers.py (the
rows of its tables: this project's train.py runs and the peers' models), studies.py (the
research studies, each a report of its own) and variants.py (variants of the model's user side,
trained as train.py runs by `python benchmark.py --variant=NAME`)."""
