"""The neural cellular automaton: the rule as data, its registries, rollouts and levels.

- :mod:`.rule`: :class:`~.rule.Rule`, the description of one level's rule, and one step.
- :mod:`.perceptions`, :mod:`.updates`: the registries of perceptions and updates, each entry
  with its reference implementation (plug-ins register here).
- :mod:`.rollout`: iterating a step with ``jax.lax.scan``; :mod:`.remat`: its checkpointing.
- :mod:`.backends`: which implementation runs a rule; :mod:`.cpu_fast`: the fast CPU one,
  derived from the description.
- :mod:`.levels`: coarse-to-fine composition of levels (any spatial rank).
- :mod:`.prng`: the fire masks' random numbers; :mod:`.weights`: the original's weights.

Nothing here imports training, evaluation or the command line.
"""
