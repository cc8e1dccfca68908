"""Retrieval fine-tuning and evaluation on Flickr30K (ALBEF's Retrieval_flickr.yaml):
k_test 128, 10 epochs; otherwise as configs/retrieval_coco.py (see there).

ALBEF's zero-shot Flickr30K numbers come from the COCO-fine-tuned model: evaluate that
checkpoint with this config (--config.eval.checkpoint=COCO_FINETUNE_WORKDIR).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import retrieval_coco  # pylint: disable=wrong-import-position


def get_config(arg=None):
  return retrieval_coco.retrieval_config('flickr', arg)
