"""The mutation catalog: correct implementations and one-bug mutants for ``sp_rope.check``.

One module per convention (``native``, ``fastvideo``, ``fastvideo_nd``) holds its correct
implementation, written as a small class whose fields are the steps a bug can live in, and a
table of rows: each mutant is the correct implementation with one field bent (a forgotten key
field, another index function, an overridden builder step). Every row becomes a module attribute
of its name, with its own cache mapping as ``<name>.cache``, so the check loads it like any
implementation: ``--impl sp_rope.mutants.fastvideo:fv_key_no_dtype --convention fastvideo
--impl-cache sp_rope.mutants.fastvideo:fv_key_no_dtype.cache`` (``Mutant.check_args()``).

A row declares the diagnosis (``sp_rope.report.DIAGNOSES``) the default check must report for
it, among whatever else it reports, or ``None`` for a correct implementation, which must pass.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sp_rope.report import DIAGNOSES

CONVENTIONS = ("native", "fastvideo", "fastvideo-nd")
_MODULES = ("native", "fastvideo", "fastvideo_nd")


@dataclass(frozen=True)
class Mutant:
    """One catalog entry (a correct implementation when ``expected`` is None)."""

    name: str
    module: str  # "sp_rope.mutants.<convention module>"
    convention: str
    impl: str  # the attribute of ``module`` that is the implementation (its name)
    cache: str | None  # the attribute path of its cache mapping ("<name>.cache"), if it keeps one
    expected: str | None
    description: str

    @property
    def path(self) -> Path:
        """The file that declares this entry."""
        return Path(sys.modules[self.module].__file__ or "")

    def check_args(self) -> list[str]:
        """The ``sp_rope.check`` options that judge this implementation."""
        args = ["--impl", f"{self.module}:{self.impl}", "--convention", self.convention]
        if self.cache is not None:
            args += ["--impl-cache", f"{self.module}:{self.cache}"]
        return args


class Row(NamedTuple):
    """One line of a convention module's table: ``impl`` is callable in that convention and has
    a ``cache`` attribute (the mapping it caches into, or None)."""

    name: str
    expected: str | None
    description: str
    impl: Any


def register(namespace: dict[str, Any], convention: str, rows: list[Row]) -> list[Mutant]:
    """Make each row's implementation an attribute of the module ``namespace`` belongs to, and
    return the rows as ``Mutant`` records. Fails loudly on a malformed row: a catalog that
    silently drops an entry proves nothing."""
    module = namespace["__name__"]
    entries = []
    for row in rows:
        where = f"{module}.{row.name}"
        if convention not in CONVENTIONS:
            raise ValueError(f"{where}: convention {convention!r} is not one of {CONVENTIONS}")
        if row.expected is not None and row.expected not in DIAGNOSES:
            raise ValueError(f"{where}: expected {row.expected!r} is not in sp_rope.report.DIAGNOSES")
        if not callable(row.impl):
            raise ValueError(f"{where}: the implementation is not callable")
        cache = getattr(row.impl, "cache", None)
        if cache is not None and not isinstance(cache, MutableMapping):
            raise ValueError(f"{where}: .cache must be the mapping it caches into, got {type(cache).__name__}")
        if not row.description or "\n" in row.description:
            raise ValueError(f"{where}: the description must be one non-empty line")
        if row.name in namespace:
            raise ValueError(f"{where}: the name is taken")
        namespace[row.name] = row.impl
        entries.append(Mutant(row.name, module, convention, row.name, None if cache is None else f"{row.name}.cache",
                              row.expected, row.description))
    return entries


def catalog() -> list[Mutant]:
    """Every entry of the catalog, correct ones first, then mutants, by name."""
    entries = [m for name in _MODULES for m in importlib.import_module(f"{__name__}.{name}").ENTRIES]
    return sorted(entries, key=lambda m: (m.expected is not None, m.name))


__all__ = ["CONVENTIONS", "Mutant", "Row", "catalog", "register"]
