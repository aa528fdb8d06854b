"""``python -m network.auth``: cluster keys and credentials (see network.auth.main)."""

from . import main

raise SystemExit(main())
