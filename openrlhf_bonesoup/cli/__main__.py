"""`python -m openrlhf_bonesoup.cli` is the `openrlhf-bonesoup` command."""

from openrlhf_bonesoup.cli import main_entry

main_entry()
