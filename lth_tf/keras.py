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

import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

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
