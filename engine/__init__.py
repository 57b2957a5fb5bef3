"""hierui's UI-free core: models, perturbations, calibration, stepping and metrics.

Nothing in this package imports Textual; the CLI and the UI both drive it.
"""

__version__ = "0.1.0"
