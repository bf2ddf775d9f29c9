"""`python -m dist_backend generate | make-tiny | demo` (see cli.py)."""

from .cli import main

raise SystemExit(main())
