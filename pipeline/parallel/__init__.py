"""How the plain model becomes a distributed training engine, applied from outside in one ordered
recipe (``parallelize.parallelize``): expert parallelism (``expert_parallel``, its token dispatch in
``ep_dispatch``), activation checkpointing, compilation, the optimizer and LR schedule (``optim``)
and DeepSpeed ZeRO (``deepspeed_config``); also the compiled inference recipe."""
