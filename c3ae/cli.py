"""The ``c3ae`` command: a thin argparse layer over the library.

User mistakes end with one sentence on stderr naming the problem and the fix, and exit code 2; never a
traceback. Heavy imports (TensorFlow, Keras) happen inside the subcommands, so ``c3ae --version`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from c3ae._version import __version__


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def cmd_models(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    from c3ae.models import VARIANTS, build_variant

    if args.name:
        if args.name not in VARIANTS:
            raise UserError(f"Unknown model {args.name!r}; run 'c3ae models' to list the known models.")
        model = build_variant(args.name)
        model.summary(line_length=100)
        named_inputs = (
            model.input if isinstance(model.input, dict) else {model.inputs[0].name: model.inputs[0]}
        )
        inputs = ", ".join(f"{name} {tuple(t.shape)}" for name, t in named_inputs.items())
        outputs = ", ".join(
            f"{name} {tuple(t.shape)}" for name, t in zip(model.output_names, model.outputs, strict=True)
        )
        print(f"inputs:  {inputs}  (float32, BGR, raw pixels in [0, 255])")
        print(f"outputs: {outputs}")
        print(f"parameters: {model.count_params():,}")
        return 0

    rows = []
    for variant in VARIANTS.values():
        model = variant.build()
        inputs = ",".join(model.input) if isinstance(model.input, dict) else model.inputs[0].name
        size = model.inputs[0].shape[1]
        rows.append(
            (
                variant.name,
                variant.family,
                f"{inputs} {size}x{size}",
                ",".join(model.output_names),
                f"{model.count_params():,}",
                variant.description,
            )
        )
    header = ("model", "family", "inputs", "outputs", "params", "description")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="c3ae",
        description="Compact face age and gender estimation: build, train, freeze and run C3AE, SSR-Net, "
        "DLDL and Levi-Hassner models.",
    )
    parser.add_argument("--version", action="version", version=f"c3ae {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    models = commands.add_parser("models", help="list the model families with their parameter counts")
    models.add_argument("name", nargs="?", help="show the layer-by-layer summary of one model")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"c3ae {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"c3ae {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
