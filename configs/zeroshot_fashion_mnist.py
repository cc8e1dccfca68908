"""Zero-shot Fashion-MNIST classification of a checkpoint with caption templates.

  python -m codis_jax.evaluate --config=configs/zeroshot_fashion_mnist.py \
      --config.eval.checkpoint=PATH --workdir=DIR [--config.eval.zeroshot.use_itm=True]

Each class is the text template.format(name) ("a photo of a t-shirt", ...); top-1
accuracy by ITC similarity (and, with use_itm, by the ITM match score over the ten
classes). The bundled Fashion-MNIST set (Debian package dataset-fashion-mnist) is
prepared on first use; eval.max_images > 0 evaluates the first N test images only.
Variants as configs/retrieval_coco.py (the model architecture comes from the checkpoint).
"""

import os
import sys

import ml_collections

# The repository root, so that this file also loads from another working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import retrieval_coco  # pylint: disable=wrong-import-position


def get_config(arg=None):
  c = retrieval_coco.retrieval_config('coco', arg)
  c.data.name = 'fashion_mnist'
  c.eval.task = 'zeroshot'
  c.eval.params = 'student'
  c.eval.zeroshot = ml_collections.ConfigDict(dict(template='a photo of a {}', use_itm=False))
  return c
