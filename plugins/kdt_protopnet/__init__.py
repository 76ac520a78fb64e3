"""ProtoPNet: class-specific prototypes compared with every latent patch (method notes §1).

Modules: :mod:`.functional` (pure tensor functions: distances, min-pool,
ProtoPNet losses, streaming projection), :mod:`.head` (the head),
:mod:`.losses` (cluster, separation, L1), :mod:`.push` and :mod:`.figures`
(the push phase and its PNG), :mod:`.plugin` (registrations).
"""
