"""Endpoint access to container providers, by string id.

``Provided("users.service")`` is a FastAPI dependency that calls the provider at that path in
the container of the app serving the request. The path is looked up once per app and the
provider object kept; calling it each request still honours ``provider.override(...)``. No
global wiring is involved, so several apps (each with its own container) can live in one
process — tests rely on that.

On a ``core.edge.routes.TransactionalRoute`` endpoint, a ``Provided`` parameter is not solved by FastAPI's
dependency machinery at all (about 20 µs a request each): the route calls ``provide`` itself with
the same result. Anywhere else (a sub-dependency, a plain route) it is an ordinary ``Depends``.
"""

from __future__ import annotations

from typing import Any

from dependency_injector import providers
from fastapi import Depends, Request


def lookup(container: Any, path: str) -> providers.Provider[Any]:
    node: Any = container
    for part in path.split("."):
        node = getattr(node, part)
    if not isinstance(node, providers.Provider):
        raise LookupError(f"{path!r} is not a provider")
    return node


def provide(request: Request, path: str) -> Any:
    """What the provider at ``path`` in the container of the app serving ``request`` gives now."""
    cache: dict[str, providers.Provider[Any]] = request.app.state.providers
    provider = cache.get(path)
    if provider is None:
        provider = cache[path] = lookup(request.app.state.container, path)
    return provider()


def Provided(path: str) -> Any:
    async def resolve(request: Request) -> Any:
        return provide(request, path)

    resolve.__name__ = f"provide_{path.replace('.', '_')}"
    resolve.provided_path = path  # type: ignore[attr-defined]  # read by core.edge.routes.TransactionalRoute
    return Depends(resolve)


def provided_path(annotation: Any) -> str | None:
    """The path of a ``Annotated[T, Provided(path)]`` annotation, else None."""
    for marker in getattr(annotation, "__metadata__", ()):
        path = getattr(getattr(marker, "dependency", None), "provided_path", None)
        if isinstance(path, str):
            return path
    return None
