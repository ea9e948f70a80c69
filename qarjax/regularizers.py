"""Every family's pure terms in one namespace, for notebooks: ``from qarjax import regularizers``.

The paper's terms (`sine`, `cosine`, `nearest`, `softmin`) take a layer's weights ``w`` (any
shape; treated as a flat vector) and return the regularizer under ``reduction``: ``"sum"``
(default) over the weights, ``"mean"``, or ``"none"`` (the per-weight term rho, shaped like
``w``); the R^2 terms return their scalar, `gradient_l1` takes ``(loss_fn, params)``, and the
``*_grid`` / `nearest_index` helpers give the levels a term pulls towards. No function reads a
module, and `jax.grad` works through all of them. They live with their family's class in
`qarjax.families` (one module per group); the formulas: docs/regularizers.md.

  - static, no parameters: `sine`, `cosine` (K zeros inside [lo, hi], none outside it);
  - dynamic, over trainable representatives ``reps``: `nearest`, `softmin`;
  - R^2 range regularization baselines: `linf`, `margin`, `soft_min_max`;
  - `gradient_l1`: the L1 norm of the loss gradient (its gradient: a Hessian-vector product).
"""

from qarjax.families import REDUCTIONS
from qarjax.families.dynamic import nearest, nearest_index, softmin
from qarjax.families.gradient_l1 import gradient_l1
from qarjax.families.r2 import linf, margin, soft_min_max
from qarjax.families.static import cosine, cosine_grid, sine, sine_grid

__all__ = [
    "REDUCTIONS",
    "cosine",
    "cosine_grid",
    "gradient_l1",
    "linf",
    "margin",
    "nearest",
    "nearest_index",
    "sine",
    "sine_grid",
    "soft_min_max",
    "softmin",
]
