"""The one place lth_tf imports TensorFlow, Keras and tfmot.

tensorflow-model-optimization 0.8 works only with Keras 2, shipped as the
``tf_keras`` package. TensorFlow decides what ``tf.keras`` means from the
``TF_USE_LEGACY_KERAS`` environment variable when it is first imported, and
importing tfmot sets that variable silently, so the import order used to change
which Keras a program got. Every module of lth_tf imports Keras from here:

    from lth_tf.keras import keras, tf, tfmot

and so always gets ``tf_keras`` whatever was imported before.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import sys  # noqa: E402

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402


def _import_tfmot():
    # tfmot's prune_registry probes `from keras.src.engine import base_layer`: with
    # Keras 3 installed beside tf_keras that imports all of Keras 3 (and matplotlib
    # through it), about 1.5 s and 100 MB, only to fail with an ImportError (Keras 3
    # has no `engine`) and fall back. Blocking `keras` during tfmot's import takes
    # that same fallback at once; the block is lifted afterwards, so a user's own
    # `import keras` still works.
    blocked = "keras" not in sys.modules
    if blocked:
        sys.modules["keras"] = None  # `import keras` raises ImportError
    try:
        import tensorflow_model_optimization as tfmot
    finally:
        if blocked and sys.modules.get("keras", 0) is None:
            del sys.modules["keras"]
    return tfmot


tfmot = _import_tfmot()

if os.environ.get("TF_USE_LEGACY_KERAS") not in ("1", "true", "True"):
    raise ImportError(
        "lth_tf needs Keras 2 (tf_keras) because tensorflow-model-optimization "
        f"does, but TF_USE_LEGACY_KERAS={os.environ.get('TF_USE_LEGACY_KERAS')!r}. "
        "Unset it or set TF_USE_LEGACY_KERAS=1 before starting Python."
    )

if keras.__version__.split(".")[:2] != tf.__version__.split(".")[:2]:
    raise ImportError(
        f"tf_keras {keras.__version__} does not match tensorflow {tf.__version__}: "
        "their minor versions must agree. Reinstall with "
        "`pip install 'tf-keras~=<tensorflow major.minor>.0'` (see BUILD.md)."
    )

__all__ = ["keras", "tf", "tfmot"]
