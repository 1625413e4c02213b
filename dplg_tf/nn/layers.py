"""Every Keras layer of the package, by name: importing this module registers
them all for .keras files (each layer lives in its own module of dplg_tf.nn).

Shapes are channels-last: images and feature maps are (B, H, W, C).
"""

from dplg_tf.nn.arcface import ArcFaceMargin
from dplg_tf.nn.dot_product_fusion import DotProductFusion
from dplg_tf.nn.gem import GeM
from dplg_tf.nn.min_size_check import MinSizeCheck
from dplg_tf.nn.orthogonal_fusion import OrthogonalFusion
from dplg_tf.nn.preprocessing import ImagePreprocessing
from dplg_tf.nn.regional_gem import RegionalGeM
from dplg_tf.nn.rfb import ReceptiveFieldBlock
from dplg_tf.nn.uniform_attention import UniformAttention
from dplg_tf.nn.whitening import Whitening

__all__ = ["ArcFaceMargin", "DotProductFusion", "GeM", "ImagePreprocessing", "MinSizeCheck",
           "OrthogonalFusion", "ReceptiveFieldBlock", "RegionalGeM", "UniformAttention", "Whitening"]
