"""The papers' experiments as suites: named variants of one base config, trained over seeds and
reported beside the papers' figures (``python -m alexnet_jax.experiments``).

``suite`` defines what a suite is and checks it; ``papers`` holds the built-in suites (AlexNet's
ablations, Zeiler & Fergus's Table 3, VGG A-E, GoogLeNet's heads, ResNet plain vs residual);
``runner`` trains their runs, each an ordinary training workdir; ``report`` writes the table.
"""
