"""The `qarjax` command line: train, quantize, tune, eval and run over config files.

    qarjax train --config configs/demo.py --workdir runs/demo [--config.num_epochs=3]
    qarjax run   --config configs/vgg16_cifar10.py:nearest --workdir runs/vgg16

``--config FILE[:ARG]`` loads ``get_config(ARG)`` from FILE; ``--config.a.b=VALUE`` overrides
any key (the value is parsed as a Python literal when it is one, and must match the key's
type). A problem with the input exits with status 2 and one line on stderr, never a
traceback. Multi-host runs pass ``--coordinator HOST:PORT --num_processes N --process_id I``
(or set the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import sys

from qarjax.errors import ConfigError, QarjaxError

COMMANDS = ("train", "quantize", "tune", "eval", "run")


def parse_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("nan", "inf", "-inf", "+inf"):
        return float(text)  # so that range checks see (and refuse) them
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def apply_overrides(config, overrides: list[str]):
    """Applies ['--config.a.b=v', ...] to `config`; unknown keys and bad types are errors."""
    for item in overrides:
        key, sep, raw = item[len("--config.") :].partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} needs a value: --config.{key}=VALUE")
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            if part not in node:
                raise ConfigError(f"unknown config key {key!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key!r}")
        value, current = parse_value(raw), node[parts[-1]]
        if isinstance(current, str) and not isinstance(value, str):
            value = raw  # e.g. --config.reg.include=123 for a string key
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[parts[-1]] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad value for {key}: {raw!r} ({e})") from None
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qarjax", description="Quantization-aware regularization for JAX/Flax NNX."
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", required=True, help="config file, optionally FILE:ARG")
    parser.add_argument("--workdir", required=True, help="the run's folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    parser.add_argument("--overwrite", action="store_true", help="replace a run in --workdir")
    parser.add_argument(
        "--artifact",
        help="eval: a compressed model (.safetensors) file instead of the workdir's",
    )
    parser.add_argument("--coordinator", help="multi-host: coordinator HOST:PORT")
    parser.add_argument("--num_processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process_id", type=int, help="multi-host: this process's index")
    return parser


def _init_distributed(args) -> None:
    explicit = args.coordinator is not None
    from_env = "JAX_COORDINATOR_ADDRESS" in os.environ
    if not (explicit or from_env):
        return
    import jax

    if explicit:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    else:
        jax.distributed.initialize()


def run_command(args, overrides: list[str]) -> None:
    from qarjax.config import load_config

    path, _, arg = args.config.partition(":")
    config = apply_overrides(load_config(path, arg or None), overrides)
    _init_distributed(args)
    import jax

    from qarjax.loop import workdir_lock

    writes = args.command != "eval" and jax.process_index() == 0
    with workdir_lock(args.workdir) if writes else contextlib.nullcontext():
        run_in_workdir(args, config)


def run_in_workdir(args, config) -> None:
    if args.command == "train":
        from qarjax.loop import fit

        result = fit(config, args.workdir, resume=args.resume, overwrite=args.overwrite)
        s = result.summary
        print(
            f"done: test accuracy {s['test_accuracy']:.4f}, {s['epochs']} epochs, "
            f"{s['train_seconds']:.1f}s training, {s['images_per_second']:,.0f} img/s -> "
            f"{args.workdir}/summary.json"
        )
        return
    from qarjax import pipeline

    pipeline.run_command(args.command, config, args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    args = build_parser().parse_args(rest)
    try:
        run_command(args, overrides)
    except QarjaxError as e:  # one line, whatever the message (e.g. a library's) holds
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"qarjax: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qarjax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
