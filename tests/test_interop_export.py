"""PyTorch export: HF towers and the ALBEF layout reproduce the JAX model; paper key set.

The PyTorch references below (a timm ViT and ALBEF's BERT layers) are written here from
ALBEF's published code and read weights by ALBEF key names only.
"""

import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
F = torch.nn.functional

from codis_jax import state as state_lib  # noqa: E402
from codis_jax.interop import albef, export, hf, mapping  # noqa: E402
from codis_jax.models import codis  # noqa: E402
from configs import pretrain  # noqa: E402
from conftest import make_batch  # noqa: E402

TOL = 1e-4
# The state-dict keys of ALBEF's released checkpoint, in order (a copy of the project's
# shared/reference/albef-state-dict-keys.txt, so the test never depends on that folder).
_REF_KEYS = os.path.join(os.path.dirname(__file__), 'data', 'albef_state_dict_keys.txt')


def small_config():
  """Tiny, with different image and text widths so that cross-attention k/v are not square."""
  c = pretrain.get_config('tiny')
  c.model.update(vit_width=48, vit_heads=4, vit_mlp_dim=96, text_width=64, text_heads=4,
                 text_mlp_dim=128)
  return c


def random_params(config, seed, only=None):
  """Random values of the model's shapes (no XLA compile): every weight, bias and
  LayerNorm offset non-zero, LayerNorm scales near 1."""
  abstract = nn.meta.unbox(jax.eval_shape(lambda r: state_lib.init_params(config, r),
                                          jax.random.key(0)))
  abstract = only(abstract) if only else abstract
  rng = np.random.default_rng(seed)
  leaf = lambda path, x: (path[-1].key == 'scale') + 0.05 * rng.standard_normal(x.shape, np.float32)
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def unit_queue(rs, q, e):
  x = rs.randn(q, e).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope='module')
def setup():
  return make_setup(small_config())


def make_setup(c):
  params = random_params(c, 1)
  ema = random_params(c, 2, only=state_lib.teacher_subset)
  rs = np.random.RandomState(3)
  iq, tq = (unit_queue(rs, c.queue_size, c.model.embed_dim) for _ in range(2))
  batch = make_batch(c, batch_size=3)
  model = codis.build_model(c.model, train=False)
  fwd = jax.jit(lambda p, b: _forward(model, p, b))  # one compile serves every param set
  return types.SimpleNamespace(c=c, params=params, ema=ema, iq=iq, tq=tq, ptr=np.int32(8),
                               batch=batch, fwd=fwd)


def _forward(model, params, batch):
  v = {'params': params}
  img, img_feat = model.apply(v, batch['image'], method=codis.CODIS.encode_image)
  txt, txt_feat = model.apply(v, batch['text_ids'], batch['text_mask'],
                              method=codis.CODIS.encode_text)
  fused = model.apply(v, txt, batch['text_mask'], img, method=codis.CODIS.fuse)
  return dict(image=img, image_feat=img_feat, text=txt, text_feat=txt_feat, fused=fused,
              itm=model.apply(v, fused, method=codis.CODIS.itm_logits),
              mlm=model.apply(v, fused, method=codis.CODIS.mlm_logits))


def jax_forward(s, params):
  return jax.tree.map(np.asarray, s.fwd(params, s.batch))


def maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a) - (b.detach().numpy() if hasattr(b, 'detach') else b))))


# --------------------------------------------------- PyTorch references by ALBEF key names

def _lin(sd, k, x):
  return x @ sd[k + '.weight'].T + sd[k + '.bias']


def _ln(sd, k, x, eps):
  return F.layer_norm(x, x.shape[-1:], sd[k + '.weight'], sd[k + '.bias'], eps)


def timm_vit(sd, p, images_nhwc, heads, patch, eps=1e-6):
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
  x = F.conv2d(x, sd[p + 'patch_embed.proj.weight'], sd[p + 'patch_embed.proj.bias'],
               stride=patch).flatten(2).transpose(1, 2)
  b, n, d = x.shape
  x = torch.cat([sd[p + 'cls_token'].expand(b, -1, -1), x], 1) + sd[p + 'pos_embed']
  i = 0
  while f'{p}blocks.{i}.norm1.weight' in sd:
    k = f'{p}blocks.{i}.'
    qkv = _lin(sd, k + 'attn.qkv', _ln(sd, k + 'norm1', x, eps))
    q, kk, v = qkv.reshape(b, n + 1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    att = ((q @ kk.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
    x = x + _lin(sd, k + 'attn.proj', (att @ v).transpose(1, 2).reshape(b, n + 1, d))
    x = x + _lin(sd, k + 'mlp.fc2', F.gelu(_lin(sd, k + 'mlp.fc1', _ln(sd, k + 'norm2', x, eps))))
    i += 1
  return _ln(sd, p + 'norm', x, eps)


def _mha(sd, k, x, kv, heads, add_mask):
  b, t, d = x.shape
  split = lambda y: y.reshape(b, y.shape[1], heads, d // heads).transpose(1, 2)
  q = split(_lin(sd, k + '.self.query', x))
  kk, v = split(_lin(sd, k + '.self.key', kv)), split(_lin(sd, k + '.self.value', kv))
  att = (q @ kk.transpose(-2, -1) / (d // heads) ** 0.5 + add_mask).softmax(-1)
  return _lin(sd, k + '.output.dense', (att @ v).transpose(1, 2).reshape(b, t, d))


def albef_bert_layer(sd, k, x, add_mask, heads, image=None, eps=1e-12):
  """ALBEF's xbert layer: self-attention, cross-attention (fusion only, image unmasked), MLP."""
  x = _ln(sd, k + 'attention.output.LayerNorm',
          x + _mha(sd, k + 'attention', x, x, heads, add_mask), eps)
  if image is not None:
    x = _ln(sd, k + 'crossattention.output.LayerNorm',
            x + _mha(sd, k + 'crossattention', x, image, heads, 0.0), eps)
  h = F.gelu(_lin(sd, k + 'intermediate.dense', x))
  return _ln(sd, k + 'output.LayerNorm', x + _lin(sd, k + 'output.dense', h), eps)


def albef_forward(sd, m, batch, suffix=''):
  """ALBEF's pretraining forward pieces, from an ALBEF-layout state dict."""
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
  out = {'image': timm_vit(sd, f'visual_encoder{suffix}.', batch['image'], m.vit_heads,
                           m.patch_size)}
  t = f'text_encoder{suffix}.'
  ids = torch.from_numpy(batch['text_ids']).long()
  mask = torch.from_numpy(batch['text_mask']).float()
  add_mask = ((1.0 - mask) * -10000.0)[:, None, None, :]  # ALBEF's extended mask
  e = t + 'bert.embeddings.'
  pos = sd[e + 'position_ids'][:, :ids.shape[1]]
  x = (F.embedding(ids, sd[e + 'word_embeddings.weight'])
       + F.embedding(pos, sd[e + 'position_embeddings.weight'])
       + F.embedding(torch.zeros_like(ids), sd[e + 'token_type_embeddings.weight']))
  x = _ln(sd, e + 'LayerNorm', x, 1e-12)
  for i in range(m.text_layers + m.fusion_layers):
    if i == m.text_layers:
      out['text'] = x
    img = out['image'] if i >= m.text_layers else None
    x = albef_bert_layer(sd, f'{t}bert.encoder.layer.{i}.', x, add_mask, m.text_heads, img)
  out['fused'] = x
  out['image_feat'] = F.normalize(_lin(sd, 'vision_proj' + suffix, out['image'][:, 0]), dim=-1)
  out['text_feat'] = F.normalize(_lin(sd, 'text_proj' + suffix, out['text'][:, 0]), dim=-1)
  if not suffix:
    out['itm'] = _lin(sd, 'itm_head', x[:, 0])
  c = t + 'cls.predictions.'
  h = _ln(sd, c + 'transform.LayerNorm', F.gelu(_lin(sd, c + 'transform.dense', x)), 1e-12)
  out['mlm'] = _lin(sd, c + 'decoder', h)
  return out


# ------------------------------------------------------------------------------- tests

def test_hf_vit_and_bert_reproduce_the_jax_towers(setup, tmp_path):
  check_hf_towers(setup, tmp_path)


def test_hf_export_of_a_tanh_gelu_model_reproduces_it(tmp_path):
  # model.gelu='tanh' (the gpu variant's) exports as HF's 'gelu_pytorch_tanh'; with the
  # exact GELU's 'gelu' the towers would differ by up to ~4.8e-4 per activation.
  c = small_config()
  c.model.gelu = 'tanh'
  vit_cfg, bert_cfg = check_hf_towers(make_setup(c), tmp_path)
  assert vit_cfg.hidden_act == bert_cfg.hidden_act == 'gelu_pytorch_tanh'


def check_hf_towers(s, tmp_path):
  """Exports s.params as HF towers, runs them, compares with the JAX towers; -> configs."""
  m = s.c.model
  want = jax_forward(s, s.params)
  vit_dir = hf.to_hf_vit(s.params, m, str(tmp_path / 'vit'))
  vit, info = transformers.ViTModel.from_pretrained(vit_dir, add_pooling_layer=False,
                                                    output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert vit.config.layer_norm_eps == 1e-6 and not vit.training
  pixels = torch.from_numpy(s.batch['image']).permute(0, 3, 1, 2)
  with torch.no_grad():
    got = vit(pixel_values=pixels).last_hidden_state
  d_vit = maxdiff(want['image'], got)

  bert_dir = hf.to_hf_bert(s.params, m, str(tmp_path / 'bert'))
  bert, info = transformers.BertModel.from_pretrained(bert_dir, add_pooling_layer=False,
                                                      output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  with torch.no_grad():
    got = bert(input_ids=torch.from_numpy(s.batch['text_ids']).long(),
               attention_mask=torch.from_numpy(s.batch['text_mask']).long()).last_hidden_state
  d_bert = maxdiff(want['text'], got)
  print(f'max abs diff: HF ViT {d_vit:.2e}, HF BERT {d_bert:.2e}')
  assert d_vit <= TOL and d_bert <= TOL
  return vit.config, bert.config


def test_albef_layout_reproduces_fusion_itm_mlm_and_teacher(setup):
  s, m = setup, setup.c.model
  sd = albef.to_albef_state_dict(s.params, s.ema, s.iq, s.tq, s.ptr, m)
  for suffix, params in (('', s.params), ('_m', {**s.params, **s.ema})):
    want = jax_forward(s, params)
    with torch.no_grad():
      got = albef_forward(sd, m, s.batch, suffix)
    diffs = {k: maxdiff(want[k], v) for k, v in got.items()}
    print(f'max abs diff, ALBEF layout{suffix or " (student)"}:',
          {k: f'{v:.1e}' for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs


def test_albef_files_round_trip(setup, tmp_path):
  s, m = setup, setup.c.model
  sd = albef.to_albef_state_dict(s.params, s.ema, s.iq, s.tq, s.ptr, m)
  paths = export.save_albef({k: np.asarray(v) for k, v in sd.items()}, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['albef.safetensors', 'albef.pth']
  from safetensors.torch import load_file
  st = load_file(paths[0])
  pth = torch.load(paths[1], weights_only=True)  # tensors only: the safe loader accepts it
  assert set(pth) == {"model"} and list(pth["model"]) == list(sd) and set(st) == set(sd)
  for k, v in sd.items():
    assert np.array_equal(st[k].numpy(), v) and np.array_equal(pth['model'][k].numpy(), v), k
  t = pth['model']
  assert t['queue_ptr'].dtype == torch.int64 and t['queue_ptr'].tolist() == [8]
  assert t['temp'].shape == () and t['codebook'].shape == (m.codebook_size, m.embed_dim)
  assert t['image_queue'].shape == (m.embed_dim, s.c.queue_size)
  assert torch.allclose(t['image_queue'].norm(dim=0), torch.ones(s.c.queue_size))
  pid = t['text_encoder.bert.embeddings.position_ids']
  assert pid.dtype == torch.int64 and pid.tolist() == [list(range(m.max_positions))]
  for p in ('text_encoder', 'text_encoder_m'):  # tied pairs hold identical values
    c = p + '.cls.predictions.'
    assert torch.equal(t[c + 'decoder.weight'], t[p + '.bert.embeddings.word_embeddings.weight'])
    assert torch.equal(t[c + 'decoder.bias'], t[c + 'bias'])
  # ... and the inverse mapping gives back every array exactly.
  back = albef.from_albef_state_dict({'model': st}, m)
  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert same(back['params'], s.params) and same(back['ema_params'], s.ema)
  assert np.array_equal(back['image_queue'], s.iq) and np.array_equal(back['text_queue'], s.tq)
  assert back['queue_ptr'] == 8
  # ALBEF's own checkpoints (no codebook here; no teacher/queues in fine-tuned ones).
  plain = {k: v for k, v in st.items() if k != 'codebook' and '_m.' not in k
           and not k.startswith(('image_queue', 'text_queue', 'queue_ptr'))}
  with pytest.raises(ValueError, match='image_queue: missing from the ALBEF state dict'):
    albef.from_albef_state_dict(plain, m)
  part = albef.from_albef_state_dict(plain, m, strict=False)
  assert 'codebook' not in part['params'] and part['ema_params'] is None
  assert same(part['params']['visual_encoder'], s.params['visual_encoder'])
  st['text_encoder.cls.predictions.decoder.bias'] += 1  # a broken tie is reported
  with pytest.raises(ValueError, match='decoder.bias differs'):
    albef.from_albef_state_dict(st, m)


def test_export_command_on_an_orbax_checkpoint(setup, tmp_path):
  """End to end: a checkpoint written by codis_jax.checkpoint, exported by the command."""
  from codis_jax import checkpoint
  s = setup
  state = {'step': np.int32(5), 'params': s.params, 'ema_params': s.ema,
           'opt_state': {'count': np.int32(5)}, 'image_queue': s.iq, 'text_queue': s.tq,
           'queue_ptr': np.int32(8)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'workdir' / 'checkpoints'), async_save=False)
  ckpt.save(5, state, {'note': 'test'}, s.c)
  ckpt.close()
  out = tmp_path / 'out'
  r = subprocess.run([sys.executable, '-m', 'codis_jax.interop.export',
                      f'--checkpoint={tmp_path / "workdir"}', f'--out={out}'],
                     capture_output=True, text=True,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['albef.pth', 'albef.safetensors', 'hf_bert', 'hf_vit']
  assert sorted(os.listdir(out / 'hf_vit')) == ['config.json', 'model.safetensors']
  from safetensors.numpy import load_file
  got = load_file(str(out / 'albef.safetensors'))
  want = albef.to_albef_state_dict(s.params, s.ema, s.iq, s.tq, s.ptr, s.c.model)
  assert set(got) == set(want) and all(np.array_equal(got[k], v) for k, v in want.items())
  with pytest.raises(ValueError, match='unknown export format'):
    export.export_state({'state': state, 'config': s.c}, str(out), ('onnx',))


def expected_paper_keys(D=768, depth=12, n_text=6, n_fusion=6, mlp=3072, vocab=30522,
                        max_pos=512, E=256, Q=65536, grid=16, p=16, K=4000):
  """ALBEF's pretraining keys and shapes, written from its published layout."""
  keys = {'temp': (), 'image_queue': (E, Q), 'text_queue': (E, Q), 'queue_ptr': (1,)}
  lin = lambda k, o, i: {k + '.weight': (o, i), k + '.bias': (o,)}
  ln = lambda k: {k + '.weight': (D,), k + '.bias': (D,)}

  def vit(pre):
    out = {pre + 'cls_token': (1, 1, D), pre + 'pos_embed': (1, 1 + grid * grid, D),
           pre + 'patch_embed.proj.weight': (D, 3, p, p), pre + 'patch_embed.proj.bias': (D,)}
    for i in range(depth):
      b = f'{pre}blocks.{i}.'
      out.update({**ln(b + 'norm1'), **lin(b + 'attn.qkv', 3 * D, D), **lin(b + 'attn.proj', D, D),
                  **ln(b + 'norm2'), **lin(b + 'mlp.fc1', mlp, D), **lin(b + 'mlp.fc2', D, mlp)})
    return {**out, **ln(pre + 'norm')}

  def bert(pre):
    e = pre + 'bert.embeddings.'
    out = {e + 'position_ids': (1, max_pos), e + 'word_embeddings.weight': (vocab, D),
           e + 'position_embeddings.weight': (max_pos, D),
           e + 'token_type_embeddings.weight': (2, D), **ln(e + 'LayerNorm')}
    for i in range(n_text + n_fusion):
      b = f'{pre}bert.encoder.layer.{i}.'
      for a in ('attention', 'crossattention') if i >= n_text else ('attention',):
        for n in ('query', 'key', 'value'):
          out.update(lin(f'{b}{a}.self.{n}', D, D))
        out.update({**lin(f'{b}{a}.output.dense', D, D), **ln(f'{b}{a}.output.LayerNorm')})
      out.update({**lin(b + 'intermediate.dense', mlp, D), **lin(b + 'output.dense', D, mlp),
                  **ln(b + 'output.LayerNorm')})
    c = pre + 'cls.predictions.'
    return {**out, c + 'bias': (vocab,), **lin(c + 'transform.dense', D, D),
            **ln(c + 'transform.LayerNorm'), **lin(c + 'decoder', vocab, D)}

  for s in ('', '_m'):
    keys.update({**vit(f'visual_encoder{s}.'), **bert(f'text_encoder{s}.'),
                 **lin('vision_proj' + s, E, D), **lin('text_proj' + s, E, D)})
  keys.update({**lin('itm_head', 2, D), 'codebook': (K, E)})
  return keys


def test_paper_albef_keys_and_shapes():
  c = pretrain.get_config('paper')
  abstract = nn.meta.unbox(jax.eval_shape(lambda r: state_lib.init_params(c, r),
                                          jax.random.key(0)))
  q = jax.ShapeDtypeStruct((c.queue_size, c.model.embed_dim), jnp.float32)
  ptr = jax.ShapeDtypeStruct((), jnp.int32)
  with pytest.warns(UserWarning, match='int64'):  # abstract int64 needs x64; the real is int64
    got = jax.eval_shape(
        lambda p, e, a, b, r: albef.to_albef_state_dict(p, e, a, b, r, c.model),
        abstract, state_lib.teacher_subset(abstract), q, q, ptr)
  want = expected_paper_keys()
  assert len(want) == 845 and set(got) == set(want)
  bad = {k: (tuple(got[k].shape), v) for k, v in want.items() if tuple(got[k].shape) != v}
  assert not bad, bad
  order = [r.key for r in mapping.albef_rules(c.model)]
  assert order[-1] == 'codebook' and set(order) == set(want)


def test_paper_albef_key_order_is_albefs():
  """Order (dicts out of eval_shape are sorted, so check the rules) against the key list
  of ALBEF's own checkpoint, then CODIS's codebook."""
  with open(_REF_KEYS) as f:
    ref = f.read().split()
  order = [r.key for r in mapping.albef_rules(pretrain.get_config('paper').model)]
  assert order == ref + ['codebook']
