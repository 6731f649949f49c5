"""Puts the CPU stand-ins (tests/stand_ins) on sys.path *after* site-packages, in subprocesses and Ray workers.

tests/conftest.py names this folder in PYTHONPATH: Python imports `sitecustomize` once its site
directories are all on sys.path, so appending here keeps every installed module (a real vllm) first.
The stand-ins folder itself in PYTHONPATH would come before site-packages and shadow a real module.
(During the tests this shadows a distribution's own sitecustomize, if the Python has one.)
"""

import os
import sys

_stand_ins = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _stand_ins not in sys.path:
    sys.path.append(_stand_ins)
