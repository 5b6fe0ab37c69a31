"""The few torch-free facts that both `extract` and `probes` need: file integrity and the model fingerprint.

`extract` never imports `probes` and the probe core never imports `extract`; what both sides share lives
here so neither has to pull the other (or torch) in.
"""

__version__ = "0.1.0"
