"""Small reference models built from foveal's mixers, used by the quality benchmarks."""

from foveal.models.backbone import Backbone, Block, Classifier, Segmenter
from foveal.models.mixers import MIXERS, build_mixer, mixer_names

__all__ = ["Backbone", "Block", "Classifier", "Segmenter", "MIXERS", "build_mixer", "mixer_names"]
