"""``python -m server.runtimes.experiments``: the same as ``flexlora experiment``."""

from server.runtimes.experiments.cli import main

raise SystemExit(main())
