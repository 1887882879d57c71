"""``python -m streamscore``: the same as the ``streamscore`` console script."""

from streamscore.jobs.cli import main

raise SystemExit(main())
