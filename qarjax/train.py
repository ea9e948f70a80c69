"""The Trainer: the jitted train and eval steps of one run spec, data-parallel over a mesh.

It takes a `qarjax.spec.RunSpec` (checked where it was built) and composes three small public
pieces: the model definition (`qarjax.model_def.ModelDef`: graphdef, regularization, initial
plain trees), the device-resident data (`qarjax.device_data.DeviceData`) and the pure step
functions (`qarjax.steps`), which it jits with the recipe bound. Each jitted call runs `scan_steps`
train steps with `lax.scan` (gather, augment and normalize on device), so an epoch costs a
handful of host round trips on an accelerator (on a CPU, where round trips are free, steps
are unrolled instead: see `Trainer.__init__`). The batch is sharded over the mesh's ``data``
axis and the state is replicated: the same program runs on 1 CPU, 8 fake devices, a GPU or
several hosts.

All randomness derives from the state's key and the step number (augmentation, dropout) or
the epoch number (data order), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qarjax import data as data_lib
from qarjax import steps as steps_lib
from qarjax import xla_defaults
from qarjax.device_data import DeviceData, epoch_order, put_replicated
from qarjax.errors import ConfigError, NonFiniteLossError
from qarjax.model_def import ModelDef
from qarjax.models import MODELS
from qarjax.optim import make_optimizer, reset_quant_state
from qarjax.spec import DTYPES, SCAN_MODES, as_spec
from qarjax.steps import TrainState
from qarjax.trees import merge

__all__ = ["DTYPES", "SCAN_MODES", "Trainer", "TrainState", "chunking", "make_mesh"]


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def chunking(batches: int, wanted: int) -> tuple[int, int]:
    """(steps per jitted call, steps per epoch) for an epoch of `batches` full batches.

    Every call runs the same number of steps, so the step compiles once: the epoch is cut
    into ceil(batches / wanted) equal chunks and the last `batches mod chunks` batches are
    dropped (fewer than the number of chunks; the data order changes every epoch, so no image
    is always left out). A largest-divisor rule would fall to 1 step per call when the
    batch count is prime (CIFAR-10 at batch 512: 97), a host round trip per step.

    >>> chunking(97, 50), chunking(101, 50), chunking(7, 1)
    ((48, 96), (33, 99), (1, 7))
    """
    chunks = -(-batches // max(1, min(wanted, batches)))
    size = batches // chunks
    return size, size * chunks


@jax.jit
def _accumulate(totals: dict, sums: dict) -> dict:
    """Adds a chunk's summed metrics to the epoch's; ``finite`` stays true while all were."""
    return {k: totals[k] & sums[k] if k == "finite" else totals[k] + sums[k] for k in totals}


class Trainer:
    """Builds the model, optimizer, regularizer and jitted steps for one run spec and dataset.

    Attributes:
      model_def: the `ModelDef` (graphdef, `reg`, initial trees); `reg` is also an attribute.
      data: the `DeviceData` (the dataset on the mesh).
      steps: the `qarjax.steps.Steps` recipe the jitted steps close over.
      trace_count: how many times the train chunk was traced (compiled); stays 1 across steps.
    """

    def __init__(
        self,
        spec,
        dataset: data_lib.Dataset,
        *,
        mesh: Mesh | None = None,
        tx: optax.GradientTransformation | None = None,
    ):
        """Args:
        spec: the run (`qarjax.spec.RunSpec`; a full ConfigDict is built into one).
        dataset: the data, placed on the mesh whole.
        mesh: the devices (default: all).
        tx: an optimizer replacing the spec's (e.g. codebook tuning, qarjax.tune).
        """
        self.spec = spec = as_spec(spec)
        train = spec.train
        self.dataset = dataset
        self.mesh = mesh or make_mesh()
        n_dev = self.mesh.devices.size
        if train.batch_size % n_dev:
            raise ConfigError(
                f"batch_size {train.batch_size} must be a positive multiple of the {n_dev} devices"
            )
        n_train = len(dataset.train_labels)
        batches = n_train // train.batch_size
        if batches == 0:
            raise ConfigError(
                f"batch_size {train.batch_size} exceeds the {n_train} training images"
            )
        # XLA:CPU runs convolutions inside a while loop many times slower than outside one
        # (jax-ml/jax#12868; results/design_measurements.md), and on
        # a CPU host round trips cost nothing: so there the steps of a call are unrolled in
        # Python (default 1 per call); on accelerators they run in lax.scan (default 50).
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        self.use_scan = train.scan_mode == "scan" or (train.scan_mode == "auto" and not on_cpu)
        wanted = train.scan_steps if train.scan_steps > 0 else (50 if self.use_scan else 1)
        self.scan_steps, self.steps_per_epoch = chunking(batches, wanted)
        self.step_counts = spec.steps(self.steps_per_epoch)
        self.dtype = spec.model.dtype
        self.augmentation = data_lib.resolve_augmentation(spec.data, dataset)

        self.model_def = ModelDef.build(spec, dataset, steps=self.step_counts)
        self.reg = self.model_def.reg
        self.tx = tx or make_optimizer(spec, self.reg, self.step_counts)
        self.replicated = NamedSharding(self.mesh, P())
        self.data = DeviceData(dataset, self.mesh, train.eval_batch_size)
        self.steps = steps_lib.Steps(
            model_def=self.model_def,
            tx=optax.with_extra_args_support(self.tx),  # a given tx may take no consts
            dtype=self.dtype,
            augmentation=self.augmentation,
            label_smoothing=train.label_smoothing,
            batch_sharding=self.data.batch_sharding,
            scan_steps=self.scan_steps,
            use_scan=self.use_scan,
            eval_batch_size=self.data.eval_batch_size,
        )
        self.trace_count = 0
        # qarjax's measured XLA options for this platform and model (qarjax.xla_defaults)
        fusion = xla_defaults.model_fusion(MODELS[spec.model.name])
        platform = self.mesh.devices.flat[0].platform
        self.compiler_options = xla_defaults.compiler_options(platform, fusion)
        jit = functools.partial(jax.jit, compiler_options=self.compiler_options)
        self._train_chunk = jit(self._counted_chunk, donate_argnums=(0,))
        self._evaluate = jit(functools.partial(steps_lib.evaluate, self.steps))
        self._batch_statistics = jit(functools.partial(steps_lib.batch_statistics, self.steps))
        self._epoch_order = jax.jit(
            functools.partial(
                epoch_order,
                num_train=n_train,
                steps=self.steps_per_epoch,
                batch_size=train.batch_size,
            )
        )
        self._reg_metrics = jax.jit(self.reg.metrics)
        # One compiled init instead of an eager op per leaf (the codebook optimizer's init
        # reads every kernel's codewords, one eager op per leaf)
        self._init_opt = jax.jit(self.tx.init)

    def _counted_chunk(self, state, arrays, order, chunk):
        self.trace_count += 1  # runs only while tracing: counts compilations
        return steps_lib.train_chunk(self.steps, state, arrays, order, chunk)

    # ------------------------------------------------------------------ state
    @property
    def initial_params(self) -> dict:
        """The model's freshly initialized weights (host arrays; names and shapes)."""
        return self.model_def.initial["params"]

    @property
    def initial_batch_stats(self) -> dict:
        return self.model_def.initial["batch_stats"]

    def init_state(self, params: dict | None = None, batch_stats: dict | None = None) -> TrainState:
        """The initial train state (or one starting from `params`), replicated over the mesh."""
        initial = self.model_def.initial
        params = jax.device_get(initial["params"] if params is None else params)
        stats = initial["batch_stats"] if batch_stats is None else batch_stats
        state = TrainState(
            step=np.int32(0),
            params=params,
            qparams=initial["qparams"],
            consts=initial["consts"],
            batch_stats=jax.device_get(stats),
            opt_state=self._init_opt(merge(params, initial["qparams"])),
            rng=np.asarray(jax.random.key_data(jax.random.key(self.spec.seed))),
        )
        return put_replicated(state, self.mesh)

    def start_regularization(self, state: TrainState, ks: dict[str, int] | None = None):
        """Fixes the grid ranges and K, initializes the representatives from the current
        weights and resets their optimizer state (called once, at reg.start_epoch).

        `ks`: K per layer (`self.reg.ks_for(spec.reg)`; default: this trainer's spec).
        The train step reads K as data, so another K compiles nothing new.
        """
        if not self.reg.any_regularized:
            return state
        qparams, consts = self.reg.initialize(state.params, state.qparams, state.consts, ks)
        trainable = merge(state.params, qparams)
        opt_state = reset_quant_state(self.tx, state.opt_state, trainable, self._init_opt)
        new = state.replace(qparams=qparams, consts=consts, opt_state=opt_state)
        return jax.device_put(new, self.replicated)

    def compiled_memory(self, state: TrainState) -> dict[str, int]:
        """XLA's memory analysis of the compiled train chunk, in bytes per device: arguments,
        outputs, temporaries (activations, gradients, DKM's attention...) and generated code.
        Compiles without running a step (e.g. to see whether a model, batch and K fit)."""
        order = self._epoch_order(state.rng, jnp.int32(0))
        lowered = self._train_chunk.lower(state, self.data.arrays, order, jnp.int32(0))
        m = lowered.compile().memory_analysis()
        names = ("argument", "output", "temp", "generated_code")
        return {n: int(getattr(m, f"{n}_size_in_bytes", -1)) for n in names}

    # ------------------------------------------------------------------ train
    def train_epoch(self, state: TrainState, epoch: int, on_chunk=None) -> tuple[TrainState, dict]:
        """One epoch of training; returns the new state and its mean train metrics.

        Raises NonFiniteLossError (the caller's last checkpoint stays the good one).
        """
        order = self._epoch_order(state.rng, jnp.int32(epoch))
        totals = None
        # The sums stay on the device until the epoch ends, and the host waits for a call
        # only once the next one is queued: reading every call's sums would leave the device
        # idle while the host dispatches the next call (on a CPU, one step per call, that
        # is every step). A non-finite loss is still caught before the epoch's checkpoint.
        previous = None
        for chunk in range(self.steps_per_epoch // self.scan_steps):
            state, sums = self._train_chunk(state, self.data.arrays, order, jnp.int32(chunk))
            totals = sums if totals is None else _accumulate(totals, sums)
            if previous is not None:
                jax.block_until_ready(previous)  # one call in flight: progress stays true
            previous = sums
            if on_chunk is not None and chunk:
                on_chunk(self.scan_steps)
        jax.block_until_ready(previous)
        if on_chunk is not None:
            on_chunk(self.scan_steps)
        totals = jax.device_get(totals)
        if not bool(totals["finite"]):
            raise NonFiniteLossError(
                f"non-finite loss in epoch {epoch + 1}; stopped, the last good checkpoint is kept"
            )
        steps = self.steps_per_epoch
        return state, {
            "loss": float(totals["loss"]) / steps,
            "ce": float(totals["ce"]) / steps,
            "reg": float(totals["reg"]) / steps,
            "accuracy": float(totals["correct"]) / (steps * self.spec.train.batch_size),
        }

    def batch_statistics(self, state: TrainState, params, indices, key) -> dict:
        """The batch-norm statistics of one training batch (`indices` into the training set)
        under `params` as they are (quantized params: no family's forward pass), in train
        mode (augmentation and dropout as in training)."""
        idx = jnp.asarray(indices, jnp.int32)
        return self._batch_statistics(
            params, state.qparams, state.consts, state.batch_stats, self.data.arrays, idx, key,
            jnp.bool_(False),
        )  # fmt: skip

    # ------------------------------------------------------------------ eval
    def evaluate(self, state: TrainState, *, params=None, batch_stats=None, data=None) -> dict:
        """Test loss and accuracy of `state` (or of `params`/`batch_stats` replacing its own).

        The state's own params run through the families' forward pass once regularization
        has started (DKM's soft reconstruction, LSQ's fake quantization: the model as it
        trains); `params` given (quantized) run as they are. `data`: a `device_data(...)` to
        evaluate on instead of this trainer's test split (compiles once per its shape)."""
        family_forward = self.reg.started(state.step) if params is None else jnp.bool_(False)
        params = state.params if params is None else params
        batch_stats = state.batch_stats if batch_stats is None else batch_stats
        loss, correct, n = jax.device_get(
            self._evaluate(
                params,
                state.qparams,
                state.consts,
                batch_stats,
                (data or self.data).arrays,
                family_forward,
            )
        )
        return {"loss": float(loss / n), "accuracy": float(correct / n)}

    def device_data(self, dataset) -> DeviceData:
        """`dataset` on this trainer's mesh, for `evaluate(data=)`."""
        return DeviceData(dataset, self.mesh, self.data.eval_batch_size)

    def regularizer_metrics(self, state: TrainState) -> dict:
        """Per-layer clustering metrics (see Regularization.metrics), as host values."""
        return jax.device_get(self._reg_metrics(state.params, state.qparams, state.consts))
