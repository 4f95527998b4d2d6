"""Drawing boxes and "34 F" labels on BGR uint8 images (photos and video frames)."""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

# BGR colours: male, female, unknown gender.
COLORS = {"male": (235, 160, 40), "female": (150, 60, 230), None: (90, 200, 90)}


def face_label(age: float | None, gender: str | None) -> str:
    """The short label drawn on a face: ``"34 F"``, ``"51 M"``, ``"34"`` (no gender), ``"F"`` (no age)."""
    parts = []
    if age is not None:
        parts.append(f"{int(round(age))}")
    if gender is not None:
        parts.append("M" if gender == "male" else "F")
    return " ".join(parts) or "?"


def draw_box(
    image: np.ndarray, box: Iterable[float], label: str, color: tuple[int, int, int] = COLORS[None]
) -> None:
    """Draw a box (x, y, w, h) and its label (on a filled tab above the box, or inside it at the top edge)
    on ``image`` in place. Line width and font size follow the image size."""
    height, width = image.shape[:2]
    x, y, w, h = (float(v) for v in box)
    x1, y1 = int(round(max(x, 0))), int(round(max(y, 0)))
    x2, y2 = int(round(min(x + w, width - 1))), int(round(min(y + h, height - 1)))
    if x2 <= x1 or y2 <= y1:
        return
    side = max(min(height, width), 1)
    thickness = max(1, int(round(side / 300)))
    scale = max(0.4, side / 900)
    cv2.rectangle(image, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
    if not label:
        return
    font = cv2.FONT_HERSHEY_SIMPLEX
    (text_w, text_h), baseline = cv2.getTextSize(label, font, scale, thickness)
    pad = max(2, thickness * 2)
    tab_h = text_h + baseline + pad
    top = y1 - tab_h if y1 - tab_h >= 0 else y1  # above the box, or inside it at the image's top edge
    left = min(x1, max(width - text_w - 2 * pad, 0))
    cv2.rectangle(image, (left, top), (left + text_w + 2 * pad, top + tab_h), color, -1)
    cv2.putText(
        image,
        label,
        (left + pad, top + text_h + pad // 2),
        font,
        scale,
        (255, 255, 255),
        thickness,
        cv2.LINE_AA,
    )


def draw_faces(image: np.ndarray, faces: Iterable, copy: bool = True) -> np.ndarray:
    """A copy of a BGR uint8 image with every face's box and ``"34 F"`` label drawn (``copy=False``: drawn
    on ``image`` itself when it is contiguous, which saves a full-size copy of a large photo).

    ``faces`` are :class:`c3ae.estimator.Face` objects, or anything with ``box`` (x, y, w, h), ``age`` and
    ``gender`` attributes.
    """
    canvas = np.ascontiguousarray(image)
    if copy and canvas is image:
        canvas = canvas.copy()
    for face in faces:
        draw_box(canvas, face.box, face_label(face.age, face.gender), COLORS.get(face.gender, COLORS[None]))
    return canvas
