"""Load the original authors' published Keras 2 weight files into this library's builders.

Supported layouts (see ``../shared/weights/legacy/README.md``):

- SSR-Net (shamangary/SSR-Net): age models (V = 101) and gender models (V = 1), stage_num (3, 3, 3),
  lambda_local = lambda_d = 1.
- C3AE (StevenBanama/C3AE): ``imdb_focal_loss_c3ae_v84.h5`` (plain) and ``c3ae_imdb_v89.h5`` (SE).

The returned models take exactly what the originals took: float32 crops of shape (N, 64, 64, 3), OpenCV
BGR channel order, raw pixel values in [0, 255], no normalisation (C3AE: three such inputs, ``outer``,
``middle``, ``inner``). That is also this library's convention for every model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from c3ae.errors import C3AEError

try:
    import h5py
    import keras

    from c3ae.models.c3ae import build_c3ae
    from c3ae.models.ssrnet import build_ssrnet
except ImportError as error:  # the runtime install: one line naming the extra, not a bare ModuleNotFoundError
    from c3ae.extras import missing_extra

    if (extra := missing_extra(error)) is None:
        raise
    raise extra from None

SSRNET_CONVS = (
    [f"x_conv{i}" for i in range(1, 5)]
    + [f"s_conv{i}" for i in range(1, 5)]
    + [f"stage{k}_{stream}_conv" for k in (1, 2, 3) for stream in ("s", "x")]
)
SSRNET_BNS = [f"x_bn{i}" for i in range(1, 5)] + [f"s_bn{i}" for i in range(1, 5)]
SSRNET_DENSES = [f"stage{k}_{part}" for k in (1, 2, 3) for part in ("s_mix", "x_mix", "feat")]


class LegacyLayoutError(C3AEError, ValueError):
    """The file is not one of the known legacy layouts, or its weights do not fit."""


def _open_weights(path: str | Path) -> tuple[h5py.File, h5py.Group]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Legacy weight file not found: {path}")
    if not h5py.is_hdf5(path):
        raise LegacyLayoutError(f"{path} is not an HDF5 file; expected a Keras 2 .h5 weight or model file.")
    handle = h5py.File(path, "r")
    root = handle["model_weights"] if "model_weights" in handle else handle
    return handle, root


def _layer_weights(group: h5py.Group) -> dict[str, np.ndarray]:
    """``{"kernel": array, "bias": array, ...}`` for one Keras 2 layer group."""
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
    weights = {}
    for full_name in names:
        short = full_name.split("/")[-1].split(":")[0]
        weights[short] = np.asarray(group[full_name])
    return weights


def _numbered(names: Iterable[str], prefix: str) -> list[str]:
    """Layer names ``prefix_N`` sorted by N, i.e. in the order the original code created them."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)$")
    found = [(int(m.group(1)), name) for name in names if (m := pattern.match(name))]
    return [name for _, name in sorted(found)]


def _assign(layer: keras.layers.Layer, weights: dict[str, np.ndarray], source: str) -> None:
    """Set ``layer``'s weights from a dict keyed by Keras variable name, checking names and shapes."""
    for variable in layer.weights:
        key = variable.name.split("/")[-1]
        if key not in weights:
            raise LegacyLayoutError(
                f"Layer {source!r} in the file has no {key!r} weight needed by {layer.name!r}; "
                f"found {sorted(weights)}."
            )
        value = weights[key]
        if key == "kernel" and value.ndim == 4 and len(variable.shape) == 2:
            value = value.reshape(value.shape[-2], value.shape[-1])  # 1x1 conv over a 1x1 map == Dense
        if tuple(value.shape) != tuple(variable.shape):
            raise LegacyLayoutError(
                f"Shape mismatch loading {source!r} into {layer.name!r}/{key}: expected "
                f"{tuple(variable.shape)}, found {tuple(value.shape)}."
            )
        if not np.all(np.isfinite(value)):
            raise LegacyLayoutError(f"Layer {source!r} holds NaN or Inf in {key!r}; refusing to load it.")
        variable.assign(value.astype("float32"))


def _require(names: list[str], expected: int, what: str, path: Path, layout: str) -> None:
    if len(names) != expected:
        raise LegacyLayoutError(
            f"{path} is not a {layout} file: expected {expected} {what} layers, found {len(names)} "
            f"({', '.join(names) or 'none'})."
        )


def load_ssrnet_h5(path: str | Path, *, V: float | None = None) -> keras.Model:
    """Load an official SSR-Net weight file (age or gender) into :func:`c3ae.models.build_ssrnet`.

    Input of the returned model: ``image``, float32 (N, 64, 64, 3), BGR, raw pixels in [0, 255].
    Output: ``age`` in years (age files, V = 101) or ``gender`` (gender files, V = 1; near 1 = male, except
    for the Morph2 gender file whose preparation script coded 1 = female).

    ``V`` overrides the output range that is otherwise read from the file's layer names.
    """
    path = Path(path)
    handle, root = _open_weights(path)
    with handle:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in root.attrs.get("layer_names", root)]
        convs = _numbered(names, "conv2d")
        bns = _numbered(names, "batch_normalization")
        denses = _numbered(names, "dense")
        if {"delta_s1", "delta_s2", "delta_s3"} - set(names):
            raise LegacyLayoutError(
                f"{path} is not an SSR-Net file: expected layers delta_s1..delta_s3, found {names[:12]}..."
            )
        _require(convs, 14, "conv2d", path, "SSR-Net")
        _require(bns, 8, "batch_normalization", path, "SSR-Net")
        _require(denses, 9, "dense", path, "SSR-Net")
        if "pred_age_stage1" in names:
            pred_prefix, file_V = "pred_age_stage", 101.0
        elif "pred_stage1" in names:
            pred_prefix, file_V = "pred_stage", 1.0
        else:
            raise LegacyLayoutError(
                f"{path} is not an SSR-Net file: expected pred_age_stage1 (age) or pred_stage1 (gender)."
            )
        stage_num = tuple(int(_layer_weights(root[f"{pred_prefix}{k}"])["bias"].shape[0]) for k in (1, 2, 3))
        model = build_ssrnet(
            stage_num, 1.0, 1.0, V if V is not None else file_V, name=f"ssrnet_legacy_{path.stem}"
        )
        mapping = list(zip(convs, SSRNET_CONVS, strict=True)) + list(zip(bns, SSRNET_BNS, strict=True))
        mapping += list(zip(denses, SSRNET_DENSES, strict=True))
        for k in (1, 2, 3):
            mapping += [
                (f"delta_s{k}", f"stage{k}_delta"),
                (f"{pred_prefix}{k}", f"stage{k}_p"),
                (f"local_delta_stage{k}", f"stage{k}_eta"),
            ]
        for source, target in mapping:
            _assign(model.get_layer(target), _layer_weights(root[source]), source)
    return model


def load_c3ae_h5(path: str | Path) -> keras.Model:
    """Load a published C3AE Keras 2.2.4 model file (v84 plain or v89 SE) into :func:`build_c3ae`.

    Inputs of the returned model: ``outer``, ``middle``, ``inner``, each float32 (N, 64, 64, 3), BGR, raw
    pixels in [0, 255]. Outputs: ``age`` in years and ``age_bins`` (12 bins over 0, 10, ..., 110).
    The v84 head (Reshape + 1x1 Conv2D(12, softmax) + GlobalMaxPool) is a Dense(12, softmax) in disguise and
    loads into ``age_bins`` unchanged.
    """
    path = Path(path)
    handle, root = _open_weights(path)
    with handle:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in root.attrs.get("layer_names", root)]
        backbone_group = next(
            (root[n] for n in names if isinstance(root.get(n), h5py.Group) and "conv1" in root[n]), None
        )
        if backbone_group is None or "age" not in names:
            raise LegacyLayoutError(
                f"{path} is not a C3AE file: expected a nested backbone group with conv1..conv5 and an 'age' "
                f"layer, found top-level layers {names}."
            )
        inner_names = list(backbone_group.keys())
        bns = _numbered(inner_names, "batch_normalization")
        se_denses = _numbered(inner_names, "dense")
        _require(bns, 4, "batch_normalization", path, "C3AE")
        if se_denses and len(se_denses) != 10:
            raise LegacyLayoutError(
                f"{path}: expected 10 SE dense layers (5 blocks x squeeze/excite) or none, "
                f"found {len(se_denses)}."
            )
        head = [n for n in names if n not in ("age",) and re.match(r"^(conv2d|dense)_\d+$", n)]
        _require(head, 1, "bin head (conv2d_N or dense_N)", path, "C3AE")
        model = build_c3ae(se=bool(se_denses), name=f"c3ae_legacy_{path.stem}")
        backbone = model.get_layer("backbone")
        for i in range(1, 6):
            _assign(backbone.get_layer(f"conv{i}"), _backbone_weights(backbone_group, f"conv{i}"), f"conv{i}")
        for i, source in enumerate(bns, start=1):
            _assign(backbone.get_layer(f"bn{i}"), _backbone_weights(backbone_group, source), source)
        for i in range(5):
            squeeze_source, excite_source = se_denses[2 * i : 2 * i + 2] if se_denses else (None, None)
            if squeeze_source:
                se = backbone.get_layer(f"se{i + 1}")
                _assign(se.squeeze, _backbone_weights(backbone_group, squeeze_source), squeeze_source)
                _assign(se.excite, _backbone_weights(backbone_group, excite_source), excite_source)
        _assign(model.get_layer("age_bins"), _layer_weights(root[head[0]]), head[0])
        _assign(model.get_layer("age"), _layer_weights(root["age"]), "age")
    return model


def _backbone_weights(group: h5py.Group, layer: str) -> dict[str, np.ndarray]:
    """Weights of a layer nested in the backbone group (Keras 2 stores them without weight_names there)."""
    if layer not in group:
        raise LegacyLayoutError(f"Backbone group has no layer {layer!r}; found {sorted(group.keys())}.")
    return {name.split(":")[0]: np.asarray(data) for name, data in group[layer].items()}
