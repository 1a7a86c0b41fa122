"""thaw: staged transfer learning for image classifiers (probe -> last stage -> full)."""

from thaw.errors import ThawError

__all__ = ["ThawError"]
__version__ = "0.1.0"
