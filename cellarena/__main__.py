import sys

from cellarena.cli import main

sys.exit(main())
