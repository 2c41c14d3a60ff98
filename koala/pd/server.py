"""The placement driver's server side: the logic over a store, and its HTTP API."""

from ._api import create_app as create_app
from ._run import serve_pd as serve_pd
from ._service import HostInfo as HostInfo
from ._service import PDError as PDError
from ._service import PlacementDriver as PlacementDriver
from ._service import Position as Position

__all__ = ["HostInfo", "PDError", "PlacementDriver", "Position", "create_app", "serve_pd"]
