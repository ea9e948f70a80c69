"""The train state and the jitted train and eval steps, data-parallel over a device mesh.

`Trainer` splits the NNX model once into a graphdef and plain nested-dict states (weights,
quantization params, grid ranges, batch statistics); the steps merge them inside `jax.jit`.
The dataset lives on the devices as uint8; each jitted call runs `scan_steps` train steps
with `lax.scan` (gather, augment and normalize on device), so an epoch costs a handful of
host round trips on an accelerator (on a CPU, where round trips are free, steps are
unrolled instead: see `Trainer.__init__`). The batch is sharded over the mesh's ``data``
axis and the state is replicated: the same program runs on 1 CPU, 8 fake devices, a GPU
or several hosts.

All randomness derives from the state's key and the step number (augmentation, dropout) or
the epoch number (data order), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qarjax import data as data_lib
from qarjax.errors import ConfigError, NonFiniteLossError
from qarjax.models import create_model
from qarjax.optim import make_optimizer, reset_quant_state
from qarjax.regularization import Regularization
from qarjax.representatives import QuantConst, QuantParam
from qarjax.trees import merge, restrict

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; nested dicts of arrays, checkpointed whole."""

    step: jax.Array
    params: dict
    quant: dict
    consts: dict
    batch_stats: dict
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays

    @property
    def trainable(self) -> dict:
        """The weights and quantization params in one model-rooted tree (what the optimizer
        sees: `qarjax.optim.optimizer` routes its leaves by name)."""
        return merge(self.params, self.quant)


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def put_replicated(tree, mesh: Mesh):
    """Host arrays -> global arrays replicated on every device of the mesh (multi-host safe)."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


SCAN_MODES = ("auto", "scan", "unroll")


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


class Trainer:
    """Builds the model, optimizer, regularizer and jitted steps for one config and dataset.

    Attributes:
      trace_count: how many times the train chunk was traced (compiled); stays 1 across steps.
    """

    def __init__(
        self,
        config,
        dataset: data_lib.Dataset,
        *,
        mesh: Mesh | None = None,
        tx: optax.GradientTransformation | None = None,
    ):
        """Args:
        config: a full config (qarjax.config.default_config() plus changes).
        dataset: the data, placed on the mesh whole.
        mesh: the devices (default: all).
        tx: an optimizer replacing the config's (e.g. codebook tuning, qarjax.tune).
        """
        self.config = config = config.copy_and_resolve_references()  # later edits: not ours
        self.dataset = dataset
        self.mesh = mesh or make_mesh()
        n_dev = self.mesh.devices.size
        if config.batch_size <= 0 or config.batch_size % n_dev:
            raise ConfigError(
                f"batch_size {config.batch_size} must be a positive multiple of the {n_dev} devices"
            )
        if config.num_epochs <= 0:
            raise ConfigError(f"num_epochs must be > 0, got {config.num_epochs}")
        if config.compute_dtype not in DTYPES:
            raise ConfigError(
                f"unknown compute_dtype {config.compute_dtype!r}: choose one of {sorted(DTYPES)}"
            )
        n_train = len(dataset.train_labels)
        batches = n_train // config.batch_size
        if batches == 0:
            raise ConfigError(
                f"batch_size {config.batch_size} exceeds the {n_train} training images"
            )
        if config.scan_mode not in SCAN_MODES:
            raise ConfigError(f"unknown scan_mode {config.scan_mode!r}: choose one of {SCAN_MODES}")
        # XLA:CPU runs convolutions inside a while loop ~30x slower than outside one
        # (jax-ml/jax#12868, measured here: 7.3 s against 0.26 s per small-CNN step), and on
        # a CPU host round trips cost nothing: so there the steps of a call are unrolled in
        # Python (default 1 per call); on accelerators they run in lax.scan (default 50).
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        self.use_scan = config.scan_mode == "scan" or (config.scan_mode == "auto" and not on_cpu)
        wanted = config.scan_steps if config.scan_steps > 0 else (50 if self.use_scan else 1)
        self.scan_steps, self.steps_per_epoch = chunking(batches, wanted)
        self.dtype = DTYPES[config.compute_dtype]
        self.augmentation = data_lib.resolve_augmentation(config.augment, dataset)

        model = create_model(
            config.model,
            num_classes=dataset.num_classes,
            image_shape=dataset.image_shape,
            seed=config.seed,
            dtype=self.dtype,
            dropout=None if config.dropout < 0 else config.dropout,
        )
        plain = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        self.reg = Regularization.from_config(
            config.reg, plain, steps_per_epoch=self.steps_per_epoch, num_epochs=config.num_epochs
        )
        if self.reg.active:
            self.reg.attach(model)
        self.graphdef, quant, params, consts, batch_stats, rest = nnx.split(
            model, QuantParam, nnx.Param, QuantConst, nnx.BatchStat, ...
        )
        if jax.tree.leaves(rest):
            raise ValueError("models must keep no state besides params and batch stats")
        self._initial = {
            "params": nnx.to_pure_dict(params),
            "quant": nnx.to_pure_dict(quant),
            "consts": nnx.to_pure_dict(consts),
            "batch_stats": nnx.to_pure_dict(batch_stats),
        }
        self.tx = tx or make_optimizer(config, self.reg, self.steps_per_epoch)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self._place_data()
        self.trace_count = 0
        self._train_chunk = jax.jit(self._train_chunk_impl, donate_argnums=(0,))
        self._evaluate = jax.jit(self._evaluate_impl)
        self._epoch_order = jax.jit(self._epoch_order_impl)
        self._reg_metrics = jax.jit(lambda p, q, c: self.reg.metrics(p, q, c))
        self._batch_statistics = jax.jit(self._batch_statistics_impl)

    # ------------------------------------------------------------------ data
    def _place_data(self) -> None:
        d, n_dev = self.dataset, self.mesh.devices.size
        eval_bs = max(n_dev, self.config.eval_batch_size // n_dev * n_dev)
        n_test = len(d.test_labels)
        padded = -(-n_test // eval_bs) * eval_bs
        pad = padded - n_test
        self.eval_batch_size = eval_bs
        test_images = np.concatenate([d.test_images, np.zeros((pad, *d.image_shape), np.uint8)])
        host = {
            "train_images": d.train_images,
            "train_labels": d.train_labels,
            "test_images": test_images,
            "test_labels": np.concatenate([d.test_labels, np.zeros(pad, np.int32)]),
            "test_mask": np.concatenate([np.ones(n_test, np.float32), np.zeros(pad, np.float32)]),
            "mean": d.channel_mean,
            "std": d.channel_std,
        }
        self.data = put_replicated(host, self.mesh)
        self._norm = {"mean": self.data["mean"], "std": self.data["std"]}

    # ------------------------------------------------------------------ state
    @property
    def initial_params(self) -> dict:
        """The model's freshly initialized weights (host arrays; names and shapes)."""
        return self._initial["params"]

    @property
    def initial_batch_stats(self) -> dict:
        return self._initial["batch_stats"]

    def init_state(self, params: dict | None = None, batch_stats: dict | None = None) -> TrainState:
        """The initial train state (or one starting from `params`), replicated over the mesh."""
        params = jax.device_get(self._initial["params"] if params is None else params)
        stats = self._initial["batch_stats"] if batch_stats is None else batch_stats
        trainable = merge(params, self._initial["quant"])
        state = TrainState(
            step=np.int32(0),
            params=params,
            quant=self._initial["quant"],
            consts=self._initial["consts"],
            batch_stats=jax.device_get(stats),
            opt_state=self.tx.init(trainable),
            rng=np.asarray(jax.random.key_data(jax.random.key(self.config.seed))),
        )
        return put_replicated(state, self.mesh)

    def start_regularization(self, state: TrainState, ks: dict[str, int] | None = None):
        """Fixes the grid ranges and K, initializes the representatives from the current
        weights and resets their optimizer state (called once, at reg.start_epoch).

        `ks`: K per layer (`self.reg.ks_for(config.reg)`; default: this trainer's config).
        The train step reads K as data, so another K compiles nothing new.
        """
        if not self.reg.active:
            return state
        quant, consts = self.reg.initialize(state.params, state.quant, state.consts, ks)
        trainable = merge(state.params, quant)
        opt_state = reset_quant_state(self.tx, state.opt_state, trainable)
        new = state.replace(quant=quant, consts=consts, opt_state=opt_state)
        return jax.device_put(new, self.replicated)

    # ------------------------------------------------------------------ model
    def apply(self, params, quant, consts, batch_stats, images, *, train: bool, dropout_key=None):
        """Logits and the updated batch statistics for normalized `images` (the kernels as
        the regularizer's forward pass sees them: unchanged for the penalty families)."""
        params = self.reg.forward_params(params, quant, consts)
        model = nnx.merge(self.graphdef, quant, params, consts, batch_stats)
        rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
        logits = model(images, train=train, rngs=rngs)
        return logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    def _prepare(self, images, data, key=None):
        if key is not None:
            aug = self.augmentation
            images = data_lib.augment(images, key, pad=aug.crop_padding, flip=aug.flip)
        return data_lib.normalize(images, data["mean"], data["std"], self.dtype)

    def cross_entropy(self, logits, labels):
        onehot = jax.nn.one_hot(labels, logits.shape[-1])
        if self.config.label_smoothing:
            onehot = optax.smooth_labels(onehot, self.config.label_smoothing)
        return optax.softmax_cross_entropy(logits, onehot).mean()

    def loss_fn(self, trainable, consts, batch_stats, images, labels, step, dropout_key):
        """Cross-entropy + the regularizer; returns (loss, aux). `trainable`: the weights and
        quantization params in one tree (`TrainState.trainable`)."""
        params = restrict(trainable, self._initial["params"])
        quant = restrict(trainable, self._initial["quant"])

        def ce_of(params):
            logits, stats = self.apply(
                params,
                quant,
                consts,
                batch_stats,
                images,
                train=True,
                dropout_key=dropout_key,
            )
            return self.cross_entropy(logits, labels), (logits, stats)

        ce, (logits, new_stats) = ce_of(params)
        penalty, _ = self.reg.terms(params, quant, consts, step, lambda p: ce_of(p)[0])
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return ce + penalty, {
            "ce": ce,
            "reg": penalty,
            "correct": correct,
            "batch_stats": new_stats,
        }

    # ------------------------------------------------------------------ train
    def _train_chunk_impl(self, state: TrainState, data: dict, order: jax.Array, chunk: jax.Array):
        self.trace_count += 1  # runs only while tracing: counts compilations
        idx_chunk = jax.lax.dynamic_slice_in_dim(order, chunk * self.scan_steps, self.scan_steps)
        images_all, labels_all = data["train_images"], data["train_labels"]

        def one_step(state: TrainState, idx):
            idx = jax.lax.with_sharding_constraint(idx, self.batch_sharding)
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            aug_key, dropout_key = jax.random.split(key)
            images = self._prepare(images_all[idx], data, aug_key)
            labels = labels_all[idx]
            grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
            (loss, aux), grads = grad_fn(
                state.trainable,
                state.consts,
                state.batch_stats,
                images,
                labels,
                state.step,
                dropout_key,
            )
            updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
            trainable = optax.apply_updates(state.trainable, updates)
            new = state.replace(
                step=state.step + 1,
                params=restrict(trainable, state.params),
                quant=restrict(trainable, state.quant),
                batch_stats=aux["batch_stats"],
                opt_state=opt_state,
            )
            return new, {
                "loss": loss,
                "ce": aux["ce"],
                "reg": aux["reg"],
                "correct": aux["correct"],
            }

        if self.use_scan:
            state, per_step = jax.lax.scan(one_step, state, idx_chunk)
        else:
            outputs = []
            for i in range(self.scan_steps):
                state, out = one_step(state, idx_chunk[i])
                outputs.append(out)
            per_step = jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
        sums = jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32)), per_step)
        sums["finite"] = jnp.all(jnp.isfinite(per_step["loss"]))
        return state, sums

    def _epoch_order_impl(self, rng, epoch):
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), 1_000_003 + epoch)
        n = self.dataset.train_labels.shape[0]
        perm = jax.random.permutation(key, n)[: self.steps_per_epoch * self.config.batch_size]
        return perm.reshape(self.steps_per_epoch, self.config.batch_size).astype(jnp.int32)

    def train_epoch(self, state: TrainState, epoch: int, on_chunk=None) -> tuple[TrainState, dict]:
        """One epoch of training; returns the new state and its mean train metrics.

        Raises NonFiniteLossError (the caller's last checkpoint stays the good one).
        """
        order = self._epoch_order(state.rng, jnp.int32(epoch))
        totals = None
        for chunk in range(self.steps_per_epoch // self.scan_steps):
            state, sums = self._train_chunk(state, self.data, order, jnp.int32(chunk))
            sums = jax.device_get(sums)
            if not bool(sums["finite"]):
                step = int(jax.device_get(state.step))
                raise NonFiniteLossError(
                    f"non-finite loss in epoch {epoch + 1} (by step {step}); stopped, the last "
                    "good checkpoint is kept"
                )
            totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
            if on_chunk is not None:
                on_chunk(self.scan_steps)
        steps = self.steps_per_epoch
        return state, {
            "loss": float(totals["loss"]) / steps,
            "ce": float(totals["ce"]) / steps,
            "reg": float(totals["reg"]) / steps,
            "accuracy": float(totals["correct"]) / (steps * self.config.batch_size),
        }

    def _batch_statistics_impl(self, params, quant, consts, batch_stats, data, idx, key):
        params = self.reg.forward_params(params, quant, consts)
        model = nnx.merge(self.graphdef, quant, params, consts, batch_stats)
        modules = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
        for _, module in modules:
            if isinstance(module, nnx.BatchNorm):
                module.momentum = 0.0  # the module then reports this batch's statistics
        images = jax.lax.with_sharding_constraint(data["train_images"][idx], self.batch_sharding)
        aug_key, dropout_key = jax.random.split(key)
        # Train mode as in training: augmented images, and dropout active (VGG16 has dropout
        # after its last batch norm; train mode without dropout rngs is an error in NNX).
        model(self._prepare(images, data, aug_key), train=True, rngs=nnx.Rngs(dropout=dropout_key))
        return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    def batch_statistics(self, state: TrainState, params, indices, key) -> dict:
        """The batch-norm statistics of one training batch (`indices` into the training set)
        under `params`, in train mode (augmentation and dropout as in training)."""
        idx = jnp.asarray(indices, jnp.int32)
        return self._batch_statistics(
            params, state.quant, state.consts, state.batch_stats, self.data, idx, key
        )

    # ------------------------------------------------------------------ eval
    def _evaluate_impl(self, params, quant, consts, batch_stats, data, images, labels, mask):
        bs = self.eval_batch_size
        shaped = lambda x: x.reshape(-1, bs, *x.shape[1:])

        def one_batch(batch):
            x, y, m = batch
            x = jax.lax.with_sharding_constraint(x, self.batch_sharding)
            logits, _ = self.apply(
                params, quant, consts, batch_stats, self._prepare(x, data), train=False
            )
            onehot = jax.nn.one_hot(y, logits.shape[-1])
            loss = optax.softmax_cross_entropy(logits, onehot)
            return jnp.sum(loss * m), jnp.sum((jnp.argmax(logits, -1) == y) * m)

        losses, correct = jax.lax.map(one_batch, (shaped(images), shaped(labels), shaped(mask)))
        return jnp.sum(losses), jnp.sum(correct), jnp.sum(mask)

    def evaluate(self, state: TrainState | None = None, *, params=None, batch_stats=None) -> dict:
        """Test loss and accuracy of `state` (or of `params`/`batch_stats` replacing its own)."""
        params = state.params if params is None else params
        batch_stats = state.batch_stats if batch_stats is None else batch_stats
        loss, correct, n = jax.device_get(
            self._evaluate(
                params,
                state.quant,
                state.consts,
                batch_stats,
                self._norm,
                self.data["test_images"],
                self.data["test_labels"],
                self.data["test_mask"],
            )
        )
        return {"loss": float(loss / n), "accuracy": float(correct / n)}

    def regularizer_metrics(self, state: TrainState) -> dict:
        """Per-layer clustering metrics (see Regularization.metrics), as host values."""
        return jax.device_get(self._reg_metrics(state.params, state.quant, state.consts))
