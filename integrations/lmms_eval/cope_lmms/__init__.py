"""lmms-eval model `cope_jax`: a thin HTTP client of `python -m cope_jax.serve`.

    lmms-eval --model cope_jax --model_args base_url=http://127.0.0.1:8000,keyframes_per_gop=1 --tasks ...

It imports nothing from cope_jax: the model runs in the server's environment, lmms-eval in its own
(`make lmms-eval-venv`). Each request sends the doc's video path (file://) and lmms-eval's prompt.
"""

__version__ = "0.1.0"
