"""python -m batchd."""

from batchd.cli import main

raise SystemExit(main())
