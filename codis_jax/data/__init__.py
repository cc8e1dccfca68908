"""codis_jax input pipeline: tf.data in, per-host numpy batches out.

    create_pipeline(data_config, split=..., global_batch_size=..., image_size=...,
                    text_len=..., train=..., seed=..., process_index=0,
                    process_count=1, state=None)
    load_retrieval_set(data_config_or_path, image_size, text_len)
    get_data_config(name)          'emoji' | 'fashion_mnist' | 'paper'
    ensure_prepared(name, data_dir)
    DataError
See docs/readme_data.md. TensorFlow is imported here only, never by the model code.
"""

from codis_jax.data.config import get_data_config
from codis_jax.data.errors import DataError
from codis_jax.data.pipeline import create_pipeline
from codis_jax.data.prepare import ensure_prepared
from codis_jax.data.retrieval import load_retrieval_set

__all__ = ['create_pipeline', 'load_retrieval_set', 'get_data_config', 'ensure_prepared',
           'DataError']
