"""ImageNet input sharding: records each host reads, and training images/s per CPU core.

    python benchmarks/input_sharding.py [--images=256] [--files=16] [--shards=16]

On a fake ImageNet prepared with tfds (ImageNet's most common size, 500x375,
JPEGs of smooth random content in `--files` files), the training pipeline at
224 px (JPEG decode of the crop window, random-resized crop, flip, normalise) for
H = 1, 2 and 4 hosts, each an input pipeline of its own
`tf.distribute.InputContext` (what `distribute_datasets_from_function` gives
each worker), run one after the other in this process:

* with `--shards` virtual shards: the files each host opens and the records it
  reads per epoch (counted where the pipeline opens files, over 3 epochs);
* images/s per CPU core of each host's pipeline over `--epochs` epochs (without
  the counter): images over the process's CPU time (all threads), so the figure
  does not depend on how many cores the machine has or how busy it is; and how
  many such cores 3,000 images/s per accelerator would need;
* the same without shards (`input_shards=0`), where every host reads every record
  and keeps its share of each batch before decoding.
"""

import argparse
import collections
import io
import os
import sys
import tarfile
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from common import write  # noqa: E402

from lth_tf.data import imagenet  # noqa: E402
from lth_tf.keras import tf  # noqa: E402

SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361")
HEIGHT, WIDTH = 375, 500
TARGET_PER_ACCELERATOR = 3000  # images/s, the figure for one accelerator


def _jpeg(rng):
    """A JPEG of smooth random content (closer to a photo's size than noise)."""
    coarse = rng.normal(128, 60, size=(1, HEIGHT // 25, WIDTH // 25, 3))
    image = tf.image.resize(coarse, [HEIGHT, WIDTH], method="bicubic")[0]
    image += rng.normal(0, 12, size=(HEIGHT, WIDTH, 3))
    return tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8), quality=90)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def prepare(root, images, files):
    """A tfds preparation of a fake ImageNet of `images` training JPEGs in `files` files."""
    import tensorflow_datasets as tfds

    manual = os.path.join(root, "downloads", "manual")
    os.makedirs(manual)
    rng = np.random.default_rng(0)
    sizes = []
    with tarfile.open(os.path.join(manual, "ILSVRC2012_img_train.tar"), "w") as outer:
        for synset in SYNSETS:
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(images // len(SYNSETS)):
                    jpeg = _jpeg(rng).numpy()
                    sizes.append(len(jpeg))
                    _add(inner, f"{synset}_{i}.JPEG", jpeg)
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(os.path.join(manual, "ILSVRC2012_img_val.tar"), "w") as tar:
        for i in range(1, files + 1):
            _add(tar, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng).numpy())
    builder = tfds.builder("imagenet2012", data_dir=root)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual, num_shards=files)
    )
    return float(np.mean(sizes))


_counts = collections.Counter()


def _count(path, record):
    _counts[path.decode()] += 1
    return record


_read_file = imagenet.record_file_dataset


def _counting_reader(read_file):
    def counting(path):
        return read_file(path).map(
            lambda record: tf.numpy_function(_count, [path, record], tf.string, stateful=True)
        )

    return counting


def _context(hosts, host):
    return tf.distribute.InputContext(
        num_input_pipelines=hosts, input_pipeline_id=host, num_replicas_in_sync=hosts
    )


def records_read(data, batch, hosts, host, epochs):
    """(records one host's pipeline reads per epoch, files it opens).

    Counted from the end of a first epoch to the end of `epochs` more, so that the
    pipeline's read-ahead counts about as much at both ends.
    """
    steps = data.steps_per_epoch(batch)
    imagenet.record_file_dataset = _counting_reader(_read_file)
    try:
        _counts.clear()
        iterator = iter(data.train(batch, 0, 0, _context(hosts, host)))
        for _ in range(steps):
            next(iterator)
        read = sum(_counts.values())
        for _ in range(epochs * steps):
            next(iterator)
        return (sum(_counts.values()) - read) / epochs, len(_counts)
    finally:
        imagenet.record_file_dataset = _read_file


def speed(data, batch, hosts, host, epochs):
    """(images per CPU second, images/s wall) of one host's pipeline, after an epoch.

    Without the read counter (a Python call per record, about 10% of the time).
    """
    steps = data.steps_per_epoch(batch)
    iterator = iter(data.train(batch, 0, 0, _context(hosts, host)))
    for _ in range(steps):
        next(iterator)
    cpu, wall = time.process_time(), time.perf_counter()
    images = 0
    for _ in range(epochs * steps):
        x, _ = next(iterator)
        images += int(x.shape[0])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return images / cpu, images / wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        mean_jpeg = prepare(root, args.images, args.files)
        print(
            f"fake ImageNet: {args.images} JPEGs of {WIDTH}x{HEIGHT} (mean {mean_jpeg / 1e3:.0f} "
            f"kB) in {args.files} files, prepared in {time.perf_counter() - start:.0f} s"
        )
        rows = []
        for shards in (args.shards, 0):
            data = imagenet.ImageNetData(root, image_size=args.image_size, input_shards=shards)
            for hosts in (1, 2, 4):
                for host in range(hosts):
                    per_core, wall = speed(data, args.batch, hosts, host, args.epochs)
                    if shards:
                        read, opened = records_read(data, args.batch, hosts, host, 3)
                    row = {
                        "input_shards": shards,
                        "hosts": hosts,
                        "host": host,
                        "images_per_cpu_second": per_core,
                        "images_per_second_wall": wall,
                        "cores_for_3000_images_per_s": TARGET_PER_ACCELERATOR / per_core,
                    }
                    if shards:
                        row["records_read_per_epoch"] = read
                        row["records_read_per_epoch_over_share"] = read / (args.images / hosts)
                        row["files_opened"] = opened
                    rows.append(row)
                    reads = (
                        f"reads {read:6.1f} records/epoch "
                        f"({row['records_read_per_epoch_over_share']:.2f} x 1/H), "
                        f"{opened:2d} files"
                        if shards
                        else f"reads all {args.images} records/epoch"
                    )
                    print(
                        f"input_shards={shards:2d} H={hosts} host {host}: {reads}; "
                        f"{per_core:6.1f} images/s per core ({wall:6.1f}/s wall): "
                        f"{row['cores_for_3000_images_per_s']:4.1f} cores for "
                        f"{TARGET_PER_ACCELERATOR} images/s"
                    )
    write(
        "input_sharding",
        {
            "images": args.images,
            "files": args.files,
            "batch": args.batch,
            "epochs": args.epochs,
            "image_size": args.image_size,
            "jpeg_size": [WIDTH, HEIGHT],
            "mean_jpeg_bytes": mean_jpeg,
            "load_average": os.getloadavg(),
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
