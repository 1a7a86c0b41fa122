"""The registered model: an MLflow pyfunc that takes images and returns labels and probabilities.

Preprocessing lives inside the model and is exactly what training saw: decode, convert to RGB,
resize the shorter side to the checkpoint's input size and center-crop (thaw prepares its
datasets the same way), normalise with the checkpoint's mean/std.

No signature and no input example are logged on purpose: MLflow infers a signature from an
example array with fixed height and width (``(-1, 32, 32, 3)``) and would then reject file bytes
in a DataFrame, grayscale arrays and images of any other size, all of which this model takes.
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
from mlflow.models import Model
from mlflow.models.model import ModelInfo

import thaw
from thaw.checkpoint import load_checkpoint, model_from_checkpoint
from thaw.data.images import BadImage, decode_image, resize_to_square
from thaw.errors import ThawError

BATCH_SIZE = 64
IMAGE_COLUMN = "image"
# What inference imports (thaw's own code travels with the model as code_paths).
INFERENCE_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "pandas", "mlflow")
MODEL_CODE = """import mlflow

from thaw.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
"""


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Image classifier rebuilt from a thaw checkpoint (the ``checkpoint`` artifact).

    Input: a DataFrame with an ``image`` column of file bytes (PNG, JPEG, ...; base64 strings
    too, which is how JSON carries bytes) or uint8 arrays; a uint8 array of shape (N,H,W,3),
    (H,W,3), (N,H,W) or (H,W) (a 3-D array whose last axis is 3 is one RGB image); or a list
    of bytes/arrays. Images may differ in size; they are batched internally.
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
                          for k, item in enumerate(items)])
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        return self.model(x).float().softmax(dim=1).cpu().numpy()


def _items(model_input: Any) -> list[Any]:
    """Split any accepted input into a list of single images (bytes, str or array)."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ThawError(f"expected a DataFrame with an {IMAGE_COLUMN!r} column of image "
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
        if model_input.ndim == 4 or (model_input.ndim == 3 and model_input.shape[-1] != 3):
            return list(model_input)  # (N,H,W,C) or (N,H,W) grayscale
        if model_input.ndim in (2, 3):
            return [model_input]  # (H,W) or (H,W,3)
        raise ThawError(f"expected an image array of shape (N,H,W,3), (H,W,3), (N,H,W) or "
                        f"(H,W), got shape {model_input.shape}")
    raise ThawError(f"unsupported input type {type(model_input).__name__}: pass a DataFrame "
                    f"with an {IMAGE_COLUMN!r} column, a uint8 array or a list of images")


def _rgb(item: Any, index: int) -> np.ndarray:
    """One image (file bytes, base64 text, or pixel array) as an HxWx3 uint8 RGB array."""
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except binascii.Error as err:
            raise ThawError(f"image {index}: a string must be base64-encoded image file "
                            f"bytes ({err})") from None
    if isinstance(item, bytes | bytearray | memoryview):
        try:
            return decode_image(bytes(item))
        except BadImage as err:
            raise ThawError(f"image {index} could not be decoded: {err.reason}") from None
    array = np.asarray(item)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise ThawError(f"image {index}: expected an (H,W,3) RGB or (H,W) grayscale array, "
                        f"got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer) or array.size == 0 or (
                array.min() < 0 or array.max() > 255):
            raise ThawError(f"image {index}: expected uint8 pixel values 0..255, got "
                            f"{array.dtype}; scale floats with (x * 255).astype(np.uint8)")
        array = array.astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def log_classifier(
    checkpoint: Path,
    name: str = "model",
    registered_model_name: str | None = None,
    run_id: str | None = None,
) -> ModelInfo:
    """Log ``checkpoint`` as an :class:`ImageClassifier` pyfunc model into run ``run_id`` (the
    active run when None), optionally registering it. The model carries thaw's code and pinned
    requirements, so it loads and serves without thaw installed."""
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
