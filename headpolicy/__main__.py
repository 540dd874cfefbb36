import sys

from headpolicy.cli import main

sys.exit(main())
