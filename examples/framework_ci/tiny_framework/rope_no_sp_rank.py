"""``tiny_framework.rope`` with the classic sequence-parallel bug: the cache key forgets the SP
rank, so the ranks of one SP group share one entry (whichever rank built it first)."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

from tiny_framework.rope import SpGroup, Tables, build_tables, rope_call

CACHE: dict[Hashable, Tables] = {}


def get_sp_group() -> SpGroup:
    return SpGroup()


def rope(*args: Any, **kwargs: Any) -> Tables:
    """``tiny_framework.rope.rope``'s arguments."""
    call = rope_call(get_sp_group, *args, **kwargs)
    key = dataclasses.replace(call, sp_rank=0)  # BUG: every rank looks up rank 0's key
    if key not in CACHE:
        CACHE[key] = build_tables(call)
    return CACHE[key]
