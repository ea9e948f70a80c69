"""The `qarjax` command line: train, quantize, tune, eval and run over config files.

    qarjax train --config=configs/demo.py --workdir=runs/demo [--config.num_epochs=3]
    qarjax run   --config=configs/vgg16_cifar10.py:nearest --workdir=runs/vgg16
    qarjax run   --flagfile=sweep/nearest_k4.flags      # any of the flags, one per line

The first argument is the command; absl flags parse the rest. ``--config FILE[:ARG]`` loads
``get_config(ARG)`` from FILE with ml_collections' config_flags (locked: an unknown key is an
error); ``--config.a.b=VALUE`` overrides a key, parsed as the key's type. A problem with the
input exits with status 2 and one line on stderr, never a traceback. Multi-host runs pass
``--coordinator HOST:PORT --num_processes N --process_id I`` (or set the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import logging
import os
import re
import signal
import sys
import threading

from absl import flags
from ml_collections import config_flags

from qarjax.errors import ConfigError, QarjaxError

COMMANDS = {
    "train": "train the config in --workdir (checkpoints, metrics, summary.json)",
    "quantize": "quantize a trained run: quantized.safetensors + quantize.json",
    "tune": "tune the quantized model's codebooks: tuned.safetensors + tune.json",
    "eval": "evaluate the workdir's (or --artifact's) compressed model",
    "run": "train -> quantize -> tune -> report, in one go",
}
USAGE = f"usage: qarjax {{{','.join(COMMANDS)}}} --config=FILE[:ARG] --workdir=DIR [flags]"
OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")  # config_flags' own override pattern


@dataclasses.dataclass(frozen=True)
class Invocation:
    """One parsed command line: the command, its loaded config and its flags."""

    command: str
    config: object  # the locked ml_collections.ConfigDict, overrides applied
    workdir: str
    resume: bool = False
    overwrite: bool = False
    artifact: str | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """The command flags, into `fv`; `argv` is what the config flag reads overrides from."""
    flags.DEFINE_string("workdir", None, "the run's folder (required)", flag_values=fv)
    flags.DEFINE_boolean("resume", False, "continue the run in --workdir", flag_values=fv)
    flags.DEFINE_boolean("overwrite", False, "replace a run in --workdir", flag_values=fv)
    flags.DEFINE_string(
        "artifact",
        None,
        "tune / eval: a compressed model (.safetensors) file instead of the workdir's",
        flag_values=fv,
    )
    flags.DEFINE_string("coordinator", None, "multi-host: coordinator HOST:PORT", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index", flag_values=fv)
    config_flags.DEFINE_config_file(
        "config",
        None,
        "config file FILE[:ARG], get_config(ARG) (required); --config.KEY=VALUE overrides KEY",
        flag_values=fv,
        lock_config=True,
        sys_argv=argv,
    )


def command_help(command: str) -> str:
    fv = flags.FlagValues()
    define_flags(fv, ["qarjax"])
    return (
        f"usage: qarjax {command} --config=FILE[:ARG] --workdir=DIR [flags]\n\n"
        f"{COMMANDS[command]}\n\n{fv.get_help(include_special_flags=False)}\n"
        "  --flagfile: read flags from a file, one per line (absl)\n"
    )


def main_help() -> str:
    lines = [USAGE, "", "Quantization-aware regularization for JAX/Flax NNX.", "", "commands:"]
    lines += [f"  {name:<9} {what}" for name, what in COMMANDS.items()]
    lines += ["", "qarjax COMMAND --help lists the flags."]
    return "\n".join(lines) + "\n"


def _flag_error(error: Exception) -> ConfigError:
    text = " ".join(str(error).split()).removeprefix("ERROR:: ")  # absl's flagfile errors
    cause = error.__context__
    if isinstance(error, flags.IllegalFlagValueError) and isinstance(cause, ValueError):
        if len(cause.args) == 2:  # absl's bool parser: ('Non-boolean argument ...', value)
            text = f"{text.split(': ', 1)[0]}: {cause.args[0]}"
    return ConfigError(text or type(error).__name__)


@contextlib.contextmanager
def _flagfile_warnings_refused():
    """absl warns on stderr and goes on where a --flagfile includes itself: refused here."""
    caught = io.StringIO()
    with contextlib.redirect_stderr(caught):
        yield
    text = caught.getvalue()
    match = re.search(r"circular flagfile dependency\. Ignoring flagfile: ?(.*)", text)
    if match:
        raise ConfigError(f"--flagfile {match.group(1).strip()} includes itself (a cycle)")
    sys.stderr.write(text)


def parse_command_line(argv: list[str]) -> Invocation:
    """`argv` without the program name: COMMAND then flags; raises ConfigError when bad."""
    from qarjax.config import check_key, load_config

    if not argv:
        raise ConfigError(f"give a command: {', '.join(COMMANDS)} (qarjax --help)")
    command, rest = argv[0], ["qarjax", *argv[1:]]
    if command not in COMMANDS:
        near = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown command {command!r}: choose one of {', '.join(COMMANDS)}{hint}")
    # First the config file alone (flagfiles expanded), through the one loader with its
    # one-line refusals, and the override keys against it; then every flag, config_flags
    # loading the same file and applying the overrides with the keys' types.
    probe = flags.FlagValues()
    flags.DEFINE_string("config", None, "", flag_values=probe)
    try:
        with _flagfile_warnings_refused():
            unparsed = probe(rest, known_only=True)
    except flags.Error as e:
        raise _flag_error(e) from None
    if not probe.config:
        raise ConfigError("--config=FILE[:ARG] is required")
    path, colon, arg = probe.config.partition(":")
    loaded = load_config(path, arg if colon else None)
    for item in unparsed:
        match = OVERRIDE.match(item)
        if match:
            check_key(loaded, match.group(1))
    fv = flags.FlagValues()
    try:
        define_flags(fv, rest)
        positional = fv(rest)[1:]
    except (flags.Error, TypeError, ValueError, KeyError, AttributeError) as e:
        raise _flag_error(e) from None
    if positional:
        raise ConfigError(f"unexpected argument {positional[0]!r}")
    if not fv.workdir:
        raise ConfigError("--workdir=DIR is required")
    if fv.coordinator is not None and (fv.num_processes is None or fv.process_id is None):
        raise ConfigError("--coordinator needs --num_processes and --process_id")
    names = ("resume", "overwrite", "artifact", "coordinator", "num_processes", "process_id")
    return Invocation(command, fv.config, fv.workdir, **{n: fv[n].value for n in names})


def _init_distributed(args: Invocation) -> None:
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


def run_command(args: Invocation) -> None:
    from qarjax.spec import build

    spec = build(args.config)  # every value checked, before the workdir is touched
    _init_distributed(args)  # before anything starts JAX's backend
    import jax

    from qarjax import compile_cache

    compile_cache.enable()  # the next command on this model reads its programs back

    from qarjax.loop import workdir_lock

    writes = args.command != "eval" and jax.process_index() == 0
    with workdir_lock(args.workdir) if writes else contextlib.nullcontext():
        run_in_workdir(args, spec)


def run_in_workdir(args: Invocation, spec) -> None:
    if args.command == "train":
        from qarjax.loop import fit

        result = fit(spec, args.workdir, resume=args.resume, overwrite=args.overwrite)
        s = result.summary
        print(
            f"done: test accuracy {s['test_accuracy']:.4f}, {s['epochs']} epochs, "
            f"{s['train_seconds']:.1f}s training, {s['images_per_second']:,.0f} img/s -> "
            f"{args.workdir}/summary.json"
        )
        return
    from qarjax import pipeline

    pipeline.run_command(args.command, spec, args)


def main(argv: list[str] | None = None) -> int:
    """The `qarjax` command; returns the exit status (2: bad input, one line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["--help"], ["-h"], ["help"]):
        print(main_help(), end="")
        return 0
    if len(argv) > 1 and argv[0] in COMMANDS and ("--help" in argv or "-h" in argv):
        print(command_help(argv[0]), end="")
        return 0
    # Libraries' own error logs (orbax's background savers) would add lines to the one line a
    # failure gets: the error that reaches here says it.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS} if in_main_thread else {}
    try:
        run_command(parse_command_line(argv))
    except QarjaxError as e:  # one line, whatever the message (e.g. a library's) holds
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"qarjax: error: {message}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"qarjax: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("qarjax: interrupted", file=sys.stderr)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


# Clusters and preemptible machines stop jobs with SIGTERM (SIGHUP: a closed terminal): both
# unwind like Ctrl-C, so the checkpoint being written is finished and the lock released.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """Raised by the handler of a STOP_SIGNALS signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def run() -> None:
    """The console entry point: `main`'s status as the exit status. After a refusal or a
    failure (2) the process ends at once, so that threads a library left (orbax's savers)
    print nothing after the one error line."""
    code = main()
    if code == 2:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(code)


if __name__ == "__main__":
    run()
