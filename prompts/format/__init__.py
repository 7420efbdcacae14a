"""The PEFT prompt-tuning folder format a soft prompt is uploaded, stored and exported in.

One job per module, imported directly (this package re-exports nothing):

- `layout`: the names of a version's files and of its one tensor;
- `tensor`: `PromptTensor`, the validated prompt matrix, and the checks every prompt passes against a base model;
- `uploads`: parsing untrusted uploads (a PEFT adapter or a raw matrix) into a `PromptTensor`;
- `stored`: a stored version's files as bytes, reading them back, and exporting them as a folder.
"""
