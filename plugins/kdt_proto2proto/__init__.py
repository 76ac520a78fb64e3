"""Proto2Proto: distilling interpretable prototype models from a deep teacher
into a shallow student, and measuring faithfulness (AAP, AJS, PMS).

The method only: it works with any head satisfying the prototype-head
protocol (:mod:`kdt_prototypes.protocol`), such as ``protopnet``
(``kdt_protopnet``) and ``prototree`` (``kdt_prototree``). It imports the
shared prototype layer ``kdt_prototypes`` and never an architecture; a recipe
names the architectures.

Modules: :mod:`.functional` (pure tensor functions: the distillation losses,
prototype matching), :mod:`.metrics` (AAP, AJS, PMS on records),
:mod:`.losses`, :mod:`.evaluation` (registered components), :mod:`.report`
(result tables), :mod:`.command` (``kdt metrics``, ``kdt explain``),
:mod:`.compare` and the ``explain*`` modules (their back-ends).
:mod:`.protocol` re-exports :mod:`kdt_prototypes.protocol` for one more
version.
"""
