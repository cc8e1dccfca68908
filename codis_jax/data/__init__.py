"""codis_jax input pipeline: tf.data in, per-host numpy batches out.

    create_pipeline(data_config, split=..., global_batch_size=..., image_size=...,
                    text_len=..., train=..., seed=..., process_index=0,
                    process_count=1, state=None)
    load_retrieval_set(data_config_or_path, image_size, text_len)
    get_data_config(name)          'emoji' | 'fashion_mnist' | 'paper'
    ensure_prepared(name, data_dir)
    DataError
See the README, "Input pipeline". TensorFlow is imported here only, never by the model code.

The names load lazily, so that the data worker processes (codis_jax.data.workers), which
import this package, never import TensorFlow.
"""

import importlib

_EXPORTS = {'create_pipeline': 'pipeline', 'load_retrieval_set': 'retrieval',
            'get_data_config': 'config', 'ensure_prepared': 'prepare', 'DataError': 'errors'}
__all__ = list(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'codis_jax.data.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
