"""The split names every row of a store carries: the one list both extraction and training read."""

SPLITS = ("train", "calibration", "test")
