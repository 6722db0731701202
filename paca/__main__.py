"""``python -m paca``: same as the ``paca`` command."""

from paca.cli.main import main

raise SystemExit(main())
