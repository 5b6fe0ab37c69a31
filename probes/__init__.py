"""probecal's probe side: estimators, calibration, metrics, artifacts, runtime wrapper, server, CLI."""

__version__ = "0.1.0"
