"""Plain GeM (Radenovic et al.): F = GeM(X5); the attention is uniform."""

from dplg_tf.nn.layers import GeM, UniformAttention


def build(m, x4, x5):
    features = GeM(p=m.gem_p, trainable_p=m.gem_trainable, name="global_gem")(x5)
    return features, UniformAttention(name="attention")(x4)
