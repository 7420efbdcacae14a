"""How each function of `softprompt.client.calls` becomes a method of both `Client` and `AsyncClient`.

`generate = unary(calls.generate)` in the class both clients share makes `client.generate(...)` prepare
the call with `calls.generate` and run it with the client's runner: `Client` returns the result,
`AsyncClient` an awaitable of it (an `async def` method). `streaming` methods return an iterator, or an
async iterator; `listing` methods a list, or an awaitable of one. The overloads of `__get__` tell type
checkers exactly that, with the `calls` function's parameters, so each method is written once and
typed for both clients. The method carries the function's name, docstring and signature (`help()`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, ParamSpec, TypeVar, overload

from softprompt.client.calls import Paged, Streaming, Unary, Until

if TYPE_CHECKING:
    from softprompt.client.aio import AsyncClient
    from softprompt.client.client import Client

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["unary", "streaming", "listing"]


class _Method(Generic[P]):
    """A client method made from a `calls` function; `_runner` names the client's method that runs it."""

    _runner: ClassVar[str]

    def __init__(self, prepare: Callable[P, Any]) -> None:
        self._prepare = prepare
        # The method's parameters are the function's; what it returns is the prepared call's result.
        self._signature = inspect.signature(prepare).replace(return_annotation=inspect.Signature.empty)

        # What the class shows (`Client.generate`): a function of the client, for `help()` and documentation.
        def unbound(client: Any, /, *args: Any, **kwargs: Any) -> Any:
            return self._bind(client)(*args, **kwargs)

        client = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        self._unbound = self._wrap(unbound, self._signature.replace(
            parameters=[client, *self._signature.parameters.values()]))

    def _wrap(self, method: Callable[..., Any], signature: inspect.Signature | None = None) -> Callable[..., Any]:
        functools.update_wrapper(method, self._prepare)
        method.__signature__ = signature or self._signature  # type: ignore[attr-defined]
        return method

    def _bind(self, client: Any) -> Callable[..., Any]:
        prepare, run = self._prepare, getattr(client, self._runner)

        def method(*args: Any, **kwargs: Any) -> Any:
            return run(prepare(*args, **kwargs))

        async def awaited(*args: Any, **kwargs: Any) -> Any:
            return await run(prepare(*args, **kwargs))

        # A coroutine runner makes a coroutine function, so the call is prepared (its arguments checked) when awaited.
        return self._wrap(awaited if inspect.iscoroutinefunction(run) else method)

    def __get__(self, client: Any, owner: Any = None) -> Any:
        return self._unbound if client is None else self._bind(client)


class unary(_Method[P], Generic[P, R]):
    """A method that runs one call and returns its result: a unary RPC, or a watch until a condition."""

    _runner = "_result"

    def __init__(self, prepare: Callable[P, Unary[R] | Until[R]]) -> None:
        super().__init__(prepare)

    @overload
    def __get__(self, client: None, owner: Any = None) -> Callable[..., Any]: ...
    @overload
    def __get__(self, client: Client, owner: Any = None) -> Callable[P, R]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: Any = None) -> Callable[P, Awaitable[R]]: ...
    def __get__(self, client: Any, owner: Any = None) -> Any:
        return super().__get__(client, owner)


class streaming(_Method[P], Generic[P, R]):
    """A method that returns the items of a server stream, or of a paged listing, as they come."""

    _runner = "_items"

    def __init__(self, prepare: Callable[P, Streaming[R] | Paged[R]]) -> None:
        super().__init__(prepare)

    @overload
    def __get__(self, client: None, owner: Any = None) -> Callable[..., Any]: ...
    @overload
    def __get__(self, client: Client, owner: Any = None) -> Callable[P, Iterator[R]]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: Any = None) -> Callable[P, AsyncIterator[R]]: ...
    def __get__(self, client: Any, owner: Any = None) -> Any:
        return super().__get__(client, owner)


class listing(_Method[P], Generic[P, R]):
    """A method that returns every item of a paged listing, in one list."""

    _runner = "_all"

    def __init__(self, prepare: Callable[P, Paged[R]]) -> None:
        super().__init__(prepare)

    @overload
    def __get__(self, client: None, owner: Any = None) -> Callable[..., Any]: ...
    @overload
    def __get__(self, client: Client, owner: Any = None) -> Callable[P, list[R]]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: Any = None) -> Callable[P, Awaitable[list[R]]]: ...
    def __get__(self, client: Any, owner: Any = None) -> Any:
        return super().__get__(client, owner)
