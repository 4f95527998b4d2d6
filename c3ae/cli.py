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


def cmd_preprocess(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    import logging
    from pathlib import Path

    from c3ae.preprocessing.pipeline import PreprocessError, preprocess
    from c3ae.preprocessing.readers import READERS

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dataset not in READERS:
        raise UserError(f"Unknown dataset {args.dataset!r}; choose one of: {', '.join(sorted(READERS))}.")
    if not Path(args.root).is_dir():
        raise UserError(f"--root {args.root} is not a folder; point it at the dataset's images.")
    fractions = _parse_fractions(args.split)
    try:
        manifest = preprocess(
            args.dataset,
            args.root,
            args.out,
            workers=args.workers,
            limit=args.limit,
            seed=args.seed,
            fractions=fractions,
            detector=args.detector,
            min_face=args.min_face,
            fallback=args.fallback,
        )
    except (PreprocessError, ValueError) as error:
        raise UserError(str(error)) from error
    counts, timing = manifest["counts"], manifest["timing"]
    rejects = ", ".join(f"{reason} {n}" for reason, n in manifest["rejects"].items()) or "none"
    print(
        f"kept {counts['kept']} of {counts['files_scanned']} files ({100 * counts['kept_fraction']:.1f}%): "
        + ", ".join(f"{split} {n}" for split, n in counts["by_split"].items())
    )
    print(f"rejected: {rejects}")
    if timing["faces_per_s"]:
        print(
            f"processed {timing['processed_samples']} photos in {timing['processing_s']} s "
            f"({timing['faces_per_s']} photos/s, {timing['workers']} workers)"
        )
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    import json
    from pathlib import Path

    from c3ae.bench import bench_data, bench_train_step, format_bench_table

    manifest = Path(args.data)
    if not (manifest.is_file() or (manifest / "manifest.json").is_file()):
        raise UserError(
            f"--data {manifest} is not a manifest.json (or a folder holding one) from 'c3ae preprocess'."
        )
    try:
        rows = [
            bench_data(
                manifest, model=args.model, batch_size=args.batch_size, batches=args.batches, augment=True
            ),
            bench_data(
                manifest, model=args.model, batch_size=args.batch_size, batches=args.batches, augment=False
            ),
        ]
    except (ValueError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    rows.append(bench_train_step(args.train_model, batch_size=args.batch_size, steps=args.steps))
    print(format_bench_table(rows))
    ratio = rows[0]["images_per_s_median"] / rows[2]["images_per_s_median"]
    print(f"\ninput pipeline with augmentation / {args.train_model} training step: {ratio:.1f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "pipeline_over_training": ratio}, indent=2) + "\n"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    from pathlib import Path

    from c3ae.config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.strategy:
        overrides.append(f"train.strategy={args.strategy}")
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        raise UserError(str(error)) from error
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    from c3ae.train import TrainingError, train

    try:
        summary = train(config, out)
    except (ConfigError, TrainingError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    best = summary["best"]
    print(f"best {best['metric']} {best['value']:.4f} at epoch {best['epoch']}; model: {out / 'best.keras'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    import json
    from pathlib import Path

    from c3ae.bundled import ModelNotFoundError, load_model
    from c3ae.evaluate import evaluate, write_report

    try:
        model = load_model(args.model)
    except ModelNotFoundError as error:
        raise UserError(str(error)) from error
    try:
        metrics, predictions = evaluate(model, args.data, args.split, args.batch_size)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.report:
        write_report(metrics, predictions, args.report, title=f"{args.model} on {args.split}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    from pathlib import Path

    from c3ae.bundled import ModelNotFoundError, publish

    if not (Path(args.run) / "best.keras").is_file():
        raise UserError(
            f"{args.run} holds no best.keras; give the --out folder of a finished 'c3ae train' run."
        )
    try:
        card = publish(args.run, args.name, args.data, args.split)
    except (ModelNotFoundError, ValueError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    metrics = card["metrics"][args.split]
    print(
        f"published {args.name}: {card['parameters']:,} parameters, {args.split} MAE {metrics['mae']}, "
        f"gender accuracy {metrics['gender_accuracy']}"
    )
    return 0


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(part) for part in text.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"--split {text!r} must be three fractions summing to 1, e.g. 0.8,0.1,0.1.")
    return fractions


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


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

    prep = commands.add_parser(
        "preprocess",
        help="detect, align and crop a dataset into Feather shards with a manifest",
        description="Detect -> align -> boxes for every photo of a dataset; write Feather shards of aligned "
        "chips and a manifest.json with counts, reject reasons and a seeded train/val/test split. "
        "Rerunning the same command resumes.",
    )
    prep.add_argument(
        "--dataset", required=True, help="reader name, e.g. utkface, asia, afad, imdb_wiki, csv"
    )
    prep.add_argument("--root", required=True, help="the dataset's folder")
    prep.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    prep.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
    prep.add_argument(
        "--limit", type=_positive_int, help="process a seeded random subset of this many photos"
    )
    prep.add_argument("--seed", type=int, default=0, help="seed of the split and of --limit (default 0)")
    prep.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions (default 0.8,0.1,0.1)")
    prep.add_argument("--detector", choices=("mtcnn", "haar"), default="mtcnn")
    prep.add_argument("--min-face", type=_positive_int, default=20, help="smallest face side in pixels")
    prep.add_argument(
        "--fallback",
        choices=("auto", "none"),
        default="auto",
        help="when no face is detected: 'auto' uses the dataset's own box, or the whole image for datasets "
        "of face crops (UTKFace, AFAD, All-Age-Faces, MegaAge); 'none' rejects the photo",
    )
    prep.set_defaults(func=cmd_preprocess)

    train = commands.add_parser(
        "train",
        help="train a model family on a preprocessed dataset (rerun on the same --out to resume)",
        description="Train from a YAML config; every field can be overridden as key=value "
        "(model.name=ssrnet train.lr=0.001 model.options.se=true).",
    )
    train.add_argument(
        "config", help="YAML config, or a bundled one: c3ae, ssrnet, ssrnet-gender, dldl, levi_hassner"
    )
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.add_argument("--out", help="run folder (default runs/<config name>); rerun on it to resume")
    train.add_argument(
        "--strategy",
        choices=("default", "mirrored", "multiworker"),
        help="mirrored: all GPUs of this machine; multiworker: one process per machine, cluster in TF_CONFIG",
    )
    train.add_argument("--precision", choices=("float32", "mixed_float16"), help="mixed_float16 on GPUs")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "evaluate", help="MAE, CA(3), CA(5), gender accuracy and MAE per age band on a split"
    )
    evaluate.add_argument("model", help="a .keras file or a bundled model's name")
    evaluate.add_argument("--data", required=True, help="manifest.json written by 'c3ae preprocess'")
    evaluate.add_argument("--split", default="test", help="split to evaluate (default test)")
    evaluate.add_argument("--json", help="write the metrics to this JSON file")
    evaluate.add_argument("--report", help="write a one-page PNG report here")
    evaluate.add_argument("--batch-size", type=_positive_int, default=256)
    evaluate.set_defaults(func=cmd_evaluate)

    publish = commands.add_parser(
        "publish", help="(maintainers) bundle a run's best model into the package with its model card"
    )
    publish.add_argument("run", help="the --out folder of a finished 'c3ae train' run")
    publish.add_argument("--name", required=True, help="bundled model name, e.g. c3ae-utk")
    publish.add_argument("--data", required=True, help="manifest.json of the data the model was trained on")
    publish.add_argument("--split", default="test", help="split the card's metrics come from (default test)")
    publish.set_defaults(func=cmd_publish)

    bench = commands.add_parser("bench", help="measure speed on this machine (medians)")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    data = bench_commands.add_parser(
        "data", help="images/s of the tf.data pipeline (with and without augmentation) vs a training step"
    )
    data.add_argument("--data", required=True, help="manifest.json written by 'c3ae preprocess'")
    data.add_argument("--model", default="c3ae", help="family whose inputs the pipeline makes (default c3ae)")
    data.add_argument("--train-model", default="c3ae-se-gender", help="variant whose training step is timed")
    data.add_argument("--batch-size", type=_positive_int, default=64)
    data.add_argument("--batches", type=_positive_int, default=30, help="timed pipeline batches")
    data.add_argument("--steps", type=_positive_int, default=20, help="timed training steps")
    data.add_argument("--json", help="also write the results to this JSON file")
    data.set_defaults(func=cmd_bench_data)
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
        resumable = (
            " Finished work is kept; rerun the same command to resume."
            if args.command in ("preprocess", "train")
            else ""
        )
        print(f"c3ae {args.command}: interrupted.{resumable}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
