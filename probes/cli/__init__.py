"""The `probecal` command: Hydra stages (extract, train, evaluate, serve, ...) and the run pipeline.

Nothing inside probecal imports this package; it imports everything else.
"""
