"""`python -m openrlhf_bonesoup.cli` is the `openrlhf-bonesoup` command."""

from openrlhf_bonesoup.cli import main_entry

if __name__ == "__main__":  # serve's vLLM engine processes are spawned: they import this module again
    main_entry()
