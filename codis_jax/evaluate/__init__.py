"""Evaluation of CODIS models: retrieval (ITC + ITM re-ranking), retrieval fine-tuning,
zero-shot classification and Grad-CAM.

  metrics.py        TR/IR Recall@K from score matrices (ALBEF's itm_eval)
  retrieval.py      retrieval_metrics(model_config, params, retrieval_set, *, k_test, ...)
  run.py            evaluate_checkpoint(config, workdir), evaluate_emoji(...), run (--mode=eval)
  finetune_step.py  the pure retrieval fine-tuning step (ITC with image ids, ITM)
  finetune.py       the fine-tuning program (python -m codis_jax.evaluate.finetune)
  zeroshot.py       zero-shot classification with caption templates
  gradcam.py        per-word Grad-CAM on cross-attention (python -m codis_jax.evaluate.gradcam)
  weights.py        checkpoint -> params (student/EMA, interpolated position embeddings)
  data_sets.py      config.retrieval -> data specs, retrieval sets, the training stream

Command line: python -m codis_jax.evaluate --config=... --config.eval.checkpoint=PATH
--workdir=DIR. Nothing is imported here: importing the package costs nothing.
"""
