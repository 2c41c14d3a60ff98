"""The host: the catalog of activations (``_catalog``), one activation's mailbox, turns
and lifecycle (``_activation``), what they run (``_call``), timers (``_timers``), the
states of all three (``_states``), and the runtime, the call path over them
(``_runtime``). The public names are re-exported by ``koala``.
"""

from ._activation import Activation as Activation
from ._call import Call as Call
from ._call import Turn as Turn
from ._call import TurnBody as TurnBody
from ._call import current_activation as current_activation
from ._call import current_chain as current_chain
from ._call import current_deadline as current_deadline
from ._catalog import Catalog as Catalog
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeStatistics as RuntimeStatistics
from ._runtime import current_runtime as current_runtime
from ._states import HostState as HostState
from ._states import State as State
from ._timers import TimerHandle as TimerHandle

__all__ = [
    "Activation",
    "Call",
    "Catalog",
    "HostState",
    "Runtime",
    "RuntimeStatistics",
    "State",
    "TimerHandle",
    "Turn",
    "TurnBody",
    "current_activation",
    "current_chain",
    "current_deadline",
    "current_runtime",
]
