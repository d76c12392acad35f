"""``python -m server.bench svd ...`` (the same as ``flexlora bench svd ...``)."""

import sys

from server.bench.cli import main

sys.exit(main())
