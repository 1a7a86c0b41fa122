"""The registered model: an MLflow pyfunc that takes images and returns labels and probabilities.

Preprocessing lives inside the model and is exactly what training saw: decode, convert to RGB,
resize the shorter side to the checkpoint's input size and center-crop (thaw prepares its
datasets the same way), normalise with the checkpoint's mean/std.

No signature and no input example are logged on purpose: MLflow infers a signature from an
example array with fixed height and width (``(-1, 32, 32, 3)``) and would then reject file bytes
in a DataFrame, grayscale arrays and images of any other size, all of which this model takes.

Bad input (not an image, an unusable array, a missing column) raises :class:`BadInput`, whose
message names the item's index and the reason: a ``ThawError`` in Python and, being an
``MlflowException`` too, an HTTP 400 with that message from ``mlflow models serve``. An empty
batch gets an empty answer.
"""

from __future__ import annotations

import base64
import binascii
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

import thaw
from thaw.checkpoint import load_checkpoint, model_from_checkpoint
from thaw.data.images import BadImage, decode_image, resize_to_square
from thaw.errors import ThawError

BATCH_SIZE = 64
IMAGE_COLUMN = "image"
# Sizes of a 3-D array's last axis that make it one image (gray, RGB, RGBA), not a batch of
# grayscale images: no real image is 1, 3 or 4 pixels wide. RGBA arrays are refused.
CHANNELS = (1, 3, 4)
# 16-bit pixels to 8-bit: 65535 / 257 = 255, the scaling of 16-bit files in thaw.data.images.
SIXTEEN_TO_EIGHT_BIT = 257
# What inference imports (thaw's own code travels with the model as code_paths).
INFERENCE_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "pandas", "mlflow")
MODEL_CODE = """import mlflow

from thaw.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
"""


class BadInput(MlflowException, ThawError):
    """Input the model cannot classify. ``ThawError`` for thaw's callers; ``MlflowException``
    (invalid parameter, HTTP 400) so MLflow's scoring server returns the message instead of
    "unexpected error"."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Image classifier rebuilt from a thaw checkpoint (the ``checkpoint`` artifact).

    Input: a DataFrame with an ``image`` column of file bytes (PNG, JPEG, ...; base64 strings
    too, which is how JSON carries bytes) or pixel arrays; an array of shape (N,H,W,3),
    (H,W,3), (N,H,W) or (H,W) (a 3-D array whose last axis is 1, 3 or 4 is one image; 4
    channels are refused: send RGBA as a file, its transparency is composited on white);
    or a list of bytes/arrays. Pixels are uint8 (or integers 0..255); uint16 arrays are
    16-bit images, scaled like 16-bit files. Images may differ in size; they are batched
    internally.
    Output: a DataFrame with ``label``, ``score`` (top probability) and ``probabilities``
    (one float per class, in the order of the model metadata's ``classes``).
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        payload = load_checkpoint(Path(context.artifacts["checkpoint"]))
        meta = payload["meta"]
        self.classes: list[str] = list(meta["classes"])
        self.data_config: dict[str, Any] = meta["data_config"]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model_from_checkpoint(payload).eval().to(self.device)
        shape = (1, 3, 1, 1)
        # Same arithmetic as training's ImageFeed: uint8 -> float, minus mean*255, over std*255.
        self.mean = torch.tensor(self.data_config["mean"], device=self.device).view(shape) * 255
        self.std = torch.tensor(self.data_config["std"], device=self.device).view(shape) * 255

    # MLflow reads this hint: other hints switch on its input validation/conversion and no
    # hint warns at import; DataFrame leaves the input alone. Arrays and lists work too.
    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        items = _items(model_input)
        probs = [self._predict_batch(items[i:i + BATCH_SIZE], offset=i)
                 for i in range(0, len(items), BATCH_SIZE)]
        p = np.concatenate(probs) if probs else np.zeros((0, len(self.classes)), np.float32)
        top = p.argmax(axis=1)
        return pd.DataFrame({
            "label": [self.classes[i] for i in top],
            "score": p.max(axis=1).astype(float),
            "probabilities": [row.tolist() for row in p.astype(float)],
        })

    @torch.inference_mode()
    def _predict_batch(self, items: list[Any], offset: int) -> np.ndarray:
        size = int(self.data_config["input_size"][-1])
        interpolation = self.data_config["interpolation"]
        batch = np.stack([resize_to_square(_rgb(item, offset + k), size, interpolation)
                          for k, item in enumerate(items)])  # each (size, size, 3) by now
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        return self.model(x).float().softmax(dim=1).cpu().numpy()


def _items(model_input: Any) -> list[Any]:
    """Split any accepted input into a list of single images (bytes, str or array)."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise BadInput(f"expected a DataFrame with an {IMAGE_COLUMN!r} column of image "
                           f"bytes or arrays, got columns {list(model_input.columns)}")
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, bytes | bytearray | str):
        return [model_input]
    if isinstance(model_input, list | tuple):
        return list(model_input)
    if isinstance(model_input, np.ndarray):
        if model_input.dtype == object:  # e.g. an array of bytes
            return list(model_input.ravel())
        if model_input.ndim == 4 or (model_input.ndim == 3
                                     and model_input.shape[-1] not in CHANNELS):
            return list(model_input)  # (N,H,W,C) or (N,H,W) grayscale
        if model_input.ndim in (2, 3):
            return [model_input]  # (H,W) or (H,W,C)
        raise BadInput(f"expected an image array of shape (N,H,W,3), (H,W,3), (N,H,W) or "
                       f"(H,W), got shape {model_input.shape}")
    raise BadInput(f"unsupported input type {type(model_input).__name__}: pass a DataFrame "
                   f"with an {IMAGE_COLUMN!r} column, a uint8 array or a list of images")


def _rgb(item: Any, index: int) -> np.ndarray:
    """One image (file bytes, base64 text, or pixel array) as an HxWx3 uint8 RGB array."""
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except binascii.Error as err:
            raise BadInput(f"image {index}: text must be base64-encoded image file bytes "
                           f"({err})") from None
    if isinstance(item, bytes | bytearray | memoryview):
        try:
            return decode_image(bytes(item))
        except BadImage as err:
            raise BadInput(f"image {index} could not be decoded: {err.reason}") from None
    return _pixels_to_rgb(_pixel_array(item, index), index)


def _pixel_array(item: Any, index: int) -> np.ndarray:
    """``item`` as an (H,W) or (H,W,3) integer array, or a BadInput saying why not."""
    try:
        array = np.asarray(item)
    except ValueError as err:  # ragged nested lists
        raise BadInput(f"image {index}: not a rectangular pixel array ({err})") from None
    if array.dtype == object or array.ndim == 0:
        raise BadInput(f"image {index}: expected image file bytes, base64 text or a pixel "
                       f"array, got {type(item).__name__}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise BadInput(f"image {index}: expected an (H,W,3) RGB or (H,W) grayscale array, "
                       f"got shape {array.shape}; send RGBA images as files (PNG)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise BadInput(f"image {index} is empty: {array.shape[0]}x{array.shape[1]} pixels")
    if not np.issubdtype(array.dtype, np.integer):
        raise BadInput(f"image {index}: expected uint8 pixel values 0..255 (or uint16 for "
                       f"16-bit images), got {array.dtype}; scale floats in 0..1 with "
                       f"(x * 255).astype(np.uint8)")
    return array


def _pixels_to_rgb(array: np.ndarray, index: int) -> np.ndarray:
    if array.dtype == np.uint16:
        array = np.rint(array / SIXTEEN_TO_EIGHT_BIT)
    elif array.min() < 0 or array.max() > 255:
        raise BadInput(f"image {index}: pixel values must be 0..255 (uint16 arrays are read "
                       f"as 16-bit), got {array.min()}..{array.max()} ({array.dtype})")
    array = array.astype(np.uint8)
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def log_classifier(
    checkpoint: Path,
    name: str = "model",
    registered_model_name: str | None = None,
    run_id: str | None = None,
) -> ModelInfo:
    """Log ``checkpoint`` as an :class:`ImageClassifier` pyfunc model into run ``run_id`` (the
    active run when None), optionally registering it. The model carries thaw's code and pinned
    requirements, so it loads and serves without thaw installed, and nothing else: no pickle
    (it loads with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``), no environment variables,
    no files of the working directory."""
    payload = load_checkpoint(Path(checkpoint))
    metadata = {
        "classes": list(payload["meta"]["classes"]),
        "arch": payload["arch"],
        "stage": payload["meta"].get("stage"),
        "data_config": payload["meta"]["data_config"],
    }
    # A LoggedModel belongs to an experiment: create it in the run's own (MLflow would
    # otherwise use the process's current experiment), then log the files into it.
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id if run_id else None
    logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id,
                                            experiment_id=experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        # Models from code: the model is rebuilt by running this file, not unpickled.
        model_code = Path(tmp, "image_classifier.py")
        model_code.write_text(MODEL_CODE)
        return Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            registered_model_name=registered_model_name,
            metadata=metadata,
            python_model=str(model_code),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(_copy_code(Path(tmp)))],
            pip_requirements=pip_requirements(),
            # MLflow would otherwise copy the working directory's pyproject.toml and uv.lock
            # into the model when both exist; they may name private indexes with tokens.
            uv_project_path=tmp,
        )


def pip_requirements() -> list[str]:
    """Inference packages pinned to the installed versions (local tags such as ``+cu128``
    dropped: they do not resolve on PyPI)."""
    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in INFERENCE_PACKAGES]


def _copy_code(dest: Path) -> Path:
    """Copy thaw's Python sources (no caches, no data files) to ``dest/thaw``."""
    source = Path(thaw.__file__).parent

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n == "__pycache__"
                or not (n.endswith(".py") or Path(directory, n).is_dir())}

    return Path(shutil.copytree(source, dest / "thaw", ignore=ignore))
