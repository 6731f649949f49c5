"""LoRA soups on vLLM's multi-LoRA: the resolver that turns a served name "bonesoup:<mu>" into merge's adapter.

vLLM asks a LoRAResolver (registered in its LoRAResolverRegistry by serve.run) about a model name it does
not know yet; `SoupResolver` writes the preference's rank-concatenated adapter with merge.merge_soup, the
file `merge` writes, and vLLM then batches any mix of preferences. `lora_rank` sizes vLLM's --max-lora-rank.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from openrlhf_bonesoup import lora, merge, vllm_api
from openrlhf_bonesoup.coefficients import parse_floats
from openrlhf_bonesoup.errors import BoneSoupError

if TYPE_CHECKING:
    from openrlhf_bonesoup.serve import Soup

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank takes (vllm/config/lora.py)


class SoupResolver:
    """vLLM's LoRAResolver interface (vllm.lora.resolver; registered in its LoRAResolverRegistry): vLLM asks
    it about a model name it does not know, and "<model>:<mu>" (serve's "bonesoup:<mu>") becomes merge's
    adapter for mu. Not a subclass: importing vLLM takes ~10 s, and serve checks the soup before that."""

    def __init__(self, soup: Soup, model: str):
        self.soup, self.prefix = soup, model + ":"
        self.cache = Path(tempfile.mkdtemp(prefix="bonesoup-serve-loras-"))
        atexit.register(shutil.rmtree, self.cache, True)
        self.count = itertools.count()

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        if not lora_name.startswith(self.prefix):
            return None
        mu = self.soup.preference(parse_floats(lora_name[len(self.prefix) :], "the preference"))
        folder = self.cache / f"mu{next(self.count)}"
        soup = self.soup
        # the merge runs in a thread: the server keeps answering (a few MB of adapters, milliseconds)
        await asyncio.to_thread(
            merge.merge_soup, soup.backbones, soup.matrix, [list(mu)], [folder], alpha=soup.alpha, progress=False
        )
        request = vllm_api.get("LoRARequest")
        return request(lora_name=lora_name, lora_int_id=1, lora_path=str(folder))  # vLLM sets the id


def lora_rank(soup: Soup) -> int:
    """The smallest --max-lora-rank that holds the rank-concatenated adapter (sum of the backbones' r)."""
    rank = sum(json.loads((b / lora.ADAPTER_CONFIG).read_text())["r"] for b in soup.backbones)
    fits = [r for r in LORA_RANKS if r >= rank]
    if not fits:
        raise BoneSoupError(f"the soup's adapter has rank {rank}; vLLM serves LoRA ranks up to {LORA_RANKS[-1]}")
    return fits[0]
