"""`python -m jaxdecode.cli`: the `jaxdecode` command."""

import sys

from jaxdecode.cli.app import main

sys.exit(main())
