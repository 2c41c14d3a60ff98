"""Koala's exceptions. Each says whose fault it is and what to do next."""

from __future__ import annotations


class KoalaError(Exception):
    """Base class of every error Koala raises itself."""


class ConfigError(KoalaError, ValueError):
    """Bad configuration (an environment variable, a flag, a config value)."""


class InterfaceError(KoalaError, TypeError):
    """An actor interface or implementation is not well formed."""


class ArgumentTypeError(KoalaError, TypeError):
    """A value does not fit its annotation; the call was not sent."""

    def __init__(self, message: str, path: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.path = path


class RuntimeNotRunningError(KoalaError, RuntimeError):
    """No Koala runtime runs in this process (or context)."""


class ActorNotFoundError(KoalaError, LookupError):
    """No implementation of the interface is registered on this host."""


class ShuttingDownError(KoalaError):
    """The host is draining: it accepts no new calls. Retry against another host."""


class OverloadedError(KoalaError):
    """The host's bound on queued work is reached; the call was refused at once."""


class HostUnavailableError(KoalaError):
    """The host that holds the actor cannot be reached (it died or is unreachable)."""


class WrongHostError(KoalaError):
    """The actor is not placed on the host that was asked; the caller re-resolves it."""


class RemoteError(KoalaError):
    """An actor raised an exception whose type is not importable here.

    `remote_type` is the dotted name of the original type, `remote_traceback` its
    traceback text as formatted where it was raised.
    """

    def __init__(self, remote_type: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback


class DeadlineExceededError(KoalaError, TimeoutError):
    """A call's deadline passed before it was answered; it may or may not have run.

    A ``TimeoutError``, so ``except TimeoutError`` catches it. What Koala knows where it
    raises it: ``timeout`` (the deadline in seconds, when the default timeout set it),
    ``actor_type``, ``key`` and ``method`` (None when unknown). Retry only what is safe
    to run twice, or give the call a longer deadline.
    """

    def __init__(
        self,
        message: str = "",
        timeout: float | None = None,
        actor_type: str | None = None,
        key: str | int | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__(message)
        # args are the constructor's, so the error rebuilds intact across an actor call
        # (set after: OSError, a base of TimeoutError, keeps only two of several args)
        self.args = (message, timeout, actor_type, key, method)
        self.message = message
        self.timeout = timeout
        self.actor_type = actor_type
        self.key = key
        self.method = method

    def __str__(self) -> str:
        return self.message or self.summary()

    def summary(self) -> str:
        """``deadline of 3 s exceeded calling Player/1.echo``, as far as it is known."""
        text = (
            "deadline exceeded"
            if self.timeout is None
            else f"deadline of {self.timeout:g} s exceeded"
        )
        if self.actor_type is not None:
            text += f" calling {self.actor_type}/{self.key}"
            if self.method is not None:
                text += f".{self.method}"
        return text


class PDRequestError(KoalaError):
    """The PD refused a request; ``status`` and ``code`` say why (see docs/pd.md)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"the PD answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class PDUnavailableError(HostUnavailableError):
    """The PD cannot be reached, did not answer in time, or cannot reach its store."""


class LeaseExpiredError(PDRequestError):
    """This host's lease is gone: it must stop serving and register again."""
