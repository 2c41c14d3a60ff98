"""Koala: virtual actors for Python, on asyncio, uvloop and trio."""

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
