"""Queue -> batches -> `generate` on one dedicated model thread, so the event loop never runs the model.

One asyncio task collects up to `max_batch_size` requests (waiting at most `batch_wait_ms` after the
first), groups them (generation by sampling settings, scoring by stop strings) and calls
`ProbedModel.generate` / `ProbedModel.score` once per group on a single thread, so the model is never
called from two threads at once.

Streaming: a request's `on_text` gets its text pieces on the event loop as the batch generates.
Domains: requests of different domains share a batch; the model gets `domains=[...]` (one per prompt) when
any of them has one. Hot reload: `swap_artifact` runs on the model thread, so it lands between two batches.
Cancellation: a request whose future was cancelled (its client went away) is dropped before its batch
starts; if every request of a running generation is cancelled, the generation stops at the next step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from extract.streaming import GenerationCancelled
from probes.runtime.wrapper import ProbedGeneration
from probes.serving.protocol import ProbedModelLike, Prompt, Sampling

log = logging.getLogger("probecal.serve")


class QueueFullError(Exception):
    """The queue is full or the worker is not running: the request gets a 503."""


class ModelError(Exception):
    """The model raised while generating a batch; every request of that batch fails with a 500."""


@dataclass
class _Pending:
    prompt: Prompt
    key: tuple  # ("generate", Sampling) or ("score", stop strings): requests batch together when equal
    future: asyncio.Future
    on_text: Callable[[str], None] | None = None  # streaming: called on the event loop
    completion: Any = field(default=None)  # scoring: the completion to score
    domain: str | None = None  # the request's domain tag (per-domain calibration)

    @property
    def gone(self) -> bool:
        return self.future.cancelled()


class Batcher:
    """Queue -> batches -> `generate` on one dedicated thread; results go back to each request's future."""

    def __init__(
        self,
        model: ProbedModelLike,
        max_batch_size: int,
        batch_wait_s: float,
        max_queue_size: int,
        on_batch: Callable[[int], None] = lambda size: None,
        on_error: Callable[[], None] = lambda: None,
    ):
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue_size = max_queue_size
        self._on_batch, self._on_error = on_batch, on_error
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probecal-model")
        self._task = asyncio.create_task(self._run(), name="probecal-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(QueueFullError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, prompt: Prompt, sampling: Sampling) -> ProbedGeneration:
        return await self.enqueue(prompt, sampling)

    def enqueue(
        self,
        prompt: Prompt,
        sampling: Sampling,
        on_text: Callable[[str], None] | None = None,
        domain: str | None = None,
    ) -> asyncio.Future:
        """Queue a generation; the future resolves to its ProbedGeneration (cancel it to drop the request)."""
        return self._put(_Pending(prompt, ("generate", sampling), self._future(), on_text, domain=domain))

    async def score(
        self, prompt: Any, completion: Any, stop: tuple[str, ...] | None, domain: str | None = None
    ) -> Any:
        """Queue a completion to score (batched with other scoring requests); returns its ProbedScore."""
        return await self._put(
            _Pending(prompt, ("score", stop), self._future(), completion=completion, domain=domain)
        )

    async def run_on_model_thread(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model thread, between two batches (hot reload: the artifact swap)."""
        if not self.running:
            raise QueueFullError("the model worker is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _future(self) -> asyncio.Future:
        if not self.running:
            raise QueueFullError("the model worker is not running")
        return asyncio.get_running_loop().create_future()

    def _put(self, pending: _Pending) -> asyncio.Future:
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.max_queue_size} requests are already queued") from None
        return pending.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Pending] = []
        try:
            while True:
                batch = [await self._queue.get()]
                deadline = loop.time() + self.batch_wait_s
                while len(batch) < self.max_batch_size:
                    if not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                        continue
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                        break
                groups: dict[tuple, list[_Pending]] = {}
                for pending in batch:
                    if not pending.gone:  # its client went away while it waited
                        groups.setdefault(pending.key, []).append(pending)
                for key, group in groups.items():
                    await self._call(key, group)
        except asyncio.CancelledError:  # shutting down mid-batch: answer the requests taken off the queue
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(QueueFullError("the server is shutting down"))
            raise

    async def _call(self, key: tuple, group: list[_Pending]) -> None:
        self._on_batch(len(group))
        loop = asyncio.get_running_loop()
        kind, setting = key
        tagged = {"domains": [p.domain for p in group]} if any(p.domain is not None for p in group) else {}
        if kind == "score":
            call = lambda: self.model.score(  # noqa: E731 - runs on the model thread
                [p.prompt for p in group],
                [p.completion for p in group],
                stop=list(setting) if setting else None,
                **tagged,
            )
        else:
            extra: dict[str, Any] = dict(tagged)
            if any(p.on_text for p in group):

                def on_text(i: int, piece: str) -> None:  # model thread -> event loop
                    if group[i].on_text is not None and not group[i].gone:
                        loop.call_soon_threadsafe(group[i].on_text, piece)

                extra |= {"on_text": on_text, "cancelled": lambda: all(p.gone for p in group)}
            call = lambda: self.model.generate(  # noqa: E731 - runs on the model thread
                [p.prompt for p in group],
                max_new_tokens=setting.max_new_tokens,
                temperature=setting.temperature,
                top_p=setting.top_p,
                stop=list(setting.stop) if setting.stop else None,
                **extra,
            )
        try:
            results = await loop.run_in_executor(self._executor, call)
            if len(results) != len(group):
                raise RuntimeError(f"{kind} returned {len(results)} results for {len(group)} prompts")
        except GenerationCancelled:
            log.info("generation stopped: all %d clients of the batch went away", len(group))
            return
        except Exception as err:  # a model failure fails this batch only; the worker keeps serving
            if len(group) > 1:  # find the request that failed: one bad request never fails its neighbours
                log.warning(
                    "%s failed on a batch of %d (%s); retrying each request alone", kind, len(group), err
                )
                for pending in group:
                    await self._call(key, [pending])
                return
            log.exception("%s failed on a batch of %d", kind, len(group))
            self._on_error()
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(ModelError(f"{type(err).__name__}: {err}"))
            return
        for pending, result in zip(group, results, strict=True):
            if not pending.future.done():  # done = the client went away and the handler was cancelled
                pending.future.set_result(result)
