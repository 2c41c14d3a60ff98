"""One URL picks the backend: ``memory://``, ``sqlite:///path``, ``postgresql://...``."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit

from .._errors import ConfigError
from ._engine import Engine
from ._memory import MemoryEngine
from ._sqlite import SYNCHRONOUS, SqliteEngine

_HELP = (
    "use memory:// (tests), sqlite:///relative/path.db or sqlite:////absolute/path.db "
    "(embedded), or postgresql://user:password@host:port/dbname (a server)"
)


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and reprs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def make_engine(
    url: str, *, max_connections: int, connect_timeout: float, busy_timeout: float
) -> Engine:
    """Validate the URL and build its engine (nothing connects yet). Bad URL: ConfigError."""
    if not isinstance(url, str):
        raise ConfigError(f"a storage URL must be a str, got {type(url).__name__}; {_HELP}")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(f"storage URL {redact(url)!r} has no scheme; {_HELP}")
    if scheme == "memory":
        if rest:
            raise ConfigError(f"memory:// takes nothing after it, got {url!r}")
        return MemoryEngine()
    if scheme == "sqlite":
        return _sqlite(url, rest, max_connections, busy_timeout)
    if scheme in ("postgresql", "postgres"):
        from ._postgres import PostgresEngine  # psycopg is only needed for this backend

        return PostgresEngine(
            url, redact(url), connect_timeout=connect_timeout, max_connections=max_connections
        )
    raise ConfigError(f"unknown storage URL scheme {scheme!r} in {redact(url)!r}; {_HELP}")


def _sqlite(url: str, rest: str, max_connections: int, busy_timeout: float) -> SqliteEngine:
    host, slash, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    if host or not slash or not path:
        raise ConfigError(
            f"bad SQLite URL {url!r}: write sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db (three slashes, then the file path)"
        )
    if path == ":memory:":
        raise ConfigError(
            "an in-memory SQLite database is private to one connection; use memory://"
        )
    synchronous = "full"
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "synchronous" and value.lower() in SYNCHRONOUS:
            synchronous = value.lower()
        elif name == "busy_timeout":
            try:
                busy_timeout = float(value)
            except ValueError:
                raise ConfigError(
                    f"busy_timeout in {url!r} must be seconds, got {value!r}"
                ) from None
        else:
            raise ConfigError(
                f"unknown or bad SQLite URL option {name}={value!r} in {url!r}; "
                "accepted: synchronous=full|normal, busy_timeout=SECONDS"
            )
    return SqliteEngine(
        path, synchronous=synchronous, busy_timeout=busy_timeout, max_connections=max_connections
    )
