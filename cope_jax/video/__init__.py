"""What training, inference, conversion and serving share about a video (docs/architecture.md §7).

- `switches`: the switch names (`SWITCHES`, `DELTA_MODES`) and their CLI flags (light: no heavy imports);
- `settings`: `VideoSettings`, everything that changes what the LLM reads, and its checked `with_switches`;
- `stream`: a video -> the steps the LLM reads (`plan_video`) -> static-shape arrays (`video_batch`);
- `prompt`: LLaVA-Video's prompt template and time instruction (chat and the stage-2 loss masks);
- `tokenizer`: a checkpoint's tokenizer (`load_tokenizer`) or the small ChatML one tiny configs and tests build.

Nothing is re-exported here, so that importing `cope_jax.video.switches` stays light.
"""
