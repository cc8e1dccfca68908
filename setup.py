"""codis_jax: CODIS vision-language pretraining in JAX/Flax."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / 'requirements.txt').read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith('#')]


setuptools.setup(
    name='codis_jax',
    version='0.1.0',
    description='CODIS (Multi-modal Alignment using Representation Codebook) in JAX/Flax',
    long_description=(_HERE / 'README.md').read_text() if (_HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['codis_jax', 'codis_jax.*', 'configs']),
    python_requires='>=3.10',
    install_requires=_requirements(),
    extras_require={
        # PyTorch interop (export/import, parity tests). Pinned: an unpinned torch pulls
        # a multi-GB CUDA build.
        'torch': ['torch==2.13.0'],
        'test': ['pytest==9.2.0', 'pytest-xdist==3.8.0', 'pot==0.9.7.post1',
                 'torch==2.13.0'],
    },
)
