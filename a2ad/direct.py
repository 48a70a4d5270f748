"""The direct path: a message send forwarded at once, in a slot admission gave it;
and what a2ad learns from every answer an agent gives."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping

from .admission import Slot
from .clock import Clock
from .metrics import Metrics
from .settings import Settings
from .store import QueueStore, answers_again
from .upstream import Answer, Opened, Outcome, Upstream
from .workspaces import Workspace


class DirectPath:
    """Forwards sends that admission let skip the queue; observes agents' answers."""

    def __init__(
        self,
        settings: Settings,
        store: QueueStore,
        upstream: Upstream,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.replay_window = settings.queue.replay_window_seconds
        self.store = store
        self.upstream = upstream
        self.clock = clock
        self.metrics = metrics
        # Liveness listens here for refused connections, timeouts and long busy spells.
        self.on_failure_signal: Callable[[Workspace, str], None] = lambda ws, reason: None
        # Replicas: a busy pause this one began is every replica's.
        self.on_pause: Callable[[Workspace], None] = lambda ws: None

    # -- the replay check --------------------------------------------------------

    def may_replay(self, ws: Workspace) -> bool:
        """Could a send to `ws` repeat a messageId of a live item, or of one
        delivered within the replay window? Only then does `seen_before` read the
        store: the fast path pays nothing while nothing of the sort exists."""
        if ws.depth.live or ws.admission.enqueuing:
            return True
        last = ws.depth.last_replayable
        return last is not None and self.clock.now() - last <= self.replay_window

    async def seen_before(self, ws: Workspace, caller: str, message_id: str | None) -> bool:
        """Does this messageId belong to an item that answers for it (the replay
        rule)? Then the send takes the queue path instead of being delivered again."""
        if message_id is None or not self.may_replay(ws):
            return False
        item = await self.store.find_message(ws.id, caller, message_id)
        return item is not None and answers_again(
            item.state, item.finished_at, now=self.clock.now(), replay_window=self.replay_window
        )

    # -- forwarding --------------------------------------------------------------

    async def send(
        self, ws: Workspace, slot: Slot, body: bytes, headers: Mapping[str, str]
    ) -> Answer:
        """Forward a message send in `slot`, which is free again when this returns."""
        with slot:
            started = self.clock.monotonic()
            answer = await self.upstream.send(ws.config, body, headers)
            ended = self.clock.monotonic()
            self.metrics.of(ws.id).proxy[answer.outcome].observe(ended - started)
            # Before the slot frees, so the wakeup finds a busy pause in place.
            self.observe(ws, answer, ended)
            return answer

    @contextlib.asynccontextmanager
    async def open(
        self, ws: Workspace, slot: Slot, body: bytes, headers: Mapping[str, str]
    ) -> AsyncIterator[Opened]:
        """Forward a streaming send in `slot`. The slot is held while the block
        runs (the relayed stream) and is free again, at once, when it ends."""
        opened: Opened | None = None
        with slot:
            try:
                started = self.clock.monotonic()
                opened = await self.upstream.open(ws.config, body, headers)
                ended = self.clock.monotonic()
                outcome = Outcome.FINAL if opened.answer is None else opened.answer.outcome
                self.metrics.of(ws.id).proxy[outcome].observe(ended - started)
                if opened.answer is not None:
                    self.observe(ws, opened.answer, ended)
                else:
                    ws.note_answer(ended)
                yield opened
            finally:
                if opened is not None and opened.stream is not None:
                    opened.stream.release()

    # -- what answers tell -------------------------------------------------------

    def observe(self, ws: Workspace, answer: Answer, now: float | None = None) -> None:
        """Learn from an agent's answer: a busy pause, a sign of life, a failure signal.
        `now` is the monotonic clock's, as every time kept only in memory."""
        if now is None:
            now = self.clock.monotonic()
        if answer.outcome is Outcome.BUSY:
            self.metrics.of(ws.id).busy.inc()
            ws.note_busy(answer.retry_after, now, answered=answer.reached_agent)
            self.on_pause(ws)
            window = self.settings.liveness.debounce_window_seconds
            if ws.busy_since is not None and now - ws.busy_since > window:
                self.on_failure_signal(ws, f"busy for over {window:g} s")
        elif answer.reached_agent:
            ws.note_answer(now)
        if answer.refused or answer.timed_out:
            self.on_failure_signal(ws, answer.error or "no answer")
