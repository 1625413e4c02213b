"""Extraction-time refinements of the descriptor (SuperGlobal, Shao et al.,
ICCV 2023), each off by default so that the paper's descriptor stays the
default. They change no weight:

- `scale_aggregation`: "mean" (the paper: the mean of the L2-normalised
  scale descriptors) or "max" (their element-wise maximum, SuperGlobal's
  scale-GeM with p = infinity); either is L2-normalised again;
- `regional_gem`: nn.RegionalGeM on X5 before the global GeM (power
  `regional_p`, window `regional_size`);
- `gem_p` (GeM+): the power of the global GeM at extraction, instead of the
  one the model was trained with (dplg_tf.retrieval.gem_plus chooses it on
  training records).

`refined(model, r)` is the model with its `global_gem` layer so changed
(every other layer shared, weights and all); the export records `r` in the
SavedModel, and its probe descriptor differs from the plain model's, so
descriptor files of different settings never mix.
"""

import dataclasses
import json
import math

from dplg_tf.errors import UserError

AGGREGATIONS = ("mean", "max")
GLOBAL_GEM = "global_gem"   # the heads' pooling of X5 (dplg_tf.nn.heads)


@dataclasses.dataclass(frozen=True)
class Refinements:
    scale_aggregation: str = "mean"
    regional_gem: bool = False
    regional_p: float = 2.5
    regional_size: int = 5
    gem_p: float | None = None

    def __post_init__(self):
        if self.scale_aggregation not in AGGREGATIONS:
            raise UserError(f"--scale_aggregation={self.scale_aggregation!r} is unknown; use "
                            "mean or max.")
        if not (math.isfinite(self.regional_p) and 0 < self.regional_p <= 100
                and 1 <= int(self.regional_size) <= 15):
            raise UserError(f"Regional GeM needs 0 < p <= 100 and a window of 1 to 15, got "
                            f"p={self.regional_p}, window {self.regional_size}.")
        if self.gem_p is not None and not (math.isfinite(self.gem_p) and 0 < self.gem_p <= 100):
            raise UserError(f"The GeM power must be in (0, 100], got {self.gem_p}.")

    @property
    def changes_model(self):
        return self.regional_gem or self.gem_p is not None

    def to_json(self):
        fields = {"scale_aggregation": self.scale_aggregation, "gem_p": self.gem_p,
                  "regional_gem": self.regional_gem}
        if self.regional_gem:
            fields.update(regional_p=self.regional_p, regional_size=self.regional_size)
        return json.dumps(fields, sort_keys=True)


NONE = Refinements()


def trained_gem_p(model):
    """The power of `model`'s global GeM (the trained or configured value)."""
    return float(model.get_layer(GLOBAL_GEM).p.numpy())


def refined(model, refinements):
    """`model` with its global GeM refined (a new functional model sharing
    every other layer), or `model` itself when nothing changes it."""
    import keras

    from dplg_tf.nn.layers import GeM, RegionalGeM

    if not refinements.changes_model:
        return model
    try:
        gem = model.get_layer(GLOBAL_GEM)
    except ValueError:
        raise UserError(f"The model has no {GLOBAL_GEM!r} layer, so regional GeM and "
                        "--gem_p cannot be applied; export it without them.") from None

    def call(layer, *args, **kwargs):
        if layer is not gem:
            return layer(*args, **kwargs)
        x = args[0]
        if refinements.regional_gem:
            x = RegionalGeM(refinements.regional_p, refinements.regional_size,
                            name="regional_gem")(x)
        if refinements.gem_p is None:
            return gem(x)
        return GeM(p=refinements.gem_p, eps=gem.eps, name=GLOBAL_GEM)(x)

    return keras.models.clone_model(model, clone_function=lambda layer: layer,
                                    call_function=call)
