"""Stand-in for flash-attn's compiled CUDA extension (see README.md): empty on purpose.

On CPU, OpenRLHF only uses flash_attn.bert_padding (pure PyTorch); any call into the CUDA
kernels would fail with AttributeError here, which is what a CPU test must see.
"""

STAND_IN = True
