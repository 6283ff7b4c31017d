import sys

from clair_jax.cli import main

sys.exit(main())
