"""`python -m proxy` is the same as the `splitstream` console script."""

from proxy.cli import main

raise SystemExit(main())
