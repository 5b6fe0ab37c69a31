"""probecal's extraction side: model loading, prompts, generation + grading, hidden-state capture, store.

Never imports `probes`.
"""
