"""The benchmark harness, run from a source checkout as ``python -m benchmarks``.

Repository tooling, not part of the installed package: it may import ``mishkit`` and
``segmentation``, never the reverse. ``timing`` measures one callable, ``contenders`` defines what
is compared, ``kernel`` runs the activation grid, ``layers`` the fused BatchNorm+activation and
network benchmarks, ``report`` writes JSON lines and the targets, ``summary`` the markdown,
``figures`` the PNG plots, ``run`` the presets and the command line.
"""
