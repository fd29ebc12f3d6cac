"""lth_tf: lottery tickets at scale with TensorFlow, Keras 2 and tfmot.

Pins are ranges installed and tested together (see BUILD.md for why):
tensorflow 2.21 with tf-keras 2.21 (tfmot needs Keras 2; tf_keras must match
TensorFlow's minor version), tensorflow-model-optimization 0.8.x (which pins
absl-py~=1.2), tensorflow-datasets 4.9.x with importlib_resources.
"""

import re

from setuptools import find_packages, setup

with open("lth_tf/__init__.py") as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
with open("README.md") as f:
    README = f.read()

setup(
    name="lth_tf",
    version=VERSION,
    description="Lottery tickets at scale: IMP with rewinding, controls and stability "
    "analyses for TensorFlow/Keras",
    long_description=README,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lth_tf", "lth_tf.*"]),
    package_data={"lth_tf": ["data_files/*.npz", "data_files/*.md"]},
    include_package_data=True,
    install_requires=[
        # `tensorflow` (not tensorflow-cpu): tf-keras depends on the package of that name.
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "tensorflow-model-optimization>=0.8.1,<0.9",
        "tensorflow-datasets>=4.9.10,<4.10",
        "importlib_resources",  # tensorflow/datasets#11212: tfds imports it unconditionally
        "tensorboard>=2.21,<2.22",  # tf.summary; TensorFlow 2.21 no longer installs it
        "absl-py~=1.2",  # tfmot's pin
        "numpy>=1.26",
        "matplotlib>=3.7",
    ],
    extras_require={
        # LiteRT's interpreter, which evaluates the TFLite files when installed (else
        # tf.lite's, which TensorFlow deprecates in its favour); the tests load the files in it.
        "test": ["pytest>=8", "ruff==0.17.6", "ai-edge-litert>=2.3.0,<2.4"],
        "litert": ["ai-edge-litert>=2.3.0"],
        # TPUClusterResolver needs it to look up a TPU by name (--tpu=NAME); on a TPU VM
        # (--tpu=local) the TPU runtime comes with the tensorflow-tpu wheel, see BUILD.md.
        "tpu": ["cloud-tpu-client>=0.10"],
    },
    entry_points={
        "console_scripts": [
            "lth-imp=lth_tf.imp:run",
            "lth-report=lth_tf.report:run",
            "lth-stability=lth_tf.stability:run",
            "lth-export=lth_tf.export:run",
            "lth-branch=lth_tf.branch:run",
        ]
    },
)
