"""Training jobs: server-side jobs that share the model's worker with serving (`training`), and what they take
and report (`types`: `TrainJobRequest`, `JobSnapshot`; torch-free, so the transports read them as they are).

May import `softprompt.prompts` (training, pipeline, registry) and the core's scheduler and errors; never the
service layer or a transport. This package itself imports nothing, so importing `types` stays torch-free.
"""
