"""The benchmark harness behind ``python -m mishkit bench`` (see ``mishkit/bench.py``).

``timing`` measures one callable, ``contenders`` defines what is compared, ``kernel`` runs the
activation grid, ``layers`` the fused BatchNorm+activation and network benchmarks, ``report``
writes JSON lines, the targets table and the markdown summary, ``figures`` the PNG plots.
"""
