"""Convert MTCNN (the ``mtcnn`` wheel's weights in our Keras builders) to the LiteRT files c3ae ships.

    python -m c3ae.export.detector            # writes c3ae/weights/mtcnn/{pnet,rnet,onet}.tflite + LICENSE

Each file is fp32 with builtin ops only; its ``serving_default`` signature takes ``image`` (BGR raw pixels in
[0, 255]) and returns the outputs named in :mod:`c3ae.models.mtcnn`. The conversion is deterministic, so
rerunning it reproduces the shipped files' numerics (a test checks this).
"""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path

from c3ae.detector import DETECTOR_DIR

LICENSE_HEADER = (
    "The MTCNN weights in this folder were converted from the mtcnn package {version}\n"
    "(https://pypi.org/project/mtcnn/) by `python -m c3ae.export.detector`. Its licence:\n\n"
)


def convert_networks(out_dir: str | Path = DETECTOR_DIR) -> dict[str, Path]:
    """Write ``pnet.tflite``, ``rnet.tflite``, ``onet.tflite`` and ``LICENSE`` into ``out_dir``."""
    from c3ae.export.tflite import to_tflite
    from c3ae.files import atomic_write_bytes
    from c3ae.models.mtcnn import NETWORKS, build_mtcnn_network

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for network in NETWORKS:
        flatbuffer = to_tflite(build_mtcnn_network(network), "none", metadata=False)
        written[network] = atomic_write_bytes(out_dir / f"{network}.tflite", flatbuffer)
    written["LICENSE"] = atomic_write_bytes(out_dir / "LICENSE", _license_text().encode())
    return written


def _license_text() -> str:
    distribution = importlib.metadata.distribution("mtcnn")
    licence = next(
        (f for f in distribution.files or [] if f.name.upper().startswith("LICENSE")),
        None,
    )
    body = (
        licence.read_text()
        if licence is not None
        else "MIT License, Copyright (c) 2019-2024 Ivan de Paz Centeno"
    )
    return LICENSE_HEADER.format(version=distribution.version) + body.strip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m c3ae.export.detector", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-o", "--out", default=str(DETECTOR_DIR), help="folder for the .tflite files")
    args = parser.parse_args(argv)
    for name, path in convert_networks(args.out).items():
        print(f"{name}: {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
