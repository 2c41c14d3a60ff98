"""The states of the host's parts, each a small enum (Orleans names them the same way).

Comparisons on the hot path are by identity (``state is State.VALID``), as cheap as the
bare ints they replace.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Where one activation is in its life (exported as ``koala.ActivationState``)."""

    CREATING = "creating"  # in the catalog, no instance yet
    ACTIVATING = "activating"  # on_activate runs
    VALID = "valid"  # serving turns
    DEACTIVATING = "deactivating"  # on_deactivate is (or is about to be) the last turn
    INVALID = "invalid"  # out of the catalog; calls still queued go to a fresh one


class Pump(enum.Enum):
    """Who runs an activation's mailbox turns."""

    NONE = 0  # no task: the next call that queues starts one
    RUNNING = 1  # a task runs turns (a pump, or a deactivation task for the last one)
    WAITING = 2  # the pump waits for work (in the catalog's set of waiting pumps)


class HostState(enum.Enum):
    """What a host accepts.

    ============  ===================  ===================
    state         new call chains      new activations
    ============  ===================  ===================
    RUNNING       yes                  yes
    EVICTING      yes                  no (fenced: ``evict_all`` runs)
    DRAINING      no (live ones only)  yes, for live chains
    STOPPING      no (live ones only)  no
    ============  ===================  ===================
    """

    RUNNING = "running"
    EVICTING = "evicting"
    DRAINING = "draining"
    STOPPING = "stopping"

    @property
    def draining(self) -> bool:
        """New call chains are refused: the host shuts down."""
        return self is HostState.DRAINING or self is HostState.STOPPING

    @property
    def creates(self) -> bool:
        """New activations may start."""
        return self is HostState.RUNNING or self is HostState.DRAINING
