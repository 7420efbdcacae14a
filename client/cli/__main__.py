"""`python -m softprompt.client.cli`: the `softprompt` command without its installed script."""

import sys

from softprompt.client.cli.app import main

sys.exit(main())
