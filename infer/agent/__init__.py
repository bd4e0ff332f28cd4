"""The agent layer between a person and the model (issue 16; contracts in the notes' AGENT_API.md).

One concept per module:
  sanitize   Unicode NFC and removal of control, tag, bidi and zero-width characters, with a length limit.
  memory     conversations per chat session in SQLite, and `assemble`: the newest turns that fit a model's window.
  privacy    which sensitive kinds (e-mail, phone, Luhn-valid card, secret) a text contains.
  backends   local engines and remote OpenAI-compatible endpoints behind one streaming interface.
  route      the routing policy (YAML) that picks a backend and its fallbacks, with a stated reason.
  service    `Agent`: one chat turn (sanitize, store, assemble, route, stream, store the answer).
  http       the /v1/agent/* endpoints mounted on the inference server.
  page/      the static chat page served at `/`.
"""
