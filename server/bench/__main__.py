"""``python -m server.bench svd ...`` (the same as ``flexlora bench svd ...``)."""

import sys

from .cli import main

sys.exit(main())
