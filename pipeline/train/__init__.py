"""Training: the loop (``loop.run_training``), the runtimes that host it (``ray_runtime`` under Ray
Train, ``torchrun`` without Ray), the packed-window data loaders (``data``), checkpoints and resume
(``checkpoint``), step profiling (``profiling``)."""
