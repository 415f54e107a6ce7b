"""The OpenAI-compatible server behind `python -m cope_jax.serve` (the CLI itself is cope_jax/serve.py).

  openai_schema   the chat-completions wire format: request parsing and checks (ChatRequest,
                  RequestError), reply shapes (Reply, finish_reason, usage); no model, no HTTP
  service         the model side: MediaPolicy, VideoCache, ConversationChat, Service, load_service
  http            the stdlib http.server layer: Handler, Server, make_server, ROUTES
"""
