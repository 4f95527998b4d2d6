"""One AgeGenderEstimator shared by threads, inherited by forked children, and run in process pools.

What a web server does: 8 threads share one estimator (Flask, FastAPI, a thread pool); gunicorn's pre-fork
workers and ``multiprocessing`` (fork and spawn) inherit or rebuild it. Every answer must equal the one a
single thread gets for the same image. Every child is guarded by a timeout: a hang fails, it never blocks.
"""

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from conftest import REPO, slow_except

from c3ae.estimator import AgeGenderEstimator

OBAMA = REPO / "assets" / "obama.jpg"
ASTRONAUT = REPO / "assets" / "astronaut.jpg"
CHILD_TIMEOUT = 120  # seconds; a hung child fails the test


def photos() -> list:
    """The bundled photos (as paths) and synthetic variations (arrays): mirrored, shrunk, brightened, two
    faces side by side, and a blank frame (no face: the padded retry runs)."""
    obama, astronaut = cv2.imread(str(OBAMA)), cv2.imread(str(ASTRONAUT))
    small = cv2.resize(astronaut, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    pair = np.hstack([cv2.resize(im, (im.shape[1] * 320 // im.shape[0], 320)) for im in (obama, astronaut)])
    bright = np.clip(obama.astype(np.int16) + 40, 0, 255).astype(np.uint8)
    blank = np.full((240, 320, 3), 90, np.uint8)
    return [str(OBAMA), str(ASTRONAUT), cv2.flip(obama, 1), small, bright, pair, blank]


def answer(faces) -> list[dict]:
    return [face.to_dict() for face in faces]


def run_task(estimator: AgeGenderEstimator, images: list, task: tuple) -> list:
    """``("one", i)``: predict(image i); ``("many", (i, j))``: predict_many of two images in one batch."""
    kind, which = task
    if kind == "one":
        return [answer(estimator.predict(images[which]))]
    return [answer(faces) for faces in estimator.predict_many([images[k] for k in which])]


def tasks(count: int, images: int) -> list[tuple]:
    found = []
    for n in range(count):
        found.append(("many", (n % images, (n * 3 + 1) % images)) if n % 4 == 3 else ("one", n % images))
    return found


@pytest.fixture(scope="module")
def images() -> list:
    return photos()


@pytest.fixture(scope="module")
def tflite_estimator() -> AgeGenderEstimator:
    return AgeGenderEstimator("c3ae-utk", backend="tflite")


@pytest.fixture(scope="module")
def expected(tflite_estimator, images) -> list:
    """One thread's answer for every image."""
    return [answer(tflite_estimator.predict(image)) for image in images]


# ------------------------------------------------------------------------------------------------- threads
@pytest.mark.parametrize("backend", slow_except(["tflite", "onnx"], fast=["tflite"]))
def test_eight_threads_share_one_estimator_and_each_gets_its_own_answer(backend, images, tflite_estimator):
    estimator = tflite_estimator if backend == "tflite" else AgeGenderEstimator("c3ae-utk", backend=backend)
    work = tasks(104, len(images))
    single = {task: run_task(estimator, images, task) for task in set(work)}  # one thread
    assert any(single[task][0] for task in single) and not single[("one", len(images) - 1)][0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        shared = list(pool.map(lambda task: run_task(estimator, images, task), work))
    wrong = [task for task, got in zip(work, shared, strict=True) if got != single[task]]
    assert not wrong, f"{len(wrong)} of {len(work)} calls differ from one thread's answer: {wrong[:5]}"


def test_threads_share_the_haar_detector_and_a_fresh_estimator(images):
    """Many threads asking a new estimator at once build its detector once and agree with one thread."""
    estimator = AgeGenderEstimator("c3ae-utk", backend="tflite", detector="haar", flip=False)
    with ThreadPoolExecutor(max_workers=8) as pool:
        shared = list(pool.map(lambda k: answer(estimator.predict(images[k % len(images)])), range(32)))
    single = [answer(estimator.predict(image)) for image in images]
    assert shared == [single[k % len(images)] for k in range(32)]


# --------------------------------------------------------------------------------------------------- fork
def _wait_for_child(pid: int, reader: int, timeout: float) -> tuple[bytes, int]:
    """Everything the child writes to ``reader`` and its wait status; kills it and fails after ``timeout``."""
    deadline, data = time.monotonic() + timeout, b""
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([reader], [], [], max(left, 0))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child hung for {timeout} s")
        chunk = os.read(reader, 1 << 16)
        if not chunk:
            break
        data += chunk
    return data, os.waitpid(pid, 0)[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_matches_its_parent(tflite_estimator, images, expected):
    """The estimator, already used by threads (its interpreters and thread pools are live), is inherited
    by a child of os.fork, which gives the parent's answers (it used to hang)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, report, and leave without running pytest's teardown
        status = 1
        try:
            os.close(reader)
            got = [answer(tflite_estimator.predict(image)) for image in images]
            os.write(writer, json.dumps(got).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    try:
        data, status = _wait_for_child(pid, reader, CHILD_TIMEOUT)
    finally:
        os.close(reader)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(data) == json.loads(json.dumps(expected))


FORK_MID_CALL = textwrap.dedent(
    """
    import gc, json, os, sys, threading
    from c3ae import AgeGenderEstimator

    estimator = AgeGenderEstimator("c3ae-utk", backend=sys.argv[1])
    expected = [face.to_dict() for face in estimator.predict(sys.argv[2])]
    busy, stop = threading.Event(), threading.Event()

    def work():  # holds the interpreters' locks over and over while the main thread forks
        while not stop.is_set():
            estimator.predict(sys.argv[2])
            busy.set()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    busy.wait()
    pid = os.fork()
    if pid == 0:
        got = [face.to_dict() for face in estimator.predict(sys.argv[2])]
        del estimator
        gc.collect()  # the parent's interpreters must not be freed in the child (that crashes it)
        if sys.argv[3] == "normal":
            sys.exit(0 if got == expected else 3)  # a normal exit: interpreter shutdown runs
        sys.stdout.flush()
        os._exit(0 if got == expected else 3)
    stop.set()
    thread.join()
    print(json.dumps({"child": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("backend", slow_except(["tflite", "onnx"], fast=["tflite"]))
def test_fork_in_the_middle_of_a_call_then_a_normal_exit(backend):
    """Forking while another thread is inside the estimator: the child still answers as the parent, frees
    what it inherited safely, and exits 0 (the parent's interpreters, if freed, would crash it).

    ONNX Runtime (1.31) itself hangs in its C++ exit handlers in a forked child of a process that made a
    session, whatever c3ae does: that child leaves with ``os._exit`` (as multiprocessing's workers do)."""
    exit_style = "normal" if backend == "tflite" else "os._exit"
    result = subprocess.run(
        [sys.executable, "-c", FORK_MID_CALL, backend, str(OBAMA), exit_style],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"child": 0}


# -------------------------------------------------------------------------------------- multiprocessing
_POOL_ESTIMATOR: AgeGenderEstimator | None = None


def _pool_init() -> None:
    """A spawned worker builds its own estimator (the safe pattern for every start method)."""
    global _POOL_ESTIMATOR
    _POOL_ESTIMATOR = AgeGenderEstimator("c3ae-utk", backend="tflite")


def _pool_predict(image) -> list[dict]:
    return answer(_POOL_ESTIMATOR.predict(image))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_pool_matches_one_process(method, tflite_estimator, images, expected):
    """``fork``: the workers inherit the parent's estimator, already used; ``spawn``: each builds its own
    in the pool's initializer. Both give the parent's answers, within a timeout."""
    import multiprocessing

    global _POOL_ESTIMATOR
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method!r} start method here")
    context = multiprocessing.get_context(method)
    _POOL_ESTIMATOR = tflite_estimator if method == "fork" else None
    pool = context.Pool(2, initializer=None if method == "fork" else _pool_init)
    try:
        got = pool.map_async(_pool_predict, images).get(timeout=CHILD_TIMEOUT)
    finally:
        pool.terminate()
        pool.join()
        _POOL_ESTIMATOR = None
    assert got == expected


# ---------------------------------------------------------------------------------------------- web server
def web_server_example() -> str:
    """The FastAPI app of docs/reliability.md: the python block after ``<!-- web-server-example -->``."""
    text = (REPO / "docs" / "reliability.md").read_text()
    block = text.split("<!-- web-server-example -->", 1)[1]
    return block.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_the_documented_fastapi_app_answers_8_threads_at_once_as_one(tmp_path):
    """The docs' web-server example, run as printed under FastAPI's test client: 8 threads post photos at
    once, each gets the answer a single request gets, and a file that is not a photo is a 422 with c3ae's
    sentence."""
    pytest.importorskip("fastapi", reason="the [test] extra installs fastapi for the web-server example")
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the [test] extra)")
    import warnings

    namespace: dict = {}
    exec(compile(web_server_example(), "docs/reliability.md", "exec"), namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # starlette's note on httpx's successor
        from fastapi.testclient import TestClient

    bodies = [OBAMA.read_bytes(), ASTRONAUT.read_bytes()]
    _, png = cv2.imencode(".png", cv2.flip(cv2.imread(str(OBAMA)), 1))
    bodies.append(png.tobytes())
    with TestClient(namespace["app"]) as client:

        def post(body: bytes):
            response = client.post("/faces", content=body, headers={"content-type": "image/jpeg"})
            return response.status_code, response.json()

        single = [post(body) for body in bodies]
        assert [status for status, _ in single] == [200] * len(bodies)
        assert all(len(faces) == 1 for _, faces in single)
        order = [n % len(bodies) for n in range(24)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, [bodies[i] for i in order]))
        assert answers == [single[i] for i in order]
        status, detail = post(b"not a photo")
        assert status == 422 and "not an image" in detail["detail"]
