"""``python -m server.experiments``: the same as ``flexlora experiment``."""

from .cli import main

raise SystemExit(main())
