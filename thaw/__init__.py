"""thaw: staged transfer learning for image classifiers (probe -> last stage -> full)."""

from importlib.metadata import version

from thaw.errors import ThawError

__all__ = ["ThawError"]
__version__ = version("thaw")  # pyproject.toml is the one place the version lives
