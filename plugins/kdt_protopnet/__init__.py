"""ProtoPNet: class-specific prototypes compared with every latent patch (method notes §1).

Modules: :mod:`.functional` (pure tensor functions: the class identity, the
last layer's initialisation, the ProtoPNet losses), :mod:`.head` (the head),
:mod:`.losses` (cluster, separation, L1), :mod:`.push` (the push phase and its
PNG), :mod:`.checks` (parameter checks), :mod:`.plugin` (registrations). The
distances, min-pooling, the streaming projection, receptive fields, figures
and explanation building blocks are shared with every prototype model and
live in ``kdt_prototypes``; ``explain``, ``figures``, ``receptive_field`` and
``sheet`` here only re-export them for one more version.
"""
