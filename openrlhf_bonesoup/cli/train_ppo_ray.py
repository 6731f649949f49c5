"""`python -m openrlhf_bonesoup.cli.train_ppo_ray <OpenRLHF args> --reward_combiner ...`: the drop-in launcher.

OpenRLHF's own train_ppo_ray, trained on a composite reward; see openrlhf_bonesoup/integration/launcher.py.
"""

import sys

from openrlhf_bonesoup.integration.launcher import main

if __name__ == "__main__":
    sys.exit(main())
