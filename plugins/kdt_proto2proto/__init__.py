"""Proto2Proto: distilling interpretable prototype models from a deep teacher
into a shallow student, and measuring faithfulness (AAP, AJS, PMS).

The method only: it works with any head satisfying the prototype-head
protocol (:mod:`.protocol`), such as ``protopnet`` (``kdt_protopnet``) and
``prototree`` (``kdt_prototree``).

Modules: :mod:`.functional` (pure tensor functions: the distillation losses,
prototype matching), :mod:`.protocol` (what a prototype head provides),
:mod:`.metrics` (AAP, AJS, PMS on records), :mod:`.losses`,
:mod:`.evaluation` (registered components), :mod:`.report` (result tables),
:mod:`.command` (``kdt metrics``).
"""
