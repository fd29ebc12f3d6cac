"""lth_tf: lottery tickets at scale with TensorFlow, Keras 2 and tfmot.

Importing the package sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow can be
imported through it, because tensorflow-model-optimization only works with
Keras 2 (``tf_keras``). See ``lth_tf/keras.py``.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__version__ = "0.1.0"

# The on-disk format of a run directory. Bump when files change meaning; runs
# written with another format version are refused with a clear error.
FORMAT_VERSION = 1
