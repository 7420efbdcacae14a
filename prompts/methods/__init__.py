"""The prompt-learning methods, one module each as PEFT keeps one folder per tuner.

- `peft_types`: every ``peft_type`` an adapter may name, and what this server does with it (serve as input
  embeddings, serve as keys and values, materialize at registration, or refuse with the reason);
- `prefix_tuning`: KV-level prompts (PREFIX_TUNING, CARTRIDGE): checking an adapter against the model's KV
  layout, PEFT's reparameterization MLP, initial prefixes, training and scoring over a prefix cache;
- `multitask`: MULTITASK_PROMPT_TUNING materialized into one task's prompt;
- `cpt`: CPT (context-aware prompt tuning) checked and kept as the prompt PEFT prepends;
- `training`: what the trainer asks of a method (`TrainingMethod`), its two trainable methods (`PromptTuning`:
  input embeddings, scored through `inject`; `PrefixTuning`) and `method_for`.

Input-level prompts as uploaded (PROMPT_TUNING, P_TUNING) need no module of their own: `format.uploads` takes
their one matrix as it is.

Imported directly (this package re-exports nothing), as `format`.
"""
