"""`python -m dist_backend generate | join | make-token | make-tiny | demo` (see cli.py)."""

from .cli import main

raise SystemExit(main())
