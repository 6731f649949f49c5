"""The plugin's stand-in `flash_attn_2_cuda` (integration/imports.py) in every subprocess and Ray worker of the tests.

tests/conftest.py names this folder in PYTHONPATH, so processes that import openrlhf.models without going
through the plugin (OpenRLHF's own `serve_rm`, Ray workers of the reward-path tests) can import flash_attn
on this CPU machine. The finder comes last on sys.meta_path: a real module always wins. (During the tests
this shadows a distribution's own sitecustomize, if the Python has one.)
"""

from openrlhf_bonesoup.integration.imports import provide_flash_attn_2_cuda

provide_flash_attn_2_cuda()
