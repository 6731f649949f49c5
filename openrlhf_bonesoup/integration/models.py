"""OpenRLHF's reward-model loader, for the code outside a Ray worker that loads one (objectives, tiny).

The one call of `openrlhf.models` outside the other seams of integration/: kept here so that only
integration/ imports openrlhf (docs/architecture.md; tests/test_layering.py checks it).
"""

from __future__ import annotations

from typing import Any

from openrlhf_bonesoup.integration.imports import provide_flash_attn_2_cuda


class LoaderUnavailable(ImportError):
    """`openrlhf.models` cannot be imported here; the message is the import's own."""


def load_openrlhf_reward_model(path: str, **kwargs: Any) -> Any:
    """`openrlhf.models.get_llm_for_sequence_regression(path, "reward", **kwargs)`, as upstream loads RMs.

    Raises LoaderUnavailable (an ImportError) when openrlhf.models cannot be imported, so that a caller
    can tell that apart from an ImportError of the loading itself, which passes through unchanged.
    """
    try:
        provide_flash_attn_2_cuda()  # openrlhf.models imports flash_attn, whose CUDA part a CPU machine lacks
        from openrlhf.models import get_llm_for_sequence_regression
    except ImportError as e:
        raise LoaderUnavailable(str(e)) from e
    return get_llm_for_sequence_regression(path, "reward", **kwargs)
