"""``python -m sim``: see :mod:`sim.run.cli`."""

from .run.cli import main

raise SystemExit(main())
