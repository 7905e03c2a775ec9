"""A network whose every call runs inside one context: how the trainer puts each network call of a step
(student, teacher, critic; ``forward`` and ``forward_jvp``) in Transformer Engine's FP8 autocast region
(``models.te_support.fp8_autocast``), chosen once here rather than inside a block's forward."""

from __future__ import annotations


class AutocastNet:
    """``net`` seen by the rCM engine, each call inside a fresh ``context()``; every other attribute is
    ``net``'s (``parameters()``, ``module``, ...). The backward runs outside the context (TE keeps the recipe
    with the tensors it saved)."""

    def __init__(self, net, context):
        self.net = net
        self.context = context

    def __call__(self, *args, **kwargs):
        with self.context():
            return self.net(*args, **kwargs)

    def forward_jvp(self, *args, **kwargs):
        from megatron_rcm.rcm.trigflow import _forward_jvp_fn

        with self.context():
            return _forward_jvp_fn(self.net)(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.net, name)
