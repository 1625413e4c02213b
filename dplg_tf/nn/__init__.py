"""The network: Keras 3 layers, one a file (gem, regional_gem, rfb,
dot_product_fusion, orthogonal_fusion, arcface, whitening, preprocessing,
min_size_check, uniform_attention; all named in layers), backbones (the
registry) and PyTorch weights copied into them (torch_weights), heads (a
registry), the model and its costs.

Layers are written with keras.ops and registered for .keras files under the
package name "dplg_tf" (the names files written before the move use).
Imports: errors, config.
"""

PACKAGE = "dplg_tf"  # the registration package of every layer
