"""A model as the pure steps see it: its graph definition, regularization and initial trees.

`ModelDef.build` creates the named model, selects and attaches the regularization, and splits
the model once into a graphdef and plain nested dicts (weights, quantization params,
quantization constants, batch statistics). `apply` merges them back inside a jitted function.
This is the only place the steps meet NNX (the shape of flax's gemma example: a model
definition plus pure functions of its state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from qarjax.models import create_model
from qarjax.regularization import Regularization
from qarjax.representatives import QuantConst, QuantParam


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """The graph definition of a model, its regularization and its initial plain trees.

    Attributes:
      graphdef: the NNX graph definition (structure, no arrays).
      reg: the model's `Regularization` (its variables are attached to the model).
      initial: {"params", "qparams", "consts", "batch_stats"}: the freshly built model's trees
        (host arrays; names and shapes).
    """

    graphdef: Any
    reg: Regularization
    initial: dict

    @classmethod
    def build(cls, spec, dataset, *, steps) -> ModelDef:
        """The model of a `qarjax.spec.RunSpec` for `dataset`'s images and classes, with its
        regularization attached (`steps`: the run's `StepCounts`)."""
        model = create_model(
            spec.model.name,
            num_classes=dataset.num_classes,
            image_shape=dataset.image_shape,
            seed=spec.seed,
            dtype=spec.model.dtype,
            dropout=spec.model.dropout,
            width=spec.model.width,
        )
        plain = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        reg = Regularization.from_spec(
            spec.reg, plain, start_step=steps.reg_start, warmup_steps=steps.reg_warmup
        )
        if reg.any_regularized:
            reg.add_variables(model)
        graphdef, qparams, params, consts, batch_stats, rest = nnx.split(
            model, QuantParam, nnx.Param, QuantConst, nnx.BatchStat, ...
        )
        if jax.tree.leaves(rest):
            raise ValueError("models must keep no state besides params and batch stats")
        initial = {
            "params": nnx.to_pure_dict(params),
            "qparams": nnx.to_pure_dict(qparams),
            "consts": nnx.to_pure_dict(consts),
            "batch_stats": nnx.to_pure_dict(batch_stats),
        }
        return cls(graphdef, reg, initial)

    def merge(
        self, params, qparams, consts, batch_stats, family_forward=True
    ) -> tuple[nnx.Module, dict]:
        """The model with these trees, its kernels as the regularizer's forward pass sees them
        (unchanged for the penalty families, and while `family_forward` is false: before the start,
        or for quantized params), and the consts that pass carries on."""
        params, carried = self.reg.forward(params, qparams, consts, family_forward)
        return nnx.merge(self.graphdef, qparams, params, consts, batch_stats), carried

    def apply(
        self, params, qparams, consts, batch_stats, images, *, train: bool, dropout_key=None,
        family_forward=True,
    ):  # fmt: skip
        """(logits, {"batch_stats", "consts"}: the updated batch statistics and the
        quantization constants the forward pass carries on) for normalized `images`."""
        model, carried = self.merge(params, qparams, consts, batch_stats, family_forward)
        rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
        logits = model(images, train=train, rngs=rngs)
        return logits, {
            "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
            "consts": carried,
        }

    def batch_statistics(
        self, params, qparams, consts, batch_stats, images, dropout_key, family_forward=False
    ) -> dict:
        """The batch-norm statistics of one batch of normalized `images` under `params`, in
        train mode (dropout active as in training: VGG16 has dropout after its last batch
        norm, and train mode without dropout rngs is an error in NNX)."""
        model, _ = self.merge(params, qparams, consts, batch_stats, family_forward)
        modules = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
        for _, module in modules:
            if isinstance(module, nnx.BatchNorm):
                module.momentum = 0.0  # the module then reports this batch's statistics
        model(images, train=True, rngs=nnx.Rngs(dropout=dropout_key))
        return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
