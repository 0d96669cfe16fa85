"""`python -m services.billing` serves billing; `python -m services.billing reconcile --since DATE` repairs
purchases whose webhook never arrived."""

import sys

from services.billing.cli import main

sys.exit(main(sys.argv[1:]))
