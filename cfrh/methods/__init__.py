"""The field's unsupervised cross-modal hashing baselines as their public code runs them: DJSRH (ICCV 2019), JDSH
(SIGIR 2020), DGCPN (AAAI 2021).

Each module is data plus pure torch functions with explicit arguments, for a training loop to call:

``Settings`` (frozen dataclass) and its published instances (``djsrh.WIKI``, ``djsrh.MIRFLICKR``, ``jdsh.MIRFLICKR``,
``dgcpn.MIRFLICKR``)
    every hyper-parameter: optimiser, learning rates, momentum, weight decay, batch size, epochs, code length,
    network shapes on precomputed features, the α schedule of the relaxation, the target's and the loss's
    constants. Each module's docstring says which file and variable of the public repository each number comes
    from, and where the code does something the method's description does not say.
``target(image_features, text_features, settings) -> S``
    the (n, n) similarity the codes are trained to reproduce, from float32 (n, d) feature rows. DJSRH and JDSH
    build it per batch; DGCPN once over the whole training set (``settings.target_scope == "training-set"``),
    and ``dgcpn.batch_target(S, rows)`` takes a batch's block.
``loss(image_codes, text_codes, S, settings) -> (total, terms)``
    the weighted objective for relaxed codes tanh(α h) (``relax(hash_logits, epoch, settings)``) and its
    unweighted terms by name, for logs.

Codes are sign(h) at test time in all three. Nothing here trains anything: the training loop decides how
batches are drawn and networks built from these settings.
"""
from __future__ import annotations

from types import ModuleType

from . import dgcpn, djsrh, jdsh
from ._common import Training, alpha, relax

METHODS: dict[str, ModuleType] = {"djsrh": djsrh, "jdsh": jdsh, "dgcpn": dgcpn}

__all__ = ["METHODS", "Training", "alpha", "relax", "dgcpn", "djsrh", "jdsh"]
