"""The placement driver's server side: the logic over a store, its HTTP API, the stores.

``koala pd`` runs :func:`serve_pd` over the store :func:`open_store` opens. Hosts never
import this package: they reach the PD through its client (``koala.pd``).
"""

from .._records import HostInfo as HostInfo
from ._api import create_app as create_app
from ._driver import PlacementDriver as PlacementDriver
from ._driver import Position as Position
from ._errors import PDError as PDError
from ._etcd import EtcdStore as EtcdStore
from ._maintenance import MaintenanceConfig as MaintenanceConfig
from ._maintenance import MaintenanceStatistics as MaintenanceStatistics
from ._serve import open_store as open_store
from ._serve import serve_pd as serve_pd
from ._store import KeyValue as KeyValue
from ._store import LeaseNotFoundError as LeaseNotFoundError
from ._store import MemoryStore as MemoryStore
from ._store import Store as Store
from ._store import StoreError as StoreError
from ._store import StoreFullError as StoreFullError
from ._store import StoreStatus as StoreStatus
from ._store import StoreUnavailableError as StoreUnavailableError

__all__ = [
    "EtcdStore",
    "HostInfo",
    "KeyValue",
    "LeaseNotFoundError",
    "MaintenanceConfig",
    "MaintenanceStatistics",
    "MemoryStore",
    "PDError",
    "PlacementDriver",
    "Position",
    "Store",
    "StoreError",
    "StoreFullError",
    "StoreStatus",
    "StoreUnavailableError",
    "create_app",
    "open_store",
    "serve_pd",
]
