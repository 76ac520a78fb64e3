"""Classic knowledge distillation: the components that prove the core general.

- head ``linear``: global average pooling, dropout, a linear classifier;
- head ``identity``: for a backbone that already outputs logits (a whole
  timm classifier, ``classifier = true``);
- loss ``cross_entropy``: the usual supervised loss on logits;
- loss ``hinton_kd`` (also ``kd``): Hinton et al.'s soft-target
  distillation, the KL divergence between temperature-softened teacher and
  student distributions, scaled by T² (optionally on standardised logits);
- the standard distillation methods ``dkd``, ``dist``, ``fitnet``,
  ``attention``, ``similarity_preserving``, ``pkt``, ``rkd`` and ``crd``.

The heads live in :mod:`kdt_classic.heads`, the losses in :mod:`kdt_classic.losses` (over the pure
functions of :mod:`kdt_classic.functional`); ``docs/methods.md`` describes
each method.
"""

from __future__ import annotations

from kdtoolkit.plugin import hookimpl


@hookimpl
def kdt_register_heads(registry):
    registry.add("linear", "kdt_classic.heads:LinearHead")
    registry.add("identity", "kdt_classic.heads:IdentityHead")


@hookimpl
def kdt_register_losses(registry):
    registry.add("cross_entropy", "kdt_classic.losses:CrossEntropyLoss")
    registry.add("hinton_kd", "kdt_classic.losses:HintonKDLoss")
    registry.add("kd", "kdt_classic.losses:HintonKDLoss")
    registry.add("dkd", "kdt_classic.losses:DKDLoss")
    registry.add("dist", "kdt_classic.losses:DISTLoss")
    registry.add("fitnet", "kdt_classic.losses:FitNetLoss")
    registry.add("attention", "kdt_classic.losses:AttentionLoss")
    registry.add("similarity_preserving", "kdt_classic.losses:SimilarityPreservingLoss")
    registry.add("pkt", "kdt_classic.losses:PKTLoss")
    registry.add("rkd", "kdt_classic.losses:RKDLoss")
    registry.add("crd", "kdt_classic.losses:CRDLoss")
