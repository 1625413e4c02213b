"""The network: Keras 3 layers (one a file), backbones, heads (a registry), the
model and its costs.

Layers are written with keras.ops and registered for .keras files under the
package name "dplg_tf" (the names files written before the move use).
Imports: errors, config.
"""

PACKAGE = "dplg_tf"  # the registration package of every layer
