"""The library's single set of conventions, stated once.

- Model inputs: float32 crops of shape (N, H, W, 3), channel order **BGR** (OpenCV's), raw pixel values in
  **[0, 255]**. No normalisation outside the model: each model normalises inside its graph (WhiteNorm or the
  first BatchNormalization), so a deployer feeds the same raw pixels to Keras, TFLite, ONNX and CoreML.
  The original SSR-Net and C3AE weights were trained on exactly this, so legacy imports need no adaptation.
- Gender: 1 = male, 0 = female, -1 = unknown. A model's ``gender`` output is the probability of male.
- Ages: years, as floats.
"""

CHANNEL_ORDER = "BGR"
PIXEL_RANGE = (0.0, 255.0)

MALE = 1
FEMALE = 0
UNKNOWN_GENDER = -1

# C3AE's two-point age bins: ages 0, 10, ..., 110 years.
NUM_AGE_BINS = 12
AGE_BIN_WIDTH = 10.0

# Age bands used to report MAE per band: [low, high) in years, upper bound None = open.
AGE_BANDS: tuple[tuple[str, float, float | None], ...] = (
    ("0-12", 0.0, 13.0),
    ("13-19", 13.0, 20.0),
    ("20-39", 20.0, 40.0),
    ("40-59", 40.0, 60.0),
    ("60+", 60.0, None),
)
