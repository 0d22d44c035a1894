"""pretrainer: pretrain, fine-tune, prompt and scale Transformers."""
