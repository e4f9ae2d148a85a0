"""Endpoint access to container providers, by string id.

``Provided("users.service")`` is a FastAPI dependency that calls the provider at that path in
the container of the app serving the request. The path is looked up once per app and the
provider object kept; calling it each request still honours ``provider.override(...)``. No
global wiring is involved, so several apps (each with its own container) can live in one
process — tests rely on that.
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


def Provided(path: str) -> Any:
    async def resolve(request: Request) -> Any:
        cache: dict[str, providers.Provider[Any]] = request.app.state.providers
        provider = cache.get(path)
        if provider is None:
            provider = cache[path] = lookup(request.app.state.container, path)
        return provider()

    resolve.__name__ = f"provide_{path.replace('.', '_')}"
    return Depends(resolve)
