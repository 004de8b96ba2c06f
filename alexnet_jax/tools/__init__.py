"""The command-line tools, each a program (``python -m alexnet_jax.tools.NAME``) on the library.
The library never imports them; the one tool another tool imports is ``bench_torch``, the PyTorch
baseline that ``bench`` times beside the framework."""
