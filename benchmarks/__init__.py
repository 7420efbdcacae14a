"""`softprompt bench`: our engine and server against the usual ways of serving soft prompts.

Every method runs in one process, on the same loaded model, over the same requests, and generates
exactly `--new-tokens` tokens per request, so their tokens/s compare:

  (a) HF `generate`, one request at a time, the prompt prepended through `inputs_embeds`;
  (b) HF `generate`, every request in one left-padded batch through `inputs_embeds`;
  (c) PEFT `PeftModel.generate`, one batch per task, on a separate copy of the model;
  (d) our engine offline: admission + scheduler, no gRPC;
  (e) our server over gRPC on loopback, with concurrent streaming clients;
  (f) (e) while a server-side training job runs;
  (g) HF `generate`, one batch with a static cache and no prompt at all;
  (h) (d) with every request on one task;
  (i) (e) over the OpenAI-compatible HTTP API: streamed `/v1/completions`, run right after (e).

Ratios are against (a). All requests arrive at once (t0); latency runs from a request's arrival
(for (e), (f), (i): from its client's send) to its last token.

Modules: `workload` (settings, inputs, prompts, model), `baselines` (HF and PEFT), `engine_methods`
(our engine and server), `methods` (the catalogue), `results` and `measure` (timing one method),
`report` (the printed report), `cli` (the command line); apart from the report above, `sampling`
times the sampler alone (`python -m softprompt.benchmarks.sampling`), `churn` times decode while rows
leave and join every step (`python -m softprompt.benchmarks.churn`), `memory` counts the rows held at
once in one KV budget, paged pool against the old arena (`python -m softprompt.benchmarks.memory`),
`overload` drives a real server past its pool (`python -m softprompt.benchmarks.overload`),
`long_prompt` times running streams while long prompts arrive (`python -m
softprompt.benchmarks.long_prompt`), `replicas` times replicas over one S3 bucket (`python -m
softprompt.benchmarks.replicas`) and `ray_ingress` Ray Serve's gRPC ingress against a direct
connection (`python -m softprompt.benchmarks.ray_ingress`).
"""
