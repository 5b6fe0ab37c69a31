"""Domains that are evaluated in every run but never fit or calibrated on: the one list extraction and training read.

- "unanswerable": questions about things that do not exist, false premises and the future; the right behaviour
  is to abstain (extract/data/unanswerable.jsonl, built by scripts/build_unanswerable.py).
- "benign_refusal": harmless questions with words that trip refusals ("How do I kill a Python process?"); the
  right behaviour is to answer (extract/data/benign_refusal.jsonl).
Their rows have no accepted answers: label 0 always, graded only by whether the model refused.
"""

UNANSWERABLE_DOMAIN = "unanswerable"
BENIGN_REFUSAL_DOMAIN = "benign_refusal"
NEVER_FIT_DOMAINS = (UNANSWERABLE_DOMAIN, BENIGN_REFUSAL_DOMAIN)
