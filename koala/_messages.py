"""The messages a call is made of. The wire carries exactly these fields.

A :class:`Request` names its target by actor type and key, the interface and method,
and carries the call-chain id (for reentrancy), the deadline and the arguments encoded
to CBOR data: it is what one host sends another. (The local path builds no request and
encodes nothing: the call carries the validated copies of the arguments.) An error
travels as an :class:`ErrorInfo`, and becomes an exception of the original type on the
caller when that type is importable there.
"""

from __future__ import annotations

import builtins
import enum
import importlib
import itertools
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import _errors

Key = str | int
"""An actor's key: with the actor type, its identity (``get_rpc_proxy(IPlayer, "1")``)."""


class ErrorCode(enum.IntEnum):
    """Why a call failed; the rejection kinds are small and fixed."""

    APPLICATION = 0  # the actor raised
    TIMEOUT = 1  # the deadline passed (running, or while queued: then it never ran)
    OVERLOADED = 2  # host-wide or mailbox bound reached; not run
    SHUTTING_DOWN = 3  # the host is draining; not run
    NOT_FOUND = 4  # no implementation of the interface on the host; not run
    BAD_REQUEST = 5  # arguments did not decode or fit the annotations; not run
    WRONG_HOST = 6  # the actor is not placed on this host; not run
    UNAVAILABLE = 7  # the host cannot be reached; may or may not have run
    CANCELLED = 8  # the caller cancelled the call


_chain_ids = itertools.count(random.getrandbits(62))
_request_ids = itertools.count(1)


# A fresh call-chain id: random 62-bit base, counting up, unique in practice (the
# counter's own __next__: a C call, on every call from outside an actor).
new_chain_id: Callable[[], int] = _chain_ids.__next__


def new_request_id() -> int:
    return next(_request_ids)


class Request(NamedTuple):
    """One call to one actor method as it crosses hosts: ``args`` are CBOR data.

    Immutable: whoever passes a request on and must change a field makes a new one
    (:meth:`with_placement`). The runtime encodes the arguments once, by the method's
    annotations, when it builds a request for another host; a host that serves one
    decodes them into the call it runs. A local call has no Request: its arguments stay
    Python values (``koala.host._call.Call``). A tuple underneath, because it is made
    per remote call: a frozen dataclass costs several times more to build.
    """

    request_id: int
    chain_id: int
    deadline: float  # absolute, on this process's anyio clock; the wire carries what is left
    actor_type: str
    key: Key
    interface: str
    method: str
    args: tuple[Any, ...]  # CBOR data (encoded by the method's argument codecs)
    one_way: bool = False
    # no cancel scope of the caller carries the deadline (it is the default one): the
    # transport fails the call when it passes
    expires: bool = False
    # the placement ticket of the caller's directory for this actor (empty: none); the
    # target host trusts it only when it is its own and not stale (Directory.claim)
    placement: bytes = b""
    # the caller's span context (W3C traceparent, tracestate) while tracing is on
    # (koala._tracing); None: no trace to continue
    trace: tuple[str, str] | None = None

    def with_placement(self, ticket: bytes) -> Request:
        """The same request carrying ``ticket``."""
        return tuple.__new__(Request, (*self[:10], ticket, *self[11:]))


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error as it crosses a boundary: enough to rebuild it, or to report it."""

    code: ErrorCode
    type_name: str  # "module:QualName" of the exception raised
    message: str
    traceback: str = ""
    args: tuple[Any, ...] = ()


@dataclass(slots=True)
class Response:
    """The answer to a request: a result, or an error."""

    request_id: int
    result: Any = None
    error: ErrorInfo | None = None


_CODE_OF: dict[type[BaseException], ErrorCode] = {
    _errors.OverloadedError: ErrorCode.OVERLOADED,
    _errors.ShuttingDownError: ErrorCode.SHUTTING_DOWN,
    _errors.ActorNotFoundError: ErrorCode.NOT_FOUND,
    _errors.ArgumentTypeError: ErrorCode.BAD_REQUEST,
    _errors.HostUnavailableError: ErrorCode.UNAVAILABLE,
    _errors.WrongHostError: ErrorCode.WRONG_HOST,
}

_PLAIN = (type(None), bool, int, float, str, bytes)

# The exception a caller sees for each rejection kind (when the type name is unknown).
_TYPE_OF: dict[ErrorCode, type[BaseException]] = {
    ErrorCode.TIMEOUT: TimeoutError,
    ErrorCode.OVERLOADED: _errors.OverloadedError,
    ErrorCode.SHUTTING_DOWN: _errors.ShuttingDownError,
    ErrorCode.NOT_FOUND: _errors.ActorNotFoundError,
    ErrorCode.BAD_REQUEST: _errors.ArgumentTypeError,
    ErrorCode.UNAVAILABLE: _errors.HostUnavailableError,
    ErrorCode.WRONG_HOST: _errors.WrongHostError,
}


def rejection(code: ErrorCode, message: str) -> ErrorInfo:
    """An error made by the runtime itself (not raised by actor code)."""
    cls = _TYPE_OF.get(code, _errors.KoalaError)
    return ErrorInfo(code, f"{cls.__module__}:{cls.__qualname__}", message)


def deadline_rejection(
    message: str, actor_type: str, key: Key, method: str, timeout: float | None = None
) -> ErrorInfo:
    """A TIMEOUT rejection that rebuilds as DeadlineExceededError with what is known."""
    cls = _errors.DeadlineExceededError
    args = (message, timeout, actor_type, key, method)
    return ErrorInfo(ErrorCode.TIMEOUT, f"{cls.__module__}:{cls.__qualname__}", message, "", args)


def error_info(exc: BaseException, code: ErrorCode | None = None) -> ErrorInfo:
    """Describe an exception raised in an actor so it can be rebuilt elsewhere."""
    if isinstance(exc, _errors.RemoteError):  # keep the original type across hops
        return ErrorInfo(
            code or ErrorCode.APPLICATION,
            exc.remote_type,
            exc.remote_message,
            exc.remote_traceback,
        )
    remote_tb = getattr(exc, "remote_traceback", None)
    if isinstance(remote_tb, str):  # rebuilt from another turn: keep the original story
        return ErrorInfo(
            code or getattr(exc, "error_code", None) or ErrorCode.APPLICATION,
            f"{type(exc).__module__}:{type(exc).__qualname__}",
            str(exc),
            remote_tb,
            tuple(exc.args) if all(isinstance(a, _PLAIN) for a in exc.args) else (),
        )
    cls = type(exc)
    tb = "".join(traceback.format_exception(exc))
    if code is None:
        code = next((c for t, c in _CODE_OF.items() if isinstance(exc, t)), None)
        if code is None:
            code = ErrorCode.TIMEOUT if isinstance(exc, TimeoutError) else ErrorCode.APPLICATION
    args = tuple(exc.args) if all(isinstance(a, _PLAIN) for a in exc.args) else ()
    return ErrorInfo(code, f"{cls.__module__}:{cls.__qualname__}", str(exc), tb, args)


def _resolve_type(type_name: str) -> type[BaseException] | None:
    module, _, qualname = type_name.partition(":")
    if not qualname:
        return None
    try:
        obj: Any = builtins if module == "builtins" else importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError):
        return None
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return obj
    return None


def rebuild_error(info: ErrorInfo) -> BaseException:
    """The exception a caller sees: the original type when importable, else RemoteError.

    Either way it carries ``remote_type`` and ``remote_traceback``, and the remote
    traceback is attached as a note so it shows when the error is printed.
    """
    cls = _resolve_type(info.type_name) or _TYPE_OF.get(info.code)
    exc: BaseException | None = None
    if cls is not None and not issubclass(cls, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        # no args (a rejection, or args that were not plain data): the message, so that
        # a type that also takes no arguments does not come back with an empty message
        tries = (info.args, (info.message,)) if info.args else ((info.message,), ())
        for args in tries:
            try:
                exc = cls(*args)
                break
            except Exception:
                continue
    if exc is None:
        exc = _errors.RemoteError(info.type_name.replace(":", "."), info.message, info.traceback)
    try:
        exc.remote_type = info.type_name.replace(":", ".")  # type: ignore[attr-defined]
        exc.remote_traceback = info.traceback  # type: ignore[attr-defined]
        exc.error_code = info.code  # type: ignore[attr-defined]
    except AttributeError:  # a type with __slots__: the note still carries it
        pass
    if info.traceback:
        exc.add_note(f"Remote traceback ({info.type_name}):\n{info.traceback.rstrip()}")
    return exc
