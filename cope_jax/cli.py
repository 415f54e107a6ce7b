"""Command-line pieces the CLIs share, kept free of heavy imports so `--help` stays instant."""


def add_switch_arguments(parser, title: str = "how videos are read (defaults: the checkpoint's settings; paper App. H)"):
    """The docs/architecture.md §7 switches as CLI flags, the same in chat, evaluate and serve."""
    switches = parser.add_argument_group(title)
    switches.add_argument("--keyframes-per-gop", type=int,
                          help="keyframes per GOP; the other steps become Δ-tokens (Tab. 1; 1 = fastest, Fig. 4a)")
    switches.add_argument("--delta-mode", choices=["cope", "zero", "keyframes_only"],
                          help="cope: Δ-tokens as trained; zero: Δ-tokens zeroed (App. H.3); keyframes_only: P steps dropped (H.4)")
    switches.add_argument("--dense-frames", type=int, help="the LLaVA-Video baseline: N frames spread over the video, all keyframes")
    switches.add_argument("--max-gops", type=int, help="longer videos keep this many GOPs, spread uniformly")
    return switches


def switches_from_args(args) -> dict:
    """The switch flags given (None: keep the checkpoint's), as `load(**switches)` takes them."""
    return {name: getattr(args, name) for name in ("keyframes_per_gop", "delta_mode", "dense_frames", "max_gops")}

