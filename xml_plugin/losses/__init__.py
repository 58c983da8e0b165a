"""Loss wrappers (XML cross-batch, zero-shot, XBN memory) and the shared ridge routine. Importing registers them."""
from .cross_batch import CrossBatchMetricLoss
from .ridge import ridge_fit_predict
from .xbn import AdaptiveCrossBatchNormMemory, CrossBatchNormMemory
from .zero_shot import ZeroShotLoss

__all__ = ["ridge_fit_predict", "CrossBatchMetricLoss", "ZeroShotLoss", "CrossBatchNormMemory",
           "AdaptiveCrossBatchNormMemory"]
