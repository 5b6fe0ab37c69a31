"""The in-process runtime: `ProbedModel` joins a live transformers model and a probe artifact (generate with a
calibrated p_correct, stream, score another engine's completions). `probes.serving` puts HTTP in front of it."""
