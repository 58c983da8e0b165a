"""Trunks, embedders and poolings (GAP, GMP, XML prototypes, GSP). Importing registers them."""
from .embedder import Conv1x1Embedder
from .gsp import GeneralizedSumPooling, gsp_transport
from .pooling import GlobalAveragePooling, GlobalMaxPooling, Pooling, PoolingOutput
from .trunks import Trunk, freeze_batchnorm
from .xml_pooling import PrototypePooling

__all__ = ["Pooling", "PoolingOutput", "GlobalAveragePooling", "GlobalMaxPooling", "PrototypePooling",
           "GeneralizedSumPooling", "gsp_transport", "Trunk", "freeze_batchnorm", "Conv1x1Embedder"]
