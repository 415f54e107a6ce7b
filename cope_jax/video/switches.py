"""The switches that change how a video is read (docs/architecture.md §7), named once for every entry
point: the training config, chat, evaluate, serve, convert and the lmms-eval client.

Kept free of heavy imports so that `--help` of every CLI stays instant.
"""

from __future__ import annotations

# "cope" = Δ-tokens as trained; "zero" = Δ-tokens zeroed at the Δ-encoder's output (paper App. H.3);
# "keyframes_only" = P steps dropped from the stream (App. H.4).
DELTA_MODES = ("cope", "zero", "keyframes_only")

# What the prompt says about time after the video. The paper is silent (it keeps LLaVA-Video's
# prompt); "full" = LLaVA-Video's preamble with every sampled step's timestamp (what checkpoints are
# trained with), "duration" = its first sentence only (duration and step count: a few dozen tokens
# whatever the video's length, so a live question does not prefill a list that grows with the
# stream), "none" = no preamble.
TIME_INSTRUCTIONS = ("full", "duration", "none")

# Switch name -> type, as a request, a CLI flag or a sweep entry gives it.
SWITCHES = {"keyframes_per_gop": int, "delta_mode": str, "dense_frames": int, "max_gops": int, "time_instruction": str}


def add_switch_arguments(parser, title: str = "how videos are read (defaults: the checkpoint's settings; paper App. H)"):
    """The switches as CLI flags, the same in chat, evaluate and serve."""
    switches = parser.add_argument_group(title)
    switches.add_argument("--keyframes-per-gop", type=int,
                          help="keyframes per GOP; the other steps become Δ-tokens (Tab. 1; 1 = fastest, Fig. 4a)")
    switches.add_argument("--delta-mode", choices=list(DELTA_MODES),
                          help="cope: Δ-tokens as trained; zero: Δ-tokens zeroed (App. H.3); keyframes_only: P steps dropped (H.4)")
    switches.add_argument("--dense-frames", type=int, help="the LLaVA-Video baseline: N frames spread over the video, all keyframes")
    switches.add_argument("--max-gops", type=int, help="longer videos keep this many GOPs, spread uniformly")
    switches.add_argument("--time-instruction", choices=list(TIME_INSTRUCTIONS),
                          help="the preamble after the video: full = LLaVA-Video's, every step's timestamp (as trained); "
                               "duration = its length and step count only (questions about a long or live video "
                               "prefill a few dozen tokens, not ~7 per second of video); none")
    return switches


def switches_from_args(args) -> dict:
    """The switch flags given (None: keep the checkpoint's), as `VideoSettings.with_switches` takes them."""
    return {name: getattr(args, name) for name in SWITCHES}
