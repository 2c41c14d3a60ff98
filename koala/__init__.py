"""Koala: virtual actors for Python, on asyncio, uvloop and trio.

The names below load on first use (PEP 562): ``import koala.wire`` (the sans-IO
protocol) then loads no event loop, and a tool that needs one part does not pay for the
runtime, the PD client and their dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._actor import ActorBase as ActorBase
    from ._backend import run as run
    from ._config import HostConfig as HostConfig
    from ._errors import ActorNotFoundError as ActorNotFoundError
    from ._errors import ArgumentTypeError as ArgumentTypeError
    from ._errors import ConfigError as ConfigError
    from ._errors import DeadlineExceededError as DeadlineExceededError
    from ._errors import HostUnavailableError as HostUnavailableError
    from ._errors import InterfaceError as InterfaceError
    from ._errors import KoalaError as KoalaError
    from ._errors import OverloadedError as OverloadedError
    from ._errors import RemoteError as RemoteError
    from ._errors import RuntimeNotRunningError as RuntimeNotRunningError
    from ._errors import ShuttingDownError as ShuttingDownError
    from ._errors import WrongHostError as WrongHostError
    from ._interface import ActorInterface as ActorInterface
    from ._interface import one_way as one_way
    from ._proxy import get_rpc_proxy as get_rpc_proxy
    from ._seams import LOCAL as LOCAL
    from ._seams import Directory as Directory
    from ._seams import Key as Key
    from ._seams import RemoteDelivery as RemoteDelivery
    from .host import Runtime as Runtime
    from .host import RuntimeStatistics as RuntimeStatistics
    from .host import State as ActivationState
    from .host import TimerHandle as TimerHandle
    from .host import current_deadline as current_deadline
    from .host import current_runtime as current_runtime

# public name -> (module, attribute)
_LAZY: dict[str, tuple[str, str]] = {
    "ActorBase": ("._actor", "ActorBase"),
    "run": ("._backend", "run"),
    "HostConfig": ("._config", "HostConfig"),
    "ActorNotFoundError": ("._errors", "ActorNotFoundError"),
    "ArgumentTypeError": ("._errors", "ArgumentTypeError"),
    "ConfigError": ("._errors", "ConfigError"),
    "DeadlineExceededError": ("._errors", "DeadlineExceededError"),
    "HostUnavailableError": ("._errors", "HostUnavailableError"),
    "InterfaceError": ("._errors", "InterfaceError"),
    "KoalaError": ("._errors", "KoalaError"),
    "OverloadedError": ("._errors", "OverloadedError"),
    "RemoteError": ("._errors", "RemoteError"),
    "RuntimeNotRunningError": ("._errors", "RuntimeNotRunningError"),
    "ShuttingDownError": ("._errors", "ShuttingDownError"),
    "WrongHostError": ("._errors", "WrongHostError"),
    "ActorInterface": ("._interface", "ActorInterface"),
    "one_way": ("._interface", "one_way"),
    "get_rpc_proxy": ("._proxy", "get_rpc_proxy"),
    "LOCAL": ("._seams", "LOCAL"),
    "Directory": ("._seams", "Directory"),
    "Key": ("._seams", "Key"),
    "RemoteDelivery": ("._seams", "RemoteDelivery"),
    "Runtime": (".host", "Runtime"),
    "RuntimeStatistics": (".host", "RuntimeStatistics"),
    "ActivationState": (".host", "State"),
    "TimerHandle": (".host", "TimerHandle"),
    "current_deadline": (".host", "current_deadline"),
    "current_runtime": (".host", "current_runtime"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'koala' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value  # found once: later reads are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "LOCAL",
    "ActivationState",
    "ActorBase",
    "ActorInterface",
    "ActorNotFoundError",
    "ArgumentTypeError",
    "ConfigError",
    "DeadlineExceededError",
    "Directory",
    "HostConfig",
    "HostUnavailableError",
    "InterfaceError",
    "Key",
    "KoalaError",
    "OverloadedError",
    "RemoteDelivery",
    "RemoteError",
    "Runtime",
    "RuntimeNotRunningError",
    "RuntimeStatistics",
    "ShuttingDownError",
    "TimerHandle",
    "WrongHostError",
    "current_deadline",
    "current_runtime",
    "get_rpc_proxy",
    "one_way",
    "run",
]
__version__ = "0.1.0"
