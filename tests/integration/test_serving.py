"""The registered pyfunc model: logged, registered, loaded back from the registry, predicting
from every accepted input form."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from thaw.backbones import create_backbone, data_config
from thaw.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from thaw.data.images import resize_to_square
from thaw.errors import ThawError
from thaw.serving import log_classifier
from thaw.stack import StackInfo

pytestmark = pytest.mark.slow

CLASSES = ["circle", "square", "triangle"]
SIZE = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.manual_seed(0)
    model = create_backbone("efficientnet_lite0", len(CLASSES), "packaged")
    save_checkpoint(path, model, {"classes": CLASSES, "stage": "full",
                                  "data_config": data_config("efficientnet_lite0", SIZE)})
    return path


@pytest.fixture(scope="module")
def served(stack: StackInfo, checkpoint: Path) -> mlflow.pyfunc.PyFuncModel:
    """The classifier logged into a run, registered, made champion and loaded back."""
    name = f"serving-{uuid.uuid4().hex[:8]}"
    experiment = MlflowClient().create_experiment(name)
    run = MlflowClient().create_run(experiment)
    info = log_classifier(checkpoint, registered_model_name=name, run_id=run.info.run_id)
    MlflowClient().set_registered_model_alias(name, "champion", info.registered_model_version)
    return mlflow.pyfunc.load_model(f"models:/{name}@champion")


def _images(n: int, height: int = 40, width: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _check(out: pd.DataFrame, n: int) -> None:
    assert list(out.columns) == ["label", "score", "probabilities"]
    assert len(out) == n
    probs = np.array(out["probabilities"].tolist())
    assert probs.shape == (n, len(CLASSES))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(out["label"]) <= set(CLASSES)
    np.testing.assert_allclose(out["score"], probs.max(axis=1))


def test_model_carries_classes_and_requirements(served) -> None:
    meta = served.metadata
    assert meta.metadata["classes"] == CLASSES
    assert meta.metadata["stage"] == "full"
    assert meta.signature is None  # any image size and input form is accepted
    requirements = Path(mlflow.pyfunc.get_model_dependencies(
        f"models:/{meta.model_id}")).read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert "scikit-learn" not in requirements


def test_predict_from_bytes_and_arrays_agree(served, checkpoint: Path) -> None:
    images = _images(5)
    from_array = served.predict(images)
    _check(from_array, 5)
    from_png = served.predict(pd.DataFrame({"image": [_png(im) for im in images]}))
    _check(from_png, 5)
    np.testing.assert_allclose(np.array(from_png["probabilities"].tolist()),
                               np.array(from_array["probabilities"].tolist()), atol=1e-5)
    b64 = served.predict(pd.DataFrame({"image": [base64.b64encode(_png(images[0])).decode()]}))
    np.testing.assert_allclose(b64["probabilities"][0], from_array["probabilities"][0],
                               atol=1e-5)

    # Exactly the preprocessing of training: resize + center crop, then mean/std.
    payload = load_checkpoint(checkpoint)
    cfg = payload["meta"]["data_config"]
    model = model_from_checkpoint(payload).eval()
    batch = np.stack([resize_to_square(im, SIZE, cfg["interpolation"]) for im in images])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        expected = model((x - mean) / std).softmax(1).numpy()
    np.testing.assert_allclose(np.array(from_array["probabilities"].tolist()), expected,
                               atol=1e-5)


def test_predict_accepts_every_input_form(served) -> None:
    _check(served.predict(_images(1)), 1)
    _check(served.predict(_images(1)[0]), 1)  # one (H,W,3) image
    gray = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    _check(served.predict(gray), 4)
    mixed = [_images(1, 64, 48)[0], _png(_images(1, 20, 90)[0]), gray[0]]
    _check(served.predict(mixed), 3)
    column = pd.DataFrame({"image": list(_images(3, 33, 33))})
    _check(served.predict(column), 3)
    _check(served.predict(_images(70, 32, 32)), 70)  # more than one internal batch


def test_predict_errors_are_clear(served) -> None:
    with pytest.raises(ThawError, match="image 1 could not be decoded"):
        served.predict(pd.DataFrame({"image": [_png(_images(1)[0]), b"not an image"]}))
    with pytest.raises(ThawError, match="'image' column"):
        served.predict(pd.DataFrame({"pixels": [b"x"]}))
    with pytest.raises(ThawError, match="expected an .H,W,3. RGB"):
        served.predict(np.zeros((2, 8, 8, 4), dtype=np.uint8))
    with pytest.raises(ThawError, match="uint8 pixel values"):
        served.predict(np.zeros((2, 8, 8, 3), dtype=np.float32))
