"""`ServeSettings`: the `serve` config group (conf/serve/default.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServeSettings:
    """The `serve` config group (conf/serve/default.yaml). Building it only assigns; `validate` checks."""

    host: str = "127.0.0.1"  # loopback by default: the server has no authentication
    port: int = 8000
    probe_dir: str | None = None  # saved probe artifact the wrapper loads (required by `probecal serve`)
    db_path: str = "outputs/serve/feedback.sqlite"  # responses + feedback; kept across restarts
    max_batch_size: int = 16  # most requests per generate call (also capped by the model's own limit)
    max_batch_tokens: int = 32768  # most (padded) tokens one /v1/score forward holds; a longer batch is split
    batch_wait_ms: float = 5.0  # after the first queued request, wait this long for more to batch
    max_queue_size: int = 256  # queued requests beyond this get 503 instead of waiting without bound
    default_max_tokens: int = 64  # max_tokens when a request does not set it
    max_tokens_limit: int = 256  # largest max_tokens a request may ask for
    max_request_bytes: int = 1_000_000  # larger bodies get 413 before they are parsed
    abstention_message: str | None = None  # text returned for an abstained answer (None: the wrapper's)
    calibration_window: int = 1000  # rolling window: the last N labelled responses
    calibration_bins: int = 10  # equal-width confidence bins for ECE and per-bin accuracy
    store_text: bool = True  # store prompts and answers in the database (False: only confidences)
    model_name: str | None = None  # name reported in responses (None: the wrapper's model_name)
    max_n: int = 8  # most choices one request may ask for (n)
    upstream: str | None = None  # proxy mode: an OpenAI-compatible engine's base URL (http://host:port/v1)
    upstream_connect_timeout_s: float = 5.0  # unreachable upstream -> 502 after this long
    upstream_timeout_s: float = 120.0  # no response / no next chunk from the upstream for this long -> 504
    upstream_deadline_s: float = 300.0  # an upstream answer (or stream) unfinished after this long -> 504
    upstream_max_bytes: int = 4_000_000  # an upstream answer larger than this -> 502 (memory, model lock)
    # request fields the proxy sets when the client does not (the probe was trained on greedy answers; an
    # engine's own default samples at T=0.8-1.0 and may generate thousands of tokens)
    upstream_defaults: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 64})
    admin_token: str | None = (
        None  # POST /admin/reload needs "Authorization: Bearer <token>" (None: loopback only)
    )
    metrics_max_domains: int = (
        20  # /metrics shows per-domain ECE for at most this many domains (most labelled)
    )
    # auto-recalibration (probes.serving.autorecal, off by default): when a domain has collected
    # auto_recalibrate_labels new labels since the last refit and the serving artifact's ECE on them exceeds
    # auto_recalibrate_max_ece, a background thread refits the calibrator (auto_recalibrate_kind) on the older
    # labels, compares child and parent on the newest auto_recalibrate_holdback share, and hot-swaps the child
    # only if it is better there (lower ECE and Brier); children are written under auto_recalibrate_dir
    # (None: <db_path's folder>/auto_recalibrate)
    auto_recalibrate: bool = False
    auto_recalibrate_labels: int = 20
    auto_recalibrate_max_ece: float = 0.1
    auto_recalibrate_kind: str = "shrinkage"
    auto_recalibrate_prior: str = "parent"  # shrinkage toward: parent | cross_domain (recalibrate.prior)
    auto_recalibrate_holdback: float = 0.3
    auto_recalibrate_dir: str | None = None

    def validate(self) -> None:
        positive = (
            "port",
            "max_batch_size",
            "max_batch_tokens",
            "max_queue_size",
            "default_max_tokens",
            "max_tokens_limit",
            "max_request_bytes",
            "calibration_window",
            "calibration_bins",
            "max_n",
            "metrics_max_domains",
            "upstream_max_bytes",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"serve.{name} must be a positive integer, got {value!r}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"serve.batch_wait_ms must be in [0, 10000] ms, got {self.batch_wait_ms!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"serve.default_max_tokens={self.default_max_tokens} exceeds "
                f"serve.max_tokens_limit={self.max_tokens_limit}"
            )
        if self.upstream is not None and not str(self.upstream).startswith(("http://", "https://")):
            raise ValueError(
                f"serve.upstream must be an http(s) URL such as http://127.0.0.1:8001/v1, "
                f"got {self.upstream!r}"
            )
        if not isinstance(self.upstream_defaults, dict) or not all(
            isinstance(k, str) for k in self.upstream_defaults
        ):
            raise ValueError(
                f"serve.upstream_defaults must map request fields to values, got {self.upstream_defaults!r}"
            )
        for name in ("upstream_connect_timeout_s", "upstream_timeout_s", "upstream_deadline_s"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"serve.{name} must be in (0, 3600] seconds, got {getattr(self, name)!r}")
        if self.admin_token is not None and (
            not isinstance(self.admin_token, str) or len(self.admin_token) < 16
        ):
            raise ValueError(
                "serve.admin_token must be a string of at least 16 characters (or null: /admin/reload "
                "then answers loopback clients only)"
            )
        if not self.db_path:
            raise ValueError("serve.db_path must name a SQLite file")
        self._validate_auto_recalibrate()

    def _validate_auto_recalibrate(self) -> None:
        from probes.recalibration import KINDS, PRIORS

        if not isinstance(self.auto_recalibrate, bool):
            raise ValueError(f"serve.auto_recalibrate must be true or false, got {self.auto_recalibrate!r}")
        labels = self.auto_recalibrate_labels
        if not isinstance(labels, int) or isinstance(labels, bool) or labels < 5:
            raise ValueError(
                f"serve.auto_recalibrate_labels must be an integer >= 5 (new labels a domain collects before a "
                f"refit), got {labels!r}"
            )
        if not 0 < self.auto_recalibrate_max_ece < 1:
            raise ValueError(
                f"serve.auto_recalibrate_max_ece must be in (0, 1) (the ECE bound on a domain's new labels), "
                f"got {self.auto_recalibrate_max_ece!r}"
            )
        if self.auto_recalibrate_kind not in KINDS:
            raise ValueError(
                f"serve.auto_recalibrate_kind={self.auto_recalibrate_kind!r} is not allowed; allowed values: "
                + ", ".join(KINDS)
            )
        if self.auto_recalibrate_prior not in PRIORS or (
            self.auto_recalibrate_prior != "parent" and self.auto_recalibrate_kind != "shrinkage"
        ):
            raise ValueError(
                f"serve.auto_recalibrate_prior={self.auto_recalibrate_prior!r} is not allowed with "
                f"auto_recalibrate_kind={self.auto_recalibrate_kind}; allowed values: {', '.join(PRIORS)} "
                "(cross_domain with kind shrinkage only)"
            )
        if not 0 < self.auto_recalibrate_holdback < 1:
            raise ValueError(
                f"serve.auto_recalibrate_holdback must be in (0, 1) (the newest share of the labels held back "
                f"to compare child and parent), got {self.auto_recalibrate_holdback!r}"
            )
