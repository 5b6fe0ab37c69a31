"""Serving: the runtime wrapper, the feedback store and the OpenAI-compatible HTTP server.

Split the way vLLM splits its OpenAI server: `protocol` (request schemas, validation, errors),
`batcher` (queue -> batched generate on one model thread), `exposition` (Prometheus metrics),
`app` (assembly: routes that call into the others). `probecal serve` starts it (probes.cli).
"""
