"""Time-MoE in plain PyTorch: ``from model import TimeMoeConfig, TimeMoeModel``."""
from model.config import TimeMoeConfig
from model.forecast import horizon_schedule
from model.modeling import TimeMoeModel, TimeMoeOutput

TimeMoeForPrediction = TimeMoeModel  # the published architecture name

__all__ = ["TimeMoeConfig", "TimeMoeModel", "TimeMoeForPrediction", "TimeMoeOutput", "horizon_schedule"]
