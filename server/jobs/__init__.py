"""Training jobs: server-side jobs that share the model's worker with serving (`training`).

May import `softprompt.prompts` (training, pipeline, registry) and the core's scheduler and errors; never a
transport.
"""
