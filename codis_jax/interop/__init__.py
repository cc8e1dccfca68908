"""PyTorch interop: ALBEF-layout and Hugging Face exports, pretrained-weight import.

  albef.to_albef_state_dict / from_albef_state_dict   ALBEF's pretraining state dict
  hf.to_hf_vit / to_hf_bert                           transformers ViTModel / BertModel dirs
  pretrained.apply_pretrained                         config.init.{bert,vit} -> params
  python -m codis_jax.interop.export                  the command line
None of these import torch at module level; torch is needed only for .pth/.bin files.
"""
