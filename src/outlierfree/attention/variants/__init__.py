"""The attention variants, one file each, in one static table.

    name      file          computes                                              kernels
    vanilla   vanilla.py    softmax                                               eager, sdpa
    clipped   clipped.py    clip((zeta - gamma) softmax + gamma, 0, 1)            eager, blocked
    gated     gated.py      softmax, output times sigmoid(G(x))                   eager, sdpa
    ncs       ncs.py        clipped softmax with a per-row gamma                  eager, blocked
    softmax1  softmax1.py   softmax with an extra logit 0                         eager
    sink      sink.py       softmax with a learned logit per head                 eager
    softpick  softpick.py   relu(exp(s) - 1) / sum |exp(s) - 1|                   eager
    sigmoid   sigmoid.py    sigmoid(s - log n)                                    eager
    softplus  softplus.py   softplus(lambda s) / l1                               eager

Adding a variant is one file defining a :class:`~.base.Variant` subclass (its parameters, flags, normaliser...) and
one line in :data:`REGISTRY` (docs/variants.md, "How to add a variant"). Nothing registers itself at import time:
the table is read-only, and everything that lists variants reads it when asked (:data:`VARIANTS` and
:func:`computed_by` are views of it), so a test can put a toy variant in it with ``monkeypatch``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import MappingProxyType
from typing import Mapping

from ...errors import require
from .base import ClipVariant, Flag, Variant
from .clipped import Clipped
from .gated import Gated
from .ncs import NCS
from .sigmoid import Sigmoid
from .sink import Sink
from .softmax1 import Softmax1
from .softplus import Softplus
from .softpick import Softpick
from .vanilla import Vanilla

REGISTRY: Mapping[str, type[Variant]] = MappingProxyType({
    "vanilla": Vanilla,
    "clipped": Clipped,
    "gated": Gated,
    "ncs": NCS,
    "softmax1": Softmax1,
    "sink": Sink,
    "softpick": Softpick,
    "sigmoid": Sigmoid,
    "softplus": Softplus,
})


def variant_class(name: str) -> type[Variant]:
    """The class of the variant called ``name``; a one-line error naming the valid ones otherwise."""
    cls = REGISTRY.get(name) if isinstance(name, str) else None
    require(cls is not None, f"unknown attention variant {name!r}", f"use one of {', '.join(REGISTRY)}")
    return cls


class Names(Sequence):
    """The names of the registered variants (those a kernel computes, with ``kernel``), read from
    :data:`REGISTRY` at each use."""

    def __init__(self, kernel: str | None = None):
        self.kernel = kernel

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, cls in REGISTRY.items() if self.kernel is None or self.kernel in cls.kernels)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, i):  # noqa: ANN001 - Sequence's signature
        return self._names()[i]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return f"Names({self._names()})"


VARIANTS = Names()


def computed_by(kernel: str) -> Names:
    """The variants a kernel of attention/kernels.py computes (each variant declares its ``kernels``)."""
    return Names(kernel)


def owner_of(field: str) -> str | None:
    """The variant whose parameter ``field`` is, or None."""
    for n, cls in REGISTRY.items():
        if field in cls.__dataclass_fields__:
            return n
    return None


def all_flags() -> list[tuple[str, Flag]]:
    """(variant, flag) for every variant's CLI flags, in table order."""
    return [(n, f) for n, cls in REGISTRY.items() for f in cls.flags]


def module_names() -> tuple[str, ...]:
    """The names of every submodule a variant adds to an attention module."""
    return tuple(dict.fromkeys(m for cls in REGISTRY.values() for m in cls.modules))


__all__ = ["REGISTRY", "VARIANTS", "ClipVariant", "Flag", "Names", "Variant", "all_flags", "computed_by",
           "module_names", "owner_of", "variant_class", "Clipped", "Gated", "NCS", "Sigmoid", "Sink", "Softmax1",
           "Softplus", "Softpick", "Vanilla"]
