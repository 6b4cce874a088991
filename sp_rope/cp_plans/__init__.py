"""diffusers' real context-parallel plans, model by model, on CPU ranks.

``python -m sp_rope.cp_plans [--models Wan,Flux,...] [--nproc 2] [--timeout S] [--report out.json]``

For each diffusers transformer whose class declares a ``_cp_plan``, a tiny seeded instance is run
whole, then under diffusers' own context parallelism (``enable_parallelism`` with a
``ContextParallelConfig`` on a CPU ``DeviceMesh`` over gloo, the class's own plan, Ulysses attention
through the native backend). Two checks per model:

- **rope split**: on every rank, the rotary embedding the attention receives is the unsharded one at
  exactly the tokens of that rank's hidden-state shard (``rank.py``);
- **end to end**: the gathered output equals the single-rank output (float32, 1e-5 relative).

Modules: ``recipes`` (tiny configurations, where each model consumes its RoPE, planted bugs),
``rank`` (one rank's checks), ``job`` (the ranks' loop and the merged verdicts), ``cli``.
"""

from .cli import main

__all__ = ["main"]
