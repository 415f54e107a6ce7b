"""lmms-eval model `cope_jax`: each request goes to a running `python -m cope_jax.serve`.

    lmms-eval --model cope_jax \
        --model_args base_url=http://127.0.0.1:8000,keyframes_per_gop=1,delta_mode=cope \
        --tasks perceptiontest_val_mc --batch_size 1 --output_path results/

Model args (all optional):
  base_url           the server, with or without /v1 (default http://127.0.0.1:8000)
  keyframes_per_gop, delta_mode, dense_frames, max_gops
                     how the server reads each video (docs/architecture.md §7); unset: the server's default
  max_new_tokens     answer length when the task's generation_kwargs give none (default 32, as cope_jax.evaluate)
  temperature        when the task gives none (default 0: greedy)
  model              the served model's name (checked by the server; default: whatever it serves)
  system_prompt      replaces the server's default system message
  api_key            the server's --api-key (default $COPE_API_KEY)
  timeout            seconds to wait for one answer (default 600)
  max_retries        tries again this many times, backing off 1, 2, 4, ... s, while the server cannot be reached (default 5)
A misspelt model arg is an error, not ignored. --batch_size is accepted and has no effect: the server
answers one question at a time, so requests go one by one (grouped by video, so the server's cache
of decoded videos is reused).

Each doc must give exactly one video file (doc_to_visual -> [path]); the path is sent as a file://
URL, so the server must be able to read it (same machine, under its --allowed-media-path).
The server returns no token scores: loglikelihood tasks are not supported.
"""

from __future__ import annotations

import difflib
import os

from loguru import logger
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from cope_lmms.client import SWITCHES, Client, CopeServerError, answer_text, chat_body, truncate

# What lmms-eval itself passes to every model (evaluator.py: batch_size, max_batch_size, device).
HARNESS_ARGS = ("batch_size", "max_batch_size", "device")
MODEL_ARGS = ("base_url", *SWITCHES, "max_new_tokens", "temperature", "model", "system_prompt", "api_key", "timeout",
              "max_retries", *HARNESS_ARGS)


def _integer(name: str, value, low: int = 0):
    """lmms-eval hands model args over as int, float ("-1" -> -1.0), bool or str: an integer or an error."""
    if value is None:
        return None
    try:
        number = float(value)
        if isinstance(value, bool) or not number.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"cope_jax model arg {name} must be an integer, got {value!r}") from None
    if number < low:
        raise ValueError(f"cope_jax model arg {name} must be >= {low}, got {value!r}")
    return int(number)


def _number(name: str, value):
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"cope_jax model arg {name} must be a number, got {value!r}") from None


class CopeJax(lmms):
    is_simple = True

    def __init__(self, base_url: str = "http://127.0.0.1:8000", keyframes_per_gop=None, delta_mode=None,
                 dense_frames=None, max_gops=None, max_new_tokens=32, temperature=0, model=None, system_prompt=None,
                 api_key=None, timeout=600, max_retries=5, batch_size=1, max_batch_size=None, device=None, **unknown):
        super().__init__()
        if unknown:
            name = min(unknown)
            close = difflib.get_close_matches(name, MODEL_ARGS, n=1)
            raise ValueError(f"cope_jax: unknown model arg {name!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(MODEL_ARGS)}"))
        self.switches = {"keyframes_per_gop": _integer("keyframes_per_gop", keyframes_per_gop, 1),
                         "dense_frames": _integer("dense_frames", dense_frames, 0),
                         "max_gops": _integer("max_gops", max_gops, 0),
                         "delta_mode": None if delta_mode is None else str(delta_mode)}
        self.max_new_tokens = _integer("max_new_tokens", max_new_tokens, 1)
        self.temperature = _number("temperature", temperature)
        self.model_name = None if model is None else str(model)
        self.system_prompt = None if system_prompt is None else str(system_prompt)
        self.visual_tokens: list = []  # per answer of the last generate_until, for its summary line
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1  # "auto" too: no effect anyway
        self.client = Client(base_url, api_key=api_key if api_key is not None else os.environ.get("COPE_API_KEY"),
                             timeout=_number("timeout", timeout), max_retries=_integer("max_retries", max_retries, 0))
        health = self.client.health()  # fails fast, with what to do, when the server is not up
        logger.info(f"cope_jax: server {self.client.root} is up ({health.get('status', '?')}); switches "
                    f"{ {k: v for k, v in self.switches.items() if v is not None} or 'the server defaults'}")

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def video_of(self, doc_to_visual, doc_id, task: str, split: str) -> str:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [visuals] if isinstance(visuals, str) else list(visuals or [])
        if len(visuals) != 1 or not isinstance(visuals[0], (str, os.PathLike)):
            kinds = ", ".join(type(v).__name__ for v in visuals) or "nothing"
            raise ValueError(f"cope_jax answers about exactly one video file per question; task {task!r} "
                             f"doc {doc_id} gave {len(visuals)} visual(s) ({kinds}) from doc_to_visual")
        return os.fspath(visuals[0])

    def ask(self, ctx: str, gen_kwargs: dict, video: str) -> GenerationResult:
        gen_kwargs = dict(gen_kwargs or {})
        temperature = gen_kwargs.get("temperature", self.temperature)
        if gen_kwargs.get("do_sample") is False or temperature is None:
            temperature = 0.0
        max_tokens = gen_kwargs.get("max_new_tokens") or self.max_new_tokens
        body = chat_body(video, ctx, max_tokens=int(max_tokens), temperature=float(temperature),
                         top_p=gen_kwargs.get("top_p") if float(temperature) > 0 else None, switches=self.switches,
                         model=self.model_name, system_prompt=self.system_prompt)
        reply = self.client.chat(body)
        text = truncate(answer_text(reply), gen_kwargs.get("until"))
        usage = reply.get("usage") or {}
        self.visual_tokens.append(usage.get("visual_tokens"))
        return GenerationResult(text, TokenCounts(input_tokens=usage.get("prompt_tokens"),
                                                  output_tokens=usage.get("completion_tokens")))

    def generate_until(self, requests) -> list[GenerationResult]:
        jobs = []
        for index, request in enumerate(requests):
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
            jobs.append((index, ctx, gen_kwargs, self.video_of(doc_to_visual, doc_id, task, split)))
        first_seen = {}
        for _, _, _, video in jobs:
            first_seen.setdefault(video, len(first_seen))
        jobs.sort(key=lambda job: (first_seen[job[3]], job[0]))  # a video's questions together: decoded once
        results: list = [None] * len(jobs)
        self.visual_tokens = []
        progress = tqdm(total=len(jobs), disable=(self.rank != 0), desc="Model Responding")
        try:
            for index, ctx, gen_kwargs, video in jobs:
                try:
                    results[index] = self.ask(ctx, gen_kwargs, video)
                except CopeServerError as e:
                    raise CopeServerError(f"cope_jax: {video}: {e}") from None
                progress.update(1)
        finally:
            progress.close()
        counted = [n for n in self.visual_tokens if isinstance(n, (int, float))]
        if counted:
            logger.info(f"cope_jax: {len(results)} answers, {sum(counted) / len(counted):.0f} visual tokens per video on average")
        return results

    def loglikelihood(self, requests):
        raise NotImplementedError("cope_jax: loglikelihood is not supported: the cope_jax server returns generated text, "
                                  "not token scores; use generate_until tasks (e.g. perceptiontest_val_mc, mvbench)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("cope_jax: multi-round generation is not supported; use single-turn generate_until tasks")
