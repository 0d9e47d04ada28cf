"""``python -m gloss_ray.report RESULTS_DIR [OUT_DIR]``."""
import sys

from . import main

sys.exit(main())
