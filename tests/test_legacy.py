"""The legacy loaders against an independent NumPy forward pass that reads the .h5 files itself."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SHARED, slow_except

from c3ae.legacy import LegacyLayoutError, load_c3ae_h5, load_ssrnet_h5

SSRNET_AGE = [
    "ssrnet_age_imdb.h5",
    "ssrnet_age_wiki.h5",
    "ssrnet_age_morph2.h5",
    "ssrnet_age_megaface_asian.h5",
]
SSRNET_GENDER = ["ssrnet_gender_imdb.h5", "ssrnet_gender_wiki.h5", "ssrnet_gender_morph.h5"]
FAST = {"ssrnet_age_imdb.h5", "ssrnet_gender_imdb.h5", "c3ae_se_imdb_v89.h5"}  # one file of each layout
BN_EPSILON = 1e-3  # Keras 2 default, used by both originals


# ---------------------------------------------------------------- NumPy building blocks (NHWC, HWIO kernels)
def conv(x, kernel, bias=None):
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # N, H', W', C, kh, kw
    out = np.einsum("nhwcij,ijco->nhwo", windows, kernel, optimize=True)
    return out if bias is None else out + bias


def batch_norm(x, w):
    return w["gamma"] * (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + BN_EPSILON) + w["beta"]


def pool(x, size, reduce):
    n, h, w, c = x.shape
    x = x[:, : h // size * size, : w // size * size]
    return reduce(x.reshape(n, h // size, size, w // size, size, c), axis=(2, 4))


def relu(x):
    return np.maximum(x, 0)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def read(group):
    """{'kernel': ..., 'bias': ...} from an h5 group holding 'name:0' datasets, however deeply nested."""
    found = {}
    group.visititems(
        lambda name, obj: (
            found.__setitem__(name.split("/")[-1].split(":")[0], obj[()])
            if isinstance(obj, h5py.Dataset)
            else None
        )
    )
    return {k: v.astype("float64") for k, v in found.items()}


# ---------------------------------------------------------------- SSR-Net, transcribed from the official code
def ssrnet_numpy(path: Path, x: np.ndarray, V: float) -> np.ndarray:
    f = h5py.File(path, "r")
    w = {name: read(f[name]) for name in f.keys()}
    pred = "pred_age_stage" if "pred_age_stage1" in w else "pred_stage"
    # The official code creates the stream-1 (x) convs conv2d_1..4 and BNs 1..4, then stream 2 (s) 5..8.
    xs, ss = [], []
    h = x
    for i in range(1, 5):
        h = relu(
            batch_norm(
                conv(h, w[f"conv2d_{i}"]["kernel"], w[f"conv2d_{i}"]["bias"]), w[f"batch_normalization_{i}"]
            )
        )
        if i < 4:
            h = pool(h, 2, np.mean)
        xs.append(h)
    h = x
    for i in range(5, 9):
        h = np.tanh(
            batch_norm(
                conv(h, w[f"conv2d_{i}"]["kernel"], w[f"conv2d_{i}"]["bias"]), w[f"batch_normalization_{i}"]
            )
        )
        if i < 8:
            h = pool(h, 2, np.max)
        ss.append(h)
    # Stage k: (s conv, x conv, s dense, x dense, fused dense, tap index, pool size)
    stages = [(9, 10, 1, 2, 3, 3, None), (11, 12, 4, 5, 6, 1, 4), (13, 14, 7, 8, 9, 0, 8)]
    probs, etas, deltas = [], [], []
    for k, (sc, xc, sd, xd, fd, tap, size) in enumerate(stages, start=1):
        s_vec = relu(conv(ss[tap], w[f"conv2d_{sc}"]["kernel"], w[f"conv2d_{sc}"]["bias"]))
        x_vec = relu(conv(xs[tap], w[f"conv2d_{xc}"]["kernel"], w[f"conv2d_{xc}"]["bias"]))
        if size:
            s_vec, x_vec = pool(s_vec, size, np.max), pool(x_vec, size, np.mean)
        s_vec, x_vec = s_vec.reshape(len(x), -1), x_vec.reshape(len(x), -1)
        dense = lambda v, name, act: act(v @ w[name]["kernel"] + w[name]["bias"])  # noqa: E731
        s_mix, x_mix = dense(s_vec, f"dense_{sd}", relu), dense(x_vec, f"dense_{xd}", relu)
        deltas.append(dense(s_vec * x_vec, f"delta_s{k}", np.tanh)[:, 0])
        fused = dense(s_mix * x_mix, f"dense_{fd}", relu)
        probs.append(dense(fused, f"{pred}{k}", relu))
        etas.append(dense(fused, f"local_delta_stage{k}", np.tanh))
    # merge_age, literally
    s1, s2, s3 = (p.shape[1] for p in probs)
    a = sum((i + etas[0][:, i]) * probs[0][:, i] for i in range(s1)) / (s1 * (1 + deltas[0]))
    b = (
        sum((j + etas[1][:, j]) * probs[1][:, j] for j in range(s2))
        / (s1 * (1 + deltas[0]))
        / (s2 * (1 + deltas[1]))
    )
    c = (
        sum((k + etas[2][:, k]) * probs[2][:, k] for k in range(s3))
        / (s1 * (1 + deltas[0]))
        / (s2 * (1 + deltas[1]))
        / (s3 * (1 + deltas[2]))
    )
    return (a + b + c) * V


# ---------------------------------------------------------------- C3AE, transcribed from the model config
def c3ae_numpy(path: Path, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    f = h5py.File(path, "r")["model_weights"]
    backbone = f["model_1"]
    b = {name: read(backbone[name]) for name in backbone.keys()}
    se = "dense_1" in b

    def squeeze_excite(h, first):
        s = relu(h.mean(axis=(1, 2)) @ b[f"dense_{first}"]["kernel"] + b[f"dense_{first}"]["bias"])
        s = sigmoid(s @ b[f"dense_{first + 1}"]["kernel"] + b[f"dense_{first + 1}"]["bias"])
        return h * s[:, None, None, :]

    def features(h):
        for i in range(1, 5):
            h = relu(
                batch_norm(
                    conv(h, b[f"conv{i}"]["kernel"], b[f"conv{i}"].get("bias")), b[f"batch_normalization_{i}"]
                )
            )
            if i < 4:
                h = pool(h, 2, np.mean)
            if se:
                h = squeeze_excite(h, 2 * i - 1)
        h = conv(h, b["conv5"]["kernel"], b["conv5"]["bias"])
        if se:
            h = squeeze_excite(h, 9)
        return h.reshape(len(h), -1)

    concatenated = np.concatenate([features(c) for c in crops], axis=-1)
    head = read(f["dense_11"] if se else f["conv2d_1"])
    bins = softmax(concatenated @ head["kernel"].reshape(1536, 12) + head["bias"])
    age = bins @ read(f["age"])["kernel"] + read(f["age"])["bias"]
    return age[:, 0], bins


# ---------------------------------------------------------------- inputs: real faces when available
def face_batch(n: int = 4, seed: int = 0) -> np.ndarray:
    """BGR float32 64x64 crops in [0, 255]: real UTKFace chips when ../shared has them, noise otherwise."""
    import cv2

    files = sorted((SHARED / "data" / "utkface").glob("*.jpg"))[::997][:n]
    if len(files) == n:
        return np.stack([cv2.resize(cv2.imread(str(p)), (64, 64)) for p in files]).astype("float32")
    return np.random.default_rng(seed).uniform(0, 255, (n, 64, 64, 3)).astype("float32")


@pytest.mark.parametrize("filename", slow_except(SSRNET_AGE + SSRNET_GENDER, FAST))
def test_ssrnet_loader_matches_numpy_forward_pass(legacy_weights, filename):
    model = load_ssrnet_h5(legacy_weights / filename)
    is_gender = "gender" in filename
    x = face_batch()
    ours = model.predict(x, verbose=0)["gender" if is_gender else "age"][:, 0]
    reference = ssrnet_numpy(legacy_weights / filename, x.astype("float64"), 1.0 if is_gender else 101.0)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
    assert model.count_params() == 40_915


@pytest.mark.parametrize("filename", slow_except(["c3ae_plain_imdb_v84.h5", "c3ae_se_imdb_v89.h5"], FAST))
def test_c3ae_loader_matches_numpy_forward_pass(legacy_weights, filename):
    model = load_c3ae_h5(legacy_weights / filename)
    faces = face_batch()
    crops = [
        faces,
        faces[:, 8:56, 8:56].repeat(4, axis=1).repeat(4, axis=2)[:, ::3, ::3][:, :64, :64],
        face_batch(seed=1)[::-1],
    ]
    out = model.predict(dict(zip(("outer", "middle", "inner"), crops, strict=True)), verbose=0)
    age, bins = c3ae_numpy(legacy_weights / filename, [c.astype("float64") for c in crops])
    np.testing.assert_allclose(out["age_bins"], bins, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["age"][:, 0], age, rtol=1e-4, atol=1e-4)
    assert model.count_params() == (53_993 if "se" in filename else 48_633)


def test_legacy_outputs_vary_across_faces(legacy_weights):
    """A faithful import is not a constant function (the failure mode users reported on conversions)."""
    ages = load_ssrnet_h5(legacy_weights / "ssrnet_age_imdb.h5").predict(face_batch(), verbose=0)["age"]
    assert np.ptp(ages) > 1.0


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_ssrnet_h5("/nonexistent/ssrnet.h5")


def test_not_hdf5(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"this is not HDF5")
    with pytest.raises(LegacyLayoutError, match="not an HDF5 file"):
        load_c3ae_h5(path)


def test_unknown_layout(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_group("dense_1").create_dataset("kernel:0", data=np.zeros((3, 3)))
    with pytest.raises(LegacyLayoutError, match="not an SSR-Net file: expected layers delta_s1"):
        load_ssrnet_h5(path)
    with pytest.raises(LegacyLayoutError, match="not a C3AE file: expected a nested backbone"):
        load_c3ae_h5(path)


def test_wrong_family(legacy_weights):
    with pytest.raises(LegacyLayoutError, match="not a C3AE file"):
        load_c3ae_h5(legacy_weights / "ssrnet_age_imdb.h5")
    with pytest.raises(LegacyLayoutError, match="not an SSR-Net file"):
        load_ssrnet_h5(legacy_weights / "c3ae_se_imdb_v89.h5")


def test_partial_file_is_refused_not_half_loaded(legacy_weights, tmp_path):
    path = tmp_path / "partial.h5"
    shutil.copy(legacy_weights / "ssrnet_age_imdb.h5", path)
    with h5py.File(path, "r+") as f:
        names = [n for n in f.attrs["layer_names"] if n != b"dense_9"]
        f.attrs["layer_names"] = names
        del f["dense_9"]
    with pytest.raises(LegacyLayoutError, match="expected 9 dense layers, found 8"):
        load_ssrnet_h5(path)


def test_nan_weights_are_refused(legacy_weights, tmp_path):
    path = tmp_path / "nan.h5"
    shutil.copy(legacy_weights / "ssrnet_age_imdb.h5", path)
    with h5py.File(path, "r+") as f:
        kernel = f["dense_3/dense_3/kernel:0"]
        kernel[0, 0] = np.nan
    with pytest.raises(LegacyLayoutError, match="'dense_3' holds NaN or Inf"):
        load_ssrnet_h5(path)


def test_shape_mismatch_names_the_layer(legacy_weights, tmp_path):
    path = tmp_path / "shape.h5"
    shutil.copy(legacy_weights / "ssrnet_age_imdb.h5", path)
    with h5py.File(path, "r+") as f:
        del f["delta_s2/delta_s2/kernel:0"]
        f.create_dataset("delta_s2/delta_s2/kernel:0", data=np.zeros((91, 1), "float32"))
    with pytest.raises(LegacyLayoutError, match=r"'delta_s2' into 'stage2_delta'/kernel: expected \(90, 1\)"):
        load_ssrnet_h5(path)
