"""Old import path of the fx half of convert, kept so that models pickled with it still load
(their rewritten forwards name ``RewrittenForward`` and the graph's tracer class from here).

Only re-exports: the code lives in :mod:`mishkit.conversion.fx`.
"""

from .conversion.fx import RewrittenForward, UntraceableModuleError, _ShallowTracer

__all__ = ["RewrittenForward", "UntraceableModuleError", "_ShallowTracer"]
