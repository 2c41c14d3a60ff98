"""The local fast path of an activation: a call to a free activation runs in its
caller's task, with no task switch and no event (a part of :class:`Activation`, in a
file of its own, as Orleans splits its ActivationData by concern: these functions are
its methods ``can_run_inline`` and ``run_inline``, and take the activation first).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .._drive import lazy_deadline, run_under_deadline
from .._messages import deadline_rejection, error_info, rebuild_error
from ._call import current_activation, current_chain, inline_depth
from ._states import State

if TYPE_CHECKING:
    from .._interface import MethodSpec
    from ._activation import Activation

log = logging.getLogger("koala.activation")

MAX_INLINE_DEPTH = 32


class Refused(Exception):
    """Internal: the activation a caller ran inline ended inside on_activate; the call
    did not run and goes through the mailbox instead (to a fresh activation)."""


def can_run_inline(act: Activation, chain: int) -> bool:
    """True when a caller may run its turn in its own task right now: the activation
    is valid (or just created) and free (no turn, nothing queued), or held by the
    caller's own chain."""
    if act.state is not State.VALID and act.state is not State.CREATING:
        return False
    held = act.chain
    if held is None:
        return not act.mailbox and inline_depth.get() < MAX_INLINE_DEPTH
    return held == chain and inline_depth.get() < MAX_INLINE_DEPTH


async def run_inline(act: Activation, spec: MethodSpec, chain: int, args: tuple[Any, ...]) -> Any:
    """Run one turn in the caller's task: the local fast path, with no task switch.

    The turn has the same guarantees as a mailbox turn: it holds the activation (other
    chains queue behind it), it runs under the caller's deadline (or the default one),
    the caller's cancellation cancels it, and errors reach the caller rebuilt exactly
    as on the mailbox path. Raises :class:`Refused` (the call did not run) if the
    activation this call created deactivated itself in on_activate.
    """
    cat = act.catalog
    outer = act.chain
    act.chain = chain
    cat.inline_started()
    t_chain = current_chain.set(chain)
    t_act = current_activation.set(act)
    t_depth = inline_depth.set(inline_depth.get() + 1)
    try:
        deadline = cat.effective_deadline()
        if deadline == math.inf:
            # inside a turn that has not suspended yet, its deadline (whose scope is
            # entered at its first suspension, this turn's included); else the default
            deadline = lazy_deadline.get()
        if deadline == math.inf:
            result = await _run_with_default_deadline(act, spec, args)
        elif deadline <= cat.clock():
            raise rebuild_error(
                deadline_rejection(
                    f"the deadline of {spec.qualname} had passed before it ran; not run",
                    *act.ident,
                    spec.name,
                )
            )
        else:
            result = await _inline_body(act, spec, args)
    except Refused:
        raise
    except Exception as exc:  # the caller sees what a mailbox turn would report
        raise rebuild_error(error_info(exc)) from None
    finally:
        current_chain.reset(t_chain)
        current_activation.reset(t_act)
        inline_depth.reset(t_depth)
        # turns of one chain may end out of order (a call back into this actor that
        # outlives the turn whose call gave up): only the holder's exit frees it
        if act.chain == chain:
            act.chain = outer
        cat.call_ended()
        if outer is None:
            if act.state is State.INVALID or act.state is State.CREATING:
                act.state = State.INVALID  # its activation failed, or never started
                cat.forget(act)
                act._requeue_leftovers()
            else:
                act.last_used = cat.now
                if act.deactivate_asap and act.state is State.VALID:
                    act.state = State.DEACTIVATING  # the next call gets a fresh one
                if act.mailbox or act.deactivate_asap:
                    act._wake()
    return spec.copy_result(result)


async def _run_with_default_deadline(
    act: Activation, spec: MethodSpec, args: tuple[Any, ...]
) -> Any:
    """An inline turn under the default deadline; a method seen finishing without
    suspending skips the deadline's cancel scope until it suspends
    (koala._drive.run_under_deadline)."""
    cat = act.catalog
    timeout = cat.config.default_timeout
    result, scope = await run_under_deadline(
        lambda: _inline_body(act, spec, args),
        cat.clock() + timeout,
        (act.impl, spec.name),
        cat.sync_methods,
        cat.scope_marker,
    )
    if scope is not None and scope.cancelled_caught:
        raise rebuild_error(
            deadline_rejection(
                f"{spec.qualname} on {act.ident[0]}/{act.key!r} did not finish within "
                f"the default timeout of {timeout} s",
                *act.ident,
                spec.name,
                timeout,
            )
        )
    return result


def _inline_body(
    act: Activation, spec: MethodSpec, args: tuple[Any, ...]
) -> Coroutine[Any, Any, Any]:
    # implementations are checked to be 'async def' when their class is defined
    if act.state is State.CREATING:
        return _activate_inline(act, spec, args)
    return getattr(act.instance, spec.name)(*args)  # type: ignore[no-any-return]


async def _activate_inline(act: Activation, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
    """First call to a new activation, in the caller's task: on_activate, then the call."""
    act.state = State.ACTIVATING
    try:
        await act._create()
    except Exception as exc:
        log.warning("activation of %s/%r failed", *act.ident, exc_info=True)
        act._activation_failed(error_info(exc))  # the calls queued meanwhile too
        raise
    except BaseException:  # the caller was cancelled: the next in line tries again
        log.warning("activation of %s/%r was cancelled", *act.ident)
        act._activation_failed(None)
        raise
    if not act._activated():
        raise Refused
    return await getattr(act.instance, spec.name)(*args)
