"""Fine-tuning a pretrained Time-MoE on one benchmark dataset: the data a fine-tuning run may see
(``data``: the dataset's TRAIN split only, scaled as the zero-shot protocol scales it) and the
paper's in-distribution protocol (``protocol``: fine-tune, then evaluate on the test split with
the zero-shot protocol's code). Which weights train is ``pipeline.train.adapters``."""
