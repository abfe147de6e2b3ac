"""Training steps of the recipes: ``draft`` (distillation), ``preferences``, ``dpo`` (TRL + PEFT LoRA),
``value`` (value-head reward model), ``reward`` (TRL RewardTrainer). Run ``specalign train STEP --config
recipe.yaml`` or ``python -m specalign.train STEP ...`` (also under ``accelerate launch``)."""
