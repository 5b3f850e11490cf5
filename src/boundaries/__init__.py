"""Domain boundaries as a Markov chain of motifs: reading them from images, fitting the chain,
and the chain's science (steady state, entropy, significant long motifs, microstates).

Modules (one job each):

- :mod:`.lattice`: steps, motifs, 2-motifs (32), 3-motifs (88), isometry classes (11).
- :mod:`.chain`: the reduced parameters ``a, b, c, d, f, g, k``, the 32x32 matrix, sampling.
- :mod:`.steady_state`: closed-form and numerical steady state.
- :mod:`.estimate`: counting (forbidden 3-motifs reported), full Dirichlet fit, reduced MLE.
- :mod:`.compare`: held-out likelihood of reduced / full / k-th order models.
- :mod:`.kmotifs`: significant tileable long k-motifs (bootstrap test, Benjamini-Hochberg).
- :mod:`.omega`: microstates ``Omega(N, R)``, their growth with N, ``alpha(d)``.
- :mod:`.register`, :mod:`.trace`: images' atomic columns -> ordered step sequences.
- :mod:`.analysis`: everything above from traces, as one report; :mod:`.figures`: its plots.
"""

from importlib import import_module
from typing import Any

# names re-exported lazily, so that importing a config model does not import scipy
_EXPORTS = {
    "BoundaryChain": "chain", "ReducedParams": "chain", "stationary_distribution": "chain", "transition_matrix": "chain",
    "BoundaryAnalysisConfig": "config", "BoundaryChainConfig": "config", "BoundaryTraceConfig": "config",
    "ForbiddenMotif": "estimate", "TransitionCounts": "estimate", "count_transitions": "estimate", "fit_full": "estimate",
    "fit_reduced": "estimate", "BoundaryTrace": "trace", "BoundaryTracer": "trace", "TraceResult": "trace",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"stemagent.boundaries.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'stemagent.boundaries' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - the lazily imported names
