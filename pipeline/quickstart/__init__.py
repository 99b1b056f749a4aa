"""The one-machine quickstart (``python -m jobs.pipeline``): corpus -> preprocessing -> pretraining
-> zero-shot evaluation -> registry, as stages that hand over through durable locations only
(``stages``), configured by one typed YAML (``config``)."""
