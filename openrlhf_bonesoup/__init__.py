"""Bone Soup (Xie et al., ACL 2025, arXiv 2502.10762) for OpenRLHF.

Stages, one module each: coefficients (B, lambda), soup (the manifest), and the OpenRLHF seams in
integration/. Nothing at this level imports openrlhf or torch.
"""

__version__ = "0.1.0"
