"""ProtoTree: a soft binary decision tree of prototypes (method notes §2).

Modules: :mod:`.functional` (pure tensor functions: routing, soft and
deterministic predictions, the derivative-free leaf update, pruning,
class-constrained projection; the L2 distance, min-pooling and the
streaming projector are those of the shared layer ``kdt_prototypes``),
:mod:`.head` (the ``nn.Module`` holding the parameters, with the per-step
hooks the trainer calls), :mod:`.losses`
(``prototree_nll``), :mod:`.phases` (``prune``, ``project``),
:mod:`.metrics` (``tree_modes``), :mod:`.report` (its table) and
:mod:`.plugin` (registrations). Distillation between trees lives in
``kdt_proto2proto``.
"""
