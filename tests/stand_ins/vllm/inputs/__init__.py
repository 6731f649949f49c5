"""Stand-in for vllm.inputs (see ../README.md)."""

TokensPrompt = dict  # vllm's TokensPrompt is a TypedDict
