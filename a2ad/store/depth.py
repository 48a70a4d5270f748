"""Queue depths in memory, changed only where the store commits, in commit order.

The store's writer applies each committed batch's moves before it hands any
result back, so no reader can see a count that a commit has not made, and no
commit can fall between a read of the store and a write of the counts: a
recount is itself an op in the writer's order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("a2ad.store")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Move:
    """One item's committed change of live state."""

    workspace: str
    item_id: str
    priority: int
    old: str | None  # None: a new row
    new: str | None  # None: a deleted row
    at: float  # the commit's time, for the replay window
    not_before: float = 0.0  # into `queued`: when it is due again


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The live items of some workspaces as one transaction saw them."""

    workspaces: frozenset[str] | None  # None: every workspace
    queued: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    dispatching: Mapping[str, int] = field(default_factory=dict)
    waiting_out: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Counted(Generic[T]):
    """An op's result with what it changed in the queue; the writer applies the
    changes after the commit and before anyone sees the result."""

    value: T
    moves: Sequence[Move] = ()
    snapshot: Snapshot | None = None
    # The result as it reads once the moves are applied (an item's place in line).
    then: Callable[[T, Depths], T] | None = None

    def applied(self, depths: Depths) -> T:
        """Apply the changes; the result."""
        if self.snapshot is not None:
            depths.replace(self.snapshot)
        depths.apply(self.moves)
        return self.value if self.then is None else self.then(self.value, depths)


class Depth:
    """One workspace's queue as committed: queued items by priority, items being
    delivered, and the queued ones waiting out a failure backoff."""

    __slots__ = (
        "_depths",
        "dispatching",
        "last_replayable",
        "queued",
        "queued_total",
        "waiting_out",
        "workspace",
    )

    def __init__(self, workspace: str, depths: Depths) -> None:
        self.workspace = workspace
        self.queued: dict[int, int] = {}
        self.queued_total = 0
        self.dispatching = 0
        self.waiting_out: dict[str, float] = {}  # item id → its not-before
        # When an item was last enqueued or delivered here: a send's messageId can
        # only repeat a live item or one delivered within the replay window.
        self.last_replayable: float | None = None
        self._depths = depths

    @property
    def live(self) -> int:
        return self.queued_total + self.dispatching

    def deliverable(self, now: float) -> int:
        """Queued items a slot could take now (those in a failure backoff aside)."""
        if not self.waiting_out:
            return self.queued_total
        return self.queued_total - sum(1 for due in self.waiting_out.values() if due > now)

    def next_due(self, now: float) -> float | None:
        """When the next item now in a backoff becomes due."""
        return min((due for due in self.waiting_out.values() if due > now), default=None)

    def _add(self, state: str | None, move: Move, n: int) -> None:
        if state == "queued":
            left = self.queued.get(move.priority, 0) + n
            if left:
                self.queued[move.priority] = left
            else:
                self.queued.pop(move.priority, None)
            self.queued_total += n
            self._depths.live_total += n
            if n > 0 and move.not_before > move.at:
                self.waiting_out[move.item_id] = move.not_before
            elif n < 0:
                self.waiting_out.pop(move.item_id, None)
        elif state == "dispatching":
            self.dispatching += n
            self._depths.live_total += n

    def _set(
        self, queued: Mapping[int, int], dispatching: int, waiting: Mapping[str, float]
    ) -> None:
        self._depths.live_total += sum(queued.values()) + dispatching - self.live
        self.queued = {p: n for p, n in queued.items() if n}
        self.queued_total = sum(self.queued.values())
        self.dispatching = dispatching
        self.waiting_out = dict(waiting)


class Depths:
    """Every workspace's Depth, and the live items over all of them (for max_depth)."""

    def __init__(self) -> None:
        self._by_workspace: dict[str, Depth] = {}
        self.live_total = 0
        # Other replicas commit to the store too: these counts are this one's view,
        # set right by the recount that follows their NOTIFY, and a move of an item
        # it has not counted yet (queued by another) stops at zero.
        self.shared = False

    def of(self, workspace: str) -> Depth:
        depth = self._by_workspace.get(workspace)
        if depth is None:
            depth = self._by_workspace[workspace] = Depth(workspace, self)
        return depth

    def apply(self, moves: Sequence[Move]) -> None:
        for move in moves:
            depth = self.of(move.workspace)
            depth._add(move.old, move, -1)
            depth._add(move.new, move, 1)
            if move.new == "delivered" or (move.old is None and move.new == "queued"):
                depth.last_replayable = move.at
            if self.shared and (depth.dispatching < 0 or min(depth.queued.values(), default=0) < 0):
                queued = {p: max(0, n) for p, n in depth.queued.items()}
                depth._set(queued, max(0, depth.dispatching), depth.waiting_out)
            elif depth.queued_total < 0 or depth.dispatching < 0:
                log.error(
                    "queue counts of %s went negative (queued %d, dispatching %d) after %s",
                    move.workspace,
                    depth.queued_total,
                    depth.dispatching,
                    move,
                )

    def replace(self, snapshot: Snapshot) -> None:
        names = snapshot.workspaces
        if names is None:
            names = frozenset(self._by_workspace) | frozenset(snapshot.queued)
            names |= frozenset(snapshot.dispatching)
        for name in names:
            self.of(name)._set(
                snapshot.queued.get(name, {}),
                snapshot.dispatching.get(name, 0),
                snapshot.waiting_out.get(name, {}),
            )
