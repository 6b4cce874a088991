"""The mutation catalog: correct implementations and one-bug mutants for ``sp_rope.check``.

Each public module here is one implementation the check can load with ``--impl``. It declares:

- ``CONVENTION``: ``native``, ``fastvideo`` or ``fastvideo-nd`` (how the check calls it);
- ``EXPECTED``: the diagnosis (``sp_rope.report.DIAGNOSES``) the default check must report, or
  ``None`` for a correct implementation, which must pass;
- ``DESCRIPTION``: one line, the real bug it models;
- ``IMPL``: the function's name; ``CACHE``: the module-level mapping it caches into, or ``None``.

Modules whose name starts with ``_`` are shared helpers, never catalog entries.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from sp_rope.report import DIAGNOSES

CONVENTIONS = ("native", "fastvideo", "fastvideo-nd")


@dataclass(frozen=True)
class Mutant:
    """One catalog entry (a correct implementation when ``expected`` is None)."""

    name: str
    module: str  # "sp_rope.mutants.<name>"
    convention: str
    impl: str
    cache: str | None
    expected: str | None
    description: str

    @property
    def path(self) -> Path:
        return Path(__file__).resolve().parent / f"{self.name}.py"

    def check_args(self) -> list[str]:
        """The ``sp_rope.check`` options that judge this implementation."""
        args = ["--impl", f"{self.module}:{self.impl}", "--convention", self.convention]
        if self.cache is not None:
            args += ["--impl-cache", f"{self.module}:{self.cache}"]
        return args


def _entry(name: str) -> Mutant:
    module_name = f"{__name__}.{name}"
    module = importlib.import_module(module_name)
    convention, expected = module.CONVENTION, module.EXPECTED
    impl, cache, description = module.IMPL, module.CACHE, module.DESCRIPTION
    # Fail loudly on a malformed module: a catalog that silently drops an entry proves nothing.
    if convention not in CONVENTIONS:
        raise ValueError(f"{module_name}.CONVENTION {convention!r} is not one of {CONVENTIONS}")
    if expected is not None and expected not in DIAGNOSES:
        raise ValueError(f"{module_name}.EXPECTED {expected!r} is not in sp_rope.report.DIAGNOSES")
    if not callable(getattr(module, impl, None)):
        raise ValueError(f"{module_name}.IMPL {impl!r} does not name a function of the module")
    if cache is not None and not hasattr(getattr(module, cache, None), "keys"):
        raise ValueError(f"{module_name}.CACHE {cache!r} does not name a module-level mapping")
    if not isinstance(description, str) or not description or "\n" in description:
        raise ValueError(f"{module_name}.DESCRIPTION must be one non-empty line")
    return Mutant(name, module_name, convention, impl, cache, expected, description)


def catalog() -> list[Mutant]:
    """Every implementation in this package, correct ones first, then mutants, by name."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    entries = [_entry(name) for name in names]
    return sorted(entries, key=lambda m: (m.expected is not None, m.name))


__all__ = ["CONVENTIONS", "Mutant", "catalog"]
