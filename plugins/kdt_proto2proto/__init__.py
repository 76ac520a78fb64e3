"""Proto2Proto: distilling interpretable prototype models (ProtoPNet) from a
deep teacher into a shallow student, and measuring faithfulness (AAP, AJS, PMS).

Modules: :mod:`.functional` (pure tensor functions: distances, losses, push),
:mod:`.metrics` (AAP, AJS, PMS on records), :mod:`.protopnet` (the head),
:mod:`.losses`, :mod:`.push`, :mod:`.evaluation` (registered components),
:mod:`.report` (result tables), :mod:`.command` (``kdt metrics``).
"""
