"""The demos, not the library: `openrlhf-bonesoup demo` (recipe.py), `demo --analytic` (analytic.py) and
`openrlhf-bonesoup tiny` (tiny.py, also the tests' checkpoint builders). No core module imports them."""
