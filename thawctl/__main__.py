"""``python -m thawctl``: the ``thaw`` command where its script is not on PATH."""

import sys

from thawctl.cli import main

sys.exit(main())
