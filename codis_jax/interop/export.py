"""Export a codis_jax checkpoint for PyTorch.

  python -m codis_jax.interop.export --checkpoint=WORKDIR_OR_STEP_DIR --out=DIR \
      [--formats=albef,hf]
  python -m codis_jax.main --mode=export --config=configs/pretrain.py --workdir=WORKDIR
      (the newest checkpoint of a training workdir into WORKDIR/export/, both formats)

Writes under DIR:
  albef.safetensors   ALBEF's pretraining state dict (+ `codebook`), safetensors
  albef.pth           the same tensors as {'model': state_dict} (ALBEF's checkpoint form;
                      tensors only, so `torch.load(..., weights_only=True)` reads it)
  hf_vit/             transformers ViTModel (config.json + model.safetensors)
  hf_bert/            transformers BertModel: embeddings + the unimodal text layers
Only the parameters are needed; the teacher (`*_m` keys) and the queues are exported when
the checkpoint has them.
"""

import os
import sys

import numpy as np

from codis_jax.interop import albef, hf

FORMATS = ('albef', 'hf')


def save_albef(state_dict: dict, out_dir: str, pth: bool = True) -> list:
  """albef.safetensors, then (needs torch) albef.pth as {'model': state_dict}."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, 'albef.safetensors')]
  hf.write_safetensors(state_dict, paths[0])
  if pth:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      print('torch is not installed: wrote albef.safetensors only '
            '(pip install codis_jax[torch] for albef.pth)', file=sys.stderr)
      return paths
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
    paths.append(os.path.join(out_dir, 'albef.pth'))
    torch.save({'model': tensors}, paths[-1])
  return paths


def export_state(raw: dict, out_dir: str, formats=FORMATS) -> list:
  """raw: `restore_raw`'s {'state': {...}, 'config': ConfigDict}. Returns written paths."""
  unknown = set(formats) - set(FORMATS)
  if unknown:
    raise ValueError(f'unknown export format(s) {sorted(unknown)}; choose from {FORMATS}')
  st, model_config = raw['state'], raw['config'].model
  params = st['params']
  written = []
  if 'albef' in formats:
    ptr = st.get('queue_ptr')
    sd = albef.to_albef_state_dict(
        params, st.get('ema_params'), st.get('image_queue'), st.get('text_queue'),
        None if ptr is None else np.asarray(ptr), model_config)
    written += save_albef({k: np.asarray(v) for k, v in sd.items()}, out_dir)
    if model_config.get('gelu', 'erf') == 'tanh':
      # A state dict cannot say which GELU its model used; ALBEF's code uses the exact one.
      print('note: this model was trained with the tanh GELU (model.gelu=tanh); ALBEF\'s '
            "code computes the exact one: use nn.GELU(approximate='tanh') to reproduce it "
            '(the HF configs already name gelu_pytorch_tanh)', file=sys.stderr)
  if 'hf' in formats:
    written.append(hf.to_hf_vit(params, model_config, os.path.join(out_dir, 'hf_vit')))
    written.append(hf.to_hf_bert(params, model_config, os.path.join(out_dir, 'hf_bert')))
  return written


def export_checkpoint(checkpoint: str, out_dir: str, formats=FORMATS) -> list:
  # Imported here: the checkpoint module pulls in Orbax, which the pure mapping never needs.
  from codis_jax.checkpoint import restore_raw  # pylint: disable=g-import-not-at-top
  return export_state(restore_raw(checkpoint), out_dir, formats)


def run(config, workdir):
  """codis_jax.main's `--mode=export`: WORKDIR's newest checkpoint -> WORKDIR/export/.

  The architecture comes from the checkpoint's own config; `config` is not used.
  """
  del config
  for path in export_checkpoint(workdir, os.path.join(workdir, 'export')):
    print(path, flush=True)
  return 0


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  for path in export_checkpoint(f.checkpoint, f.out, tuple(f.formats)):
    print(path)


def _define_flags():
  # Defined only when run as a program, so importing this module never clashes with the
  # flags of the program that imports it.
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('checkpoint', None, 'workdir or checkpoint step directory')
  flags.DEFINE_string('out', None, 'output directory')
  flags.DEFINE_list('formats', list(FORMATS), f'any of {FORMATS}')
  flags.mark_flags_as_required(['checkpoint', 'out'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
