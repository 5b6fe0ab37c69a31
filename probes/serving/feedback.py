"""Calibration monitoring in production: a SQLite store of served responses and their feedback.

Every response the server returns is recorded with its confidence (`p_correct`, higher = more likely
correct). Clients later post whether the answer turned out correct; `calibration_stats` then reports,
over the last `window` labelled responses, the accuracy, the expected calibration error and the accuracy
per equal-width confidence bin, so calibration drift shows up on a dashboard.

Storage: one SQLite file in WAL mode (readers never block the writer; committed rows survive a restart).
Duplicate feedback for the same response: the last label wins for the statistics, and every label is kept
in the append-only `feedback` table for auditing. "Last N labelled" means the N responses whose most recent
label arrived last (label order, not response order), so a late label for an old answer counts as fresh.

Domains and artifacts (schema 2): each response stores the request's domain tag (NULL: none given) and the
digest of the probe artifact that scored it; the `artifacts` table lists every artifact the server put in
service (start-up and hot reloads), so `/metrics` can show the ECE per domain of the current artifact beside
the previous one. Prompt states (schema 3): each response stores the question's prompt_last state at the
probe's layer as a float16 BLOB (`encode_state`: 2 bytes per hidden unit, 1,152 bytes for SmolLM2-135M) and
whether its domain was assigned by the artifact's clusters (not a client tag), so `probecal recalibrate
recalibrate.refit_domains=K` can refit the clusters on served traffic. An older database is migrated in place
on open (columns added; old rows get NULL).
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from probes.domains import decode_state, encode_state
from probes.evaluation.metrics import ece as expected_calibration_error
from probes.evaluation.metrics import ece_floor, reliability_curve, smooth_ece

SCHEMA_VERSION = 3
DEFAULT_DOMAIN = "default"  # the metrics label of responses served without a domain tag

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,          -- unix time the response was served
    endpoint TEXT NOT NULL,         -- completions | chat.completions
    model TEXT NOT NULL,
    prompt TEXT,                    -- JSON text of the prompt / messages (NULL when store_text is off)
    text TEXT,                      -- the text returned to the client (NULL when store_text is off)
    p_correct REAL NOT NULL,
    score REAL NOT NULL,
    layer INTEGER NOT NULL,
    position TEXT NOT NULL,
    abstained INTEGER NOT NULL,
    threshold REAL,
    finish_reason TEXT NOT NULL,
    correct INTEGER,                -- latest label: 1 correct, 0 wrong, NULL unlabelled
    label_seq INTEGER,              -- feedback.seq of the latest label (orders the rolling window)
    domain TEXT,                    -- the request's domain tag (metadata.domain); NULL when none was given
    artifact TEXT,                  -- digest of the probe artifact that scored the response
    prompt_state BLOB,              -- float16 prompt_last state at the probe's layer (NULL: not computed)
    domain_assigned INTEGER         -- 1: `domain` is the artifact's cluster of the prompt, not a client tag
);
CREATE INDEX IF NOT EXISTS responses_label_seq ON responses(label_seq) WHERE label_seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    response_id TEXT NOT NULL REFERENCES responses(id),
    correct INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    digest TEXT NOT NULL,           -- ProbeArtifact.digest put in service
    probe_dir TEXT,
    created REAL NOT NULL           -- unix time it started serving
);
"""
_MIGRATIONS = {  # from version -> statements bringing it to version + 1
    1: ["ALTER TABLE responses ADD COLUMN domain TEXT", "ALTER TABLE responses ADD COLUMN artifact TEXT"],
    2: [
        "ALTER TABLE responses ADD COLUMN prompt_state BLOB",
        "ALTER TABLE responses ADD COLUMN domain_assigned INTEGER",
    ],
}


class UnknownResponseError(KeyError):
    """Feedback named a response id this store has never served."""


@dataclass(frozen=True)
class ResponseRecord:
    """One served choice, as stored. Higher `p_correct` = more likely correct."""

    id: str
    endpoint: str
    model: str
    prompt: str | None
    text: str | None
    p_correct: float
    score: float
    layer: int
    position: str
    abstained: bool
    threshold: float | None
    finish_reason: str
    created: float
    domain: str | None = None  # the request's domain tag (None: none given)
    artifact: str | None = None  # digest of the artifact that scored it
    domain_assigned: bool = False  # `domain` is the artifact's cluster of the prompt (no client tag)
    # [hidden] prompt_last state at the probe's layer (None: not computed), stored as float16
    prompt_state: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class CalibrationBin:
    """Equal-width confidence bin [lower, upper) (the last bin includes 1.0)."""

    lower: float
    upper: float
    count: int
    accuracy: float  # NaN when the bin is empty
    mean_confidence: float  # NaN when the bin is empty


@dataclass(frozen=True)
class CalibrationStats:
    """Calibration over the last `labelled` labelled responses (at most the window). NaN when none."""

    labelled: int
    accuracy: float
    mean_confidence: float
    ece: float  # sum over bins of (count / labelled) * |accuracy - mean_confidence|
    bins: tuple[CalibrationBin, ...]
    # the ECE a perfectly calibrated p reads on these rows (probes.evaluation.metrics.ece_floor) and the smooth
    # ECE (comparable across row counts): judge a domain's ece against its floor, not against 0
    ece_floor: float = math.nan
    smooth_ece: float = math.nan


def calibration_stats(p_correct: list[float], correct: list[bool], n_bins: int) -> CalibrationStats:
    """Accuracy, ECE and per-bin accuracy of confidences `p_correct` [n] against labels `correct` [n].

    The binning is the report's (`probes.evaluation.metrics.reliability_curve`, "uniform"): bin b holds
    edges[b] <= p < edges[b+1] with edges = linspace(0, 1, n_bins + 1), and p = 1.0 falls in the last
    bin; one function, so the dashboard's ECE and the report's agree.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if len(p_correct) != len(correct):
        raise ValueError(f"p_correct has {len(p_correct)} values but correct has {len(correct)}")
    n = len(p_correct)
    if n == 0:
        edges = [b / n_bins for b in range(n_bins + 1)]
        empty = tuple(CalibrationBin(edges[b], edges[b + 1], 0, math.nan, math.nan) for b in range(n_bins))
        return CalibrationStats(0, math.nan, math.nan, math.nan, empty)
    labels = [int(ok) for ok in correct]
    curve = reliability_curve(p_correct, labels, n_bins, "uniform")
    bins = tuple(
        CalibrationBin(
            lower=float(curve.edges[b]),
            upper=float(curve.edges[b + 1]),
            count=int(curve.counts[b]),
            accuracy=float(curve.accuracy[b]) if curve.counts[b] else math.nan,
            mean_confidence=float(curve.confidence[b]) if curve.counts[b] else math.nan,
        )
        for b in range(n_bins)
    )
    ece = expected_calibration_error(p_correct, labels, n_bins, "uniform")
    floor, smooth = ece_floor(p_correct, n_bins), smooth_ece(p_correct, labels)
    return CalibrationStats(n, sum(labels) / n, sum(p_correct) / n, ece, bins, floor, smooth)


class FeedbackStore:
    """Thread-safe SQLite store of responses and feedback labels (one connection behind a lock).

    Calls are short (single-row writes, one windowed read), so callers on an event loop run them in a
    worker thread (`asyncio.to_thread`) rather than holding the loop.
    """

    def __init__(self, db_path: str | Path):
        self.db_path = Path(db_path)
        self._lock = threading.Lock()
        try:  # a database the server cannot write is refused at start-up, in one line (no traceback)
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        except (sqlite3.Error, OSError) as err:
            raise ValueError(
                f"serve.db_path={self.db_path}: the feedback database is not usable ({type(err).__name__}: "
                f"{err}); point serve.db_path at a writable file"
            ) from None

    def _open(self) -> None:
        try:
            self._conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            has_tables = self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.db_path}: not a usable SQLite database ({err})") from None
        if has_tables and version in _MIGRATIONS and version < SCHEMA_VERSION:
            self._migrate(version)
            version = SCHEMA_VERSION
        if has_tables and version != SCHEMA_VERSION:
            self._conn.close()
            raise ValueError(
                f"{self.db_path}: feedback database schema version {version}, this probecal reads "
                f"version {SCHEMA_VERSION}; point serve.db_path at a new file"
            )
        # WAL: the server writes while /metrics reads; synchronous=NORMAL keeps every committed row
        # across a process crash or restart (only an OS crash / power loss can drop the last commits).
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")  # a write: a read-only file fails here

    def _migrate(self, version: int) -> None:
        """Bring an older schema to SCHEMA_VERSION in one transaction (rows are kept; new columns NULL)."""
        with self._transaction():
            while version < SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    self._conn.execute(statement)
                version += 1
                self._conn.execute(f"PRAGMA user_version={version}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def record_responses(self, records: list[ResponseRecord]) -> None:
        """Store served responses in one transaction (ids must be new)."""
        rows = [
            (
                r.id,
                r.created,
                r.endpoint,
                r.model,
                r.prompt,
                r.text,
                r.p_correct,
                r.score,
                r.layer,
                r.position,
                int(r.abstained),
                r.threshold,
                r.finish_reason,
                r.domain,
                r.artifact,
                int(r.domain_assigned),
                encode_state(r.prompt_state),
            )
            for r in records
        ]
        with self._locked():
            with self._transaction():
                self._conn.executemany(
                    "INSERT INTO responses (id, created, endpoint, model, prompt, text, p_correct, score, "
                    "layer, position, abstained, threshold, finish_reason, domain, artifact, domain_assigned, "
                    "prompt_state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )

    def record_feedback(self, response_id: str, correct: bool) -> bool | None:
        """Label a response; returns the label it replaced (None if it had none). Last label wins.

        Raises UnknownResponseError when no response has this id.
        """
        with self._locked():
            with self._transaction():
                row = self._conn.execute(
                    "SELECT correct FROM responses WHERE id = ?", (response_id,)
                ).fetchone()
                if row is None:
                    raise UnknownResponseError(response_id)
                cur = self._conn.execute(
                    "INSERT INTO feedback (response_id, correct, created) VALUES (?, ?, ?)",
                    (response_id, int(correct), time.time()),
                )
                self._conn.execute(
                    "UPDATE responses SET correct = ?, label_seq = ? WHERE id = ?",
                    (int(correct), cur.lastrowid, response_id),
                )
        return None if row[0] is None else bool(row[0])

    def get_response(self, response_id: str) -> tuple[ResponseRecord, bool | None]:
        """The stored response and its latest label (None when unlabelled)."""
        with self._locked():
            row = self._conn.execute(
                "SELECT id, endpoint, model, prompt, text, p_correct, score, layer, position, abstained, "
                "threshold, finish_reason, created, domain, artifact, domain_assigned, prompt_state, correct "
                "FROM responses WHERE id = ?",
                (response_id,),
            ).fetchone()
        if row is None:
            raise UnknownResponseError(response_id)
        *values, assigned, state, correct = row
        values[9] = bool(values[9])  # abstained
        record = ResponseRecord(*values, domain_assigned=bool(assigned), prompt_state=decode_state(state))
        return record, None if correct is None else bool(correct)

    def counts(self) -> dict[str, int]:
        """All-time totals: responses stored, responses labelled, feedback posts (duplicates included)."""
        with self._locked():
            responses, labelled = self._conn.execute(
                "SELECT count(*), count(correct) FROM responses"
            ).fetchone()
            feedback = self._conn.execute("SELECT count(*) FROM feedback").fetchone()[0]
        return {"responses": responses, "labelled": labelled, "feedback": feedback}

    def calibration(self, window: int, n_bins: int) -> CalibrationStats:
        """Calibration over the `window` most recently labelled responses (see module docstring)."""
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        with self._locked():
            rows = self._conn.execute(
                "SELECT p_correct, correct FROM responses WHERE label_seq IS NOT NULL "
                "ORDER BY label_seq DESC LIMIT ?",
                (window,),
            ).fetchall()
        return calibration_stats([r[0] for r in rows], [bool(r[1]) for r in rows], n_bins)

    def labels_since(self, digest: str, after_seq: int) -> list[tuple[int, str, float, bool]]:
        """(label_seq, domain ('' untagged), p_correct, latest label) of the responses scored by the artifact
        `digest` whose latest label arrived after feedback.seq `after_seq`, in label order."""
        with self._locked():
            rows = self._conn.execute(
                "SELECT label_seq, COALESCE(domain, ''), p_correct, correct FROM responses WHERE artifact = ? "
                "AND label_seq > ? ORDER BY label_seq",
                (digest, after_seq),
            ).fetchall()
        return [(int(seq), str(d), float(p), bool(c)) for seq, d, p, c in rows]

    def record_artifact(self, digest: str, probe_dir: str | None) -> None:
        """Note that `digest` started serving now (unless it is already the current one)."""
        with self._locked():
            with self._transaction():
                row = self._conn.execute("SELECT digest FROM artifacts ORDER BY seq DESC LIMIT 1").fetchone()
                if row is None or row[0] != digest:
                    self._conn.execute(
                        "INSERT INTO artifacts (digest, probe_dir, created) VALUES (?, ?, ?)",
                        (digest, probe_dir, time.time()),
                    )

    def artifact_history(self) -> tuple[str | None, str | None]:
        """(current, previous): the digest of the last artifact put in service and of the last one before
        it that differs (None when there is none)."""
        with self._locked():
            rows = self._conn.execute("SELECT digest FROM artifacts ORDER BY seq DESC LIMIT 64").fetchall()
        current = rows[0][0] if rows else None
        previous = next((r[0] for r in rows if r[0] != current), None)
        return current, previous

    def domain_calibration(
        self, digest: str, window: int, n_bins: int, max_domains: int
    ) -> dict[str, CalibrationStats]:
        """{domain: calibration} over the `window` most recently labelled responses of each domain scored by
        the artifact `digest` (responses without a domain under DEFAULT_DOMAIN), for the `max_domains`
        domains with the most labelled responses (bounded metric cardinality)."""
        with self._locked():
            top = self._conn.execute(
                "SELECT COALESCE(domain, ?) AS d, count(*) AS n FROM responses WHERE artifact = ? AND "
                "label_seq IS NOT NULL GROUP BY d ORDER BY n DESC, d LIMIT ?",
                (DEFAULT_DOMAIN, digest, max_domains),
            ).fetchall()
            grouped = {
                domain: self._conn.execute(
                    "SELECT p_correct, correct FROM responses WHERE artifact = ? AND COALESCE(domain, ?) = ? "
                    "AND label_seq IS NOT NULL ORDER BY label_seq DESC LIMIT ?",
                    (digest, DEFAULT_DOMAIN, domain, window),
                ).fetchall()
                for domain, _ in top
            }
        return {
            d: calibration_stats([r[0] for r in rows], [bool(r[1]) for r in rows], n_bins)
            for d, rows in grouped.items()
        }

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The connection's lock, once the database's files are known to be writable. In WAL mode SQLite maps
        the `-shm` index into memory; a file turned immutable (chattr +i) under a running server makes the
        next access, a read included, fault (SIGBUS) and kill the process with no traceback. Checking first
        (three access() calls) turns that into an ordinary error: the answer still goes out, counted."""
        with self._lock:
            for suffix in ("", "-wal", "-shm"):
                path = self.db_path.with_name(self.db_path.name + suffix)
                if path.exists() and not os.access(path, os.R_OK | os.W_OK):
                    raise sqlite3.OperationalError(f"{path} is not writable (read-only or immutable)")
            yield

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (the connection is in autocommit)."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
