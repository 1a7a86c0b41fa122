"""The served model and bad input: every item it cannot classify is refused with its index and
the reason (in Python and over MLflow's REST scoring path), odd but valid images are
classified as training would see them, and the stored class order is the served one."""

from __future__ import annotations

import base64
import io
import json
import uuid
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import invocations
from PIL import Image

from thaw.backbones import create_backbone, data_config
from thaw.checkpoint import save_checkpoint
from thaw.data.images import decode_image
from thaw.errors import ThawError
from thaw.serving import log_classifier
from thaw.stack import StackInfo

pytestmark = pytest.mark.slow

# Not alphabetical, with spaces and non-ASCII letters: a model that sorted, trimmed or
# re-encoded its classes anywhere would serve other labels.
CLASSES = ["zebra crossing", "Äpfel grün", "mango 芒果"]
# Head biases that make every image come out zebra > mango > apple, by a wide margin.
BIAS = [3.0, 0.0, 1.5]
SIZE = 64


@pytest.fixture(scope="module")
def served(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> mlflow.pyfunc.PyFuncModel:
    """A classifier with CLASSES and BIAS, logged, registered, made champion, loaded back."""
    checkpoint = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.manual_seed(0)
    model = create_backbone("efficientnet_lite0", len(CLASSES), "packaged")
    with torch.no_grad():
        model.get_classifier().bias.copy_(torch.tensor(BIAS))
    save_checkpoint(checkpoint, model, {"classes": CLASSES, "stage": "full",
                                        "data_config": data_config("efficientnet_lite0", SIZE)})
    name = f"serving-input-{uuid.uuid4().hex[:8]}"
    run = MlflowClient().create_run(MlflowClient().create_experiment(name))
    info = log_classifier(checkpoint, registered_model_name=name, run_id=run.info.run_id)
    MlflowClient().set_registered_model_alias(name, "champion", info.registered_model_version)
    return mlflow.pyfunc.load_model(f"models:/{name}@champion")


def _rgb(height: int = 40, width: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _probs(out: pd.DataFrame) -> np.ndarray:
    return np.array(out["probabilities"].tolist())


def _rest(model: mlflow.pyfunc.PyFuncModel, images: list[str]) -> list[dict[str, Any]]:
    """Score base64 images through MLflow's scoring server (what `mlflow models serve` runs
    per request), as JSON in and out."""
    body = json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[image] for image in images]}})
    answer = invocations(body, "application/json", model, None)
    assert answer.status == 200, answer.response
    return json.loads(answer.response)["predictions"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_class_order_survives_logging_registry_and_serving(served) -> None:
    assert served.metadata.metadata["classes"] == CLASSES
    out = served.predict([_rgb(seed=s) for s in range(4)])
    assert out["label"].tolist() == [CLASSES[0]] * 4  # index 0, the first stored class
    probs = _probs(out)
    # Column j is CLASSES[j]: zebra (bias 3) > mango (1.5) > apple (0) on every row.
    assert ((probs[:, 0] > probs[:, 2]) & (probs[:, 2] > probs[:, 1])).all(), probs
    over_rest = _rest(served, [_b64(_png(_rgb(seed=s))) for s in range(4)])
    assert [row["label"] for row in over_rest] == [CLASSES[0]] * 4
    np.testing.assert_allclose([row["probabilities"] for row in over_rest], probs, atol=1e-5)


BAD_ITEMS = {
    "random bytes": (np.random.default_rng(0).bytes(300), "could not be decoded: not an image"),
    "empty file": (b"", "could not be decoded: empty file"),
    "text": ("hello, world!", "text must be base64-encoded image file bytes"),
    "base64 text, not an image": (_b64(b"just some words"), "could not be decoded: not an image"),
    "None": (None, "expected image file bytes, base64 text or a pixel array, got NoneType"),
    "ragged pixel lists": ([[1, 2, 3], [4, 5]], "not a rectangular pixel array"),
    "0x0 pixels": (np.zeros((0, 0, 3), np.uint8), "is empty: 0x0 pixels"),
    "RGBA array": (np.zeros((8, 8, 4), np.uint8), r"\(8, 8, 4\); send RGBA images as files"),
    "two channels": (np.zeros((8, 8, 2), np.uint8), r"expected an \(H,W,3\) RGB or \(H,W\) gray"),
    "floats": (np.full((8, 8, 3), 0.5, np.float32), "expected uint8 pixel values 0..255 .*float32"),
    "out of range": (np.full((8, 8), 300, np.int64), "pixel values must be 0..255"),
}


@pytest.mark.parametrize("item, reason", BAD_ITEMS.values(), ids=BAD_ITEMS.keys())
def test_a_bad_item_is_refused_with_its_index_and_reason(served, item: Any, reason: str) -> None:
    good = _rgb()
    with pytest.raises(ThawError, match=f"image 1:? .*{reason}") as raised:
        served.predict([good, item, good])
    assert isinstance(raised.value, MlflowException)  # an HTTP 400 from a scoring server


def test_over_rest_a_bad_item_is_a_400_naming_it(served) -> None:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [_b64(_png(_rgb()))], [_b64(b"%PDF-1.4 not an image")]]}})
    with pytest.raises(MlflowException, match="image 1 could not be decoded: not an image") as e:
        invocations(body, "application/json", served, None)
    assert e.value.get_http_status_code() == 400


@pytest.mark.parametrize("whole, reason", [
    (np.zeros((2, 8, 8, 8, 3), np.uint8), r"expected an image array of shape .* got shape"),
    (pd.DataFrame({"pixels": [b"x"]}), "'image' column"),
    (42, "unsupported input type int"),
], ids=["5-D array", "no image column", "a number"])
def test_unusable_input_as_a_whole_is_refused(served, whole: Any, reason: str) -> None:
    with pytest.raises(ThawError, match=reason):
        served.predict(whole)


def test_one_rgba_array_is_one_refused_image_not_rows_of_gray(served) -> None:
    """An (H,W,4) array used to be split into H grayscale images of W x 4 pixels."""
    with pytest.raises(ThawError, match=r"image 0: .*\(40, 50, 4\)"):
        served.predict(np.zeros((40, 50, 4), np.uint8))


@pytest.mark.parametrize("empty", [
    pd.DataFrame({"image": []}), [], np.zeros((0, 32, 32, 3), np.uint8),
], ids=["empty DataFrame", "empty list", "zero-length array"])
def test_an_empty_batch_gets_an_empty_answer(served, empty: Any) -> None:
    out = served.predict(empty)
    assert list(out.columns) == ["label", "score", "probabilities"]
    assert len(out) == 0


def test_grayscale_rgba_and_16_bit_files_are_classified_as_training_decodes_them(served) -> None:
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    rgba = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    deep = rng.integers(0, 65536, (30, 40), dtype=np.uint16)
    files = [_png(gray), _png(rgba), _png(deep)]
    from_files = _probs(served.predict(pd.DataFrame({"image": files})))
    as_training_sees = _probs(served.predict([decode_image(f) for f in files]))
    np.testing.assert_allclose(from_files, as_training_sees, atol=1e-5)
    # The same pixels given as arrays: gray as is, 16-bit rescaled like the file.
    np.testing.assert_allclose(_probs(served.predict([gray, deep])), from_files[[0, 2]],
                               atol=1e-5)
    # Transparency counts (composited on white): dropping alpha is another image.
    dropped_alpha = _probs(served.predict(rgba[..., :3]))
    assert not np.allclose(dropped_alpha, from_files[1], atol=1e-3)


def test_a_batch_mixing_sizes_and_forms_equals_each_image_alone(served) -> None:
    mixed = [_rgb(64, 48, 1), _png(_rgb(20, 90, 2)), _rgb(33, 33, 3)[..., 0], _rgb(7, 300, 4)]
    together = _probs(served.predict(mixed))
    alone = np.concatenate([_probs(served.predict([image])) for image in mixed])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert not np.allclose(together[0], together[1], atol=1e-3)  # the images do differ
    column = _probs(served.predict(pd.DataFrame({"image": mixed})))
    np.testing.assert_allclose(column, together, atol=1e-5)

