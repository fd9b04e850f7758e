"""Pickling for classes generated at run time (one per fused experts class).

A generated class is not importable by name in a fresh process, so its instances pickle through
the factory that made the class instead: unpickling calls ``factory(key)`` (which regenerates the
class, cached) and restores the instance's state into it. ``factory`` and ``key`` must themselves
pickle by reference (module-level functions, Transformers classes).
"""

from __future__ import annotations

from typing import Any, Callable


def _new_instance(factory: Callable[[Any], type], key: Any) -> Any:
    cls = factory(key)
    return cls.__new__(cls)


def pickled_through(factory: Callable[[Any], type], key: Any) -> dict[str, Any]:
    """Class-body entries that make instances of ``factory(key)`` pickle and deep-copy through it."""

    def __reduce_ex__(self: Any, protocol: int) -> tuple:
        getstate = getattr(self, "__getstate__", None)  # nn.Module has one; plain objects only from 3.11
        return _new_instance, (factory, key), getstate() if getstate is not None else dict(self.__dict__)

    return {"__reduce_ex__": __reduce_ex__}
