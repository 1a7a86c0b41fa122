"""KFP components: thin wrappers that turn artifacts and parameters into `thaw.steps` calls.

Each component is a Lightweight Python component whose body imports ``thaw`` inside, so the
container image (not this file) provides the compute; the image is chosen at compile time.
"""

from importlib.metadata import version
from types import SimpleNamespace

from kfp import dsl

from components.evaluate import evaluate
from components.finalize import finalize
from components.preprocess import preprocess
from components.register import register
from components.source_version import source_version
from components.train import train

# What `make image` builds by default (REGISTRY/thaw:<package version>).
DEFAULT_IMAGE = f"ghcr.io/thaw-ml/thaw:{version('thaw')}"


def build_components(image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """The components bound to container ``image`` (which has thaw and kfp installed)."""

    def make(func):
        return dsl.component(func, base_image=image, install_kfp_package=False)

    return SimpleNamespace(preprocess=make(preprocess), train=make(train),
                           evaluate=make(evaluate), register=make(register),
                           finalize=make(finalize), source_version=make(source_version))
